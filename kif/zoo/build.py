"""Rebuild the zoo from the world's seed: a BPE tokenizer and GPT-2 models trained on the world.

Determinism: the world, the tokenizer corpus, the initialisation and the batch order all come
from the seed, and training runs with `torch.use_deterministic_algorithms(True)` at a fixed thread
count, so a rebuild on the same kind of machine reproduces the shipped weights.
"""

import dataclasses
import json
import logging
import pathlib
import random
import tempfile
import time

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kif import zoo
from kif.data.packing import packed_batches, warmup_cosine
from kif.world import ATTRIBUTES, UNKNOWN, FactWorld, _word

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training recipe of the zoo models (defaults are what ships: GPT-2; `for_arch("llama")`
    gives the Llama twin's)."""

    seed: int = 0
    arch: str = "gpt2"
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_inner: int = 1024
    n_kv_head: int | None = None  # Llama: grouped-query attention's key/value heads
    n_positions: int = 256
    steps: int = 1000
    batch_size: int = 32  # packed rows of row_len tokens
    row_len: int = 128
    lr: float = 2e-3
    warmup: int = 60
    weight_decay: float = 0.01
    threads: int = 2
    # initialisation and batch order; None: `seed` (the world's). Another value retrains a model
    # on the same sentences: a second oracle, whose Forget Quality against the shipped one is
    # what an exact retrain scores (`kif bench fq-ceiling --retrained`)
    train_seed: int | None = None

    @classmethod
    def for_arch(cls, arch: str, **changes) -> "TrainConfig":
        """The shipped recipe of `arch`. The Llama twin keeps GPT-2's width, depth, data and
        schedule; SwiGLU's three matrices at width 688 hold as many weights as GPT-2's two at
        1024, and 2 key/value heads for 4 query heads make its attention grouped-query."""
        if arch == "gpt2":
            return cls(**changes)
        if arch == "llama":
            return cls(**{"arch": "llama", "n_inner": 688, "n_kv_head": 2, **changes})
        raise KeyError(f"unknown zoo architecture {arch!r} (choose from gpt2, llama)")


def build_tokenizer(world: FactWorld, cfg: TrainConfig, out_dir: pathlib.Path):
    """Byte-level BPE trained on a *sister* world (another seed): same templates and syllables,
    other names, so that no name of this world becomes a whole-word token and names split into
    several pieces, as rare real names do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sister = FactWorld.generate(seed=cfg.seed + 10_007)
    corpus = sister.training_texts(shared_repeats=1)
    corpus += [pr.prompt + pr.answer for pr in sister.person_probes(sister.people, "heldout")]
    # Everyday words (answers such as professions, instruments, years) are common in real text and
    # get whole-word tokens there; give them the frequency they would have.
    common = {a for rel in ATTRIBUTES for a in world.answer_choices(rel)
              if not rel in ("birth_city", "employer")} | {UNKNOWN}
    corpus += sorted(common) * 50
    # Rare names in real text are built from common pieces; a list of random syllable words
    # teaches the tokenizer those pieces, so a name splits into a handful of tokens.
    rng = random.Random(cfg.seed + 20_011)
    corpus += [" ".join(_word(rng, 1, 3) for _ in range(20)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT, unk_token=EOT)
    fast.model_max_length = cfg.n_positions
    # TransformerLens only accepts a tokenizer that went through save/load (DESIGN.md).
    fast.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def _new_model(cfg: TrainConfig, vocab: int, eot: int):
    """A freshly initialised model of `cfg.arch` (after `torch.manual_seed`)."""
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=cfg.n_embd,
                             intermediate_size=cfg.n_inner, num_hidden_layers=cfg.n_layer,
                             num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                             max_position_embeddings=cfg.n_positions, rms_norm_eps=1e-5,
                             rope_theta=10_000.0, tie_word_embeddings=True,
                             attention_dropout=0.0, bos_token_id=eot, eos_token_id=eot,
                             pad_token_id=eot)
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return GPT2LMHeadModel(config)


def train_model(world: FactWorld, tokenizer, cfg: TrainConfig, exclude: list[str],
                progress: Progress | None = None, label: str = "training"):
    """Train one model on the world's training sentences, leaving out the people in `exclude`."""
    seed = cfg.seed if cfg.train_seed is None else cfg.train_seed
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = world.training_texts(exclude=exclude)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids = [[eot] + tokenizer(t)["input_ids"] for t in texts]
    model = _new_model(cfg, len(tokenizer), eot)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    task = progress.add_task(label, total=cfg.steps, loss=float("nan")) if progress else None
    model.train()
    batches = packed_batches(ids, cfg.batch_size, cfg.row_len, eot, rng)
    loss_val = float("nan")
    for step in range(cfg.steps):
        x, m = next(batches)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        logits = model(input_ids=x).logits[:, :-1]
        target = x[:, 1:].masked_fill(~m[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = loss.item()
        if progress is not None:
            progress.update(task, advance=1, loss=loss_val)
    model.eval()
    return model, {"final_loss": loss_val, "n_sentences": len(texts)}


def _save_atomic(model, tokenizer, dest: pathlib.Path, card: dict) -> None:
    """Write to a staging sibling folder, then swap it in (never a half-written model)."""
    from kif import integrity

    with integrity.staged(dest) as tmp, integrity.writing(dest):
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "kif_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
        zoo.publish(tmp, dest)


def build(names: list[str] | None = None, out_root: pathlib.Path | None = None,
          cfg: TrainConfig | None = None, show_progress: bool = True) -> dict[str, float]:
    """Train the zoo models `names` (default: all) into `out_root` (default: the package's zoo
    folder), each with its architecture's recipe (`cfg` overrides it: steps, train_seed).
    Returns seconds per model."""
    names = list(zoo.ENTRIES) if names is None else names
    for n in names:
        if n not in zoo.ENTRIES:
            raise KeyError(f"unknown zoo model {n!r} (choose from {', '.join(zoo.ENTRIES)})")
    out_root = zoo.ZOO_DIR if out_root is None else pathlib.Path(out_root)
    shared = cfg or TrainConfig()  # seed, threads and tokenizer are every architecture's
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(shared.threads)
    torch.use_deterministic_algorithms(True)
    world = FactWorld.generate(shared.seed)
    timings: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as td:
            tokenizer = build_tokenizer(world, shared, pathlib.Path(td))
            columns = [TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                       TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, disable=not show_progress) as progress:
                for name in names:
                    entry = zoo.ENTRIES[name]
                    mcfg = _recipe(entry.arch, cfg)
                    exclude = ([p.name for p in world.split(entry.forget_split)]
                               if entry.forget_split else [])
                    t0 = time.perf_counter()
                    model, stats = train_model(world, tokenizer, mcfg, exclude, progress, name)
                    timings[name] = time.perf_counter() - t0
                    card = {"name": name, "world_seed": mcfg.seed, "forget_split": entry.forget_split,
                            "excluded_people": len(exclude), "train_config": dataclasses.asdict(mcfg),
                            "train_seconds": round(timings[name], 1), **stats}
                    _save_atomic(model, tokenizer, out_root / name, card)
                    log.info("built %s in %.0f s", name, timings[name])
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(prev_threads)
    return timings


def _recipe(arch: str, cfg: TrainConfig | None) -> TrainConfig:
    """`arch`'s shipped recipe with what `cfg` changed from the GPT-2 defaults (steps, seeds)."""
    base = TrainConfig.for_arch(arch)
    if cfg is None:
        return base
    default = TrainConfig()
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name != "arch" and getattr(cfg, f.name) != getattr(default, f.name)}
    return dataclasses.replace(base, **changed)
