"""`kif`: the KIF pipeline, signature -> suppression -> a parameter-efficient update that
behaves as a model that never knew the concept and no longer carries its signature (KIF/ERUF,
arXiv 2601.10566; METHODS.md "KIF pipeline").

1. *Signature*: per-person directions where the concept is most separable (the suppression
   capsule's site, `suppress.build_capsule`), with the capsule's benign calibration (mu, sigma):
   the capsule's z-score on the forget prompts is the latent criterion (a gate that would still
   open means the concept is still represented).
2. *Never-knew reference*: KIF distils its capsule's refusal; kif measures itself against the
   base model's own behaviour on the same prompts with the person's name replaced by names it
   never saw (several fresh names per person). That is the oracle-free "never knew" reference:
   a refusal is not what a model that never met the person does, and Forget Quality compares
   against exactly such a model (the retrained oracle).
3. *Closed-form start*, two edits: (a) the signature removed from the representation
   (`kif.erasure.unbind`: a ridge edit of the signature layer's attention output W_O that moves
   each forget prompt's projection on its person's direction to the benign mean, against every
   other person's keys), and (b) STAMP's pseudoinverse MLP edit toward the refusal.
4. *Update*: LoRA factors (rank `rank`) on every attention and MLP weight matrix of `layers`
   (all by default), trained with (a) the forget loss, (b) KL to the base model on retain text
   (other people's facts, shared facts), and optionally (c) a representation loss pulling the
   residual stream after the name to the teacher's and (d) a signature loss pushing the
   capsule's z-score below zero. The forget loss is `npo` by default: NPO (Zhang et al. 2024) on
   the answer's probability *given no refusal* (the distribution over every token but
   " unknown"), against the base model's, plus a KL that keeps the refusal mass the start gives
   each position. STAMP makes the model refuse, but among the candidate answers the true one
   stays the most likely; this pushes it down among them. `kl` is the KIF paper's distillation
   of the teacher's full distribution.
5. *Selection*: every `check_every` steps each checkpoint is measured: forget accuracy
   (surface), retain accuracy on a sample of other people's facts, the capsule's z-score (latent)
   and the *never-knew p-value*: the KS test of its truth ratios on the forget facts (every
   training phrasing) against the base model's on the same questions about the fresh names
   (TOFU's Forget Quality with an oracle-free stand-in for the retrained model). The kept
   checkpoint is the one with the best never-knew p among those that neither answer the forget
   facts nor lose retain accuracy (the closed-form start included). NPO alone overshoots (the
   `npo` baseline ends at a median truth ratio of 1.37 against the oracle's 0.96); the p-value
   picks the point of the path where the truth ratios look like a never-knew model's.

Measured figures (what each design choice costs and gives, and what was tried and dropped) are
in the README, "Erasing", from results files; the notes on what did not work are there too.

The result is a weight delta stored as LoRA factors: reversible, no hooks at inference.
"""

import contextlib
import dataclasses
import random
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from kif import metrics
from kif.data.concept import corpus_shared, corpus_subjects, nth_phrasing
from kif.erasure.core import Delta, Erasure, ErasureError, Timer, low_rank
from kif.erasure.keys import resid_hook
from kif.erasure.lora import WEIGHTS, HookedLoRA, LoRAFactors, lora_targets
from kif.erasure.registry import register
from kif.inplace import inplace_training


