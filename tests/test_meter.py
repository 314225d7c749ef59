"""Tests for kif.meter (the latent-trace meter) on tiny models where the answer is known.

A 2-layer HookedTransformer is trained for a few hundred steps on planted facts: "city NameK" ->
" CityJ", "job NameK" -> " JobJ" (word-level tokenizer, one token per word). The output-only
suppression (`kif.meter.bench.output_suppression`) adds a permanent hook on the last block's
output that removes the answers' unembedding directions and pushes their logits down: the facts
vanish from the output but are still computed in block 0. The meter must call it `suppressed`
and its lens / linear probes must recover the facts; base vs itself must be `intact`; the oracle
(the same training without the forget people) calibrated against itself must be `deleted`. LEACE
must bring the linear probe to chance on the layer it erases.
"""

import argparse
import copy
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from kif.concepts import Concept
from kif.errors import KifError
from kif.meter import PROBES, LeaceFitter, trace
from kif.meter.audit import run_pass
from kif.meter.bench import output_suppression
from kif.meter.calibrate import calibrate, chance_band
from kif.meter.probes.linear_probe import fit_ridge
from kif.meter.report import ProbeResult, TraceReport
from kif.data.probe import Probe

N_PEOPLE, N_FORGET, N_HOLDOUT = 24, 2, 5
NAMES = [f"Name{i}" for i in range(N_PEOPLE + N_HOLDOUT)]
RELATIONS = {"city": [f"City{j}" for j in range(6)], "job": [f"Job{j}" for j in range(6)]}
TRAIN = ["{r} {n}", "the {r} of {n}"]
HELDOUT = ["my {r} {n}"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
FILLER = ["the", "of", "my"]
STEPS, LR = 120, 1e-2


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    words = SPECIAL + NAMES + list(RELATIONS) + [a for v in RELATIONS.values() for a in v] + FILLER
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)  # TransformerLens only accepts a reloaded tokenizer
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _facts() -> dict[str, dict[str, str]]:
    rng = random.Random(0)
    return {n: {r: " " + rng.choice(v) for r, v in RELATIONS.items()} for n in NAMES}


def _probes(names, facts, phrasing="train") -> list[Probe]:
    temps = TRAIN if phrasing == "train" else HELDOUT
    return [Probe(prompt=t.format(r=r, n=n), answer=facts[n][r], subject=n, relation=r,
                  phrasing=phrasing, template=i, kind="person")
            for n in names for r in RELATIONS for i, t in enumerate(temps)]


def _train(tok, probes, steps: int = STEPS, seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                                  n_ctx=32, d_vocab=len(tok), act_fn="gelu",
                                  normalization_type="LN", seed=seed, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tok)
    bos = tok.bos_token_id
    seqs = [[bos] + tok(p.prompt + p.answer, add_special_tokens=False)["input_ids"]
            for p in probes]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, 1: len(s)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    for _ in range(steps):
        logits = model(tokens, padding_side="right")
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        loss = -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    tok = _tokenizer(tmp_path_factory.mktemp("tok"))
    facts = _facts()
    known = NAMES[:N_PEOPLE]
    forget, retain, holdout = known[:N_FORGET], known[N_FORGET:], NAMES[N_PEOPLE:]
    base = _train(tok, _probes(known, facts))
    oracle = _train(tok, _probes(retain, facts))
    retain_probes = tuple(_probes(retain, facts))
    concepts = [Concept(name=n, forget=tuple(_probes([n], facts)),
                        paraphrase=tuple(_probes([n], facts, "heldout")), neighbour=(),
                        shared=(), retain=retain_probes) for n in forget]
    reference = _probes(holdout, facts) + _probes(holdout, facts, "heldout")
    suppressed = output_suppression(base, [facts[n][r] for n in forget for r in RELATIONS])
    return dict(base=base, oracle=oracle, suppressed=suppressed, concepts=concepts,
                reference=reference, retain=list(retain_probes), facts=facts, tok=tok)


