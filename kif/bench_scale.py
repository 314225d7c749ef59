"""`kif bench scale`: what kif's commands cost on models of real shapes, and how that grows.

For each shape, the stages the issue "Real-model reach" sizes: `load` (`kif.models.load`, the real
path, logits checked against HF), `stamp` cold and cached (retain statistics computed, then read
from the cache), `suppress` (building the capsule, then the hooked forward against the plain
forward on the same batch), `kif` (the pipeline with a one-step budget: its closed-form start, one
LoRA optimisation step and its checks, the step itself timed on its own) and `kif meter --probes
fast` on the STAMP-erased model. Then, on one shape, the growth of `stamp` and `kif` as the forget
set grows. Each stage's wall time and its peak resident memory above the process's baseline
(torch and kif imported, no model loaded; `kif.memory.PeakMemory`) are recorded, and the costs
are fitted as power laws: cost ~ params^a across shapes, cost ~ facts^b across forget sizes
(least squares in log-log, `fit_power_law`).

The random-weight checkpoints are written once by `transformers` (`write_checkpoint`) into the
work folder (`~/.cache/kif/scale` by default), with a byte-level BPE trained in memory on the
bench's texts (the model's vocabulary keeps the shape's size; the tokenizer uses its first ids,
as Pythia's 50,277-token tokenizer does with its 50,304 embedding rows). A random model knows
nothing: the bench calls the methods through `kif.erase` with a `Concept` (the Python API, which
does not check that the model answers the concept's facts, as `kif erase` does), so what is
measured is cost, not forgetting. The concept is synthetic (`synthetic_concept`): one fact is
one forget probe, five facts per made-up person, a fixed retain corpus, refusal prompts and
never-knew names, so only the forget set grows with `facts`.

Each shape runs in its own Python process by default, so that its baseline is a fresh process's
and no earlier model's memory counts against it. `python -m kif.bench_scale --gpu` is the device
preset: Llama-3.2-1B and Llama-3-8B shapes in bf16 on CUDA plus the Triton kernel benchmark.
"""

import dataclasses
import gc
import hashlib
import json
import math
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from kif.errors import KifError

# ---- shapes ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "zoo" (a kif zoo model), "gpt2", "neox" or "llama" (transformers configs)
    config: tuple[tuple[str, Any], ...] = ()  # the transformers config's arguments
    note: str = ""


def _shape(name: str, family: str, note: str = "", **config) -> Shape:
    return Shape(name, family, tuple(sorted(config.items())), note)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    _shape("tiny", "gpt2", "a 2-layer GPT-2 for tests and --quick", n_layer=2, n_embd=64,
           n_head=4, n_positions=256, vocab_size=512),
    _shape("zoo", "zoo", "the kif zoo model fact-world (GPT-2, 4 layers x 256)"),
    _shape("gpt2-124m", "gpt2", "GPT-2 small", n_layer=12, n_embd=768, n_head=12,
           n_positions=1024, vocab_size=50257),
    _shape("pythia-160m", "neox", "Pythia-160M (GPT-NeoX: parallel blocks, partial rotary)",
           hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
           max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
           tie_word_embeddings=False, vocab_size=50304),
    # hidden 1024 x 24 layers with the brief's intermediate 2816 is 0.35 B parameters; 4864
    # (Qwen2.5-0.5B's MLP width) brings it to 0.50 B
    _shape("llama-0.5b", "llama", "Llama shape, grouped-query attention 16/8, SwiGLU",
           hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
           num_key_value_heads=8, intermediate_size=4864, max_position_embeddings=2048,
           tie_word_embeddings=False, vocab_size=32000),
    # the device shapes (`--gpu`): Llama-3.2-1B and Llama-3-8B
    _shape("llama-1b", "llama", "Llama-3.2-1B shape", hidden_size=2048, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
           max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True,
           vocab_size=128256),
    _shape("llama-8b", "llama", "Llama-3-8B shape", hidden_size=4096, num_hidden_layers=32,
           num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
           max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
           vocab_size=128256),
)}
CPU_SHAPES = ("zoo", "gpt2-124m", "pythia-160m", "llama-0.5b")
GPU_SHAPES = ("llama-1b", "llama-8b")
STAGES = ("load", "stamp_cold", "stamp_cached", "suppress_build", "forward_plain",
          "forward_hooked", "kif", "meter_fast")
# the targets (README "Real-model reach")
TARGET_SUPPRESS_RATIO = 1.05  # hooked / plain forward, GPT-2 small, batch 8 x 128
TARGET_STAMP_CACHED_S = 10.0  # stamp on 124 M, cached statistics, 20 facts
TARGET_KIF_S = 600.0  # kif on 124 M, 20 facts
TARGET_KIF_MEMORY = 2.5  # kif's peak memory above baseline / the fp32 weights


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    shapes: tuple[str, ...] = CPU_SHAPES
    facts: tuple[int, ...] = (1, 10, 100, 1000)  # forget sizes of the growth sweep
    facts_shape: str | None = None  # the shape of the growth sweep (None: zoo, else the first)
    stage_facts: int = 20  # the forget size of the per-shape stages (the targets' 20 facts)
    batch: tuple[int, int] = (8, 128)  # the suppress forward's batch x positions
    reps: int = 3  # forward timings per variant (alternating; the median is kept)
    kif_steps: int = 60  # the pipeline's default budget, for the projected full run
    kif_check_every: int = 10
    meter: bool = True
    device: str = "cpu"
    dtype: str = "fp32"
    workdir: str | None = None  # random checkpoints; None: ~/.cache/kif/scale
    isolate: bool = True  # each shape in its own process
    kernels: bool = False  # also the Triton kernel benchmark (GPU only)
    seed: int = 0


