"""SAE-feature signatures (Farrell et al. 2024): on a tiny model whose layer-0 residual is exactly
the token embedding (orthogonal embeddings, attention and MLP outputs zeroed), a hand-built SAE has
a planted concept feature, a feature that also fires on retain text, and a feature that fires on
everything; the extractor must keep the first and drop the others. Plus SAE loading and the
shipped SAEs' held-out explained variance."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from kif.concepts import Concept
from kif.errors import KifError
from kif.signatures.base import Signature
from kif.signatures.registry import extract
from kif.signatures.ablate import ablation_hooks
from kif.signatures.sae_features import (SAELoadError, load_sae, retain_text, select_features,
                                         shipped_hooks, shipped_sae_ref)
from kif.data.probe import Probe

HOOK = "blocks.0.hook_resid_post"
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = ["Talia", "Vorhees", "Brun", "Okafor", "Mira", "Sand", "was", "born", "in", "the", "city",
         "of", "plays", "works", "for", "Maresk", "Dovan", "piano", "violin", "Acme", "Zenit",
         "Lund", "capital", "is", "1970"]
D_MODEL = 48  # > vocabulary size: one orthogonal embedding per token
# planted features of the hand-built SAE (d_sae = 12)
CONCEPT, CONCEPT_LAST, SHARED_NAME, COMMON = 3, 9, 7, 5


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)  # TransformerLens only accepts a reloaded tokenizer
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HookedTransformer:
    torch.set_num_threads(1)
    tok = _tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=8, d_mlp=32,
                                  n_ctx=32, d_vocab=len(tok), act_fn="gelu",
                                  normalization_type="LN", seed=0, device="cpu")
    m = HookedTransformer(cfg, tokenizer=tok)
    with torch.no_grad():
        # resid_post of layer 0 = W_E[token]: orthogonal embeddings, no positions, and block 0
        # writes nothing (its attention and MLP outputs are zero)
        m.embed.W_E.copy_(torch.eye(len(tok), D_MODEL) * 2.0)
        m.pos_embed.W_pos.zero_()
        for p in (m.blocks[0].attn.W_O, m.blocks[0].attn.b_O, m.blocks[0].mlp.W_out,
                  m.blocks[0].mlp.b_out):
            p.zero_()
    m.eval()
    return m


def _sae(model, d_in: int = D_MODEL, hook: str = HOOK):
    """A StandardSAE whose feature i fires (activation 1) exactly on the tokens listed for i."""
    from sae_lens import SAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=12, dtype="float32", device="cpu",
                            apply_b_dec_to_input=True)
    cfg.metadata.hook_name = hook
    sae = SAE.from_dict(cfg.to_dict())
    planted = {CONCEPT: ["Talia", "Vorhees"], CONCEPT_LAST: ["Vorhees"],
               SHARED_NAME: ["Talia", "Vorhees", "the"], COMMON: ["was", "born", "in", "plays"]}
    vocab = model.tokenizer.get_vocab()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)  # every feature is off unless its token's embedding lifts it
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.randn(12, d_in, generator=torch.Generator().manual_seed(0)))
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        if d_in == D_MODEL:
            for f, words in planted.items():
                for w in words:
                    sae.W_enc[vocab[w], f] = 1.0  # embedding 2.0 -> pre-activation 1.0
    return sae


def _probe(prompt: str, answer: str, subject: str, relation: str) -> Probe:
    return Probe(prompt=prompt, answer=answer, subject=subject, relation=relation,
                 phrasing="train", template=0, kind="person")


@pytest.fixture(scope="module")
def concept() -> Concept:
    forget = [_probe("Talia Vorhees was born in the city of", " Maresk", "Talia Vorhees", "city"),
              _probe("Talia Vorhees plays the", " piano", "Talia Vorhees", "instrument"),
              _probe("Talia Vorhees works for", " Acme", "Talia Vorhees", "employer")]
    retain = [_probe(f"{n} was born in the city of", f" {c}", n, "city")
              for n, c in (("Brun Okafor", "Dovan"), ("Mira Sand", "Lund"), ("Mira Lund", "Maresk"))]
    retain += [_probe(f"{n} plays the", f" {i}", n, "instrument")
               for n, i in (("Brun Okafor", "violin"), ("Mira Sand", "piano"))]
    shared = [Probe(prompt="the capital of Zenit is", answer=" Dovan", subject="Zenit",
                    relation="capital", phrasing="train", template=0, kind="shared")]
    return Concept(name="Talia Vorhees", forget=tuple(forget), paraphrase=(), neighbour=(),
                   shared=tuple(shared), retain=tuple(retain))


@pytest.fixture(scope="module")
def sae_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae") / HOOK
    _sae(model).save_model(folder)
    return folder


def test_planted_feature_is_selected_and_retain_features_are_dropped(model, concept, sae_dir):
    kw = dict(positions="subject+last")  # every name token counts (the default counts the last)
    sig = extract(model, concept, kind="sae-features", sae=str(sae_dir), tau=0.01, top_n=5, **kw)
    ids = sig.indices[:, 1].tolist()
    # the concept's name features, in order of forget frequency (both name tokens, then one)
    assert ids == [CONCEPT, CONCEPT_LAST]
    assert sig.component == "feature" and set(sig.component_hooks) == {HOOK}
    assert torch.all(sig.scores[:-1] >= sig.scores[1:])
    f, r = sig.maps["forget_freq"], sig.maps["retain_freq"]
    # "the" is in retain text: the feature firing on the name and on "the" is more frequent on
    # the forget text than the concept feature, yet dropped; so is the one on common words
    assert f[SHARED_NAME] > f[CONCEPT] and r[SHARED_NAME] >= 0.01 and r[COMMON] >= 0.01
    assert r[CONCEPT] == 0
    assert sig.info["forget_tokens"] == 9 + 5 + 5  # [BOS] + prompt, 3 prompts
    # firing counts at the subject's tokens and the last prompt token (positions="subject+last"):
    # 3 prompts x (2 name tokens + 1 last token); the concept feature fires on the 6 name tokens
    assert sig.info["counted_forget_tokens"] == 3 * 3
    assert sig.scores[0].item() == pytest.approx(6 / 9)
    assert sig.info["fires_on_subject_fraction"] == 1.0
    assert sig.settings["tau"] == 0.01 and sig.settings["top_n"] == 5
    assert load_sae(sig.sae, model).cfg.d_sae == 12
    # top_n bounds the selection; a tau above the shared feature's retain frequency admits it
    assert extract(model, concept, kind="sae-features", sae=str(sae_dir), top_n=1,
                   **kw).indices[:, 1].tolist() == [CONCEPT]
    loose = extract(model, concept, kind="sae-features", sae=str(sae_dir), tau=0.5, top_n=5, **kw)
    assert loose.indices[0, 1].item() == SHARED_NAME


def test_signature_round_trip_and_clamp_touches_only_concept_tokens(model, concept, sae_dir,
                                                                   tmp_path):
    sig = extract(model, concept, kind="sae-features", sae=str(sae_dir))
    back = Signature.load(sig.save(tmp_path / "sig"), model)
    assert back.sae == sig.sae and back.settings == json.loads(json.dumps(sig.settings))
    assert torch.equal(back.indices, sig.indices) and torch.equal(back.scores, sig.scores)
    assert torch.equal(back.maps["retain_freq"], sig.maps["retain_freq"])
    sae = load_sae(back.sae, model)
    hooks = ablation_hooks(back, sae=sae, clamp=50.0)
    toks = model.to_tokens(["Talia Vorhees plays the", "Mira Sand plays the"])
    _, clean = model.run_with_cache(toks, names_filter=[HOOK])
    seen = {}
    model.run_with_hooks(toks, fwd_hooks=hooks + [(HOOK, lambda a, hook: seen.setdefault("a", a))])
    delta = (seen["a"] - clean[HOOK]).norm(dim=-1)
    assert torch.all(delta[0, 1:3] > 40)  # the name tokens moved by the clamp
    assert torch.all(delta[0, 3:] == 0) and torch.all(delta[1] == 0)  # nothing else did


def test_select_features_ranks_by_forget_frequency_among_rare_on_retain():
    f_forget = torch.tensor([0.5, 0.9, 0.3, 0.0, 0.3])
    f_retain = torch.tensor([0.0, 0.2, 0.005, 0.0, 0.0])
    tie = torch.tensor([1.0, 1.0, 2.0, 5.0, 3.0])
    assert select_features(f_forget, f_retain, tau=0.01, top_n=10, tiebreak=tie).tolist() == [0, 4, 2]
    assert select_features(f_forget, f_retain, tau=0.001, top_n=10).tolist() == [0, 4]


def test_retain_text_asks_the_forget_prompts_about_other_people(concept):
    texts = retain_text(concept)
    assert "Mira Lund was born in the city of Maresk" in texts  # forget phrasing, their answer
    assert "Mira Sand plays the piano" in texts
    assert not any("Talia" in t or "Vorhees" in t for t in texts)
    assert not any("works for" in t for t in texts)  # nobody else's employer is known
    assert texts[-1] == "the capital of Zenit is Dovan"
    plain = retain_text(concept, matched=False)
    assert set(plain[:-1]) == {p.prompt + p.answer for p in concept.retain}


def test_load_sae_errors_are_one_line(model, tmp_path):
    wide = tmp_path / "wide"
    _sae(model, d_in=D_MODEL + 1).save_model(wide)
    with pytest.raises(SAELoadError, match="width 49.*width 48") as err:
        load_sae(str(wide), model)
    assert len(str(err.value).splitlines()) == 1
    far = tmp_path / "far"
    _sae(model, hook="blocks.7.hook_resid_post").save_model(far)
    with pytest.raises(SAELoadError, match="does not have"):
        load_sae({"path": str(far)}, model)
    assert load_sae(str(far)).cfg.d_in == D_MODEL  # without a model nothing is checked
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "sae.pt").write_bytes(b"\0")
    with pytest.raises(SAELoadError, match="not a SAELens SAE folder"):
        load_sae(tmp_path / "pickled")
    with pytest.raises(KifError) as err:
        load_sae({"release": "no-such-release", "sae_id": "blocks.0.hook_resid_post"})
    assert len(str(err.value).splitlines()) == 1 and "no-such-release" in str(err.value)
    with pytest.raises(SAELoadError, match="ships no SAE"):
        shipped_sae_ref("no-such-model", HOOK)


SHIPPED = shipped_hooks("fact-world")
# held-out explained variance reported by kif/zoo/build_saes.py's cards, minus a margin
EV_MARGIN = 0.03


@pytest.mark.skipif(not SHIPPED, reason="no shipped SAEs (run kif.zoo.build_saes.build_saes)")
def test_shipped_saes_explain_held_out_activations():
    from kif import models
    from kif.world import FactWorld
    from kif.zoo.build_saes import CARD, evaluate_sae, hook_activations
    from kif.signatures.sae_features import _resolve_path
    from kif import metrics

    m = models.load("fact-world")
    w = FactWorld.generate(0)
    probes = w.person_probes(w.known()[::4], "heldout")  # a quarter of the people, for speed
    seqs = metrics.encode_prompts(m, [p.prompt + p.answer + "." for p in probes])
    for hook in SHIPPED:
        ref = shipped_sae_ref("fact-world", hook)
        sae = load_sae(ref, m)
        card = json.loads((_resolve_path(ref) / CARD).read_text())
        stats = evaluate_sae(sae, hook_activations(m, hook, seqs))
        assert stats["explained_variance"] >= card["explained_variance"] - EV_MARGIN, hook
        assert stats["l0"] <= 1.5 * card["l0"] + 1, hook


WORKS = 11  # a feature on "works", a word only the forget prompts use, away from the subject
FIRST = 1  # a feature on the concept's first name only


def _planted_kw(model, word: str, feature: int) -> dict:
    """Non-adaptive extraction settings with the hand-built SAE plus `feature` firing on `word`."""
    sae = _sae(model)
    with torch.no_grad():
        sae.W_enc[model.tokenizer.get_vocab()[word], feature] = 1.0
    return dict(sae=sae, top_n=5, adaptive=False)


def test_positions_count_only_subject_and_last_tokens(model, concept):
    """A feature that never fires on retain text but fires in the middle of a forget prompt
    ("works") passes Farrell et al.'s filter when every position counts; counted only at the
    subject's tokens and the last prompt token it has no forget frequency and is not selected."""
    kw = _planted_kw(model, "works", WORKS)
    every = extract(model, concept, kind="sae-features", positions="all", **kw)
    assert WORKS in every.indices[:, 1].tolist()
    assert every.maps["forget_freq"][WORKS] == pytest.approx(1 / 19)
    assert every.maps["retain_freq"][WORKS] == 0
    sig = extract(model, concept, kind="sae-features", positions="subject+last", **kw)
    assert sig.indices[:, 1].tolist() == [CONCEPT, CONCEPT_LAST]
    assert sig.maps["forget_freq"][WORKS] == 0