def _trace(t, erased, probes, oracle=None):
    return trace(t["base"], erased, t["concepts"], oracle=oracle, probes=probes,
                 reference=t["reference"], retain=t["retain"], progress=False)


FAST = ["fast", "linear-probe", "linear-probe-retrained"]


def test_tiny_model_knows_its_facts_and_the_hook_hides_them(tiny):
    from kif import metrics

    forget = [p for c in tiny["concepts"] for p in c.forget]
    prompts, answers = [p.prompt for p in forget], [p.answer for p in forget]
    assert metrics.score_answers(tiny["base"], prompts, answers).correct.mean() == 1.0
    assert metrics.score_answers(tiny["suppressed"], prompts, answers).correct.mean() == 0.0
    assert metrics.score_answers(tiny["oracle"], prompts, answers).correct.mean() < 0.5
    # the caller's base model is untouched by building the suppression
    assert not any(h.is_permanent for hp in tiny["base"].hook_dict.values() for h in hp.fwd_hooks)


def test_base_vs_itself_is_intact(tiny):
    r = _trace(tiny, tiny["base"], FAST)
    assert r.verdict == "intact"
    assert r.latent_trace_score == pytest.approx(1.0)
    assert all(c.verdict == "intact" for c in r.concepts.values())
    assert r.scores["surface"] == pytest.approx(1.0)


def test_output_suppression_is_caught(tiny):
    r = _trace(tiny, tiny["suppressed"], FAST)
    assert r.verdict == "suppressed"
    assert r.scores["surface"] <= 0.05
    assert r.latent_trace_score >= 0.5
    # the facts are still readable before the last block
    assert max(r.scores["logit-lens"], r.scores["linear-probe"]) >= 0.5
    assert all(c.verdict == "suppressed" for c in r.concepts.values())
    ll = r.probes["logit-lens"]
    assert ll.curves["erased"][-1] < 0.05 < ll.curves["erased"][1]


def test_oracle_against_itself_is_deleted(tiny):
    r = _trace(tiny, tiny["oracle"], FAST, oracle=tiny["oracle"])
    assert r.verdict == "deleted"
    assert r.latent_trace_score == pytest.approx(0.0, abs=1e-9)
    assert r.calibration == "oracle"


def test_derived_from_the_base_is_judged_per_tensor(tiny):
    """A closed-form edit moves one tensor by more than its norm and stays derived (the base's
    readers apply to it); an independently trained model does not."""
    from kif.meter.audit import DERIVED_SHARE, build_audit

    edited = copy.deepcopy(tiny["base"])
    with torch.no_grad():
        w = edited.blocks[0].mlp.W_out
        w.add_(3.0 * torch.randn_like(w) * w.std())
    audit = build_audit(tiny["base"], edited, tiny["concepts"], tiny["oracle"],
                        reference=tiny["reference"], retain=tiny["retain"])
    assert audit.distance("erased") > 0.25  # the whole-model distance would have refused it
    assert audit.kept_share("erased") >= 0.8 and audit.derived
    assert audit.kept_share("base") == 1.0
    # the fixture's oracle starts from the base's initialisation: fine-tuned from it, in effect
    assert audit.oracle_derived
    other = _train(tiny["tok"], tiny["retain"], seed=1)  # another initialisation
    audit = build_audit(tiny["base"], other, tiny["concepts"], other,
                        reference=tiny["reference"], retain=tiny["retain"])
    assert audit.kept_share("erased") < DERIVED_SHARE and not audit.derived
    assert not audit.oracle_derived
    r = _trace(tiny, other, ["linear-probe"])
    assert r.settings["derived"] is False
    assert r.probes["linear-probe"].skipped and "derived from the base" in \
        r.probes["linear-probe"].skipped


def _input_side_erasure(t):
    """The base with the forget people's name embeddings replaced by an unseen person's."""
    base, tok = t["base"], t["tok"]
    erased = copy.deepcopy(base)
    unseen = tok.convert_tokens_to_ids(NAMES[-1])
    with torch.no_grad():
        for c in t["concepts"]:
            erased.embed.W_E[tok.convert_tokens_to_ids(c.name)] = base.embed.W_E[unseen]
    return erased