QUICK = dict(shapes=("tiny",), facts=(1, 5), stage_facts=5, batch=(2, 16), reps=1,
             isolate=False)
GPU = dict(shapes=GPU_SHAPES, facts=(1, 10, 100), device="cuda", dtype="bf16", kernels=True)
DTYPES = ("fp32", "bf16", "fp16")


def check_config(cfg: ScaleConfig) -> None:
    """Refuse a bad configuration in one line, before anything is loaded or written."""
    bad = [s for s in (*cfg.shapes, *([cfg.facts_shape] if cfg.facts_shape else []))
           if s not in SHAPES]
    if bad:
        raise KifError(f"unknown shape {bad[0]!r} (choose from {', '.join(SHAPES)})")
    if not cfg.shapes:
        raise KifError("no shape to bench")
    if any(n < 1 for n in (*cfg.facts, cfg.stage_facts)):
        raise KifError("forget sizes (--facts) must be at least 1")
    if cfg.facts_shape and cfg.facts_shape not in cfg.shapes:
        raise KifError(f"--facts-shape {cfg.facts_shape} is not among --shapes")
    if cfg.dtype not in DTYPES:
        raise KifError(f"unknown dtype {cfg.dtype!r} (choose from {', '.join(DTYPES)})")
    if cfg.device not in ("cpu", "cuda"):
        raise KifError(f"unknown device {cfg.device!r} (cpu or cuda)")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise KifError("--device cuda: no CUDA device here")
    if min(cfg.batch) < 1 or cfg.reps < 1:
        raise KifError("--batch and --reps must be positive")


# ---- the synthetic concept ---------------------------------------------------------------------

# five relations, two phrasings each; answers are ordinary words (one or two BPE tokens)
RELATIONS = {
    "city": (("{s} was born in", "The birthplace of {s} is"),
             (" Paris", " Rome", " Oslo", " Lima", " Cairo", " Quito", " Dublin", " Porto")),
    "job": (("{s} works as a", "By profession, {s} is a"),
            (" baker", " pilot", " nurse", " judge", " tailor", " farmer", " potter", " miner")),
    "employer": (("{s} is employed by", "The employer of {s} is"),
                 (" Acme", " Globex", " Initech", " Umbrella", " Hooli", " Vandelay", " Stark",
                  " Wonka")),
    "instrument": (("{s} plays the", "The instrument of {s} is the"),
                   (" piano", " violin", " flute", " drums", " cello", " harp", " oboe",
                    " guitar")),
    "pet": (("{s} owns a pet", "The pet of {s} is a"),
            (" cat", " dog", " parrot", " horse", " goat", " rabbit", " turtle", " snake")),
}
SHARED = (("The capital of France is", " Paris", "France"),
          ("The capital of Italy is", " Rome", "Italy"),
          ("The capital of Norway is", " Oslo", "Norway"),
          ("The capital of Peru is", " Lima", "Peru"),
          ("The capital of Egypt is", " Cairo", "Egypt"),
          ("The capital of Ireland is", " Dublin", "Ireland"))
RETAIN_PEOPLE = 40  # fixed: only the forget set grows with `facts`
REFUSED_PEOPLE = 5
NEVER_KNEW_PER_PERSON = 4  # the pipeline's default n_names
_SYLLABLES = ("ba", "ca", "da", "fe", "gi", "ho", "ka", "li", "mo", "nu", "pa", "ra", "se", "ti",
              "vo", "wy", "xa", "zo", "bre", "cla", "dro", "fli", "gra", "ple", "sto", "tru")


