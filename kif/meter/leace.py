"""LEACE: LEAst-squares Concept Erasure (Belrose et al. 2023, "LEACE: Perfect linear concept
erasure in closed form", Theorem 4.3), as a fitter -> frozen eraser (DESIGN convention 1,
after EleutherAI's concept-erasure).

For features x with covariance Sigma_XX and cross-covariance Sigma_XZ with the concept labels z
(one-hot), the eraser

    r(x) = x - W^+ P_{W Sigma_XZ} W (x - E[x]),    W = (Sigma_XX^{1/2})^+ (whitening),

with P_A the orthogonal projection onto the column space of A, is the smallest change (in the
Mahalanobis / least-squares sense) after which Cov(r(x), z) = 0: every class has the same mean,
so no linear classifier beats a constant one (for convex losses), and a least-squares classifier
trained on erased features has exactly zero weights. The meter uses it to check itself: its
linear probes must fall to chance on a layer erased this way.

Statistics are accumulated in float64 (streaming means and co-moments, Chan et al.), the eraser
is applied in the input's dtype.
"""

import dataclasses

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class LeaceEraser:
    """x -> x - ((x - bias) proj_right^T) proj_left^T (Belrose et al. 2023, Thm. 4.3)."""

    proj_left: Float[Tensor, "d_model k"]
    proj_right: Float[Tensor, "k d_model"]
    bias: Float[Tensor, " d_model"]

    def __call__(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pl, pr, b = (t.to(x.device, torch.float64) for t in (self.proj_left, self.proj_right,
                                                              self.bias))
        xd = x.double()
        return (xd - ((xd - b) @ pr.T) @ pl.T).type_as(x)

    @property
    def rank(self) -> int:
        return int(self.proj_left.shape[1])

    def hook(self):
        """A TransformerLens hook applying the eraser at every position."""
        def fn(act, hook):
            return self(act)
        return fn


class LeaceFitter:
    """Accumulate x and one-hot z statistics (`update` returns self); `eraser` is the frozen
    LEACE eraser of everything seen so far."""

    def __init__(self, d: int, k: int, *, tol: float = 1e-8):
        self.d, self.k, self.tol = d, k, tol
        self.n = 0
        self.mean_x = torch.zeros(d, dtype=torch.float64)
        self.mean_z = torch.zeros(k, dtype=torch.float64)
        self.xx = torch.zeros(d, d, dtype=torch.float64)  # sum of centred outer products
        self.xz = torch.zeros(d, k, dtype=torch.float64)

    def update(self, x: Float[Tensor, "n d_model"],
               z: Int[Tensor, " n"] | Float[Tensor, "n k"]) -> "LeaceFitter":
        x = x.reshape(-1, self.d).detach().cpu().double()
        if z.dim() == 1:
            z = torch.nn.functional.one_hot(z.long().cpu(), self.k).double()
        z = z.reshape(-1, self.k).detach().cpu().double()
        m = x.shape[0]
        if m == 0:
            return self
        n_new = self.n + m
        dx = x - self.mean_x
        dz = z - self.mean_z
        self.mean_x = self.mean_x + dx.sum(0) / n_new
        self.mean_z = self.mean_z + dz.sum(0) / n_new
        # co-moments with the updated means (Welford / Chan: exact for any batch split)
        self.xx += dx.T @ (x - self.mean_x)
        self.xz += dx.T @ (z - self.mean_z)
        self.n = n_new
        return self

    @property
    def eraser(self) -> LeaceEraser:
        if self.n < 2:
            raise ValueError("LEACE needs at least two samples")
        sigma = self.xx / (self.n - 1)
        cross = self.xz / (self.n - 1)
        evals, evecs = torch.linalg.eigh(sigma)
        keep = evals > self.tol * evals.max().clamp_min(1e-300)
        evals, evecs = evals[keep], evecs[:, keep]
        w = evecs @ torch.diag(evals.rsqrt()) @ evecs.T       # (Sigma^{1/2})^+
        w_inv = evecs @ torch.diag(evals.sqrt()) @ evecs.T    # Sigma^{1/2}
        u, s, _ = torch.linalg.svd(w @ cross, full_matrices=False)
        u = u[:, s > self.tol * s.max().clamp_min(1e-300)] if s.numel() else u[:, :0]
        return LeaceEraser(proj_left=w_inv @ u, proj_right=u.T @ w, bias=self.mean_x.clone())