def test_downstream_finds_memories_behind_an_input_side_erasure(tiny):
    """Erase the forget people at the input (their name embeddings replaced by an unseen
    person's): the surface forgets, but every block still holds their facts, and given the
    base's embeddings the erased model answers them again; the oracle, which never stored them,
    does not. An output-only hook edits no weight: nothing sits behind it (UDS's case)."""
    erased = _input_side_erasure(tiny)
    r = _trace(tiny, erased, ["surface", "downstream"], oracle=tiny["oracle"])
    assert r.scores["surface"] < 0.3
    d = r.probes["downstream"]
    assert d.group == "trace" and d.info["site"] == "blocks.0.hook_resid_pre"
    assert d.score is not None and d.score > 0.8, (d.values, d.skipped)
    assert d.curves["erased"][0] > d.curves["oracle"][0] + 0.3, d.curves
    assert d.reference.startswith("oracle")
    # the oracle itself, audited as an erasure against unseen people: fed the base's state, it
    # decodes far less, never having stored the facts (on 8 rows of a 2-layer model, not 0)
    o = _trace(tiny, tiny["oracle"], ["downstream"]).probes["downstream"]
    assert o.reference.startswith("the erased model on unseen")
    assert o.score is not None and o.score < d.score - 0.4, (o.values, d.values)
    hooked = _trace(tiny, tiny["suppressed"], ["downstream"], oracle=tiny["oracle"])
    assert "edits no weight" in hooked.probes["downstream"].skipped


def test_first_edit_site_reads_weights_beyond_rounding_and_hooks(tiny):
    """A half-precision round trip is storage, not an edit; a weight edit or a suppression hook
    in block b puts the site at block b's output; the embeddings put it at the input."""
    from kif.inplace import shared_copy
    from kif.meter.probes.downstream import first_edit_site

    base = tiny["base"]
    rounded = copy.deepcopy(base)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    assert first_edit_site(base, rounded) is None
    with torch.no_grad():
        rounded.blocks[0].mlp.W_out.mul_(1.1)
    assert first_edit_site(base, rounded) == "blocks.0.hook_resid_post"
    assert first_edit_site(base, _input_side_erasure(tiny)) == "blocks.0.hook_resid_pre"
    hooked = shared_copy(base)
    hooked.blocks[0].hook_resid_post.add_hook(lambda act, hook: act * 0.5, is_permanent=True)
    assert first_edit_site(base, hooked) == "blocks.0.hook_resid_post"
    hooked.reset_hooks(including_permanent=True)


def test_relearning_rate_is_chosen_on_the_base(tiny):
    """Under `auto` the relearning attack runs at the strongest rate of the grid that keeps the
    base's measured facts (within KEEP): every rate tried above the chosen one cost the base more
    than that, the chosen one did not, and the base's weights are its own again afterwards. The
    audit's report says the rate was chosen; under `fact-world` it is the constant."""
    from kif.meter.probes.relearning import KEEP, LR, LR_GRID, choose_lr, split_facts

    def found_the_edge(lr, trials):
        acc0 = trials[0]["measured_acc"]
        tried = {t["lr"]: t["measured_acc"] for t in trials[1:]}
        assert trials[1]["lr"] == LR  # the walk starts at the fact world's rate
        assert tried[lr] >= acc0 - KEEP
        assert all(a < acc0 - KEEP for r, a in tried.items() if r > lr)
        i = LR_GRID.index(lr)
        assert i + 1 == len(LR_GRID) or LR_GRID[i + 1] in tried  # found, not assumed

    base = tiny["base"]
    before = {n: p.clone() for n, p in base.named_parameters()}
    shown, measured = split_facts([p for c in tiny["concepts"] for p in c.forget])
    found_the_edge(*choose_lr(base, shown, measured))
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    r = _trace(tiny, tiny["suppressed"], ["relearning"])  # the tiny model is not the zoo's
    v = r.probes["relearning"].values
    lr = v["lr"]
    assert v["lr_chosen_on_the_model"]
    found_the_edge(lr, v["lr_trials"])
    constants = r.settings["constants"]
    assert constants["profile"] == "auto" and constants["chosen_on_the_model"] == ["relearning_lr"]
    assert "lr" not in constants["fact_world_constants"]["relearning"]
    from kif.meter.summary import markdown

    assert f"chosen on this base model: the strongest that keeps its facts (lr {lr:g})" in \
        markdown(r)
    fixed = trace(base, tiny["suppressed"], tiny["concepts"], probes=["relearning"],
                  reference=tiny["reference"], retain=tiny["retain"], progress=False,
                  profile="fact-world")
    assert fixed.probes["relearning"].values["lr"] == LR
    assert not fixed.probes["relearning"].values["lr_chosen_on_the_model"]
    assert fixed.settings["constants"]["fact_world_constants"]["relearning"]["lr"] == LR