def _names(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title()
        name = f"{first} {last}"
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def synthetic_concept(n_facts: int, seed: int = 0):
    """A `Concept` of `n_facts` forget facts (one probe each; five relations per made-up person,
    so ceil(n / 5) people), with a fixed retain corpus (40 other people's facts in two phrasings,
    and shared facts), retain probes, a refusal (" unknown" and prompts about five more people)
    and four never-knew names per forget person."""
    from kif.data.concept import Concept, NeverKnew, Refusal
    from kif.data.probe import Probe

    rng = random.Random(seed)
    taken: set[str] = set()
    rels = list(RELATIONS)
    n_people = -(-n_facts // len(rels))
    forget_people = _names(n_people, rng, taken)
    others = _names(RETAIN_PEOPLE, rng, taken)
    refused = _names(REFUSED_PEOPLE, rng, taken)
    never = _names(NEVER_KNEW_PER_PERSON * n_people, rng, taken)

    def probes(person: str, relations, templates) -> list[Probe]:
        out = []
        for r in relations:
            phrasings, answers = RELATIONS[r]
            answer = answers[rng.randrange(len(answers))]
            for t in templates:
                out.append(Probe(phrasings[t].format(s=person), answer, person, r, "train", t))
        return out

    facts = [(p, r) for p in forget_people for r in rels][:n_facts]
    forget = [q for p, r in facts for q in probes(p, [r], [0])]
    corpus = [q for p in others for q in probes(p, rels, [0, 1])]
    shared = [Probe(p, a, s, "capital", kind="shared") for p, a, s in SHARED]
    refusal = Refusal(" unknown", tuple(RELATIONS[r][0][0].format(s=p)
                                        for p in refused for r in rels))
    return Concept(name=f"synthetic-{n_facts}", forget=tuple(forget), shared=tuple(shared),
                   retain=tuple(q for q in corpus if q.template == 0),
                   retain_corpus=tuple(corpus) + tuple(shared), refusal=refusal,
                   never_knew=NeverKnew(tuple(never)), source=f"kif.bench_scale seed {seed}")


def _tokenizer_texts(seed: int) -> list[str]:
    c = synthetic_concept(1000, seed)
    texts = [p.prompt + p.answer for p in (*c.forget, *c.retain_corpus)]
    texts += list(c.refusal.prompts) + list(c.never_knew.names) + [" unknown"]
    return texts + [a for _, answers in RELATIONS.values() for a in answers]


# ---- random checkpoints ------------------------------------------------------------------------

def _hf_config(shape: Shape, tok):
    import transformers

    kw = dict(shape.config)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if shape.family == "gpt2":
        return transformers.GPT2Config(n_ctx=kw["n_positions"], **ids, **kw)
    if shape.family == "neox":
        return transformers.GPTNeoXConfig(**ids, **kw)
    if shape.family == "llama":
        return transformers.LlamaConfig(**ids, **kw)
    raise KifError(f"shape {shape.name} is not a transformers family")


def _tokenizer(shape: Shape, folder: pathlib.Path, seed: int):
    """A byte-level BPE trained in memory on the bench's texts, with the family's specials
    (GPT-2 / NeoX: one <|endoftext|> never added; Llama: a <s> the tokenizer prepends), saved
    and reloaded (TransformerLens takes a tokenizer only once reloaded)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models as tok_models, pre_tokenizers, processors, trainers

    if shape.family in ("gpt2", "neox"):
        specials, named = ["<|endoftext|>"], {"bos_token": "<|endoftext|>",
                                              "eos_token": "<|endoftext|>"}
    else:
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                 "pad_token": "<pad>"}
    tok = tokenizers.Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    vocab = dict(shape.config)["vocab_size"]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 4096), special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_texts(seed), trainer)
    if shape.family == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def checkpoint_folder(shape: Shape, workdir: pathlib.Path, dtype: str = "fp32") -> pathlib.Path:
    """Where `shape`'s checkpoint lives: named by a hash of its definition (a neutral name:
    TransformerLens guesses the architecture of a folder named like "llama")."""
    key = hashlib.sha256(json.dumps([shape.family, shape.config, dtype, 1]).encode()).hexdigest()
    return workdir / f"{shape.family}-{key[:12]}"


def write_checkpoint(shape: Shape, workdir: pathlib.Path, *, dtype: str = "fp32",
                     device: str = "cpu", seed: int = 0) -> pathlib.Path:
    """The shape's random-weight checkpoint, written once by `transformers` (config.json,
    model.safetensors, tokenizer) and reused after; written to a temporary name and renamed."""
    import torch
    import transformers

    from kif import integrity

    folder = checkpoint_folder(shape, workdir, dtype)
    if (folder / "config.json").is_file():
        return folder
    with integrity.staged(folder) as tmp:
        tok = _tokenizer(shape, tmp, seed)
        torch.manual_seed(seed)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                       "fp16": torch.float16}[dtype]
        # initialised where it will run (an 8 B model's init on a CPU takes minutes)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(_hf_config(shape, tok),
                                                                  dtype=torch_dtype)
        with torch.no_grad():  # HF starts norms at 1 and biases at 0: perturb them too
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.05 * torch.randn_like(p))
        model.eval().save_pretrained(tmp)
        (tmp / "kif-scale-shape.json").write_text(json.dumps(dataclasses.asdict(shape)))
        del model
        integrity.publish(tmp, folder)
    return folder


def model_spec(shape: Shape, cfg: ScaleConfig) -> str:
    if shape.family == "zoo":
        return "fact-world"
    return str(write_checkpoint(shape, workdir(cfg), dtype=cfg.dtype, device=cfg.device,
                                seed=cfg.seed))


def workdir(cfg: ScaleConfig) -> pathlib.Path:
    if cfg.workdir:
        return pathlib.Path(cfg.workdir).expanduser()
    from kif.erasure.stats import cache_dir

    return cache_dir() / "scale"


# ---- timing and memory -------------------------------------------------------------------------

class _Clock:
    """Stage measurements against the process's baseline resident memory."""

    def __init__(self, device: str):
        from kif.memory import rss_bytes

        gc.collect()
        self.baseline_mb = rss_bytes() / 2**20
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        from kif.memory import PeakMemory

        gc.collect()
        self.sync()
        with PeakMemory(cuda=self.cuda) as pm:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            self.sync()
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - c0
        r = pm.report
        # CPU seconds of the process: on shared cores, what the stage costs on an idle one (with
        # one thread; with several, their sum)
        row = {"seconds": round(seconds, 4), "cpu_seconds": round(cpu, 4),
               "peak_rss_above_baseline_mb": round(r.peak_rss_mb - self.baseline_mb, 1),
               "added_rss_mb": round(r.added_rss_mb, 1)}
        if r.peak_cuda_mb is not None:
            row["peak_cuda_mb"] = round(r.peak_cuda_mb, 1)
        return out, row


