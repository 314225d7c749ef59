"""`undo`: an erasure distilled into a partly re-initialised model (UNDO, Lee et al. 2025,
"Distillation robustifies unlearning", arXiv 2506.06278; METHODS.md has no entry yet).

Unlearn, Noise, Distill on Outputs:

1. *Unlearn*: a teacher erasure, a registered method (`kif` by default) or a kif erasure folder of
   the same base. Its model answers nothing about the concept, but still stores it behind the
   edit: fine-tuning on half the facts brings the other half back (the meter's relearning).
2. *Noise*: the student starts as the base shrunk toward a fresh initialisation,
   `(1 - alpha) * theta_base + alpha * theta_init` (the model's own initialiser, seeded), for
   every parameter. That damages what the weights store, the concept's facts with the rest.
3. *Distill*: the student is trained to match the teacher's full next-token distribution on the
   concept's retain corpus and forget probes, packed into rows as the zoo was trained. It
   relearns what the teacher still shows (the retain facts, and "unknown" for the concept) and
   never sees what the teacher only hides: what is hidden is not transferred by its outputs.

The cost is a partial retrain: `steps` rows of `batch` x `row_len` tokens, two forwards and a
backward each, on top of the teacher's erasure. The trade-off is `alpha` against `steps`: a
small alpha keeps too much of the base (relearning finds the concept again), a large one needs
more steps to give the retain facts back. The result is a dense delta of every parameter, stored
with the originals as every weight erasure is (reversible, no hooks at inference).
"""

import copy
import dataclasses
import random
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from kif.data.concept import corpus_shared
from kif.erasure.core import Delta, Erasure, ErasureError, Timer
from kif.erasure.registry import erase, register
from kif.inplace import inplace_training


@dataclasses.dataclass(frozen=True)
class UndoConfig:
    teacher: str = "kif"  # a registered method, or a kif erasure folder of the same base
    alpha: float = 0.8  # share of the fresh initialisation in the student's start
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 60  # linear warm-up steps, then cosine to 5 % of lr (the zoo's schedule)
    batch: int = 32  # packed rows per step
    row_len: int = 128  # tokens per row
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    shared_repeats: int = 8  # shared facts weigh as much as the many people (the zoo's text)
    # the teacher's outputs on the forget probes join the text: they teach the student what to
    # say instead of the answer; without them it never sees the concept at all
    forget_probes: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        # checked when the settings are made: the CLI refuses them before it loads a model
        _check(self)


def _check(cfg: UndoConfig) -> None:
    from kif.erasure.io import is_erasure_folder
    from kif.erasure.registry import METHOD_MODULES

    if not 0.0 < cfg.alpha <= 1.0:
        raise ErasureError(f"undo's alpha must be in (0, 1], got {cfg.alpha}")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.row_len < 4:
        raise ErasureError("undo needs steps >= 1, batch >= 1 and row_len >= 4")
    if cfg.teacher == "undo":
        raise ErasureError("undo's teacher must be another method or an erasure folder")
    if cfg.teacher not in METHOD_MODULES and not is_erasure_folder(cfg.teacher):
        raise ErasureError(f"undo's teacher {cfg.teacher!r} is neither an erasure method "
                           f"({', '.join(sorted(METHOD_MODULES))}) nor a kif erase folder")


def teacher_erasure(model, concept, cfg: UndoConfig, *, progress: bool, base_spec: str
                    ) -> Erasure:
    """The erasure to distil: `cfg.teacher` run now, or loaded from its folder."""
    from kif.erasure.io import is_erasure_folder, load_erasure

    if is_erasure_folder(cfg.teacher):
        return load_erasure(cfg.teacher)  # `distil` checks that it was made on `model`
    return erase(model, concept, cfg.teacher, progress=progress, base_spec=base_spec)


def corpus_ids(model, concept, shared_repeats: int, forget_probes: bool = True
               ) -> list[list[int]]:
    """The distillation text as token ids, each sentence led by a separator (BOS, else EOS): the
    concept's retain corpus (its shared facts repeated), its forget probes (prompt + answer) and
    its refusal prompts followed by the refusal target."""
    concept.require("retain_corpus", method="undo")
    tok = model.tokenizer
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if sep is None:
        raise ErasureError("undo needs a tokenizer with a BOS or EOS token to separate rows")
    facts = [p for p in concept.retain_corpus if p.kind != "shared"]
    rows = facts + corpus_shared(concept) * shared_repeats
    rows += list(concept.forget) if forget_probes else []
    texts = [p.prompt + p.answer for p in rows]
    if concept.refusal is not None:
        # the prompts the model already refuses: without them the student forgets how to say
        # "unknown" about people it was taught to refuse
        texts += [q + concept.refusal.target for q in concept.refusal.prompts]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [[sep] + list(s) for s in ids if s]