def test_meter_config_refuses_a_rate_that_is_not_positive():
    from kif.meter.config import MeterConfig

    with pytest.raises(KifError, match="relearning_lr"):
        MeterConfig(relearning_lr=0.0)


def test_relearning_restricted_to_one_part(tiny):
    """`relearned(only=...)` trains the matching parameters and no other, and gives every weight
    back; `localize` runs the attack per scope (the fact world's figures are in results/)."""
    from kif.meter.localize import localize, scopes
    from kif.meter.probes.relearning import relearned, split_facts

    erased = _input_side_erasure(tiny)
    before = {n: p.clone() for n, p in erased.named_parameters()}
    shown, measured = split_facts([p for c in tiny["concepts"] for p in c.forget])
    with relearned(erased, shown, lr=LR, only=scopes(erased)["block 1"]) as m:
        moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("blocks.1.") for n in moved), moved
    assert all(torch.equal(p, before[n]) for n, p in erased.named_parameters())
    with pytest.raises(KifError, match="no parameter"):
        with relearned(erased, shown, only="^nothing"):
            pass
    r = localize(erased, shown, measured)
    assert set(r) == {"no attack", *scopes(erased)}
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert all(torch.equal(p, before[n]) for n, p in erased.named_parameters())


def test_every_probe_runs_on_the_tiny_model(tiny):
    base = tiny["base"]
    w_before = {n: p.clone() for n, p in base.named_parameters()}
    r = _trace(tiny, tiny["suppressed"], ["all"], oracle=tiny["oracle"])
    assert list(r.probes) == list(PROBES)
    for name, p in r.probes.items():
        assert p.group in ("surface", "latent", "trace"), name
        if p.skipped:
            # no SAE for a tiny model; a hook on the last block has nothing behind it
            assert name in ("sae-persistence", "downstream"), (name, p.skipped)
            assert name != "downstream" or "edits no weight" in p.skipped, p.skipped
            continue
        assert p.score is None or 0.0 <= p.score <= 1.0, (name, p.score)
    s = r.scores
    assert r.verdict == "suppressed"
    # a hook on the output survives quantization and a weight-only fine-tune of other facts
    assert s["quantization"] <= 0.2
    assert s["parametric"] == pytest.approx(1.0)  # the weights are the base's
    assert s["uds"] >= 0.2  # patching any but the last block gives the base its answers back
    assert r.probes["tuned-lens"].info["lens"]["kl_tuned"][0] <= \
        r.probes["tuned-lens"].info["lens"]["kl_logit"][0]
    json.dumps(r.to_dict())  # JSON-safe
    for n, p in base.named_parameters():
        assert torch.equal(p, w_before[n]), n  # never mutates the caller's models


