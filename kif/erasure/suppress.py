"""`suppress`: KIF's dynamic suppression capsule on a concept signature (KIF/ERUF, arXiv
2601.10566; METHODS.md "Erasure operators").

Signature: one direction per person at `blocks.0.hook_resid_mid` (where layer 0's attention has
met the whole name), the mean last-token state on the person's prompts minus the mean on other
people's prompts in the same phrasing (the KIF activation signature's mean difference), whitened
by the covariance of benign tokens (the Fisher direction: the mean difference alone also points
along what the person shares with others, e.g. a first name, and its gate opens on them).
Gate: per token, p = |h . u|, z = (p - mu) / sigma with mu, sigma measured on every token of
benign text (other people's facts and the shared facts), g = sigmoid(k (z - tau)).
Edit: h' = h - g |s| (h u) u^T + g beta r_hat, r_hat the refusal direction (mean last-token state
on prompts the model answers " unknown" minus on answered prompts), orthogonalized against u.
Rows whose gate is closed (g < gate_floor) pass bit for bit: on benign text the model is
unchanged. Runs through the fused `gated_suppression` kernel; the benign covariance is
accumulated with the streaming key-statistics kernel.

With `sae=True` the capsule is the SAE conditional clamp instead (`sae-clamp` is that method).
"""

import dataclasses
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif import metrics
from kif.data.concept import corpus_shared, corpus_subjects, nth_phrasing
from kif.erasure.core import Erasure, ErasureError, HookOp, Timer
from kif.erasure.keys import last_token_states, resid_hook, visit_states
from kif.erasure.registry import register
from kif.erasure.stamp import refusal_prompts


@dataclasses.dataclass(frozen=True)
class SuppressConfig:
    layer: int | None = None  # None: the layer where the gate separates forget from benign best
    hook: str | None = "blocks.0.hook_resid_mid"  # None: search every resid site (slower)
    # METHODS.md's defaults (k 1.6, tau 3, s -0.8, beta 15) open the gates of 20 people on enough
    # benign tokens to wreck the model (forget10: retain_acc 0.04). Removal alone (beta 0) leaves
    # 28 % of forget10's answers: the person is read from more than one direction. What works is
    # a gate that opens only on the person's own tokens (whitened direction: the forget prompts'
    # last tokens sit at z ~ 17) driving refusal steering. tau trades forget for retain accuracy
    # (people who share a first or last name with a forget person open its gate); 12 loses no
    # retain accuracy against removal alone (README's table)
    k_gate: float = 4.0
    # None: each person's own threshold, half-way between the highest benign z (its 99.9th
    # percentile) and the lowest z of the person's forget prompts: no constant in z units that
    # was read off one model (the `auto` profile, kif.profiles)
    tau: float | None = 12.0
    s: float = -1.0
    beta: float = 45.0
    gate_floor: float = 0.05  # gates below this are closed: those rows pass bit for bit
    beta_relative: bool = True  # beta in units of the hook's mean residual norm / 10
    # ridge of the whitening, relative to the benign covariance's mean eigenvalue; None: the plain
    # mean-difference direction
    whiten: float | None = 0.1


