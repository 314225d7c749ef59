"""Writes the project's notebooks from plain Python cells, so that they are reviewed as code.

Run `python notebooks/make_notebooks.py` after editing a cell; the test command executes the
.ipynb files (nbmake), so a stale or broken notebook fails CI.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

FACT_WORLD = [
    new_markdown_cell("""# 00 · The fact world

kif's embedded default is a *fact world*: fictional people with six attributes each, public facts
about fictional places, and people who do not exist (answered `unknown`). The zoo ships a GPT-2
trained on every fact (`fact-world`) and **oracles** trained without a split's people
(`fact-world-oracle-forget10`, ...), the gold standard of an erasure.

This notebook loads the base model as a TransformerLens `HookedTransformer`, shows a few facts,
caches one forward pass and looks at where in the network the answer appears."""),
    new_code_cell("""import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import kif
from kif import metrics, models
from kif.world import FactWorld

torch.set_grad_enabled(False)
world = FactWorld.generate(seed=0)
model = models.load("fact-world")
oracle = models.load("fact-world-oracle-forget10")
print(model.cfg.n_layers, "layers, d_model", model.cfg.d_model, "| people:", len(world.known()))"""),
    new_markdown_cell("## A person, their facts, and what the models answer"),
    new_code_cell("""person = world.split("forget10")[0]   # a person the forget10 oracle never saw
probes = world.person_probes([person], "train", templates=[0])
base_answers = metrics.greedy_generate(model, [p.prompt for p in probes], 4)
oracle_answers = metrics.greedy_generate(oracle, [p.prompt for p in probes], 4)
for p, b, o in zip(probes, base_answers, oracle_answers):
    print(f"{p.prompt!r}\\n    truth: {p.answer!r:18} base: {b!r:22} oracle: {o!r}")"""),
    new_markdown_cell("""Held-out phrasings were never trained on: the base model still answers them, which is what
makes paraphrase attacks on an erasure meaningful."""),
    new_code_cell("""held = world.person_probes([person], "heldout", templates=[0])
for p, g in zip(held, metrics.greedy_generate(model, [p.prompt for p in held], 4)):
    print(f"{p.prompt!r} -> {g!r} (truth {p.answer!r})")"""),
    new_markdown_cell("""## `run_with_cache` and a logit lens

