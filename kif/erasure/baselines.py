"""The field's unlearning baselines, for comparison with kif's own operators (METHODS.md,
"Erasure operators" -> Baselines).

Training baselines (full or partial fine-tuning of the model in place, `kif.inplace`: the
trained weights' originals are kept and restored bit for bit; the result is the dense change of
every parameter that moved, `Delta(dense=new - old)` in float32):

- `ga`, gradient ascent (Jang et al. 2023; TOFU, Maini et al. 2024): minimise the mean
  log-likelihood of the forget answers' tokens, teacher-forced on prompt + answer.
- `gradiff`, gradient difference (Liu et al. 2022; TOFU): GA + `w_retain` x NLL of the retain
  answers (every other known person's facts and the shared facts, training phrasings).
- `npo`, negative preference optimisation (Zhang et al. 2024, Eq. 3):
  L = (2/beta) E_f log(1 + (pi_theta(a|q) / pi_ref(a|q))^beta) on the forget answers, pi the
  sequence probability of the answer, pi_ref the frozen base model; + `w_retain` x retain NLL.
- `rmu`, representation misdirection (Li et al. 2024, WMDP, Eq. 1-2):
  L = MSE(h_l(x_f), c u) + alpha MSE(h_l(x_r), h_l^frozen(x_r)) at `blocks.{l}.hook_resid_post`,
  u a fixed random unit vector (uniform [0, 1) entries, normalised, as the reference code), only
  the MLP output weights (W_out, b_out) of layers l-2..l trained.

Every training baseline samples batches of right-padded rows (`kif.metrics._padded`), stops at
its step budget or as soon as the forget accuracy on the concept's training forget prompts is
<= `target_forget_acc` (checked every `check_every` steps), and reports `info["history"]`.

Signature baselines (no training):

- `sae-clamp` (Farrell, Lau & Conmy 2024, Eq. 2): the concept's SAE features (kif.signatures,
  kind "sae-features", per person, union per hook) clamped to -c when active, a hook patch
  (`HookOp(op="sae_clamp")` with only the selected encoder / decoder columns).
- `neuron-ablate` (Dai et al. 2022, Sec. 5 "erasing"): the concept's knowledge neurons (kind
  "knowledge-neurons", per person, union) removed by zeroing their W_out rows, a weight delta
  `-W_out[rows]` on `blocks.{l}.mlp.W_out`.

Defaults were measured on the zoo model `fact-world`, forget split forget10 (module constants
and the config comments say what was measured).
"""

import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kif import metrics
from kif.data.concept import by_subject, corpus_shared
from kif.erasure.core import Delta, Erasure, ErasureError, HookOp, Timer
from kif.erasure.registry import register
from kif.inplace import InplaceTraining, inplace_training


# ---- configs ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GAConfig:
    steps: int = 200  # budget
    lr: float = 2e-5
    batch_forget: int = 32
    check_every: int = 2  # GA's collapse is abrupt: forget 0.42 -> 0.01 in 10 steps at 3e-5
    target_forget_acc: float = 0.05
    check_prompts: int = 128  # forget prompts of the cheap check (all: the final test)
    monitor_retain: int = 64  # retain prompts scored at each check (history only)
    max_grad_norm: float | None = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class GradDiffConfig:
    steps: int = 300
    lr: float = 5e-5
    batch_forget: int = 32
    batch_retain: int = 32
    w_retain: float = 5.0
    shared_repeats: int = 4  # the shared facts' weight in the retain set (as `kif` uses)
    check_every: int = 5
    target_forget_acc: float = 0.05
    check_prompts: int = 128  # forget prompts of the cheap check (all: the final test)
    monitor_retain: int = 64  # retain prompts scored at each check (history only)
    max_grad_norm: float | None = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class NPOConfig:
    steps: int = 300
    lr: float = 5e-5
    beta: float = 0.1
    batch_forget: int = 32
    batch_retain: int = 32
    w_retain: float = 5.0
    shared_repeats: int = 4
    check_every: int = 5
    target_forget_acc: float = 0.05
    check_prompts: int = 128  # forget prompts of the cheap check (all: the final test)
    monitor_retain: int = 64  # retain prompts scored at each check (history only)
    max_grad_norm: float | None = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RMUConfig:
    # None: the layer at relative depth `depth`, int(depth * n_layers) clamped to the model: the
    # zoo model's 4 layers give layer 2, where forget10 was measured; a 2-layer model layer 1
    layer: int | None = None
    depth: float = 0.5
    c: float | None = None  # steering coefficient; None: c_scale x mean |h_l| on forget tokens
    c_scale: float = 3.0
    alpha: float = 100.0
    steps: int = 300
    lr: float = 1e-2
    batch_forget: int = 32
    batch_retain: int = 32
    shared_repeats: int = 4
    check_every: int = 5
    target_forget_acc: float = 0.05
    check_prompts: int = 128  # forget prompts of the cheap check (all: the final test)
    monitor_retain: int = 64  # retain prompts scored at each check (history only)
    max_grad_norm: float | None = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SaeClampConfig:
    clamp: float | None = None  # None: the extractor's clamp (its validation used that value)
    hook: str | None = None  # None: the extractor picks the best shipped SAE per person
    # an SAE folder or a SAELens release id "RELEASE/ID" (`--set sae=...`; kif.signatures.
    # sae_features.load_sae); None: the SAEs kif ships for the zoo model
    sae: str | None = None
    tau: float = 0.01
    top_n: int = 20