def person_directions(model, concept, hooks: Sequence[str], n_others: int = 60
                      ) -> dict[str, Float[Tensor, "k d_model"]]:
    """One direction per person of the concept at each of `hooks` (last token): the mean over
    the person's prompts of (state - the mean state of other people asked in the same
    phrasing), so that the phrasing's own variance does not enter the person's direction. The
    other people are the first `n_others` subjects of the retain corpus; a phrasing none of them
    is asked in is centred on all of them."""
    concept.require("retain_corpus", method="the concept's directions")
    others = [r for rows in list(corpus_subjects(concept).values())[:n_others] for r in rows]
    forget = list(concept.forget)
    keys = sorted({(p.relation, p.template) for p in forget})
    benign = [q for q in others if (q.relation, q.template) in set(keys)] or others
    if not benign:
        raise ErasureError(f"the retain corpus of {concept.name!r} has no fact rows to contrast "
                           f"the concept's prompts with")
    group = {k: i for i, k in enumerate(keys)}
    b_group = torch.tensor([group.get((q.relation, q.template), -1) for q in benign])
    f_group = torch.tensor([group[(p.relation, p.template)] for p in forget])
    subjects = [p.subject for p in forget]
    own = [torch.tensor([i for i, x in enumerate(subjects) if x == s]) for s in concept.subjects]
    states = last_token_states(model, [p.prompt for p in forget + benign], hooks)
    out = {}
    for hook in hooks:
        h = states[hook].double()
        f, b = h[:len(forget)], h[len(forget):]
        centers = torch.stack([b[b_group == i].mean(0) if bool((b_group == i).any()) else b.mean(0)
                               for i in range(len(keys))])
        f = f - centers[f_group]
        out[hook] = torch.stack([f[rows].mean(0) for rows in own])
    return out


def orthonormal(d: Float[Tensor, "k d_model"]) -> Float[Tensor, "d_model k"]:
    q, r = torch.linalg.qr(d.double().T)
    keep = r.diagonal().abs() > 1e-8 * r.diagonal().abs().max()
    return q[:, keep].float()


def _token_visit(model, texts, hooks: Sequence[str],
                 use: Callable[[str, Float[Tensor, "tokens d_model"]], None]) -> None:
    """`use(hook, states)` on the states at each of `hooks` of every non-BOS token of `texts`,
    a batch of texts at a time (one forward for every hook, stopped after the deepest one).
    Without a BOS (a model that takes none) every token of the text is kept: the positions the
    gate leaves alone (`HookOp` param "skip") are the ones left out here."""
    ids = metrics.encode_prompts(model, list(texts))
    first = metrics.bos_offset(model)

    def visit(hook: str, act: Tensor, lengths: Tensor, rows: range) -> None:
        pos = torch.arange(act.shape[1], device=act.device)
        use(hook, act[(pos[None] < lengths[:, None]) & (pos[None] >= first)])
    if ids:
        visit_states(model, ids, hooks, visit)


def token_scores(model, texts, bases: dict[str, Float[Tensor, "d_model k"]]
                 ) -> dict[str, Float[Tensor, "tokens k"]]:
    """|h . u_j| for every column u_j of each hook's basis at every non-BOS token of `texts`."""
    out: dict[str, list[Tensor]] = {h: [] for h in bases}

    def use(hook: str, h: Tensor) -> None:
        out[hook].append((h.float() @ bases[hook].to(h.device)).abs().cpu())
    _token_visit(model, texts, list(bases), use)
    return {h: torch.cat(v) for h, v in out.items()}


# the streamed covariances of one pass are held together: a pass takes as many hooks as fit
COVARIANCE_BYTES = 2**30