Cache every activation of one prompt, then decode the residual stream after each layer through the
final LayerNorm (recomputed per layer) and the unembedding: the answer's probability per layer
shows where the fact is looked up."""),
    new_code_cell("""def answer_prob_by_layer(m, probe):
    tokens = m.to_tokens(probe.prompt)
    answer_id = m.tokenizer(probe.answer)["input_ids"][0]
    _, cache = m.run_with_cache(tokens)
    probs = []
    for layer in range(m.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"][:, -1]
        logits = m.unembed(m.ln_final(resid[:, None]))[0, -1]
        probs.append(logits.softmax(-1)[answer_id].item())
    return probs

probe = world.person_probes([person], "train", attributes=["birth_city"], templates=[0])[0]
_, cache = model.run_with_cache(model.to_tokens(probe.prompt))
print(len(cache), "cached activations, e.g.", [k for k in cache.keys()][:4])
base_curve = answer_prob_by_layer(model, probe)
oracle_curve = answer_prob_by_layer(oracle, probe)
base_curve, oracle_curve"""),
    new_code_cell("""retain = world.split("retain")[:40]
curves = {}
for name, m in [("base", model), ("oracle forget10", oracle)]:
    for group, people in [("forget10 people", world.split("forget10")), ("retain people", retain)]:
        ps = world.person_probes(people, "train", attributes=["birth_city"], templates=[0])
        curves[(name, group)] = torch.tensor([answer_prob_by_layer(m, p) for p in ps]).mean(0)

fig, ax = plt.subplots(figsize=(6, 3.5))
for (name, group), c in curves.items():
    ax.plot(range(model.cfg.n_layers), c, marker="o", ls="-" if name == "base" else "--",
            label=f"{name} · {group}")
ax.set_xlabel("layer (resid_post)"); ax.set_ylabel("p(answer) under the logit lens")
ax.set_title("Where the birth city appears"); ax.legend(fontsize=7); fig.tight_layout()
fig.savefig("fact_world_logit_lens.png", dpi=110)"""),
    new_markdown_cell("""The base model produces the answer in its last layers for everyone; the oracle does so only for
the people it was trained on. A real erasure has to make the base model look like the dashed
forget curve **at every layer**, not just the last one: that is what kif's latent-trace meter
checks."""),
    new_code_cell("""report = kif.evaluate(model, world, "forget10", oracle=oracle)
{k: round(v, 3) for k, v in report.to_dict().items() if isinstance(v, float)}"""),
]

SIGNATURES = [
    new_markdown_cell("""# 01 · Signatures: where does the model keep a person?

Four ways to locate a concept, each a `Signature` (components + scores, keyed by canonical
TransformerLens hook names): causal tracing (ROME), knowledge neurons (integrated gradients),
concept vectors (the KIF activation signature), and SAE features (SAELens SAEs shipped with the
zoo). We extract all four for one person, plot them, check that ablating each one removes the
person's facts (and random components of the same size do not), and compare where they point."""),
    new_code_cell("""import matplotlib
matplotlib.use("Agg")
import pathlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

from kif import metrics, models
from kif.signatures.registry import KIND_MODULES, extract
from kif.signatures.ablate import ablation_hooks, random_like
from kif.signatures.bench import sae_loader
from kif.signatures.plots import plot_signature
from kif.world import FactWorld, world_concept

world = FactWorld.generate(0)
model = models.load("fact-world")
person = world.split("forget10")[2]
concept = world_concept(world, person.name)
print(person.name, person.attributes)"""),
    new_code_cell("""sigs, seconds = {}, {}
import time
for kind in KIND_MODULES:
    t0 = time.perf_counter()
    sigs[kind] = extract(model, concept, kind=kind)
    seconds[kind] = time.perf_counter() - t0
    print(f"{kind:18} {len(sigs[kind]):4d} components at {list(sigs[kind].hooks)[:4]} "
          f"({seconds[kind]:.1f} s)")"""),
    new_markdown_cell("## The plots each kind writes (`kif signatures --out DIR` writes the same)"),
    new_code_cell("""out = pathlib.Path("signature_plots")
for kind, sig in sigs.items():
    for p in plot_signature(sig, out / kind):
        display(Image(filename=str(p), width=520))"""),
    new_markdown_cell("""## Are they causal?

Ablate each signature (project out its directions, zero its neurons, clamp its SAE features) and
compare with the same number of random components at the same hooks."""),
    new_code_cell("""own = world.person_probes([person], "train")
others = world.person_probes(world.split("retain")[:60], "train", templates=[0])

def acc(probes, hooks=()):
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes],
                              fwd_hooks=list(hooks))
    return float(np.mean(s.correct))

gen = torch.Generator().manual_seed(0)
rows = []
for kind, sig in sigs.items():
    from kif.signatures.bench import default_k
    top = sig.top(default_k(kind))
    sae = sae_loader(top) if top.component == "feature" else None
    clamp = float(top.settings.get("clamp", 50.0))  # SAE features: the extractor's clamp
    hooks = ablation_hooks(top, sae=sae, clamp=clamp)
    rand = ablation_hooks(random_like(top, gen, sae=sae), sae=sae, clamp=clamp)
    rows.append((kind, len(top), acc(own), acc(own, hooks), acc(own, rand), acc(others), acc(others, hooks)))
print(f"{'kind':18} {'k':>3} {'own':>5} {'ablated':>8} {'random':>7} {'others':>7} {'others abl.':>11}")
for r in rows:
    print(f"{r[0]:18} {r[1]:3d} {r[2]:5.2f} {r[3]:8.2f} {r[4]:7.2f} {r[5]:7.2f} {r[6]:11.2f}")"""),
    new_markdown_cell("## Where do they agree? Layer of each kind's components, weighted by score"),
    new_code_cell("""import re
L = model.cfg.n_layers
mass = {}
for kind, sig in sigs.items():
    w = np.zeros(L)
    for hook, score in zip(sig.component_hooks, sig.scores.abs().tolist()):
        m = re.match(r"blocks\.(\d+)\.", hook)
        if m:
            w[int(m.group(1))] += score
    mass[kind] = w / max(w.sum(), 1e-12)
fig, ax = plt.subplots(figsize=(6, 3))
width = 0.8 / len(mass)
for j, (kind, w) in enumerate(mass.items()):
    ax.bar(np.arange(L) + j * width, w, width, label=kind)
ax.set_xticks(np.arange(L) + 0.4 - width / 2, [f"layer {l}" for l in range(L)])
ax.set_ylabel("share of signature score"); ax.legend(fontsize=7); fig.tight_layout()
fig.savefig("signature_layers.png", dpi=110)
{k: int(np.argmax(w)) for k, w in mass.items()}"""),
]