@dataclasses.dataclass(frozen=True)
class NeuronAblateConfig:
    # neurons kept per person (None: all the extractor finds). 200 (the signature bench's k) is
    # right for one person; the union over many people grows with them (forget10, 20 people:
    # nearly every neuron of the model, retain_acc 0.001; `top_k=50` there: 0.69)
    top_k: int | None = 200
    threshold: float = 0.05
    steps: int = 20  # integrated-gradient steps


# ---- answer-token batches ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _QA:
    """Prompt + answer rows: token ids of `[BOS] + prompt + answer` and the answer's start."""

    seqs: list[list[int]]
    starts: list[int]  # index of the first answer token in the row

    def __len__(self) -> int:
        return len(self.seqs)


def _encode_qa(model, probes) -> _QA:
    p_ids = metrics.encode_prompts(model, [p.prompt for p in probes])
    a_ids = metrics.encode_answers(model, [p.answer for p in probes])
    return _QA([p + a for p, a in zip(p_ids, a_ids)], [len(p) for p in p_ids])


def _qa_batch(model, qa: _QA, idx: Sequence[int]
              ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pred"]]:
    """Right-padded tokens and the mask of next-token predictions that are answer tokens
    (prediction t reads position t and predicts token t + 1)."""
    tokens, lengths = metrics._padded(model, [qa.seqs[i] for i in idx])
    starts = torch.tensor([qa.starts[i] for i in idx], device=tokens.device)
    pos = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    mask = (pos[None] >= starts[:, None] - 1) & (pos[None] < lengths.to(tokens.device)[:, None] - 1)
    return tokens, mask


def _answer_logprobs(model, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pred"]
                     ) -> tuple[Float[Tensor, " batch"], Float[Tensor, " n_ans"], Bool[Tensor, " batch"]]:
    """Per row: the answer's log-probability (sum over its tokens, float32); every answer
    token's log-probability; whether every answer token is the argmax (teacher-forced)."""
    logits = model(tokens, return_type="logits", padding_side="right")[:, :-1]
    sel = logits[mask].float()  # only the answer positions go through the log-softmax
    tgt = tokens[:, 1:][mask]
    tok_lp = F.log_softmax(sel, -1).gather(-1, tgt[:, None]).squeeze(-1)
    row = mask.nonzero()[:, 0]
    seq_lp = torch.zeros(tokens.shape[0], device=tok_lp.device).index_add(0, row, tok_lp)
    wrong = (sel.argmax(-1) != tgt).float()
    correct = torch.zeros(tokens.shape[0], device=tok_lp.device).index_add(0, row, wrong) == 0
    return seq_lp, tok_lp, correct


def _retain_probes(concept, shared_repeats: int, method: str) -> list:
    """The concept's retain corpus (in the fact world: every other known person's facts and the
    shared facts, training phrasings), its shared facts repeated: the `kif` pipeline's set."""
    concept.require("retain_corpus", method=method)
    facts = [p for p in concept.retain_corpus if p.kind != "shared"]
    return facts + corpus_shared(concept) * shared_repeats


class _Sampler:
    """Batches of indices, each epoch a fresh permutation (seeded)."""

    def __init__(self, n: int, size: int, gen: torch.Generator):
        self.n, self.size, self.gen, self._queue = n, min(size, n), gen, []

    def __call__(self) -> list[int]:
        if len(self._queue) < self.size:
            self._queue += torch.randperm(self.n, generator=self.gen).tolist()
        out, self._queue = self._queue[:self.size], self._queue[self.size:]
        return out


# ---- the shared training loop --------------------------------------------------------------------

def _check_sets(concept, cfg, gen: torch.Generator) -> tuple[list, list]:
    """A fixed random sample of `cfg.check_prompts` forget prompts (the cheap stopping test) and
    of `cfg.monitor_retain` retain prompts (recorded in the history, never used to stop)."""
    forget, retain = list(concept.forget), list(concept.retain)
    fi = torch.randperm(len(forget), generator=gen)[:cfg.check_prompts].sort().values.tolist()
    ri = torch.randperm(len(retain), generator=gen)[:cfg.monitor_retain].sort().values.tolist()
    return [forget[i] for i in fi], [retain[i] for i in ri]


def _train(student, params: list[Tensor], loss_fn: Callable[[], tuple[Tensor, dict[str, float]]],
           concept, cfg, timer: Timer, progress: bool, label: str
           ) -> tuple[int, list[dict[str, Any]], bool]:
    """AdamW (no weight decay: only the loss moves weights) on `params` until the step budget
    or forget accuracy <= cfg.target_forget_acc. Returns (steps, history, converged).

    Every `check_every` steps the forget accuracy is measured on a fixed sample of
    `check_prompts` training forget prompts; when that is <= 2 x the target, on all of them (the
    stopping test): a full check costs as much as several training steps on a large concept."""
    from rich.progress import Progress

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    check_f, check_r = _check_sets(concept, cfg, torch.Generator().manual_seed(cfg.seed + 1))
    whole = len(check_f) == len(concept.forget)
    history: list[dict[str, Any]] = []
    step, done = 0, False
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(label, total=cfg.steps)
        while step < cfg.steps and not done:
            with timer.section("train"):
                loss, parts = loss_fn()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
            step += 1
            bar.advance(task)
            if step % cfg.check_every == 0 or step == cfg.steps:
                with timer.section("check"):
                    entry = {"step": step, "loss": float(loss.detach()), **parts}
                    acc = metrics.probe_accuracy(student, check_f)
                    entry["forget_acc_sample"] = acc
                    if not whole and acc <= 2 * cfg.target_forget_acc:
                        acc = metrics.probe_accuracy(student, concept.forget)
                    if whole or acc <= 2 * cfg.target_forget_acc:
                        entry["forget_acc"] = acc
                        done = acc <= cfg.target_forget_acc
                    if check_r:
                        entry["retain_acc_sample"] = metrics.probe_accuracy(student, check_r)
                history.append(entry)
                bar.update(task, description=f"{label} (forget acc {acc:.3f})")
    return step, history, done


def _result(method: str, state: InplaceTraining, concept, cfg, base_hash: str, base_spec: str,
            timer: Timer, steps: int, history: list, converged: bool, **extra: Any) -> Erasure:
    """The erasure of a model trained in place (`state`, still inside its block): the
    `Delta(dense=new - old)` (float32) of every trained parameter that moved."""
    from kif.models import snap_to_exportable

    with timer.section("deltas"):
        # weights the checkpoint holds transformed (Gemma's embedding and norms) are moved to
        # values a saved checkpoint gives back, so the erased folder matches its manifest
        snap_to_exportable(state.model)
        deltas = {n: Delta(dense=d.cpu()) for n, d in state.changed().items()}
    info = {"steps": steps, "step_budget": cfg.steps, "lr": cfg.lr, "converged": converged,
            "history": history, "n_forget": len(concept.forget),
            "n_changed_params": len(deltas), **extra,
            "seconds": {**timer.sections, "total": timer.total}}
    return Erasure(method=method, concepts=(concept.name,), base_hash=base_hash,
                   base_spec=base_spec, deltas=deltas, settings=dataclasses.asdict(cfg), info=info)


def _nll_mean(tok_lp: Tensor) -> Tensor:
    return -tok_lp.mean()


# ---- GA, GradDiff, NPO --------------------------------------------------------------------------

def _likelihood_baseline(method: str, model, concept, cfg, progress: bool, base_spec: str,
                         forget_loss: str, retain: bool) -> Erasure:
    from kif.models import weight_hash

    if retain:
        concept.require("retain_corpus", method=method)
    timer = Timer()
    base_hash = weight_hash(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    with timer.section("setup"):
        fqa = _encode_qa(model, concept.forget)
        f_batches = _Sampler(len(fqa), cfg.batch_forget, gen)
        ref_lp = None
        if forget_loss == "npo":  # pi_ref: the frozen base model's answer log-probabilities
            ref_lp = torch.zeros(len(fqa))
            with torch.no_grad():
                for s in range(0, len(fqa), 256):
                    idx = list(range(s, min(s + 256, len(fqa))))
                    tokens, mask = _qa_batch(model, fqa, idx)
                    ref_lp[idx] = _answer_logprobs(model, tokens, mask)[0].cpu()
        if retain:
            rqa = _encode_qa(model, _retain_probes(concept, cfg.shared_repeats, method))
            r_batches = _Sampler(len(rqa), cfg.batch_retain, gen)
        # trained in place (`kif.inplace`): every weight trains, so the saved originals are one
        # copy of the trained parameters (what a deep copy cost, less buffers and frozen ones)
        student = model
        # parameters the HF checkpoint has no place for stay frozen (zero), so the result exports
        from kif.models import export_frozen_parameters

        frozen = set(export_frozen_parameters(model))
        names = [n for n, _ in model.named_parameters() if n not in frozen]

    def loss_fn() -> tuple[Tensor, dict[str, float]]:
        idx = f_batches()
        tokens, mask = _qa_batch(student, fqa, idx)
        seq_lp, tok_lp, _ = _answer_logprobs(student, tokens, mask)
        if forget_loss == "ga":
            lf = -_nll_mean(tok_lp)  # ascend the NLL
        else:  # NPO, Zhang et al. 2024 Eq. 3: (2/beta) log(1 + (pi/pi_ref)^beta) = softplus
            ratio = seq_lp - ref_lp[idx].to(seq_lp.device)
            lf = 2.0 / cfg.beta * F.softplus(cfg.beta * ratio).mean()
        parts = {"loss_forget": float(lf.detach()), "forget_nll": float(_nll_mean(tok_lp.detach()))}
        loss = lf
        if retain:
            rt, rm = _qa_batch(student, rqa, r_batches())
            lr_ = _nll_mean(_answer_logprobs(student, rt, rm)[1])
            loss = loss + cfg.w_retain * lr_
            parts["loss_retain"] = float(lr_.detach())
        return loss, parts

    with inplace_training(model, names) as state:
        steps, history, done = _train(student, state.trainable(), loss_fn, concept, cfg, timer,
                                      progress, f"{method} ({len(fqa)} forget prompts)")
        extra = {"n_retain": len(rqa)} if retain else {}
        return _result(method, state, concept, cfg, base_hash, base_spec, timer, steps,
                       history, done, **extra)


@register("ga", GAConfig, "weights",
          "baseline: gradient ascent on the forget answers (full fine-tuning)")
def ga(model, concept, cfg: GAConfig, *, progress: bool = False,
       base_spec: str = "") -> Erasure:
    """Gradient ascent (Jang et al. 2023; TOFU's GA, Maini et al. 2024): minimise
    mean_t log p(a_t | q, a_<t) over the forget answers' tokens, all weights trained."""
    return _likelihood_baseline("ga", model, concept, cfg, progress, base_spec, "ga", False)


@register("gradiff", GradDiffConfig, "weights",
          "baseline: gradient ascent on forget answers + NLL on retain answers")
def gradiff(model, concept, cfg: GradDiffConfig, *, progress: bool = False,
            base_spec: str = "") -> Erasure:
    """Gradient difference (Liu et al. 2022; TOFU): GA on the forget answers + w_retain x NLL of
    the retain answers (other known people, shared facts)."""
    return _likelihood_baseline("gradiff", model, concept, cfg, progress, base_spec, "ga",
                                True)


@register("npo", NPOConfig, "weights",
          "baseline: negative preference optimisation vs the frozen model + retain NLL")
def npo(model, concept, cfg: NPOConfig, *, progress: bool = False,
        base_spec: str = "") -> Erasure:
    """NPO (Zhang, Lin, Bai & Mei 2024, Eq. 3): (2/beta) E log(1 + (pi_theta/pi_ref)^beta) on the
    forget answers' sequence probabilities + w_retain x retain NLL (their NPO+RT)."""
    if cfg.beta <= 0:
        raise ErasureError(f"NPO's beta must be > 0, got {cfg.beta}")
    return _likelihood_baseline("npo", model, concept, cfg, progress, base_spec, "npo",
                                True)


# ---- RMU ------------------------------------------------------------------------------------------

def _subject_starts(model, probes) -> list[int]:
    """Position (in `[BOS] + tokens(prompt)`) of each probe's first subject token."""
    prompts = [p.prompt for p in probes]
    enc = model.tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    off = metrics.bos_offset(model)
    out = []
    for pr, offsets in zip(probes, enc["offset_mapping"]):
        start = pr.prompt.find(pr.subject)
        pos = [i for i, (a, b) in enumerate(offsets) if start >= 0 and b > start]
        out.append(pos[0] + off if pos else off)
    return out


def rmu_layer(cfg: RMUConfig, n_layers: int) -> int:
    """The layer RMU steers at: `cfg.layer`, or the one at relative depth `cfg.depth`,
    int(depth * n_layers) clamped to the model (4 layers: 2, the zoo model's; 2 layers: 1)."""
    if cfg.layer is None:
        if not 0.0 <= cfg.depth <= 1.0:
            raise ErasureError(f"RMU's depth must be in [0, 1], got {cfg.depth}")
        return min(n_layers - 1, int(cfg.depth * n_layers))
    if not 0 <= cfg.layer < n_layers:
        raise ErasureError(f"layer {cfg.layer} is outside the model's {n_layers} layers")
    return cfg.layer


def _span_mask(tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"],
               starts: Sequence[int]) -> Bool[Tensor, "batch pos"]:
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    st = torch.tensor(list(starts), device=tokens.device)
    return (pos[None] >= st[:, None]) & (pos[None] < lengths.to(tokens.device)[:, None])


@register("rmu", RMUConfig, "weights",
          "baseline: representation misdirection (RMU) of forget tokens at one layer")
def rmu(model, concept, cfg: RMUConfig, *, progress: bool = False,
        base_spec: str = "") -> Erasure:
    """RMU (Li et al. 2024, WMDP, Sec. 5): at h_l = `blocks.{l}.hook_resid_post`,
    L = mean ||h_l(x_f) - c u||^2 + alpha mean ||h_l(x_r) - h_l^frozen(x_r)||^2 (per element),
    training W_out, b_out of the MLPs of layers max(0, l-2)..l (b_out where the architecture has
    one), l = `cfg.layer` or the layer at relative depth `cfg.depth` (`rmu_layer`).

    Forget tokens are those from the subject's first token on (prompt rest and answer): the
    tokens before the name are template words every retain prompt shares, where the two terms
    would pull the same activations apart (the fact world's counterpart of RMU's topical forget
    corpus). Retain tokens: every non-BOS token of the retain probes. BOS (the attention sink,
    with a huge norm) is never in either term. c defaults to c_scale x the mean norm of h_l on
    the forget tokens (Li et al.'s c = 6.5-20 is for 7B models, a scale this model's residual
    stream does not have)."""
    from kif.models import weight_hash

    n_layers = model.cfg.n_layers
    cfg = dataclasses.replace(cfg, layer=rmu_layer(cfg, n_layers))  # the settings record it
    concept.require("subjects", "retain_corpus", method="rmu")
    timer = Timer()
    base_hash = weight_hash(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    hook_stop = cfg.layer + 1  # forward only up to h_l

    def resid(m, tokens):
        return m(tokens, stop_at_layer=hook_stop, padding_side="right")

    with timer.section("setup"):
        fqa = _encode_qa(model, concept.forget)
        f_start = _subject_starts(model, concept.forget)
        rqa = _encode_qa(model, _retain_probes(concept, cfg.shared_repeats, "rmu"))
        f_batches = _Sampler(len(fqa), cfg.batch_forget, gen)
        r_batches = _Sampler(len(rqa), cfg.batch_retain, gen)
        d = model.cfg.d_model
        u = torch.rand(d, generator=gen)
        u = (u / u.norm()).to(model.cfg.device)
        c = cfg.c
        if c is None:
            with torch.no_grad():
                norms = []
                for s in range(0, len(fqa), 256):
                    idx = list(range(s, min(s + 256, len(fqa))))
                    tokens, lengths = metrics._padded(model, [fqa.seqs[i] for i in idx])
                    h = resid(model, tokens)
                    m = _span_mask(tokens, lengths, [f_start[i] for i in idx])
                    norms.append(h[m].float().norm(dim=-1))
                c = cfg.c_scale * float(torch.cat(norms).mean())
        # trained in place (`kif.inplace`): only the trained MLP outputs are saved and restored
        student = model
        layers = list(range(max(0, cfg.layer - 2), cfg.layer + 1))
        # b_out only where the checkpoint has an MLP output bias (GPT-2, GPT-NeoX): Llama-like
        # MLPs have none, and a trained one could not be saved
        from kif.models import export_frozen_parameters

        frozen = set(export_frozen_parameters(model))
        names = [f"blocks.{l}.mlp.{name}" for l in layers for name in ("W_out", "b_out")
                 if f"blocks.{l}.mlp.{name}" not in frozen]
    target = c * u
    first = metrics.bos_offset(model)  # retain tokens start after the BOS, where there is one

    def loss_fn() -> tuple[Tensor, dict[str, float]]:
        idx = f_batches()
        tokens, lengths = metrics._padded(student, [fqa.seqs[i] for i in idx])
        h = resid(student, tokens)
        fm = _span_mask(tokens, lengths, [f_start[i] for i in idx])
        lf = (h[fm].float() - target.to(h.device)).pow(2).mean()
        ridx = r_batches()
        rt, rl = metrics._padded(student, [rqa.seqs[i] for i in ridx])
        rm = _span_mask(rt, rl, [first] * len(ridx))
        with torch.no_grad(), state.base():  # the frozen model: the originals swapped in
            h0 = resid(model, rt)[rm].float()
        lr_ = (resid(student, rt)[rm].float() - h0).pow(2).mean()
        return lf + cfg.alpha * lr_, {"loss_forget": float(lf.detach()), "loss_retain": float(lr_.detach())}

    with inplace_training(model, names) as state:  # `loss_fn` reads `state` when it runs
        label = f"rmu layer {cfg.layer} ({len(fqa)} forget prompts)"
        steps, history, done = _train(student, state.trainable(), loss_fn, concept, cfg, timer,
                                      progress, label)
        return _result("rmu", state, concept, cfg, base_hash, base_spec, timer, steps,
                       history, done, c=c, layers=layers, n_retain=len(rqa))


# ---- signature baselines ---------------------------------------------------------------------------

@register("sae-clamp", SaeClampConfig, "hooks",
          "baseline: clamp the concept's SAE features to -c when active (hook patch)")
def sae_clamp(model, concept, cfg: SaeClampConfig, *, progress: bool = False,
              base_spec: str = "") -> Erasure:
    """SAE conditional clamp (Farrell, Lau & Conmy 2024, Eq. 2): per person the SAE-feature
    signature (`kif.signatures`, kind "sae-features"), the union of features per hook, each hook
    a `HookOp(op="sae_clamp")` holding only the selected columns:
    h' = h + sum_{i in S, a_i > 0} (-c - a_i) W_dec[i]."""
    from rich.progress import Progress

    from kif.models import weight_hash
    from kif.signatures.registry import extract
    from kif.signatures.sae_features import load_sae

    timer = Timer()
    base_hash = weight_hash(model)
    feats: dict[str, list[int]] = {}
    refs: dict[str, dict] = {}
    clamps: set[float] = set()
    per_person = []
    people = by_subject(concept)
    settings = {"tau": cfg.tau, "top_n": cfg.top_n}
    if cfg.hook is not None:
        settings["hook"] = cfg.hook
    if cfg.clamp is not None:
        settings["clamp"] = cfg.clamp
    if cfg.sae is not None:
        settings["sae"] = cfg.sae
    with timer.section("signatures"), Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("sae-clamp: SAE features per person", total=len(people))
        for pc in people:
            sig = extract(model, pc, kind="sae-features", **settings)
            ids = [int(i) for i in sig.indices[:, 1]]
            for h, i in zip(sig.component_hooks, ids):
                if i not in feats.setdefault(h, []):
                    feats[h].append(i)
                refs[h] = dict(sig.sae)
            clamps.add(float(sig.settings["clamp"]))
            per_person.append({"person": pc.name, "hook": sig.info.get("hook"),
                               "features": ids, "coverage": sig.info.get("coverage")})
            bar.advance(task)
    clamp = cfg.clamp if cfg.clamp is not None else max(clamps)
    ops = []
    with timer.section("patch"):
        for h, ids in feats.items():
            if not ids:
                continue
            sae = load_sae(refs[h], model)
            idx = torch.tensor(ids)
            t = {"W_enc": sae.W_enc[:, idx], "b_enc": sae.b_enc[idx], "b_dec": sae.b_dec,
                 "W_dec": sae.W_dec[idx]}
            if getattr(sae, "threshold", None) is not None:  # JumpReLU SAEs
                t["threshold"] = sae.threshold[idx]
            t = {k: v.detach().float().cpu().clone().contiguous() for k, v in t.items()}
            ops.append(HookOp(hook=h, op="sae_clamp", tensors=t,
                              params={"clamp": float(clamp), "features": ids, "sae": refs[h]}))
    if not ops:
        raise ErasureError(f"no SAE feature separates {concept.name!r} (tau={cfg.tau})")
    info = {"n_features": {h: len(v) for h, v in feats.items()}, "clamp": clamp,
            "per_person": per_person, "seconds": {**timer.sections, "total": timer.total}}
    return Erasure(method="sae-clamp", concepts=(concept.name,), base_hash=base_hash,
                   base_spec=base_spec, hooks=tuple(ops), settings=dataclasses.asdict(cfg),
                   info=info)


@register("neuron-ablate", NeuronAblateConfig, "weights",
          "baseline: zero the W_out rows of the concept's knowledge neurons")
def neuron_ablate(model, concept, cfg: NeuronAblateConfig, *, progress: bool = False,
                  base_spec: str = "") -> Erasure:
    """Knowledge-neuron erasure (Dai et al. 2022, Sec. 5): per person the knowledge neurons
    (`kif.signatures`, kind "knowledge-neurons", the `top_k` best), their union, each neuron's
    output removed for good by zeroing its row of W_out: Delta = -W_out[rows] there, 0 elsewhere."""
    from rich.progress import Progress

    from kif.models import weight_hash
    from kif.signatures.registry import extract

    timer = Timer()
    base_hash = weight_hash(model)
    people = by_subject(concept)
    rows: dict[int, set[int]] = {}
    per_person = []
    with timer.section("signatures"), Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("neuron-ablate: knowledge neurons per person", total=len(people))
        for pc in people:
            sig = extract(model, pc, kind="knowledge-neurons", threshold=cfg.threshold,
                          steps=cfg.steps)
            if cfg.top_k is not None:
                sig = sig.top(cfg.top_k)
            for l, n in sig.indices.tolist():
                rows.setdefault(int(l), set()).add(int(n))
            per_person.append({"person": pc.name, "n_neurons": len(sig)})
            bar.advance(task)
    deltas = {}
    with timer.section("deltas"):
        for l, ns in sorted(rows.items()):
            w = model.blocks[l].mlp.W_out.detach()
            d = torch.zeros(w.shape, dtype=torch.float32)
            idx = torch.tensor(sorted(ns))
            d[idx] = -w[idx].float().cpu()
            deltas[f"blocks.{l}.mlp.W_out"] = Delta(dense=d)
    if not deltas:
        raise ErasureError(f"no knowledge neuron found for {concept.name!r}")
    info = {"n_neurons": {l: len(ns) for l, ns in sorted(rows.items())},
            "neurons": {l: sorted(ns) for l, ns in sorted(rows.items())},
            "per_person": per_person, "seconds": {**timer.sections, "total": timer.total}}
    return Erasure(method="neuron-ablate", concepts=(concept.name,), base_hash=base_hash,
                   base_spec=base_spec, deltas=deltas, settings=dataclasses.asdict(cfg), info=info)


__all__ = ["GAConfig", "GradDiffConfig", "NPOConfig", "NeuronAblateConfig", "RMUConfig",
           "SaeClampConfig", "ga", "gradiff", "neuron_ablate", "npo", "rmu", "rmu_layer",
           "sae_clamp"]