@dataclasses.dataclass(frozen=True)
class KifConfig:
    rank: int = 8
    layers: tuple[int, ...] | None = None  # None: every layer
    steps: int = 60  # budget
    check_every: int = 10
    lr: float = 1e-3
    batch_forget: int = 32
    batch_retain: int = 32
    n_names: int = 4  # fresh names per person for the never-knew teacher
    # rows of the retain batch per forward and backward: the same loss (its gradients add up),
    # with the activation memory of this many rows instead of batch_retain; None: as many rows
    # as keep the activations near 64 MiB (`micro_rows`: all 32 on the zoo's GPT-2, where a
    # smaller step only adds overhead, about 6 on GPT-2 small)
    retain_micro_batch: int | None = None
    w_forget: float = 1.0
    # the representation and signature losses are off: at any weight that moved the signature
    # they took other people's facts with it (module docstring)
    w_repr: float = 0.0
    w_retain: float = 40.0
    w_signature: float = 0.0  # push the capsule's z-score on forget tokens below zero
    surface_target: float = 0.05  # forget accuracy (training phrasings) to reach
    latent_target: float = 3.0  # capsule z (median over forget prompts) to fall below (= tau)
    never_knew_target: float = 0.5  # KS p-value vs the never-knew truth ratios that ends training
    retain_tolerance: float = 0.02  # a checkpoint may lose at most this retain accuracy
    # None: the residual site where the concept's capsule separates best (`suppress.best_capsule`)
    signature_hook: str | None = "blocks.0.hook_resid_mid"
    unbind: bool = True  # remove the signature in closed form first (kif.erasure.unbind)
    unbind_weight: float = 10.0  # its forget rows' weight against the retain keys
    stamp_start: bool = True  # begin from the STAMP edit (closed form) instead of the base
    # STAMP solved on the unbound model (its keys, retain statistics recomputed, ~10 s more)
    # instead of the base's: utility kept (forget10: model utility 0.948, retain 0.995) but the
    # update then reaches less Forget Quality (0.39 at lr 2e-3, against 0.59)
    stamp_on_unbound: bool = False
    # the start's STAMP target and forget weight (StampConfig's; the `auto` profile spreads it
    # over layers toward optimized targets, with the weight calibrated on the model)
    stamp_target: str = "unknown"
    stamp_forget_weight: float | None = 12.0
    # the downstream forget loss: NPO again, on the forget facts with the *base's* residual
    # after the first trained block patched in, so that the blocks behind it stop decoding the
    # answers too (the meter's downstream probe, as a loss); 0: off
    w_downstream: float = 0.0
    forget_loss: str = "npo"  # one of FORGET_LOSSES
    npo_beta: float = 0.25  # NPO saturates at log-ratio ~ -2/beta: about ln(#candidates) per token
    seed: int = 0


FORGET_LOSSES = ("npo", "kl")


def never_knew_names(concept, n: int) -> list[str]:
    """The first `n` of the concept's never-knew names (`Concept.never_knew`), refused in one
    line where the concept has too few."""
    concept.require("never_knew", method="kif")
    names = list(concept.never_knew.names)
    if len(names) < n:
        raise ErasureError(f"kif needs {n} never-knew names for {concept.name!r}; its source "
                           f"gives {len(names)}")
    return names[:n]


@dataclasses.dataclass(frozen=True)
class _Pair:
    person: int  # index into concept.subjects
    real: list[int]  # token ids of [BOS] + real prompt + answer
    anon: list[int]  # the same with a fresh name
    start_real: int  # position of the last name token (first position whose output we match)
    start_anon: int
    n: int  # number of matched positions
    n_answer: int  # answer tokens (the last n_answer of `real`)


def _pairs(model, probes, names_for: dict[str, list[str]], rng: random.Random) -> list[_Pair]:
    subjects = list(names_for)
    out = []
    for p in probes:
        text = p.prompt + p.answer
        cut = text.index(p.subject) + len(p.subject)
        fake = rng.choice(names_for[p.subject])
        anon = text[:cut].replace(p.subject, fake) + text[cut:]
        cut_anon = cut - len(p.subject) + len(fake)
        ids_r = metrics.encode_prompts(model, [text, text[:cut]])
        ids_a = metrics.encode_prompts(model, [anon, anon[:cut_anon]])
        tail_r, tail_a = ids_r[0][len(ids_r[1]):], ids_a[0][len(ids_a[1]):]
        if tail_r != tail_a or not tail_r:
            continue  # BPE merged across the name boundary: no clean alignment
        n_answer = len(metrics.encode_answers(model, [p.answer])[0])
        out.append(_Pair(subjects.index(p.subject), ids_r[0], ids_a[0], len(ids_r[1]) - 1,
                         len(ids_a[1]) - 1, len(tail_r), n_answer))
    return out


def _pad(model, seqs: Sequence[Sequence[int]]) -> Tensor:
    tokens, _ = metrics._padded(model, seqs)
    return tokens


def _gather(x: Tensor, starts: Sequence[int], n: Sequence[int]) -> Tensor:
    """Rows x[b, starts[b] : starts[b] + n[b]] concatenated: [sum n, ...]."""
    idx_b = torch.cat([torch.full((k,), b, dtype=torch.long) for b, k in enumerate(n)])
    idx_p = torch.cat([torch.arange(s, s + k) for s, k in zip(starts, n)])
    return x[idx_b.to(x.device), idx_p.to(x.device)]


@register("kif", KifConfig, "weights",
          "KIF pipeline: signature -> suppression -> LoRA update toward never-knew behaviour, "
          "removing the signature itself")
