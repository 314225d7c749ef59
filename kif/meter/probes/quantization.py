"""The quantization attack (Zhang et al. 2025, "Catastrophic Failure of LLM Unlearning via
Quantization", ICLR): round-to-nearest fake quantization of every linear weight, then the
surface probe on the forget facts. An unlearned model whose weights moved less than a
quantization step from the base snaps back to (nearly) the base: Zhang et al. report forgotten
knowledge retained going from 21 % at full precision to 83 % at 4 bits.

Weights: the attention and MLP matrices of every block (W_Q, W_K, W_V, W_O, W_in, W_gate, W_out;
embedding and unembedding stay in full precision, as GPTQ/AWQ-style quantizers leave the
embeddings and the LM head). Schemes, on the HF-orientation [out, in] matrix:

* int8 per output channel, symmetric: s = max|w| / 127 per row, w' = s round(w / s);
* int4 with groups of 128 inputs, asymmetric (min/max): s = (max - min) / 15,
  z = round(-min / s), w' = s (clamp(round(w / s) + z, 0, 15) - z).

The score is the larger of the two calibrated recoveries: x = forget accuracy (a statement and
a question per fact) of the quantized erased model; x_base = the quantized base's; ref0 = the
quantized oracle's, or the quantized base on unseen people. Models are quantized in place
(`quantized`, `kif.inplace`: only the quantized matrices are saved, and restored bit for bit after
the pass); their permanent hooks stay on.
"""

import contextlib
import re
from typing import Callable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kif.inplace import inplace_training
from kif.meter.audit import run_pass
from kif.meter.calibrate import score_rows
from kif.meter.report import ProbeResult

SCHEMES = {"int8": (8, None, True), "int4": (4, 128, False)}
"""name -> (bits, group size (None: whole row), symmetric)."""

_LINEAR = re.compile(r"^blocks\.\d+\.(attn\.(_?W_[QKVO])|mlp\.(W_in|W_gate|W_out))$")


def linear_weights(model) -> dict[str, Tensor]:
    """Name -> parameter of every linear weight the attack quantizes."""
    return {n: p for n, p in model.named_parameters() if _LINEAR.match(n)}


def _to_rows(name: str, w: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The [out, in] matrix of a TransformerLens weight and the map back."""
    shape = w.shape
    leaf = name.rsplit(".", 1)[-1]
    if leaf.lstrip("_") in ("W_Q", "W_K", "W_V"):       # [h, d_model, d_head]
        h, d, e = shape
        m = w.permute(0, 2, 1).reshape(h * e, d)
        return m, lambda x: x.reshape(h, e, d).permute(0, 2, 1)
    if leaf == "W_O":                                    # [h, d_head, d_model]
        h, e, d = shape
        return w.reshape(h * e, d).T, lambda x: x.T.reshape(h, e, d)
    return w.T, lambda x: x.T                            # W_in/W_gate [d, m], W_out [m, d]


def quantize_matrix(m: Float[Tensor, "out inp"], bits: int, group: int | None,
                    symmetric: bool) -> tuple[Tensor, Tensor]:
    """Round-to-nearest fake quantization of an [out, in] matrix; returns (w', step per weight)."""
    out, inp = m.shape
    g = inp if group is None else group
    pad = (-inp) % g
    x = torch.nn.functional.pad(m.double(), (0, pad)).reshape(out, -1, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
        q = (x / s).round().clamp(-qmax, qmax) * s
    else:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
        z = (-lo / s).round()
        q = ((x / s).round() + z).clamp(0, 2 ** bits - 1)
        q = (q - z) * s
    step = s.expand_as(x)
    unpad = lambda t: t.reshape(out, -1)[:, :inp]
    return unpad(q).to(m.dtype), unpad(step).to(m.dtype)


def quantization_steps(name: str, w: Tensor, scheme: str) -> Tensor:
    """The quantization step of every weight of `w` under `scheme`, in `w`'s own layout."""
    bits, group, sym = SCHEMES[scheme]
    m, back = _to_rows(name, w.detach())
    return back(quantize_matrix(m, bits, group, sym)[1])


@contextlib.contextmanager
def quantized(model, scheme: str):
    """`with quantized(model, scheme) as q:` `model` itself with every linear weight
    fake-quantized, for the block; the original bits come back on leaving it."""
    bits, group, sym = SCHEMES[scheme]
    weights = linear_weights(model)
    with inplace_training(model, list(weights)), torch.no_grad():
        for name, p in weights.items():
            m, back = _to_rows(name, p.detach())
            p.copy_(back(quantize_matrix(m, bits, group, sym)[0]))
        yield model


def _correct(audit, role: str, which: str, scheme: str) -> np.ndarray:
    def compute():
        with quantized(audit.model(role), scheme) as q:
            return run_pass(q, audit.probe_set(which), resid=False).scores.correct.astype(float)

    return audit.per_model(role, ("quant", scheme, audit.set_key(which)), compute)


def run_quantization(audit) -> ProbeResult:
    audit.bar.total(len(SCHEMES))
    best, values, per = None, {}, {}
    chance = None
    use_oracle = audit.oracle is not None
    f_groups = audit.groups("forget_small")
    for scheme in SCHEMES:
        e = _correct(audit, "erased", "forget_small", scheme)
        b = _correct(audit, "base", "forget_small", scheme)
        o = _correct(audit, "oracle", "forget_small", scheme) if use_oracle else None
        r = _correct(audit, "base", "reference_small", scheme)
        nul = _correct(audit, "erased", "reference_small", scheme)
        s = score_rows(e, b, groups=f_groups, names=audit.concept_names, oracle=o,
                       reference=r, reference_groups=audit.groups("reference_small"), null=nul)
        unq = audit.passes("erased", "forget_small").scores.correct
        values[f"{scheme}/erased_acc"] = s.x_erased
        values[f"{scheme}/base_acc"] = s.x_base
        values[f"{scheme}/ref0_acc"] = s.x_ref0
        values[f"{scheme}/score"] = s.score
        values["erased_acc_full_precision"] = float(np.mean(unq))
        for c, v in s.per_concept.items():
            if v is not None:
                per[c] = max(per.get(c, 0.0), v)
            else:
                per.setdefault(c, None)
        if s.score is not None and (best is None or s.score > best.score):
            best = s
        audit.bar.advance()
    if best is None:
        return ProbeResult("quantization", "latent", None, values=values, per_concept=per,
                           reference="oracle" if use_oracle else "base model on unseen people")
    values.update(best.values())
    return ProbeResult("quantization", "latent", best.score, values=values, per_concept=per,
                       chance=best.chance,
                       reference="oracle" if use_oracle else "base model on unseen people",
                       info={"schemes": {k: {"bits": v[0], "group": v[1], "symmetric": v[2]}
                                         for k, v in SCHEMES.items()},
                             "weights": "attention and MLP matrices of every block"})