ERASURE = [
    new_markdown_cell("""# 02 · Erasure: one person, every method

`kif.erase(model, concepts, method=...)` returns an `Erasure`: a reversible weight delta or a hook
patch tied to the base weights' SHA-256. We erase one person with every registered method, score
the person's facts (training and held-out phrasings) against everyone else's, and check that
removing each erasure gives the base weights back bit for bit. Budgets here are small so the
notebook runs in CI; `kif erase --forget-split forget10` runs the full defaults."""),
    new_code_cell("""import time
import numpy as np
import torch

import kif
from kif import metrics, models
from kif.erasure import methods
from kif.world import FactWorld

world = FactWorld.generate(0)
model = models.load("fact-world")
base_hash = models.weight_hash(model)
person = world.split("forget01")[0]
own = world.person_probes([person], "train")
para = world.person_probes([person], "heldout")
others = world.person_probes([p for p in world.known() if p.name != person.name][::5], "train", [0])

def acc(probes):
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes])
    return float(np.mean(s.correct))

print(person.name, "| methods:", ", ".join(methods()))"""),
    new_code_cell("""# CI-sized budgets (the defaults are the README's; undo's 600 steps take ~10 min)
small = {"kif": {"steps": 60, "check_every": 30}, "undo": {"steps": 60, "warmup": 6}}
rows = []
for name in methods():
    t0 = time.perf_counter()
    erasure = kif.erase(model, person.name, method=name, config=small.get(name), world=world,
                        base_spec="fact-world")
    seconds = time.perf_counter() - t0
    with erasure.apply(model):
        rows.append((name, erasure.kind, acc(own), acc(para), acc(others), seconds))
    assert models.weight_hash(model) == base_hash  # removed bit for bit
print(f"{'method':14} {'kind':8} {'forget':>6} {'para':>6} {'others':>6} {'s':>6}")
for r in rows:
    print(f"{r[0]:14} {r[1]:8} {r[2]:6.2f} {r[3]:6.2f} {r[4]:6.2f} {r[5]:6.1f}")"""),
    new_markdown_cell("## Forget vs keep, per method"),
    new_code_cell("""import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 4))
for name, kind, f, p, o, s in rows:
    ax.scatter(f, o, s=40)
    ax.annotate(name, (f, o), fontsize=8, xytext=(3, 3), textcoords="offset points")
ax.set_xlabel("person's facts still answered (lower is better)")
ax.set_ylabel("other people's facts kept (higher is better)")
ax.set_xlim(-0.05, 1.05); ax.set_ylim(0, 1.05); fig.tight_layout()
fig.savefig("erasure_tradeoff.png", dpi=110)"""),
]