def test_leace_brings_the_linear_probe_to_chance(tiny):
    base = tiny["base"]
    hook = "blocks.0.hook_resid_post"
    retain = tiny["retain"]
    answers = sorted({p.answer for p in retain})
    ci = {a: i for i, a in enumerate(answers)}
    x = run_pass(base, retain).resid[1]  # blocks.0.hook_resid_post, last prompt position
    eraser = LeaceFitter(x.shape[-1], len(answers)).update(
        x, torch.tensor([ci[p.answer] for p in retain])).eraser
    erased = copy.deepcopy(base)
    erased.add_hook(hook, eraser.hook(), is_permanent=True)
    r = _trace(tiny, erased, ["linear-probe-retrained"])
    before = _trace(tiny, base, ["linear-probe-retrained"])
    lp, lp0 = r.probes["linear-probe-retrained"], before.probes["linear-probe-retrained"]
    assert lp0.curves["erased"][1] >= 0.8  # decodable at block 0's output before
    # after LEACE, the probe retrained there predicts no better than the majority class
    facts = [p for c in tiny["concepts"] for p in c.forget + c.paraphrase]
    majority = {}
    for rel in RELATIONS:
        ans = [p.answer for p in retain if p.relation == rel]
        majority[rel] = max(sorted(set(ans)), key=ans.count)
    chance = np.mean([p.answer == majority[p.relation] for p in facts])
    assert lp.curves["erased"][1] <= chance + 0.1
    assert lp.curves["score"][1] <= 0.25
    check = before.probes["linear-probe-retrained"].info["leace_check"]
    assert check["acc_after_leace"] <= check["chance_acc"] + 0.05


def test_leace_fitter_is_exact_on_synthetic_data():
    g = torch.Generator().manual_seed(0)
    n, d, k = 600, 12, 4
    z = torch.randint(k, (n,), generator=g)
    means = 3 * torch.randn(k, d, generator=g)
    x = means[z] + torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)
    fit = LeaceFitter(d, k)
    for lo in range(0, n, 128):  # streaming equals one batch
        fit.update(x[lo: lo + 128], z[lo: lo + 128])
    one = LeaceFitter(d, k).update(x, z).eraser
    e = fit.eraser
    assert torch.allclose(e.proj_left, one.proj_left, atol=1e-8)
    xe = e(x)
    onehot = torch.nn.functional.one_hot(z, k).double()
    cross = (xe.double() - xe.double().mean(0)).T @ (onehot - onehot.mean(0)) / (n - 1)
    assert cross.abs().max() < 1e-4
    assert e.rank <= k - 1
    pred = fit_ridge(x[None], z, k)(x[None])[0]
    pred_e = fit_ridge(xe[None], z, k)(xe[None])[0]
    majority = torch.bincount(z).max().item() / n
    assert (pred == z).double().mean() > 0.9
    assert (pred_e == z).double().mean() <= majority + 0.02
    # the change is small: LEACE moves x less than projecting out the class-mean subspace
    assert (xe - x).norm() < x.norm()


def test_calibration_and_bands():
    assert calibrate(0.5, 1.0, 0.0) == 0.5
    assert calibrate(2.0, 1.0, 0.0) == 1.0
    assert calibrate(-1.0, 1.0, 0.0) == 0.0
    assert calibrate(0.3, 0.1, 0.1) is None  # no signal: the base knows no more than ref0
    assert chance_band((0.0, 0.1), 1) == pytest.approx(0.1645, abs=1e-3)
    assert chance_band((0.0, 0.1), 100) > chance_band((0.0, 0.1), 10)


def test_verdict_logic():
    def pr(name, group, score, per):
        return ProbeResult(name=name, group=group, score=score, per_concept=per,
                           chance=(0.0, 0.05))
    common = dict(calibration="unseen", models={}, hashes={}, seconds=0.0)
    r = TraceReport.build({"surface": pr("surface", "surface", 0.0, {"a": 0.0, "b": 0.0}),
                           "logit-lens": pr("logit-lens", "latent", 0.5, {"a": 0.9, "b": 0.9}),
                           "linear-probe": pr("linear-probe", "latent", 0.5,
                                              {"a": 0.9, "b": 0.1})},
                          ["a", "b"], **common)
    # two families read concept a; b is read by one family only (a chance excursion)
    assert r.concepts["a"].verdict == "suppressed" and r.concepts["b"].verdict == "deleted"
    assert r.verdict == "suppressed" and r.latent_trace_score == 0.5
    r = TraceReport.build({"surface": pr("surface", "surface", 0.0, {"a": 0.0}),
                           "logit-lens": pr("logit-lens", "latent", 0.1, {"a": 0.1})},
                          ["a"], **common)
    assert r.verdict == "deleted"
    r = TraceReport.build({"surface": pr("surface", "surface", 0.0, {"a": 0.0}),
                           "membership": pr("membership", "trace", 0.9, {"a": 0.9})},
                          ["a"], **common)
    assert r.verdict == "deleted"  # trace probes show remnants; they do not recover facts
    r = TraceReport.build({"surface": pr("surface", "surface", 0.9, {"a": 0.9})}, ["a"], **common)
    assert r.verdict == "intact"