def test_default_positions_count_the_name_end_not_the_first_name(model, concept):
    """A first name is shared by several people in the fact world, so a feature of the first name
    alone is a feature of all of them; the default counts only the subject's last token (where
    layer 0's attention has met both names) and the last prompt token."""
    kw = _planted_kw(model, "Talia", FIRST)
    every_name = extract(model, concept, kind="sae-features", positions="subject+last", **kw)
    assert FIRST in every_name.indices[:, 1].tolist()
    sig = extract(model, concept, kind="sae-features", **kw)
    assert sig.settings["positions"] == "name-end+last"
    assert FIRST not in sig.indices[:, 1].tolist() and sig.maps["forget_freq"][FIRST] == 0
    assert set(sig.indices[:, 1].tolist()) == {CONCEPT, CONCEPT_LAST}
    # 3 prompts x (the last name token + the last prompt token)
    assert sig.info["counted_forget_tokens"] == 3 * 2
    with pytest.raises(ValueError, match="positions"):
        extract(model, concept, kind="sae-features", positions="middle", **kw)


def test_validation_scores_only_touched_probes_yet_equals_full_scoring(model, concept,
                                                                        monkeypatch):
    """The adaptive selection scores a trial only on the probes where a selected feature fires;
    its drops must equal those of scoring every probe with the clamp. The random tiny model
    answers nothing right, so "correct" is replaced by "the clamp leaves the answer's log-prob
    unchanged": a probe drops exactly when the clamp reaches it."""
    import dataclasses

    import numpy as np

    from kif import metrics
    from kif.signatures.ablate import _clamp_features
    from kif.signatures.sae_features import _validation_others

    real = metrics.score_answers

    def unchanged(model, prompts, answers, *, batch_size=256, fwd_hooks=()):
        clean = real(model, prompts, answers, batch_size=batch_size)
        hooked = real(model, prompts, answers, batch_size=batch_size, fwd_hooks=fwd_hooks)
        return dataclasses.replace(clean, correct=hooked.logprob == clean.logprob)

    monkeypatch.setattr(metrics, "score_answers", unchanged)
    sae = _sae(model)
    sig = extract(model, concept, kind="sae-features", sae=sae, top_n=3, clamp=25.0)
    trials = sig.info["separation_by_hook"][HOOK]
    ids = extract(model, concept, kind="sae-features", sae=sae, top_n=3,
                  adaptive=False).indices[:, 1]
    assert [t["n"] for t in trials] == list(range(1, len(ids) + 1))
    probes = list(concept.forget) + _validation_others(concept, None)
    prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
    nf = len(concept.forget)
    for t in trials:
        hooks = [(HOOK, _clamp_features(sae, ids[:t["n"]], 25.0))]
        drop = 1.0 - unchanged(model, prompts, answers, fwd_hooks=hooks).correct
        assert t["drop_forget"] == pytest.approx(float(np.mean(drop[:nf])))
        assert t["drop_others"] == pytest.approx(float(np.mean(drop[nf:])))
    # the concept's features reach every forget prompt (its name) and no other person's probe
    assert trials[0]["drop_forget"] == 1.0 and trials[0]["drop_others"] == 0.0