def kif_pipeline(model, concept, cfg: KifConfig, *, progress: bool = False,
                 base_spec: str = "") -> Erasure:
    from kif.erasure.suppress import SuppressConfig, best_capsule, candidate_hooks
    from kif.models import weight_hash

    if cfg.forget_loss not in FORGET_LOSSES:
        raise ErasureError(f"unknown kif forget_loss {cfg.forget_loss!r} "
                           f"(choose from {', '.join(FORGET_LOSSES)})")
    if cfg.retain_micro_batch is not None and cfg.retain_micro_batch < 1:
        raise ErasureError(f"kif's retain_micro_batch must be at least 1 row, "
                           f"got {cfg.retain_micro_batch}")
    # every part the pipeline reads, checked before any work (one line naming what to pass)
    concept.require("subjects", "retain_corpus", "refusal_prompts", "never_knew", method="kif")
    timer = Timer()
    base_hash = weight_hash(model)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = list(cfg.layers) if cfg.layers is not None else list(range(model.cfg.n_layers))
    if any(not 0 <= l < model.cfg.n_layers for l in layers):
        raise ErasureError(f"layers {layers} are outside the model's {model.cfg.n_layers} layers")

    # 1. signature and the capsule's calibration (the latent criterion)
    with timer.section("signature"):
        # the signature is the plain mean-difference direction (the one the oracle is compared
        # on), not the suppression gate's whitened detector
        sig_cfg = SuppressConfig(hook=cfg.signature_hook, whiten=None)
        ops, cap_stats = best_capsule(model, concept, sig_cfg, candidate_hooks(model, sig_cfg))
        sig_hook = cap_stats["hook"]

    # 2. the never-knew teacher: base model on the prompts with fresh names
    with timer.section("teacher"):
        names = never_knew_names(concept, cfg.n_names * len(concept.subjects))
        names_for = {s: names[i * cfg.n_names:(i + 1) * cfg.n_names]
                     for i, s in enumerate(concept.subjects)}
        pairs = _pairs(model, concept.forget, names_for, rng)
        if not pairs:
            raise ErasureError(f"no forget prompt of {concept.name!r} could be aligned")
        repr_hooks = list(dict.fromkeys(
            resid_hook(model, f"blocks.{l}.{h}") for l in range(model.cfg.n_layers)
            for h in ("hook_resid_mid", "hook_resid_post")))
        if sig_hook not in repr_hooks:
            raise ErasureError(f"signature_hook must be a residual hook, got {cfg.signature_hook!r}")
        t_logp, t_resid = [], []
        concept.require("refusal", method="kif")
        unk = metrics.encode_answers(model, [concept.refusal.target])[0][0]
        # the teacher's distributions and residuals serve the `kl` forget loss and the
        # representation loss only (off by default: no forward, no memory for them)
        teach = cfg.forget_loss == "kl" or cfg.w_repr > 0
        with torch.no_grad():
            for s in range(0, len(pairs), 256) if teach else ():
                chunk = pairs[s:s + 256]
                logits, cache = model.run_with_cache(_pad(model, [p.anon for p in chunk]),
                                                     names_filter=lambda n: n in repr_hooks,
                                                     padding_side="right")
                st, n = [p.start_anon for p in chunk], [p.n for p in chunk]
                t_logp.append(F.log_softmax(_gather(logits, st, n).float(), -1))
                t_resid.append(torch.stack([_gather(cache[h], st, n) for h in repr_hooks], 1))
        offsets = torch.tensor([0] + [p.n for p in pairs]).cumsum(0)
        if teach:
            t_logp_all, t_resid_all = torch.cat(t_logp), torch.cat(t_resid)
            resid_scale = t_resid_all.pow(2).mean((0, 2), keepdim=True)  # [1, layer, 1]
        # the never-knew reference for checkpoint selection: the base model's truth ratios on the
        # forget facts asked about the fresh names (the true answer is the person's; a model that
        # never met the person has no reason to prefer it)
        from kif.truth_ratios import truth_ratios

        # every training phrasing: with one phrasing (60 questions for forget10) the KS p-value
        # swung by 3x between neighbouring checkpoints
        select_probes = list(concept.forget)
        fresh_probes = [dataclasses.replace(p, prompt=p.prompt.replace(
            p.subject, names_for[p.subject][i % cfg.n_names])) for i, p in enumerate(select_probes)]
        tr_never = truth_ratios(model, concept, fresh_probes)
    # the signature each person's tokens must lose: direction, benign mean and spread
    by_person = {op.params["person"]: op for op in ops}
    sig_u = torch.stack([by_person[s].tensors["basis"][:, 0] for s in concept.subjects])
    sig_mu = torch.tensor([by_person[s].params["mu"] for s in concept.subjects])
    sig_sd = torch.tensor([by_person[s].params["sigma"] for s in concept.subjects])
    others = corpus_subjects(concept)  # other subjects' fact rows, in corpus order
    retain_texts = ([p.prompt + p.answer for rows in others.values() for p in rows]
                    + [p.prompt + p.answer for p in corpus_shared(concept)] * 4)
    retain_ids = metrics.encode_prompts(model, retain_texts)

    # 3a. the closed-form start: STAMP on the attributed layer moves the answers to the
    # never-knew side in one solve (the distillation below is slow to get there alone). Both
    # edits are solved on the base before it is touched: the model itself is then trained
    # (in place), with only the weights the edits and the LoRA touch saved, and restored bit for
    # bit however the pipeline ends (`kif.inplace`)
    start = None
    unbound = None
    if cfg.unbind:
        from kif.erasure.unbind import UnbindConfig, unbind_delta

        with timer.section("unbind"):
            unbound, dw, unbind_info = unbind_delta(model, concept, ops,
                                                       UnbindConfig(forget_weight=cfg.unbind_weight))
    if cfg.stamp_start and not (unbound and cfg.stamp_on_unbound):
        from kif.erasure.stamp import StampConfig, stamp

        with timer.section("stamp"):
            start = stamp(model, concept, StampConfig(target=cfg.stamp_target,
                                                      forget_weight=cfg.stamp_forget_weight),
                              base_spec=base_spec)
    # NPO's reference, the base model's answer log-probabilities given no refusal (and, for the
    # downstream loss, the base's residual after the first trained block, row by row)
    site = downstream_site(model, layers) if cfg.w_downstream > 0 else None
    ref_lp, down = [], []
    with torch.no_grad():
        for s in range(0, len(pairs), 256):
            chunk = pairs[s:s + 256]
            tokens = _pad(model, [p.real for p in chunk])
            ref_lp.append(_answer_rest_lp(model, _final_resid(model, tokens), chunk, unk))
            if site is not None:
                _, c = model.run_with_cache(tokens, names_filter=site, padding_side="right",
                                            stop_at_layer=min(layers) + 1)
                down += [c[site][b, :len(p.real)].clone() for b, p in enumerate(chunk)]
    ref_lp = torch.cat(ref_lp)
    # other people's facts, one phrasing each, for the retain check of every checkpoint
    subjects = list(others)
    check = nth_phrasing([p for s in subjects[::max(1, len(subjects) // 40)] for p in others[s]], 0)
    check_prompts, check_answers = [p.prompt for p in check], [p.answer for p in check]
    with torch.no_grad():
        base_kept = float(metrics.score_answers(model, check_prompts, check_answers).correct.mean())
    targets = lora_targets(model, layers)
    # only the weights edited in place are saved: the LoRA is added to the activations
    # (`HookedLoRA`) and leaves its weights as they are
    touched = ([unbound] if unbound else []) + list(start.deltas if start is not None else [])
    if any(not n.startswith("blocks.") for n in touched):  # retain_kl reads the base's head
        raise ErasureError(f"the kif pipeline edits block weights only, not {touched}")
    with inplace_training(model, touched) as state, contextlib.ExitStack() as stack:
        student = model  # trained in place; `state.base()` is the base, for reference forwards
        if unbound:
            with torch.no_grad():
                state.params[unbound].add_(dw.to(model.cfg.dtype))
        if cfg.stamp_start and start is None:  # stamp_on_unbound: solved on the unbound model
            from kif.erasure.stamp import StampConfig, stamp

            with timer.section("stamp"):
                start = stamp(student, concept, StampConfig(
                    cache=False, target=cfg.stamp_target, forget_weight=cfg.stamp_forget_weight),
                    base_spec=base_spec)
            state.add(start.deltas)
        if start is not None:
            _add_deltas(student, start.deltas)  # on top of the unbinding, where there is one
        # the refusal mass the start gives each matched position (the update keeps it)
        a_unk = []
        with torch.no_grad():
            for s in range(0, len(pairs), 256):
                chunk = pairs[s:s + 256]
                h = _gather(_final_resid(student, _pad(model, [p.real for p in chunk])),
                            [p.start_real for p in chunk], [p.n for p in chunk])
                a_unk.append(F.log_softmax(metrics._head(student, h).float(), -1)[:, unk].exp())
        a_unk_all = torch.cat(a_unk).clamp(1e-6, 1 - 1e-6)
        # the training forward captures the residuals the representation loss compares and the
        # signature hook (whose z-score is logged, and is a loss with w_signature)
        captured = repr_hooks if cfg.w_repr > 0 else [sig_hook]
        # 3b. the update: LoRA on every weight matrix of `layers`
        state.trainable([])
        lora = HookedLoRA(model, targets, cfg.rank, gen, active=lambda: not state.in_base)
        stack.callback(lora.remove)
        loras = lora.factors
        params = lora.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        history: list[dict[str, Any]] = []
        step = 0

        def criteria() -> dict[str, float]:
            with torch.no_grad():
                p, surf = never_knew_check(student, concept, select_probes, tr_never)
                kept = float(metrics.score_answers(student, check_prompts,
                                                   check_answers).correct.mean())
                return {"forget_acc": surf, "retain_acc": kept,
                        "capsule_z_median": _capsule_z(student, concept, ops), "never_knew_p": p}

        def rank(c: dict[str, float]) -> tuple:
            # a checkpoint that answers the forget facts or forgets other people's is never
            # preferred; among the others, the one whose truth ratios look most like a never-knew
            # model's, then the one with the weaker signature
            return (max(c["forget_acc"] - cfg.surface_target, 0.0)
                    + max(base_kept - cfg.retain_tolerance - c["retain_acc"], 0.0),
                    -c["never_knew_p"], c["capsule_z_median"])

        def converged(c: dict[str, float]) -> bool:
            return (rank(c)[0] == 0.0 and c["capsule_z_median"] < cfg.latent_target
                    and c["never_knew_p"] >= cfg.never_knew_target)

        def snapshot() -> dict[str, tuple[Tensor, Tensor]]:
            return {n: (l.a.detach().clone(), l.b.detach().clone()) for n, l in loras.items()}

        # the iterations are judged on the surface (forget accuracy) first, the signature
        # second; the best checkpoint is kept (the closed-form start, step 0, included), so a
        # budget that runs out never leaves a worse erasure than the start
        c = criteria()
        history.append({"step": 0, **c})
        best = (c, 0, snapshot())
        done = converged(c)
        from rich.progress import Progress

        with timer.section("train"), Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"kif update ({len(pairs)} facts)", total=cfg.steps)
            device = next(model.parameters()).device
            step_times: list[tuple[float, float]] = []  # (wall, CPU) seconds of each step
            while step < cfg.steps and not done:
                t_step = _clock(device)
                idx = torch.randperm(len(pairs), generator=gen)[:cfg.batch_forget].tolist()
                chunk = [pairs[i] for i in idx]
                ridx = torch.randperm(len(retain_ids), generator=gen)[:cfg.batch_retain].tolist()
                rtok = _pad(model, [retain_ids[i] for i in ridx])
                # run_with_cache detaches what it stores: capture the activations with their graph
                cache: dict[str, Tensor] = {}

                def capture(act, hook):
                    cache[hook.name] = act
                    return act

                # final residuals: only the positions a loss reads are unembedded
                resid = student.run_with_hooks(_pad(model, [p.real for p in chunk]),
                                               fwd_hooks=[(h, capture) for h in captured],
                                               padding_side="right",
                                               stop_at_layer=model.cfg.n_layers)
                st, n = [p.start_real for p in chunk], [p.n for p in chunk]
                rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx])
                s_logp = F.log_softmax(metrics._head(student, _gather(resid, st, n)).float(), -1)
                if cfg.forget_loss == "npo":
                    # NPO (Zhang et al. 2024) on the answer's probability given no refusal,
                    # against the base model's: pushes the true answer down among the
                    # candidates; the never-knew p-value picks where along that path the model
                    # looks like one that never knew
                    ratio = _answer_rest_lp(student, resid, chunk, unk) - ref_lp[idx]
                    p = s_logp[:, unk].exp().clamp(1e-6, 1 - 1e-6)
                    a = a_unk_all[rows]
                    kl_unk = a * (a / p).log() + (1 - a) * ((1 - a) / (1 - p)).log()
                    loss_f = (2.0 / cfg.npo_beta * F.softplus(cfg.npo_beta * ratio).mean()
                              + kl_unk.sum() / len(chunk))
                else:  # "kl": the KIF paper's distillation of the teacher's full distribution,
                    # summed over a fact's positions (most positions after the name are template
                    # words both models already agree on; a mean would dilute the answer's few
                    # hard ones)
                    loss_f = F.kl_div(s_logp, t_logp_all[rows], log_target=True,
                                      reduction="sum") / len(chunk)
                loss_r = None
                if cfg.w_repr > 0:
                    s_resid = torch.stack([_gather(cache[h], st, n) for h in repr_hooks], 1)
                    loss_r = ((s_resid - t_resid_all[rows]).pow(2) / resid_scale).mean((1, 2)).sum()
                    loss_r = loss_r / len(chunk)
                who = torch.cat([torch.full((p.n,), p.person, dtype=torch.long) for p in chunk])
                h_sig = _gather(cache[sig_hook], st, n).float()
                if cfg.w_signature == 0:
                    h_sig = h_sig.detach()  # logged only: no backward through it
                z = ((h_sig * sig_u[who]).sum(-1).abs() - sig_mu[who]) / sig_sd[who]
                loss_s = F.relu(z).pow(2).sum() / len(chunk)
                loss = cfg.w_forget * loss_f
                if loss_r is not None:
                    loss = loss + cfg.w_repr * loss_r
                if cfg.w_signature > 0:
                    loss = loss + cfg.w_signature * loss_s
                opt.zero_grad(set_to_none=True)
                loss.backward()
                del resid, cache  # the forget forward's activations, before the retain one's
                loss_d = None
                if site is not None:
                    loss_d = _downstream_backward(student, chunk, [down[i] for i in idx], site,
                                                  ref_lp[idx], unk, cfg)
                loss_k = _retain_backward(model, state, rtok, cfg.w_retain,
                                          cfg.retain_micro_batch)
                opt.step()
                step_times.append(tuple(b - a for a, b in zip(t_step, _clock(device))))
                step += 1
                bar.advance(task)
                if step % cfg.check_every == 0 or step == cfg.steps:
                    c = criteria()
                    if rank(c) < rank(best[0]):
                        best = (c, step, snapshot())
                    history.append({"step": step, "loss_forget": float(loss_f.detach()),
                                    **({} if loss_r is None
                                       else {"loss_repr": float(loss_r.detach())}),
                                    **({} if loss_d is None
                                       else {"loss_downstream": float(loss_d)}),
                                    "loss_retain": float(loss_k.detach()),
                                    "loss_signature": float(loss_s.detach()), **c})
                    done = converged(c)

        with torch.no_grad():
            for n, (a, b) in best[2].items():
                loras[n].a.copy_(a)
                loras[n].b.copy_(b)
        deltas = _final_deltas(state, loras)
    info = {"layers": layers, "steps": step, "converged": done, "best_step": best[1],
            # each update step alone (the checks between them are in seconds.train), for
            # `kif bench scale`'s per-step cost
            "step_seconds": [round(w, 4) for w, _ in step_times],
            "step_cpu_seconds": [round(c, 4) for _, c in step_times],
            **best[0], "history": history,
            "n_pairs": len(pairs), "capsule": cap_stats,
            "stamp_start": dict(start.info) if start is not None else None,
            "unbind": unbind_info if unbound else None,
            "seconds": {**timer.sections, "total": timer.total}}
    return Erasure(method="kif", concepts=(concept.name,), base_hash=base_hash,
                   base_spec=base_spec, deltas=deltas, settings=dataclasses.asdict(cfg), info=info)


def downstream_site(model, layers: Sequence[int]) -> str:
    """The residual after the first trained block, where the downstream loss patches the base's
    in (the meter's downstream probe reads the same site when that block is the first edit)."""
    first = min(layers)
    if first >= model.cfg.n_layers - 1:
        raise ErasureError(f"kif's w_downstream needs a trained block before the last; layers "
                           f"{list(layers)} start at block {first} of {model.cfg.n_layers}")
    return f"blocks.{first}.hook_resid_post"


def _downstream_backward(student, chunk, base_rows: list[Tensor], site: str, ref_lp: Tensor,
                         unk: int, cfg: KifConfig) -> float:
    """`cfg.w_downstream` x NPO on `chunk`'s answers (given no refusal, against the base's) with
    the base's residual at `site` patched in, backpropagated (into the blocks after `site`
    only: the patch cuts the graph there); returns the loss."""
    tokens = _pad(student, [p.real for p in chunk])
    patch = torch.zeros(*tokens.shape, base_rows[0].shape[-1], dtype=base_rows[0].dtype,
                        device=tokens.device)
    for b, r in enumerate(base_rows):
        patch[b, :len(r)] = r
    resid = student.run_with_hooks(tokens, fwd_hooks=[(site, lambda act, hook: patch.to(act))],
                                   padding_side="right", stop_at_layer=student.cfg.n_layers)
    ratio = _answer_rest_lp(student, resid, chunk, unk) - ref_lp
    loss = 2.0 / cfg.npo_beta * F.softplus(cfg.npo_beta * ratio).mean()
    (cfg.w_downstream * loss).backward()
    return float(loss.detach())


def _final_deltas(state, loras: dict[str, LoRAFactors]) -> dict[str, Delta]:
    """Each edited weight's change: the weights edited in place (the closed-form start, the
    unbinding) as stored now minus their saved originals, plus the LoRA's A @ B. A weight only
    the LoRA touched keeps its exact factors."""
    deltas = {}
    for name in dict.fromkeys(list(loras) + list(state.params)):
        f = loras.get(name)
        if name not in state.params and f is not None and len(f.shape) == 2:
            deltas[name] = Delta(a=f.a.detach().float().cpu(), b=f.b.detach().float().cpu())
            continue
        diff = torch.zeros(()) if f is None else f.delta().detach().float()
        if name in state.params:
            diff = diff + (state.current(name).float() - state.originals[name].float())
        deltas[name] = (low_rank(diff.reshape(diff.shape[0], -1)) if diff.ndim == 2
                        else Delta(dense=diff.cpu()))
    return deltas


def _clock(device: torch.device) -> tuple[float, float]:
    """(wall, CPU) time, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _final_resid(model, tokens: Tensor) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after the last block (right-padded `tokens`), before the final norm
    and the unembedding, which `metrics._head` applies to the rows a loss reads."""
    return model(tokens, padding_side="right", stop_at_layer=model.cfg.n_layers)


# activation memory of one retain micro-batch when its rows are not given (`micro_rows`)
_MICRO_BYTES = 64 * 2 ** 20


def micro_rows(model, width: int, budget: int = _MICRO_BYTES) -> int:
    """Rows of `width` tokens whose activations kept for the backward fit `budget` bytes, at an
    estimate of n_layers x (6 d_model + 2 d_mlp) values per token (the residual, norms,
    attention and MLP inputs and outputs; the attention pattern is small at these widths)."""
    c = model.cfg
    per_token = c.n_layers * (6 * c.d_model + 2 * (c.d_mlp or 4 * c.d_model))
    size = next(model.parameters()).element_size()
    return max(1, budget // (per_token * size * max(width, 1)))


def _retain_backward(model, state, rtok: Tensor, weight: float, rows: int | None) -> Tensor:
    """`weight` x the retain KL (`retain_kl` over every real token of `rtok`) backpropagated
    `rows` rows at a time (None: `micro_rows`), each micro-batch cut to its own longest row
    (right padding: the positions before it see the same tokens); returns the KL."""
    real = rtok != metrics._pad_id(model)
    n_real = max(int(real.sum()), 1)
    if rows is None:
        rows = micro_rows(model, int(real.any(0).nonzero().max()) + 1 if real.any() else 1)
    total = torch.zeros(())
    for i in range(0, rtok.shape[0], max(1, rows)):
        # through the last real position (a BOS that is also the pad token is not "real")
        width = int(real[i:i + rows].any(0).nonzero().max()) + 1
        tok, keep = rtok[i:i + rows, :width], real[i:i + rows, :width]
        with torch.no_grad(), state.base():
            base_h = _final_resid(model, tok)[keep]
        with torch.set_grad_enabled(weight != 0):
            kl = retain_kl(model, base_h, _final_resid(model, tok)[keep]) * (keep.sum() / n_real)
        if weight != 0:
            (weight * kl).backward()
        total += float(kl.detach())
    return total


# rows of [rows, d_vocab] logits per chunk of the retain KL: 2**24 float32 logits are 64 MiB
_KL_CHUNK_ELEMENTS = 2 ** 24


def retain_kl(model, base: Float[Tensor, "tokens d_model"],
              student: Float[Tensor, "tokens d_model"]) -> Float[Tensor, ""]:
    """The mean over tokens of KL(p_base || p_student), from the two models' final residuals.

    The logits are formed a chunk of tokens at a time and not kept for the backward pass
    (`torch.utils.checkpoint` forms them again there): 32 retain rows of 20 tokens are 640 x
    d_vocab logits per model, 128 MiB each for GPT-2's 50257 tokens, and the KL's backward needs
    both distributions, where a chunk's are a few dozen MiB. The final norm and the unembedding
    are the base's (no erasure edits them)."""
    from torch.utils.checkpoint import checkpoint

    def chunk_kl(b: Tensor, s: Tensor) -> Tensor:
        with torch.no_grad():
            logp = F.log_softmax(metrics._head(model, b).float(), -1)
        logq = F.log_softmax(metrics._head(model, s).float(), -1)
        return F.kl_div(logq, logp, log_target=True, reduction="sum")

    rows = max(1, _KL_CHUNK_ELEMENTS // model.cfg.d_vocab_out)
    total = student.new_zeros((), dtype=torch.float32)
    for i in range(0, student.shape[0], rows):
        total = total + checkpoint(chunk_kl, base[i:i + rows], student[i:i + rows],
                                   use_reentrant=False)
    return total / max(student.shape[0], 1)


def _add_deltas(model, deltas: dict[str, Delta]) -> None:
    """Add `deltas` to `model`'s weights in place, as `Erasure.apply` does (float32 sum, cast
    back), without its check of the base hash or its copy of the originals: the caller holds
    those (`kif.inplace`)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            p = params[name]
            p.copy_((p.float() + d.value(p)).to(p.dtype))


def _rest_logp(logits: Tensor, unk: int) -> Tensor:
    """Log-probabilities over every token but `unk` (the distribution given no refusal)."""
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[unk] = True
    out = F.log_softmax(logits.masked_fill(mask, float("-inf")), -1)
    return out.masked_fill(mask, 0.0)  # finite at `unk` (never an answer token here)


def _answer_rest_lp(model, resid: Tensor, pairs: Sequence[_Pair], unk: int) -> Tensor:
    """Per pair, the sum over its answer tokens of log p(token | no refusal), teacher forced
    (`resid`: the final residuals of the pairs' `real` sequences, right-padded)."""
    st = [len(p.real) - p.n_answer - 1 for p in pairs]
    n = [p.n_answer for p in pairs]
    lp = _rest_logp(metrics._head(model, _gather(resid, st, n)).float(), unk)
    tok = torch.tensor([t for p in pairs for t in p.real[-p.n_answer:]], device=lp.device)
    per = lp.gather(1, tok[:, None])[:, 0]
    who = torch.cat([torch.full((k,), b, dtype=torch.long) for b, k in enumerate(n)])
    return torch.zeros(len(pairs), device=lp.device).index_add(0, who.to(lp.device), per)


def never_knew_p(model, source, probes, tr_never) -> float:
    """KS p-value between `model`'s truth ratios on `probes` and the never-knew reference's
    (TOFU's Forget Quality with the base model on fresh names standing in for the oracle)."""
    return never_knew_check(model, source, probes, tr_never)[0]


def never_knew_check(model, source, probes, tr_never) -> tuple[float, float]:
    """(`never_knew_p`, accuracy on `probes`) from one batched scoring pass (the true answers
    are among the rows the truth ratios score)."""
    from kif.truth_ratios import truth_ratios_and_correct

    tr, correct = truth_ratios_and_correct(model, source, probes)
    return float(metrics.forget_quality(tr, tr_never)), float(correct.mean())


def _capsule_z(model, concept, ops) -> float:
    """Median over forget prompts of the capsule's z-score for the prompt's person (last token):
    where the signature still reads the person, the gate would open."""
    from kif.erasure.keys import last_token_states

    hook = ops[0].hook
    states = last_token_states(model, [p.prompt for p in concept.forget], [hook])[hook]
    by_person = {op.params["person"]: op for op in ops}
    z = []
    for i, p in enumerate(concept.forget):
        op = by_person[p.subject]
        u = op.tensors["basis"][:, 0]
        z.append((float((states[i] @ u).abs()) - op.params["mu"]) / op.params["sigma"])
    return float(torch.tensor(z).median())


__all__ = ["FORGET_LOSSES", "KifConfig", "WEIGHTS", "kif_pipeline", "lora_targets",
           "never_knew_names", "never_knew_p"]