def test_report_md_leads_with_the_verdict_in_words_and_says_why_probes_did_not_apply():
    from kif.meter.summary import markdown

    def pr(name, group, score, per):
        return ProbeResult(name=name, group=group, score=score, per_concept=per,
                           chance=(0.0, 0.05))
    r = TraceReport.build({"surface": pr("surface", "surface", 0.0, {"a": 0.0, "b": 0.0}),
                           "logit-lens": pr("logit-lens", "latent", 0.5, {"a": 0.9, "b": 0.9}),
                           "linear-probe": pr("linear-probe", "latent", 0.5, {"a": 0.9, "b": 0.1}),
                           "relearning": ProbeResult.skip("relearning", "latent",
                                                          "the erased model is a hook patch")},
                          ["a", "b"], calibration="unseen", models={"erased": "E", "base": "B"},
                          hashes={}, seconds=3.0)
    md = markdown(r)
    head = md.split("## ")[0]
    assert md.startswith("# kif meter: E against B\n")
    assert "**Verdict: suppressed.** Of 2 concepts: 1 suppressed, 1 deleted." in head
    assert "*suppressed*: the answers no longer come out" in head and "*deleted*:" in head
    assert "*intact*" not in head and "people the base model never saw" in head
    assert "- `relearning`: the erased model is a hook patch" in md
    assert "| a | suppressed | 0.000 |" in md and "| b | deleted |" in md
    assert "strongest recoveries: logit-lens 0.50 (lens), linear-probe 0.50 (linear probe)" in md
    nothing = TraceReport.build({"surface": pr("surface", "surface", 0.0, {"a": 0.0}),
                                 "logit-lens": pr("logit-lens", "latent", 0.0, {"a": 0.0})},
                                ["a"], calibration="oracle", models={}, hashes={}, seconds=1.0)
    assert "No latent probe recovers anything (1 ran, every score 0)." in markdown(nothing)
    from kif import profiles

    other = dataclasses.replace(nothing, settings={"constants": {
        "tuned_on_this_model": False, "fact_world_constants": profiles.meter_constants()}})
    assert "carried over to this model as they are" in markdown(other)
    # under auto the rate is said to be chosen only where the attack ran and chose it
    chosen_nowhere = dataclasses.replace(nothing, settings={"constants": {
        "profile": "auto", "chosen_on_the_model": ["relearning_lr"], "tuned_on_this_model": False,
        "fact_world_constants": profiles.meter_constants(skip=["relearning_lr"])}})
    assert "the attack did not run" in markdown(chosen_nowhere)
    assert "was chosen on this base model" not in markdown(chosen_nowhere)
    assert "## The meter's settings" not in markdown(nothing)  # an older report.json