LATENT_TRACE = [
    new_markdown_cell("""# 03 · The latent-trace meter: suppressed or deleted?

`kif.meter.trace(base, erased, concepts, oracle=...)` probes an erased model from the inside and
scores each probe in [0, 1] (0 = as the oracle, which never saw the people; 1 = as the base). We
meter four models on the forget01 people, side by side: the base model itself, the oracle, an
output-only suppression (the answers' logits pushed down at the last layer: the surface says
"gone", the inside still knows) and a `stamp` erasure. The fast probe set keeps this notebook
short; `kif meter ... --probes all` runs every probe."""),
    new_code_cell("""import torch
from kif import models
from kif.erasure import erase
from kif.meter import trace
from kif.world import FactWorld

world = FactWorld.generate(0)
base = models.load("fact-world")
oracle = models.load("fact-world-oracle-forget01")
people = [p.name for p in world.split("forget01")]"""),
    new_code_cell("""import copy
from kif import metrics

# output-only suppression: subtract the first answer tokens' unembedding directions at the last
# layer of the residual stream (a permanent hook, as a hook-based unlearning tool would)
suppressed = copy.deepcopy(base)
answers = {a for n in people for a in world.person(n).attributes.values()}
first = torch.tensor(sorted({metrics.encode_answers(base, [a])[0][0] for a in answers}))
w_u = base.W_U[:, first].detach()
q, _ = torch.linalg.qr(w_u)
def push_down(act, hook):
    return act - 3.0 * (act @ q) @ q.T
suppressed.add_hook(f"blocks.{base.cfg.n_layers - 1}.hook_resid_post", push_down, is_permanent=True)

stamped = copy.deepcopy(base)
erase(base, people, method="stamp", world=world).apply(stamped)
models_under_test = {"base": base, "oracle": oracle, "output-only suppression": suppressed,
                     "stamp": stamped}"""),
    new_code_cell("""reports = {}
for name, m in models_under_test.items():
    reports[name] = trace(base, m, "forget01", oracle=oracle, probes=["fast"], world=world,
                          progress=False)
    r = reports[name]
    print(f"{name:24} verdict {r.verdict:10} latent_trace_score "
          f"{r.latent_trace_score if r.latent_trace_score is None else round(r.latent_trace_score, 3)}")"""),
    new_code_cell("""names = list(reports)
probes = list(reports[names[0]].scores)
print(f"{'probe':28}" + "".join(f"{n[:14]:>16}" for n in names))
for p in probes:
    cells = [reports[n].scores.get(p) for n in names]
    print(f"{p:28}" + "".join(f"{'-' if c is None else round(c, 3):>16}" for c in cells))"""),
]