def _fresh_init(model, seed: int) -> dict[str, Tensor]:
    """Name -> the value a freshly initialised model of `model`'s architecture holds (the
    model's own initialiser: weight matrices drawn, biases zero, norms one)."""
    from transformer_lens import HookedTransformer

    cfg = copy.deepcopy(model.cfg)
    cfg.seed = seed
    with torch.random.fork_rng(devices=[]):
        fresh = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
        fresh.init_weights()
    return {n: p.detach() for n, p in fresh.named_parameters()}


def distill_loss(student, teacher, tokens: Int[Tensor, "batch pos"],
                 mask: Bool[Tensor, "batch pos"]) -> Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over real tokens."""
    with torch.no_grad():
        t = teacher(tokens, padding_side="right").log_softmax(-1)
    s = student(tokens, padding_side="right").log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum()


@register("undo", UndoConfig, "weights",
          "UNDO: a teacher erasure (kif) distilled into the base shrunk toward a fresh init")
def undo(model, concept, cfg: UndoConfig, *, progress: bool = False,
         base_spec: str = "") -> Erasure:
    # the settings were checked when made (`UndoConfig.__post_init__`)
    concept.require("retain_corpus", method="undo")  # before the teacher's work, not after
    timer = Timer()
    with timer.section("teacher"):
        t_erasure = teacher_erasure(model, concept, cfg, progress=progress, base_spec=base_spec)
    return distil(model, concept, t_erasure, cfg, progress=progress, base_spec=base_spec,
                  timer=timer)


def distil(model, concept, t_erasure: Erasure, cfg: UndoConfig, *, progress: bool = False,
           base_spec: str = "", timer: Timer | None = None) -> Erasure:
    """Steps 2 and 3 on any erasure of `model` (`t_erasure`, made on these weights): the base
    shrunk toward a fresh initialisation, trained on the teacher's outputs. `model` is left as
    it was; the result is an `Erasure` of every parameter (`cfg.teacher` is only recorded)."""
    from rich.progress import Progress

    from kif.data.packing import packed_batches, warmup_cosine
    from kif.models import export_frozen_parameters, snap_to_exportable, weight_hash

    timer = timer or Timer()
    ids = corpus_ids(model, concept, cfg.shared_repeats, cfg.forget_probes)
    base_hash = weight_hash(model)
    if t_erasure.base_hash != base_hash:
        raise ErasureError(f"the teacher erasure ({t_erasure.method}, {cfg.teacher}) was made "
                           f"on another model (its base hash differs from this model's)")
    with timer.section("teacher"):
        teacher = copy.deepcopy(model)
        t_erasure.apply(teacher)
        for p in teacher.parameters():
            p.requires_grad_(False)
    frozen = set(export_frozen_parameters(model))
    names = [n for n, _ in model.named_parameters() if n not in frozen]
    dev = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id
    batches = packed_batches(ids, cfg.batch, cfg.row_len, ids[0][0] if pad is None else pad,
                             random.Random(cfg.seed))
    history: list[dict[str, Any]] = []
    with inplace_training(model, names) as state:
        with timer.section("noise"), torch.no_grad():
            init = _fresh_init(model, cfg.seed)
            for n in names:
                p = state.params[n]
                p.mul_(1 - cfg.alpha).add_(init[n].to(p.device, p.dtype), alpha=cfg.alpha)
            del init
        params = state.trainable(names)
        decay = [p for p in params if p.dim() >= 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": [p for p in params if p.dim() < 2],
                                  "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
        model.train()
        with timer.section("distill"), Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"undo: distilling {t_erasure.method}", total=cfg.steps)
            for step in range(cfg.steps):
                tokens, mask = next(batches)
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
                loss = distill_loss(model, teacher, tokens.to(dev), mask.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                bar.advance(task)
                if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                    history.append({"step": step + 1, "kl": float(loss.detach())})
        model.eval()
        del opt, teacher
        with timer.section("deltas"):
            snap_to_exportable(model)
            deltas = {n: Delta(dense=d.cpu()) for n, d in state.changed().items()}
    info = {"teacher": {"method": t_erasure.method, "source": cfg.teacher,
                        "seconds": t_erasure.info.get("seconds")},
            "n_sentences": len(ids), "history": history, "n_changed_params": len(deltas),
            "seconds": {**timer.sections, "total": timer.total}}
    return Erasure(method="undo", concepts=(concept.name,), base_hash=base_hash,
                   base_spec=base_spec, deltas=deltas, settings=dataclasses.asdict(cfg), info=info)