def test_cli_on_the_zoo(tmp_path, capsys):
    from kif.meter import cli

    parser = argparse.ArgumentParser(prog="kif")
    cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args(["meter", "--erased", "fact-world", "--concept", "Miasmar Viahos",
                              "--probes", "surface", "logit-lens", "answer-rank",
                              "--out", str(out), "--json"])
    assert cli.run(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "intact"
    assert set(data["probes"]) == {"surface", "logit-lens", "answer-rank"}
    assert data["latent_trace_score"] == pytest.approx(1.0)
    assert json.loads((out / "report.json").read_text())["verdict"] == "intact"
    md = (out / "report.md").read_text()
    assert md.startswith("# kif meter: fact-world against fact-world")
    # the meter's own fact-world constants are in the manifest, and the model is theirs
    constants = json.loads((out / "report.json").read_text())["settings"]["constants"]
    assert constants["tuned_on_this_model"] is True
    assert constants["fact_world_constants"]["relearning"]["lr"] == pytest.approx(1e-4)
    assert constants["fact_world_constants"]["verdict"]["min_families"] == 2
    assert "## The meter's settings" in md and "carried over" not in md
    assert (out / "probes.png").is_file() and (out / "answer_rank.png").is_file()
    args = parser.parse_args(["meter", "--erased", "fact-world", "--concept", "Nobody Here",
                              "--out", str(tmp_path / "x")])
    from kif.errors import KifError

    with pytest.raises(KifError):
        cli.run(args)


def test_undo_distils_an_erasure_into_a_partly_reinitialised_model(tiny):
    """`undo` distils an erasure (here: the forget people's name embeddings faded to 5 %) into
    the base shrunk toward a fresh initialisation. The student answers as its teacher does: the
    forget facts gone, the retain facts kept, though 90 % of every weight was re-drawn; the
    base is left as it was and the result is an ordinary reversible erasure. (Deletion itself,
    relearning at the oracle's level, is measured on the fact world: results/ and the README.
    On this 2-layer model the relearning attack costs the base half its measured facts.)"""
    import dataclasses

    from kif import metrics
    from kif.erasure.core import Delta, Erasure
    from kif.erasure.distill import UndoConfig, distil
    from kif.models import weight_hash

    base = tiny["base"]
    forget = [p for c in tiny["concepts"] for p in c.forget]
    concept = Concept(name="forget", forget=tuple(forget), retain=tuple(tiny["retain"]),
                      retain_corpus=tuple(tiny["retain"]))
    rows = [tiny["tok"].convert_tokens_to_ids(c.name) for c in tiny["concepts"]]
    d = torch.zeros_like(base.embed.W_E)
    d[rows] = -0.95 * base.embed.W_E[rows].detach()
    teacher = Erasure(method="faded", concepts=("forget",), base_hash=weight_hash(base),
                      base_spec="tiny", deltas={"embed.W_E": Delta(dense=d)})
    cfg = UndoConfig(teacher="kif", alpha=0.9, steps=150, lr=1e-2, warmup=10, batch=8,
                     row_len=24, shared_repeats=0)
    before = weight_hash(base)
    erasure = distil(base, concept, teacher, cfg)
    assert weight_hash(base) == before  # the base is left as it was
    assert erasure.method == "undo" and erasure.info["teacher"]["method"] == "faded"
    student = copy.deepcopy(base)
    handle = erasure.apply(student)

    def acc(m, rows):
        return float(metrics.score_answers(m, [p.prompt for p in rows],
                                           [p.answer for p in rows]).correct.mean())

    w0, w1 = base.blocks[1].mlp.W_out, student.blocks[1].mlp.W_out
    assert float((w1 - w0).norm() / w0.norm()) > 0.5  # re-drawn, then trained back
    assert acc(base, forget) == 1.0 and acc(student, forget) <= 0.05
    assert acc(student, tiny["retain"]) >= 0.95, acc(student, tiny["retain"])
    handle.remove()
    assert weight_hash(student) == before
    with pytest.raises(KifError, match="alpha"):
        dataclasses.replace(cfg, alpha=0.0)
    with pytest.raises(KifError, match="another model"):
        distil(base, concept, dataclasses.replace(teacher, base_hash="0" * 64), cfg)
    with pytest.raises(KifError, match="retain"):
        distil(base, dataclasses.replace(concept, retain_corpus=()), teacher, cfg)
    # without the forget probes the distillation text never names the concept's subjects
    from kif.erasure.distill import corpus_ids

    def names_in(ids):  # the forget people's name tokens (one token each in this world)
        return {t for s in ids for t in s} & set(rows)

    assert not names_in(corpus_ids(base, concept, 0, forget_probes=False))
    assert names_in(corpus_ids(base, concept, 0)) == set(rows)