YOUR_OWN_MODEL = [
    new_markdown_cell("""# 04 · Your own model and your own concept

Nothing here comes from kif's zoo or its fact world: the notebook writes a small Hugging Face
checkpoint, teaches it a few facts, writes the concept to erase as a kif JSONL file (the format
a user writes by hand or converts from TOFU), erases it with `stamp`, scores the erasure on the
file's own probes, and audits it with the latent-trace meter, calibrated without an oracle on
made-up names that no model ever saw."""),
    new_code_cell("""import json, pathlib, random, tempfile
import torch
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
import kif

work = pathlib.Path(tempfile.mkdtemp(prefix="kif-own-model-"))
rng = random.Random(0)
people = [f"Person{i}" for i in range(24)]      # taught two facts each
strangers = [f"Stranger{i}" for i in range(6)]  # taught to answer " unknown"
made_up = [f"Nobody{i}" for i in range(8)]      # in the vocabulary, never in the text
cities, jobs = [f"City{j}" for j in range(6)], [f"Job{j}" for j in range(6)]
train = {"city": ["city {n}", "the city of {n}"], "job": ["job {n}", "the job of {n}"]}
heldout = {"city": ["my city {n}"], "job": ["my job {n}"]}
facts = {n: {"city": " " + rng.choice(cities), "job": " " + rng.choice(jobs)} for n in people}

def rows(names, templates, answer):
    return [(t.format(n=n), answer(n, r), n, r) for n in names for r, ts in templates.items()
            for t in ts]"""),
    new_code_cell("""# a word-level tokenizer and an untrained GPT-2 checkpoint, written by transformers
words = (["[PAD]", "[UNK]", "[BOS]", "[EOS]", "unknown", "the", "of", "my", "city", "job"]
         + people + strangers + made_up + cities + jobs)
tok = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                    pad_token="[PAD]", unk_token="[UNK]")
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=16, n_ctx=16, n_embd=64, n_layer=2,
                           n_head=4, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                           tie_word_embeddings=False)).save_pretrained(work / "init")
tokenizer.save_pretrained(work / "init")

# teach it the facts through its TransformerLens view, then save a plain HF checkpoint
model = kif.load(str(work / "init"))
texts = rows(people, train, lambda n, r: facts[n][r]) + rows(strangers, train, lambda n, r: " unknown")
seqs = [[tokenizer.bos_token_id] + tokenizer(p + a, add_special_tokens=False)["input_ids"]
        for p, a, _, _ in texts]
tokens = torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs])
last, idx = torch.tensor([len(s) - 1 for s in seqs]), torch.arange(len(seqs))
params = [p for n, p in model.named_parameters() if n != "unembed.b_U"]  # GPT-2 has no b_U
for p in params:
    p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=1e-2)
for step in range(150):
    logits = model(tokens, padding_side="right")
    loss = -torch.log_softmax(logits[idx, last - 1], -1)[idx, tokens[idx, last]].mean()
    opt.zero_grad(); loss.backward(); opt.step()
kif.save(model.eval(), work / "model")
print(f"answer loss {loss.item():.4f}; checkpoint: {sorted(p.name for p in (work / 'model').iterdir())}")"""),
    new_code_cell("""# the concept to erase: two people, as kif JSONL (forget, paraphrase, retain and refusal
# rows), and made-up names for the never-knew reference
def row(prompt, answer, subject, relation, split, **kw):
    return json.dumps({"prompt": prompt, "answer": answer, "subject": subject,
                       "relation": relation, "split": split, **kw})

forget_people = people[:2]
with open(work / "forget.jsonl", "w") as f:
    for r in rows(forget_people, train, lambda n, r: facts[n][r]):
        f.write(row(*r, "forget") + "\\n")
    for r in rows(forget_people, heldout, lambda n, r: facts[n][r]):
        f.write(row(*r, "paraphrase") + "\\n")
with open(work / "retain.jsonl", "w") as f:
    for r in rows(people[2:], train, lambda n, r: facts[n][r]):
        f.write(row(*r, "retain") + "\\n")
    for r in rows(people[2:], heldout, lambda n, r: facts[n][r]):
        f.write(row(*r, "retain", phrasing="heldout") + "\\n")
    for r in rows(strangers, train, lambda n, r: " unknown"):
        f.write(row(*r, "refusal") + "\\n")
(work / "never_knew.txt").write_text("\\n".join(made_up) + "\\n")
print((work / "forget.jsonl").read_text().splitlines()[0])"""),
    new_code_cell("""from kif.data.formats import load_concept
from kif.erasure import erase, open_model, save_erasure
from kif.evaluation import evaluate_concept

base = kif.load(str(work / "model"))     # a local HF folder, not a zoo name
concept = load_concept(work / "forget.jsonl", [work / "retain.jsonl"],
                       never_knew=work / "never_knew.txt")
erasure = erase(base, concept, method="stamp")
folder = save_erasure(erasure, base, work / "erased")
erased = open_model(str(folder))
keys = ["forget_acc", "forget_paraphrase_acc", "retain_acc", "retain_paraphrase_acc",
        "forget_truth_ratio_median"]
before, after = evaluate_concept(base, concept), evaluate_concept(erased, concept)
for k in keys:
    print(f"{k:28} {before[k]:8.3f} -> {after[k]:8.3f}")"""),
    new_code_cell("""from kif.data.concept import by_subject
from kif.meter import trace

# per person, calibrated on the same questions about the made-up names (no oracle needed)
report = trace(base, erased, by_subject(concept), probes=["fast"], progress=False)
for name, score in report.scores.items():
    print(f"{name:20} {'-' if score is None else round(score, 3)}")
print("verdict:", report.verdict, "| latent trace score:", report.latent_trace_score)"""),
    new_markdown_cell("""A score of 0 is the level of a model that never met these people, 1 the base model's.
STAMP stops the answers at the surface in one closed-form solve; what the lenses and the
answer-rank probe still find inside is what the meter calls *suppressed*. The same files run
from the command line: `kif erase --model DIR --forget forget.jsonl --retain retain.jsonl
--never-knew never_knew.txt --method stamp --out OUT`, then `kif meter --model DIR --erased OUT
--forget forget.jsonl --retain retain.jsonl --never-knew never_knew.txt --probes fast --out M`."""),
]


def main() -> None:
    for name, cells in {"00_fact_world.ipynb": FACT_WORLD,
                        "01_signatures.ipynb": SIGNATURES,
                        "02_erasure.ipynb": ERASURE,
                        "03_latent_trace.ipynb": LATENT_TRACE,
                        "04_your_own_model.ipynb": YOUR_OWN_MODEL}.items():
        for i, cell in enumerate(cells):  # stable ids: a regenerated notebook diffs only where it changed
            cell["id"] = f"{name[:2]}-{i:02d}"
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                                 "display_name": "Python 3",
                                                                 "language": "python"}})
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