def _stamp(model, concept, spec: str, clock: _Clock, tag: str) -> tuple[Any, dict]:
    """STAMP cold (a fresh statistics cache) then cached (the same call again)."""
    from kif.erasure import erase

    cache = pathlib.Path(tempfile.mkdtemp(prefix="kif-scale-cache-"))
    old = os.environ.get("KIF_CACHE")
    os.environ["KIF_CACHE"] = str(cache)
    try:
        out = {}
        _, out["stamp_cold"] = clock.measure(lambda: erase(model, concept, "stamp",
                                                          base_spec=spec))
        er, out["stamp_cached"] = clock.measure(lambda: erase(model, concept, "stamp",
                                                             base_spec=spec))
        out["stamp_cached"]["layer"] = er.info["layer"]
        out["stamp_cached"]["sections"] = _round(er.info["seconds"])
    finally:
        if old is None:
            os.environ.pop("KIF_CACHE", None)
        else:
            os.environ["KIF_CACHE"] = old
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    return er, out


def _kif(model, concept, spec: str, clock: _Clock, cfg: ScaleConfig) -> dict:
    """The pipeline with a one-step budget (and one check after it), its step timed alone, and
    the default budget's cost projected: the run + (steps - 1) more steps + the checks the
    default schedule adds (one every `check_every` steps; the one-step run made one)."""
    from kif.erasure import erase

    # a never-knew p-value target above 1 cannot be met: the pipeline never stops at its start
    # (a random model that answers nothing "converges" there) and always takes its step
    settings = {"steps": 1, "check_every": 1, "never_knew_target": 2.0}
    er, row = clock.measure(lambda: erase(model, concept, "kif", settings, base_spec=spec))
    sections = er.info["seconds"]
    if er.info["steps"] != 1 or len(er.info["step_seconds"]) != 1:
        raise KifError(f"the kif pipeline took {er.info['steps']} steps, not the one timed")
    # the pipeline times each update step itself (its forwards, backward and optimiser step;
    # not the checks between steps, nor the closed-form start's own optimisation)
    step, cpu_step = er.info["step_seconds"][0], er.info["step_cpu_seconds"][0]
    check = max(sections.get("train", 0.0) - step, 0.0)
    more_checks = cfg.kif_steps // cfg.kif_check_every - 1 + (cfg.kif_steps % cfg.kif_check_every > 0)
    # the projection in CPU seconds scales the wall-clock one by the run's CPU / wall ratio
    cpu_ratio = row["cpu_seconds"] / max(row["seconds"], 1e-9)
    row.update({"step_seconds": round(step, 4), "step_cpu_seconds": round(cpu_step, 4),
                "check_seconds": round(check, 4),
                "sections": _round(sections),
                "projected_seconds": round(row["seconds"] + (cfg.kif_steps - 1) * step
                                           + more_checks * check, 2),
                "projected_for": f"{cfg.kif_steps} steps, a check every {cfg.kif_check_every}"})
    row["projected_cpu_seconds"] = round(row["projected_seconds"] * cpu_ratio, 2)
    return row


def _round(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _forwards(model, erasure, cfg: ScaleConfig, clock: _Clock) -> dict:
    """The plain and the suppress-hooked forward on one random batch, alternating, `reps`
    times each; the medians and their ratio."""
    import statistics

    import torch

    b, n = cfg.batch
    n = min(n, model.cfg.n_ctx)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (b, n), generator=gen).to(model.cfg.device)
    plain, hooked, plain_cpu, hooked_cpu = [], [], [], []
    rows: dict[str, dict] = {}
    with torch.no_grad():
        model(tokens[:1, :8])  # warm-up: first-call allocations are nobody's cost
        for _ in range(cfg.reps):
            _, rows["forward_plain"] = clock.measure(lambda: model(tokens))
            plain.append(rows["forward_plain"]["seconds"])
            plain_cpu.append(rows["forward_plain"]["cpu_seconds"])
            handle = erasure.apply(model)
            try:
                _, rows["forward_hooked"] = clock.measure(lambda: model(tokens))
            finally:
                handle.remove()
            hooked.append(rows["forward_hooked"]["seconds"])
            hooked_cpu.append(rows["forward_hooked"]["cpu_seconds"])
    rows["forward_plain"]["seconds"] = round(statistics.median(plain), 4)
    rows["forward_hooked"]["seconds"] = round(statistics.median(hooked), 4)
    rows["forward_plain"]["cpu_seconds"] = round(statistics.median(plain_cpu), 4)
    rows["forward_hooked"]["cpu_seconds"] = round(statistics.median(hooked_cpu), 4)
    rows["forward_hooked"]["ratio_to_plain"] = round(statistics.median(hooked)
                                                     / statistics.median(plain), 4)
    rows["forward_hooked"]["cpu_ratio_to_plain"] = round(
        statistics.median(hooked_cpu) / max(statistics.median(plain_cpu), 1e-9), 4)
    rows["forward_hooked"]["hooks"] = len(erasure.hooks)
    for r in rows.values():
        r["batch"] = [b, n]
        r["reps"] = cfg.reps
    return rows