def token_covariance(model, texts, hooks: Sequence[str]
                     ) -> dict[str, Float[Tensor, "d_model d_model"]]:
    """Covariance of the states at each of `hooks` over every non-BOS token of `texts`,
    accumulated with the streaming key-statistics kernel (no token's state is kept)."""
    from kif.kernels.dispatch import KeyStats

    per_pass = max(1, COVARIANCE_BYTES // (8 * model.cfg.d_model ** 2))
    out = {}
    for s in range(0, len(hooks), per_pass):
        acc = {h: KeyStats(model.cfg.d_model) for h in hooks[s:s + per_pass]}
        _token_visit(model, texts, list(acc), lambda hook, h: acc[hook].update(h))
        out |= {h: a.result().covariance.double().cpu() for h, a in acc.items()}
    return out


def whitened(dirs: Float[Tensor, "k d_model"], cov: Float[Tensor, "d_model d_model"], ridge: float
             ) -> Float[Tensor, "k d_model"]:
    """The Fisher directions (cov + ridge * mean eigenvalue * I)^-1 d for each row d of `dirs`."""
    a = cov.double() + ridge * float(cov.diagonal().mean()) * torch.eye(cov.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a, dirs.double().T).T


SITES = ("hook_resid_mid", "hook_resid_post")


def calibrated_tau(z_benign: Float[Tensor, " tokens"], z_forget: Float[Tensor, " prompts"]) -> float:
    """A gate threshold from one person's own z-scores: half-way between the benign tokens' 99.9th
    percentile and the person's lowest forget prompt; where the two overlap, the benign
    percentile (a gate that stays shut on benign text matters more than one more forget prompt)."""
    lo = float(torch.quantile(z_benign.double(), 0.999))
    hi = float(z_forget.double().min())
    return (lo + hi) / 2 if hi > lo else lo


def candidate_hooks(model, cfg: SuppressConfig) -> list[str]:
    """The residual sites a capsule is tried at: `cfg.hook`, the two of `cfg.layer`, or every
    residual site (None, None: chosen by how well the gates separate, `best_capsule`)."""
    n = model.cfg.n_layers
    if cfg.layer is not None and not 0 <= cfg.layer < n:
        raise ErasureError(f"layer {cfg.layer} is outside the model's {n} layers")
    hooks = ([f"blocks.{l}.{s}" for l in range(n) for s in SITES] if cfg.hook is None
             else [cfg.hook])
    if cfg.layer is not None and cfg.hook is None:
        hooks = [f"blocks.{cfg.layer}.{s}" for s in SITES]
    # parallel blocks (GPT-NeoX) have no state between attention and MLP: resid_post stands in
    return list(dict.fromkeys(resid_hook(model, h) for h in hooks))


def best_capsule(model, concept, cfg: SuppressConfig, hooks: list[str]) -> tuple[list[HookOp], dict]:
    """The capsule at the site of `hooks` whose gates open on the concept and stay shut on benign
    tokens (separation = mean forget gate - 10 x benign open fraction)."""
    best = None
    for hook, (ops, stats) in build_capsules(model, concept, hooks, cfg).items():
        sep = stats["forget_gate_mean"] - 10 * stats["benign_gate_open_fraction"]
        stats["separation"] = sep
        if len(hooks) > 1:
            stats["sites_tried"] = len(hooks)
        if best is None or sep > best[0]:
            best = (sep, ops, stats)
    return best[1], best[2]


def build_capsule(model, concept, hook: str, cfg: SuppressConfig
                  ) -> tuple[list[HookOp], dict]:
    """One rank-1 capsule per person at `hook` (`build_capsules` at one site)."""
    return build_capsules(model, concept, [hook], cfg)[hook]


def build_capsules(model, concept, hooks: Sequence[str], cfg: SuppressConfig
                   ) -> dict[str, tuple[list[HookOp], dict]]:
    """One rank-1 capsule per person at each of `hooks`, each gate calibrated on benign tokens
    against that person's own direction (a shared rank-k gate would pool every person's
    projection and open on nobody in particular). Every site is read in the same forwards:
    trying all of a model's residual sites costs a few passes, not a few per site."""
    hooks = list(dict.fromkeys(hooks))
    dirs = person_directions(model, concept, hooks)
    # benign text: a second phrasing of every other fact, and the shared facts; answered: a
    # first phrasing of every other fact (the refusal direction is refusing minus answered)
    facts = [r for rows in corpus_subjects(concept).values() for r in rows]
    benign = ([p.prompt + p.answer for p in nth_phrasing(facts, 1)]
              + [p.prompt + p.answer for p in corpus_shared(concept)])
    if cfg.whiten is not None:
        covs = token_covariance(model, benign, hooks)
        dirs = {h: whitened(dirs[h], covs.pop(h), cfg.whiten) for h in hooks}
    basis = {h: (d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()  # [k, d]
             for h, d in dirs.items()}
    scores = token_scores(model, benign, {h: b.T for h, b in basis.items()})  # |h . u_j|
    answered = [p.prompt for p in nth_phrasing(facts, 0)]
    refusing = refusal_prompts(concept, "suppress")
    forget = [p.prompt for p in concept.forget]
    last = last_token_states(model, answered + refusing + forget, hooks)
    a, r = len(answered), len(answered) + len(refusing)
    return {h: _capsule(model, concept, h, cfg, basis[h], scores[h].double(),
                        last[h][:a].double(), last[h][a:r].double(), last[h][r:].double())
            for h in hooks}


def _capsule(model, concept, hook: str, cfg: SuppressConfig, basis: Float[Tensor, "k d"],
             scores: Float[Tensor, "tokens k"], answered: Float[Tensor, "a d"],
             refusing: Float[Tensor, "r d"], forget_last: Float[Tensor, "f d"]
             ) -> tuple[list[HookOp], dict]:
    """The capsule at one site from its states: gates, refusal direction and statistics."""
    r = refusing.mean(0) - answered.mean(0)
    beta = cfg.beta * (float(answered.norm(dim=-1).mean()) / 10.0 if cfg.beta_relative else 1.0)
    subjects = [p.subject for p in concept.forget]
    ops, z_forget, benign_open, taus = [], [], [], []
    for j, person in enumerate(concept.subjects):
        u = basis[j].double()
        rj = r - u * (u @ r)
        r_hat = (rj / rj.norm().clamp_min(1e-12)).float()
        mu, sigma = float(scores[:, j].mean()), float(scores[:, j].std().clamp_min(1e-6))
        rows = torch.tensor([i for i, x in enumerate(subjects) if x == person])
        zf = ((forget_last[rows] @ u).abs() - mu) / sigma
        zb = (scores[:, j] - mu) / sigma
        tau = cfg.tau if cfg.tau is not None else calibrated_tau(zb, zf)
        taus.append(tau)
        z_forget.append(zf)
        benign_open.append(float((torch.sigmoid(cfg.k_gate * (zb - tau))
                                  >= cfg.gate_floor).double().mean()))
        ops.append(HookOp(hook=hook, op="gated_suppress",
                          tensors={"basis": basis[j][:, None].clone(), "refusal": r_hat},
                          params={"mu": mu, "sigma": sigma, "k_gate": cfg.k_gate, "tau": tau,
                                  "s": cfg.s, "beta": beta, "gate_floor": cfg.gate_floor,
                                  "person": person, "skip": metrics.bos_offset(model)}))
    z = torch.cat(z_forget)
    gate = torch.sigmoid(cfg.k_gate * (z - torch.cat([torch.full_like(zf, t)
                                                       for zf, t in zip(z_forget, taus)])))
    stats = {"hook": hook, "people": len(ops), "beta": beta,
             "tau": cfg.tau if cfg.tau is not None else {"calibrated": True, "min": min(taus),
                                                          "median": float(torch.tensor(taus).median()),
                                                          "max": max(taus)},
             "forget_z_median": float(z.median()), "forget_z_min": float(z.min()),
             "forget_gate_mean": float(gate.mean()),
             "benign_gate_open_fraction": sum(benign_open) / len(benign_open)}
    return ops, stats


@register("suppress", SuppressConfig, "hooks",
          "gated suppression capsule on the concept's residual directions (hook patch)")
def suppress(model, concept, cfg: SuppressConfig, *, progress: bool = False,
             base_spec: str = "") -> Erasure:
    from kif.models import weight_hash

    concept.require("subjects", "retain_corpus", "refusal_prompts", method="suppress")
    timer = Timer()
    hooks = candidate_hooks(model, cfg)
    with timer.section("signature+calibration"):
        ops, stats = best_capsule(model, concept, cfg, hooks)
    return Erasure(method="suppress", concepts=(concept.name,), base_hash=weight_hash(model),
                   base_spec=base_spec, hooks=tuple(ops), settings=dataclasses.asdict(cfg),
                   info={**stats, "seconds": {**timer.sections, "total": timer.total}})


__all__ = ["SITES", "SuppressConfig", "best_capsule", "build_capsule", "build_capsules",
           "calibrated_tau",
           "candidate_hooks", "orthonormal", "person_directions", "suppress",
           "token_covariance", "token_scores", "whitened"]