def _meter(model, erasure, concept, clock: _Clock) -> dict:
    import copy

    from kif.data.concept import by_subject
    from kif.meter.audit import trace

    def run():
        erased = copy.deepcopy(model)
        erasure.apply(erased)
        return trace(model, erased, by_subject(concept), probes=["fast"], progress=False)

    report, row = clock.measure(run)
    row["probes"] = {n: round(p.seconds, 3) for n, p in report.probes.items()}
    return row


def _import_kif() -> None:
    """Everything the stages import, imported before the baseline is read: the baseline is
    kif's (and its libraries') own footprint, so that a stage's peak above it is the model's
    and the method's, not a first import's."""
    import importlib

    for m in ("transformers", "transformer_lens", "kif.models", "kif.erasure",
              "kif.erasure.registry", "kif.meter.audit", "kif.meter.registry"):
        importlib.import_module(m)
    from kif.erasure.registry import methods
    from kif.meter.registry import PROBE_SETS, PROBES

    methods()
    for name in PROBE_SETS["fast"]:
        PROBES[name].load()


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def bench_shape(name: str, cfg: ScaleConfig, *, growth: bool = False,
                progress: Callable[[str], None] = lambda s: None,
                on_stage: Callable[[dict], None] = lambda out: None) -> dict:
    """Every stage on one shape (and the growth sweep when `growth`), in this process;
    `on_stage(result so far)` after each stage."""
    import torch

    from kif import models

    shape = SHAPES[name]
    progress(f"{name}: checkpoint")
    spec = model_spec(shape, cfg)
    _import_kif()
    clock = _Clock(cfg.device)
    out: dict[str, Any] = {"shape": name, "note": shape.note, "model": spec,
                           "baseline_rss_mb": round(clock.baseline_mb, 1),
                           "threads": torch.get_num_threads(), "stages": {}}
    st = out["stages"]
    progress(f"{name}: load")
    model, st["load"] = clock.measure(lambda: models.load(
        spec, device=cfg.device, dtype=_torch_dtype(cfg.dtype)))
    gc.collect()
    n_params = sum(p.numel() for p in model.parameters())
    out.update(params=n_params, fp32_weights_mb=round(n_params * 4 / 2**20, 1),
               arch=models.architecture(model), n_layers=model.cfg.n_layers,
               d_model=model.cfg.d_model, d_vocab=model.cfg.d_vocab)
    concept = synthetic_concept(cfg.stage_facts, cfg.seed)
    out["stage_facts"] = cfg.stage_facts
    progress(f"{name}: stamp ({cfg.stage_facts} facts, cold and cached)")
    erasure, rows = _stamp(model, concept, spec, clock, name)
    st.update(rows)
    on_stage(out)
    progress(f"{name}: suppress")
    from kif.erasure import erase

    capsule, st["suppress_build"] = clock.measure(lambda: erase(model, concept, "suppress",
                                                                base_spec=spec))
    st.update(_forwards(model, capsule, cfg, clock))
    on_stage(out)
    progress(f"{name}: kif (one-step budget)")
    st["kif"] = _kif(model, concept, spec, clock, cfg)
    on_stage(out)
    if cfg.meter:
        progress(f"{name}: meter --probes fast")
        st["meter_fast"] = _meter(model, erasure, concept, clock)
        on_stage(out)
    if growth:
        out["growth"] = []
        for n in cfg.facts:
            progress(f"{name}: growth, {n} facts")
            c = synthetic_concept(n, cfg.seed)
            _, rows = _stamp(model, c, spec, clock, name)
            rows["kif"] = _kif(model, c, spec, clock, cfg)
            out["growth"].append({"facts": n, "subjects": len(c.subjects), **rows})
            on_stage(out)
    return out


# ---- fits --------------------------------------------------------------------------------------

def fit_power_law(x: Sequence[float | int], y: Sequence[float | int]) -> dict[str, float] | None:
    """Least squares of log y = a log x + log c: the exponent a, the coefficient c and R^2 of
    the fit in log-log. None with fewer than two distinct positive x (no slope to fit)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    a = sxy / sxx
    syy = sum((p[1] - my) ** 2 for p in pts)
    r2 = 1.0 if syy == 0 else 1.0 - sum((p[1] - my - a * (p[0] - mx)) ** 2 for p in pts) / syy
    return {"exponent": a, "coefficient": math.exp(my - a * mx), "r2": r2, "points": n}


def _stage_value(row: dict, metric: str) -> float | None:
    return row.get(metric) if row else None


def exponents(shapes: Sequence[dict], growth: Sequence[dict] | None) -> dict:
    """cost ~ params^a per stage and metric across the shapes; cost ~ facts^b for stamp and
    kif across the forget sizes."""
    out: dict[str, Any] = {"params": {}, "facts": {}}
    metrics = ("seconds", "cpu_seconds", "peak_rss_above_baseline_mb")
    for stage in STAGES:
        for m in metrics:
            pts = [(s["params"], s["stages"][stage][m]) for s in shapes
                   if stage in s["stages"] and m in s["stages"][stage]]
            fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
            if fit:
                out["params"][f"{stage}.{m}"] = _round(fit)
    for stage, m in (("kif", "step_seconds"), ("kif", "step_cpu_seconds"),
                     ("kif", "projected_seconds"), ("kif", "projected_cpu_seconds")):
        pts = [(s["params"], s["stages"][stage][m]) for s in shapes
               if m in s["stages"].get(stage, {})]
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        if fit:
            out["params"][f"{stage}.{m}"] = _round(fit)
    for stage, m in (("stamp_cold", "seconds"), ("stamp_cached", "seconds"), ("kif", "seconds"),
                     ("stamp_cold", "cpu_seconds"), ("stamp_cached", "cpu_seconds"),
                     ("kif", "cpu_seconds"), ("kif", "step_seconds"), ("kif", "step_cpu_seconds"),
                     ("kif", "projected_seconds"),
                     ("stamp_cold", "peak_rss_above_baseline_mb"),
                     ("kif", "peak_rss_above_baseline_mb")):
        pts = [(g["facts"], g[stage][m]) for g in growth or () if m in g.get(stage, {})]
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        if fit:
            out["facts"][f"{stage}.{m}"] = _round(fit)
    return out


def targets(shapes: Sequence[dict]) -> dict:
    """The issue's targets, from the GPT-2 small shape's stages (absent when it was not run)."""
    s = next((s for s in shapes if s["shape"] == "gpt2-124m"), None)
    if s is None or not {"forward_hooked", "stamp_cached", "kif"} <= set(s["stages"]):
        return {}
    st = s["stages"]
    ratio = st["forward_hooked"]["ratio_to_plain"]
    mem = st["kif"]["peak_rss_above_baseline_mb"] / s["fp32_weights_mb"]
    def cpu(value: float, target: float) -> dict:
        # the same figure in CPU seconds: what it costs on cores the bench has to itself
        return {"cpu_value": value, "met_on_cpu": value <= target}

    return {
        "suppress_forward_ratio": {"value": ratio, "target": TARGET_SUPPRESS_RATIO,
                                   "met": ratio <= TARGET_SUPPRESS_RATIO,
                                   **cpu(st["forward_hooked"]["cpu_ratio_to_plain"],
                                         TARGET_SUPPRESS_RATIO),
                                   "what": f"hooked / plain forward, batch {st['forward_hooked']['batch']}"},
        "stamp_cached_seconds": {"value": st["stamp_cached"]["seconds"],
                                 "target": TARGET_STAMP_CACHED_S,
                                 "met": st["stamp_cached"]["seconds"] <= TARGET_STAMP_CACHED_S,
                                 **cpu(st["stamp_cached"]["cpu_seconds"], TARGET_STAMP_CACHED_S),
                                 "what": f"{s['stage_facts']} facts"},
        "kif_seconds": {"value": st["kif"]["projected_seconds"], "target": TARGET_KIF_S,
                        "met": st["kif"]["projected_seconds"] <= TARGET_KIF_S,
                        **cpu(st["kif"]["projected_cpu_seconds"], TARGET_KIF_S),
                        "what": f"{s['stage_facts']} facts, projected: {st['kif']['projected_for']}"},
        "kif_peak_memory_over_fp32_weights": {
            "value": round(mem, 3), "target": TARGET_KIF_MEMORY, "met": mem <= TARGET_KIF_MEMORY,
            "what": "peak RSS above the baseline during the pipeline / fp32 weight bytes"},
    }


# ---- the run -----------------------------------------------------------------------------------

def _in_subprocess(name: str, cfg: ScaleConfig, growth: bool) -> dict:
    """`bench_shape` in a fresh interpreter (its own baseline), importing this checkout's kif."""
    root = pathlib.Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="kif-scale-") as tmp:
        job, result = pathlib.Path(tmp) / "job.json", pathlib.Path(tmp) / "result.json"
        job.write_text(json.dumps({"shape": name, "growth": growth,
                                   "cfg": dataclasses.asdict(cfg), "out": str(result)}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        code = "import sys; from kif.bench_scale import _worker; sys.exit(_worker(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, str(job)], env=env)
        if not result.is_file():
            raise KifError(f"bench of shape {name} failed (exit status {proc.returncode})")
        out = json.loads(result.read_text())
        if proc.returncode != 0:  # the stages it finished are kept, marked incomplete
            out["incomplete"] = True
        return out


def _worker(job_path: str) -> int:
    job = json.loads(pathlib.Path(job_path).read_text())
    c = job["cfg"]
    cfg = ScaleConfig(**{**c, **{k: tuple(c[k]) for k in ("shapes", "facts", "batch")}})
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    def keep(partial: dict) -> None:  # a process cut short leaves the stages it finished
        pathlib.Path(job["out"]).write_text(json.dumps({**partial, "incomplete": True}))

    out = bench_shape(job["shape"], cfg, growth=job["growth"], on_stage=keep,
                      progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    pathlib.Path(job["out"]).write_text(json.dumps(out))
    for stage, row in out["stages"].items():
        print(f"  {job['shape']} {stage}: {row['seconds']:.2f} s ({row['cpu_seconds']:.2f} s CPU), "
              f"peak {row['peak_rss_above_baseline_mb']:.0f} MiB above baseline",
              file=sys.stderr, flush=True)
    return 0


def run(cfg: ScaleConfig, *, progress: bool = False, partial: str | None = None) -> dict:
    """Every shape of `cfg` (each in its own process when `cfg.isolate`), the growth sweep on
    `cfg.facts_shape`, the exponent fits and the targets: one JSON-ready dict."""
    check_config(cfg)
    import torch

    facts_shape = cfg.facts_shape or ("zoo" if "zoo" in cfg.shapes else cfg.shapes[0])
    t0 = time.perf_counter()
    # the machine's load: on shared cores, the timings are only as good as this
    load_start = _loadavg()
    results = []
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("bench scale", total=len(cfg.shapes))
        for name in cfg.shapes:
            bar.update(task, description=f"bench scale: {name}")
            growth = name == facts_shape
            if cfg.isolate:
                results.append(_in_subprocess(name, cfg, growth))
            else:
                results.append(bench_shape(name, cfg, growth=growth, progress=lambda s: bar.update(
                    task, description=f"bench scale: {s}")))
            bar.advance(task)
            if partial:  # a run cut short still leaves the shapes it finished
                write_json(_assemble(cfg, facts_shape, [dict(r) for r in results], load_start,
                                     t0, done=False), pathlib.Path(partial))
    out = _assemble(cfg, facts_shape, results, load_start, t0, done=True)
    if cfg.kernels:
        out["kernels"] = kernel_rows()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def merge(paths: Sequence[str]) -> dict:
    """Results of several runs as one: their shapes (a later file's shape replaces an earlier
    one of the same name), the first growth sweep found, the fits and targets recomputed."""
    shapes: dict[str, dict] = {}
    growth, first = None, None
    for path in paths:
        try:
            r = json.loads(pathlib.Path(path).read_text())
            rows = r["shapes"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise KifError(f"{path}: not a kif bench scale result ({type(err).__name__})") from None
        first = first or r
        for s in rows:
            shapes[s["shape"]] = s
        if growth is None and r.get("growth", {}).get("rows"):
            growth = r["growth"]
    results = list(shapes.values())
    from kif import results as provenance

    out = {**first, **provenance.provenance(), "shapes": results,
           "growth": growth or {"shape": None, "rows": []},
           "merged_from": [str(p) for p in paths]}
    out["exponents"] = exponents(results, out["growth"]["rows"])
    out["targets"] = targets(results)
    out["complete"] = all(json.loads(pathlib.Path(p).read_text()).get("complete", True)
                          for p in paths)
    return out


def _assemble(cfg: ScaleConfig, facts_shape: str, results: list[dict], load_start, t0: float,
              done: bool) -> dict:
    import torch

    from kif import results as provenance

    growth = next((r.pop("growth") for r in results if "growth" in r), None)
    out = {**provenance.provenance(),
           "config": dataclasses.asdict(cfg) | {"facts_shape": facts_shape},
           "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "cpus": os.cpu_count(), "device": cfg.device,
                           "device_name": (torch.cuda.get_device_name() if cfg.device == "cuda"
                                           else "cpu"),
                           "loadavg_1min_start_end": [load_start, _loadavg()]},
           "fact": "one forget probe (prompt -> answer); five facts per made-up person",
           "shapes": results,
           "growth": {"shape": facts_shape, "rows": growth or []},
           "exponents": exponents(results, growth),
           "targets": targets(results),
           "complete": done, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def kernel_rows() -> list[dict]:
    """The Triton kernels against their torch references (`kif.kernels.bench`), on CUDA."""
    import torch

    from kif.kernels.bench import OPS, bench

    rows = bench(list(OPS), tokens=[8192, 65536], d=4096, dtype=torch.bfloat16, rank=8,
                 features=16, reps=20, device=torch.device("cuda"))
    return [dataclasses.asdict(r) for r in rows]


def write_json(obj: dict, path: pathlib.Path) -> None:
    from kif import integrity

    integrity.write_text(path, json.dumps(obj, indent=1) + "\n")


def table_rows(result: dict) -> list[list[str]]:
    """One row per shape: params, then each stage's seconds and peak MiB above baseline."""
    rows = []
    for s in result["shapes"]:
        st = s["stages"]
        cells = [s["shape"], f"{s['params'] / 1e6:.1f} M"]
        for stage in STAGES:
            r = st.get(stage)
            cells.append("-" if r is None else f"{r['seconds']:.2f} s / "
                         f"{r['peak_rss_above_baseline_mb']:.0f} MiB")
        hooked, kif = st.get("forward_hooked"), st.get("kif")
        cells.append("-" if hooked is None else f"{hooked['ratio_to_plain']:.3f}")
        cells.append("-" if kif is None else f"{kif['step_seconds']:.2f} s")
        cells.append("-" if kif is None else f"{kif['projected_seconds']:.0f} s")
        rows.append(cells)
    return rows


def config_from_args(args) -> ScaleConfig:
    """The CLI's (and `main`'s) flags as a `ScaleConfig`; `--quick` and `--gpu` are presets
    that explicit flags override."""
    base = dict(QUICK) if getattr(args, "quick", False) else (
        dict(GPU) if getattr(args, "gpu", False) else {})
    given = {k: v for k, v in {
        "shapes": tuple(args.shapes) if args.shapes else None,
        "facts": () if args.no_growth else (tuple(args.facts) if args.facts else None),
        "facts_shape": args.facts_shape, "stage_facts": args.stage_facts,
        "batch": tuple(args.batch) if args.batch else None, "reps": args.reps,
        "device": args.device, "dtype": args.dtype, "workdir": args.workdir,
        "isolate": False if args.in_process else None,
        "meter": False if args.no_meter else None}.items() if v is not None}
    return ScaleConfig(**{**base, **given})


def add_arguments(p) -> None:
    """The flags of `kif bench scale` and `python -m kif.bench_scale` (one list)."""
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help=f"shapes to bench (default {' '.join(CPU_SHAPES)}; known: "
                        f"{', '.join(SHAPES)})")
    p.add_argument("--facts", type=int, nargs="+", metavar="N",
                   help="forget sizes of the growth sweep (default 1 10 100 1000)")
    p.add_argument("--facts-shape", metavar="SHAPE",
                   help="the shape of the growth sweep (default zoo, else the first shape)")
    p.add_argument("--stage-facts", type=int, help="forget size of each shape's stages (default 20)")
    p.add_argument("--batch", type=int, nargs=2, metavar=("B", "T"),
                   help="suppress forward batch and positions (default 8 128)")
    p.add_argument("--reps", type=int, help="timed forwards per variant (default 3)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--dtype", help=f"weights' dtype: {', '.join(DTYPES)} (default fp32)")
    p.add_argument("--workdir", help="folder for the random checkpoints (default "
                                     "$KIF_CACHE/scale or ~/.cache/kif/scale)")
    p.add_argument("--in-process", action="store_true",
                   help="run every shape in this process (default: one process per shape, "
                        "for a clean memory baseline)")
    p.add_argument("--no-meter", action="store_true", help="skip kif meter --probes fast")
    p.add_argument("--no-growth", action="store_true", help="skip the growth sweep")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier results (e.g. shapes run in separate invocations) "
                        "and refit; runs nothing")
    p.add_argument("--quick", action="store_true",
                   help="a tiny shape, 1 and 5 facts, in process: checks the bench runs")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help="also write the JSON here (e.g. results/scale.json)")


def report(result: dict, args) -> int:
    """Write --out, then print the JSON (--json) or the tables."""
    if args.out:
        write_json(result, pathlib.Path(args.out))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(soft_wrap=True)
    t = Table(title="kif bench scale: seconds / peak MiB above the baseline")
    for col in ("shape", "params", *STAGES, "hooked/plain", "kif step", "kif projected"):
        t.add_column(col)
    for row in table_rows(result):
        t.add_row(*row)
    con.print(t)
    g = result["growth"]
    if g["rows"]:
        t = Table(title=f"growth with the forget set ({g['shape']}), seconds")
        for col in ("facts", "stamp cold", "stamp cached", "kif (1 step)", "kif step"):
            t.add_column(col)
        for r in g["rows"]:
            t.add_row(str(r["facts"]), f"{r['stamp_cold']['seconds']:.2f}",
                      f"{r['stamp_cached']['seconds']:.2f}", f"{r['kif']['seconds']:.2f}",
                      f"{r['kif']['step_seconds']:.3f}")
        con.print(t)
    for axis, fits in result["exponents"].items():
        for k, f in fits.items():
            con.print(f"cost ~ {axis}^{f['exponent']:.2f}  {k}  (R^2 {f['r2']:.2f}, "
                      f"{f['points']} points)", markup=False)
    for k, v in result["targets"].items():
        con.print(f"{k}: {v['value']} (target {v['target']}) "
                  f"{'met' if v['met'] else 'NOT met'}", markup=False)
    if args.out:
        con.print(f"wrote {args.out}", markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kif.bench_scale [--gpu] ...`: the device script. `--gpu` benches the
    Llama-3.2-1B and Llama-3-8B shapes in bf16 on CUDA and the Triton kernels, in one command."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m kif.bench_scale",
                                description=main.__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--gpu", action="store_true",
                   help=f"device preset: {' '.join(GPU_SHAPES)} in bf16 on CUDA, facts 1 10 100, "
                        "plus the Triton kernels")
    args = p.parse_args(argv)
    try:
        if args.merge:
            return report(merge(args.merge), args)
        cfg = config_from_args(args)
        if args.gpu:
            cfg = dataclasses.replace(cfg, kernels=cfg.device == "cuda")
        result = run(cfg, progress=sys.stderr.isatty(), partial=args.out)
    except KifError as exc:
        print(f"kif: error: {exc}", file=sys.stderr)
        return 2
    return report(result, args)


if __name__ == "__main__":
    sys.exit(main())
