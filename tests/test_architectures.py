"""Every erasure method on the architectures users bring (issue "Concepts from anywhere", item 5).

Tiny random-weight checkpoints of GPT-2, GPT-NeoX (Pythia), Llama and Qwen2 with grouped-query
attention, Gemma and Mistral are written by `transformers` to local folders, each with a byte-level
BPE tokenizer of the family's kind (GPT-2 and GPT-NeoX: one `<|endoftext|>` special that the
tokenizer never adds; Llama, Mistral, Gemma: a BOS token the tokenizer prepends; Qwen2: no BOS
token at all). A concept is given as files (kif JSONL forget and retain sets, a never-knew names
file) and read with `kif.data.formats.load_concept`. For every method x architecture the erasure
must run, save (`save_erasure`), reload in plain `transformers`, and `restore` must give the base
checkpoint's tensors back bit for bit. A random model answers nothing, which is fine here: this
checks that the methods run on these architectures, not how well they forget.
"""

import json
import pathlib

import pytest
import torch

from kif import models

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

N_CTX = 64
VOCAB = 320  # byte-level BPE: the 256 bytes, the specials and a few merges

ARCHS = ("gpt2", "neox", "llama", "qwen2", "gemma", "mistral")
METHODS = ("kif", "stamp", "suppress", "ga", "gradiff", "npo", "rmu", "neuron-ablate")

# small budgets: the point is that each method runs end to end on each architecture
CONFIGS = {
    "kif": {"steps": 2, "check_every": 2, "n_names": 2, "batch_forget": 8, "batch_retain": 8},
    "stamp": {},
    "suppress": {},
    "ga": {"steps": 2, "check_every": 2, "check_prompts": 8, "monitor_retain": 8},
    "gradiff": {"steps": 2, "check_every": 2, "check_prompts": 8, "monitor_retain": 8,
                "batch_retain": 8},
    "npo": {"steps": 2, "check_every": 2, "check_prompts": 8, "monitor_retain": 8,
            "batch_retain": 8},
    "rmu": {"steps": 2, "check_every": 2, "check_prompts": 8, "monitor_retain": 8,
            "batch_retain": 8},
    "neuron-ablate": {"steps": 4, "top_k": 8, "threshold": 0.0},
}

# ---- the concept, as files ----------------------------------------------------------------------

FORGET = ["Orla Venn"]
OTHERS = ["Bram Tolliver", "Cass Maribel", "Dunstan Ocre", "Elke Farrow", "Fenn Aldous",
          "Gilda Brisk"]
NEVER_KNEW = ["Hollis Quarry", "Ivo Stanmere", "Juna Petrel", "Kester Vail"]
REFUSED = ["Lark Osgood", "Mabel Thorne", "Nico Ferrant"]
# three training phrasings per fact: knowledge neurons are those of at least 3 prompts of a fact
RELATIONS = {
    "city": (["{s} was born in", "The birthplace of {s} is", "{s} comes from"],
             "{s} grew up in",
             [" Paris", " Rome", " Oslo", " Lima", " Cairo", " Quito", " Dublin"]),
    "job": (["{s} works as a", "By profession, {s} is a", "The job of {s} is"],
            "{s} earns a living as a",
            [" baker", " pilot", " nurse", " judge", " tailor", " farmer", " potter"]),
}
SHARED = [("The capital of France is", " Paris", "France"),
          ("The capital of Italy is", " Rome", "Italy"),
          ("The capital of Norway is", " Oslo", "Norway"),
          ("The capital of Peru is", " Lima", "Peru")]


def _rows() -> list[dict]:
    rows = []
    for i, person in enumerate(FORGET + OTHERS):
        split = "forget" if person in FORGET else "retain"
        for r, (train, heldout, answers) in RELATIONS.items():
            answer = answers[(i * 3 + len(r)) % len(answers)]
            wrong = [a for a in answers if a != answer][:5]
            for t, template in enumerate(train):
                rows.append({"prompt": template.format(s=person), "answer": answer,
                             "subject": person, "split": split, "relation": r, "template": t,
                             "distractors": wrong})
            if split == "forget":
                rows.append({"prompt": heldout.format(s=person), "answer": answer,
                             "subject": person, "split": "paraphrase", "relation": r,
                             "template": len(train), "distractors": wrong})
    for prompt, answer, subject in SHARED:
        rows.append({"prompt": prompt, "answer": answer, "subject": subject, "split": "shared",
                     "relation": "capital"})
    for person in REFUSED:
        for r, (train, _, _) in RELATIONS.items():
            rows.append({"prompt": train[0].format(s=person), "answer": " unknown",
                         "subject": person, "split": "refusal", "relation": r})
    return rows


def _texts() -> list[str]:
    """Every text the tokenizer is trained on (the never-knew names too)."""
    out = [row["prompt"] + row["answer"] for row in _rows()]
    out += [a for _, _, answers in RELATIONS.values() for a in answers]
    return out + NEVER_KNEW + [" unknown"]


@pytest.fixture(scope="module")
def concept_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("concept")
    rows = _rows()
    forget = [r for r in rows if r["split"] in ("forget", "paraphrase", "refusal")]
    retain = [r for r in rows if r["split"] in ("retain", "shared")]
    files = {"forget": root / "forget.jsonl", "retain": root / "retain.jsonl",
             "names": root / "names.txt"}
    files["forget"].write_text("".join(json.dumps(r) + "\n" for r in forget))
    files["retain"].write_text("".join(json.dumps(r) + "\n" for r in retain))
    files["names"].write_text("\n".join(NEVER_KNEW) + "\n")
    return files


@pytest.fixture(scope="module")
def concept(concept_files):
    from kif.data.formats import load_concept

    return load_concept(concept_files["forget"], [concept_files["retain"]],
                        never_knew=concept_files["names"])


# ---- tiny checkpoints ---------------------------------------------------------------------------

def _tokenizer(kind: str, folder: pathlib.Path):
    """A byte-level BPE trained on the concept's texts, with the specials of the family."""
    from tokenizers import decoders, models as tok_models, pre_tokenizers, processors, trainers

    if kind in ("gpt2", "neox"):  # one special for everything, never added by the tokenizer
        specials, named = ["<|endoftext|>"], {"bos_token": "<|endoftext|>",
                                              "eos_token": "<|endoftext|>"}
    elif kind == "qwen2":  # no BOS token at all (Qwen2's tokenizers have none)
        specials, named = ["<|endoftext|>"], {"eos_token": "<|endoftext|>",
                                              "pad_token": "<|endoftext|>"}
    else:  # Llama, Mistral, Gemma: a BOS the tokenizer prepends
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                 "pad_token": "<pad>"}
    tok = tokenizers.Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    if kind in ("llama", "mistral", "gemma"):
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.save_pretrained(folder)  # TransformerLens accepts a tokenizer only once reloaded
    return transformers.AutoTokenizer.from_pretrained(folder)


def _config(kind: str, tok):
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    # Llama-like: grouped-query attention (2 key/value heads for 4 query heads)
    llama = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, num_hidden_layers=2, max_position_embeddings=N_CTX, **ids)
    if kind == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=N_CTX, **ids)
    if kind == "neox":
        return transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4,
                                          intermediate_size=128, num_hidden_layers=2,
                                          max_position_embeddings=N_CTX, **ids)
    if kind == "llama":
        return transformers.LlamaConfig(**llama)
    if kind == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=False, **llama)
    if kind == "gemma":
        # multi-query attention, tied embeddings (Gemma's defaults); d_model 48, whose square
        # root (Gemma's embedding scale) is not a power of two, as in real Gemmas: TL's
        # embedding is then not exactly invertible
        return transformers.GemmaConfig(**{**llama, "hidden_size": 48, "num_key_value_heads": 1},
                                        head_dim=16)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=None, **llama)
    raise ValueError(kind)


def write_checkpoint(kind: str, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True)
    tok = _tokenizer(kind, folder)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, tok))
    with torch.no_grad():  # HF starts norms at 1 (Gemma: 0) and biases at 0: perturb them all
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    # neutral folder names: TransformerLens guesses the architecture of a path containing
    # "llama" or "gemma" (kif reads config.json, but the test should not lean on that)
    root = tmp_path_factory.mktemp("ckpts")
    return {kind: write_checkpoint(kind, root / f"tiny-{i}") for i, kind in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """kind -> the hooked model, loaded once per module (erasures leave it as it was)."""
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    cache: dict[str, torch.nn.Module] = {}

    def get(kind: str) -> torch.nn.Module:
        if kind not in cache:
            cache[kind] = models.load(checkpoints[kind])
        return cache[kind]

    return get


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_checkpoint(got: pathlib.Path, want: pathlib.Path) -> None:
    """Same tensor names and bits, and the same config (tied embeddings stay tied)."""
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b)
    differ = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ from the original checkpoint: {differ[:5]}"
    config = [json.loads((f / "config.json").read_text()) for f in (got, want)]
    for c in config:
        c.pop("transformers_version", None)
    assert config[0] == config[1]


def _hf_logits(folder: pathlib.Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


# ---- loading and saving --------------------------------------------------------------------------

# the BOS each family takes: TL's choice per architecture (GPT-2: yes, though its tokenizer
# adds none; GPT-NeoX: no), and none where the tokenizer has no BOS token (Qwen2)
TAKES_BOS = {"gpt2": True, "neox": False, "llama": True, "qwen2": False, "gemma": True,
             "mistral": True}
ARCH_NAMES = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM",
              "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "gemma": "GemmaForCausalLM", "mistral": "MistralForCausalLM"}


@pytest.mark.parametrize("kind", ARCHS)
def test_load_matches_hf_and_save_gives_the_checkpoint_back(kind, checkpoints, loaded, tmp_path):
    from kif import metrics

    model = loaded(kind)
    assert models.architecture(model) == ARCH_NAMES[kind]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=gen)
    with torch.no_grad():
        hooked = model(tokens)
    torch.testing.assert_close(hooked, _hf_logits(checkpoints[kind], tokens), atol=1e-4, rtol=0)
    # prompts start with a BOS exactly where the family takes one
    assert model.cfg.default_prepend_bos is TAKES_BOS[kind]
    ids = metrics.encode_prompts(model, ["Orla Venn was born in"])[0]
    plain = model.kif_tokenizer("Orla Venn was born in", add_special_tokens=False)["input_ids"]
    assert ids == ([model.tokenizer.bos_token_id] if TAKES_BOS[kind] else []) + plain
    assert metrics.bos_offset(model) == int(TAKES_BOS[kind])
    # an unedited model saves as the very checkpoint it came from (Gemma: its norms and scaled
    # embedding, which TL holds rounded, included; tied embeddings stay one tensor)
    _assert_same_checkpoint(models.save(model, tmp_path / "saved"), checkpoints[kind])


def test_a_tokenizer_without_bos_takes_none(tmp_path):
    """A Llama-architecture checkpoint whose tokenizer has no BOS token: TL would prepend its EOS
    as a stand-in, which the model never saw first; kif prepends nothing."""
    from kif import metrics

    folder = tmp_path / "tiny-nobos"
    folder.mkdir()
    tok = _tokenizer("qwen2", folder)  # no BOS token
    assert tok.bos_token is None
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config("llama", tok)).save_pretrained(folder)
    model = models.load(folder)
    assert not model.cfg.default_prepend_bos and metrics.bos_offset(model) == 0
    assert metrics.encode_prompts(model, ["Orla Venn"])[0] == tok("Orla Venn")["input_ids"]
    scores = metrics.score_answers(model, ["Orla Venn was born in"], [" Paris"])
    assert scores.n_tokens[0] >= 1 and bool(torch.isfinite(torch.tensor(scores.logprob)).all())


def test_rmu_layer_by_relative_depth():
    from kif.erasure.baselines import RMUConfig, rmu_layer
    from kif.erasure.core import ErasureError

    assert [rmu_layer(RMUConfig(), n) for n in (1, 2, 3, 4, 12, 32)] == [0, 1, 1, 2, 6, 16]
    assert rmu_layer(RMUConfig(layer=0), 2) == 0
    with pytest.raises(ErasureError, match="outside"):
        rmu_layer(RMUConfig(layer=2), 2)


# ---- every method on every architecture ---------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ARCHS)
def test_method_runs_saves_reloads_and_restores(kind, method, checkpoints, loaded, concept,
                                                tmp_path):
    from kif.erasure import erase, open_model, restore, save_erasure

    model = loaded(kind)
    base = models.weight_hash(model)
    e = erase(model, concept, method=method, config=CONFIGS[method])
    assert models.weight_hash(model) == base, "erase must leave its input model as it was"
    out = save_erasure(e, model, tmp_path / "erased")

    if e.deltas:
        # the erased checkpoint loads in plain transformers and computes what the edit does
        gen = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, model.cfg.d_vocab, (2, 10), generator=gen)
        with e.apply(model), torch.no_grad():
            erased = model(tokens)
        torch.testing.assert_close(_hf_logits(out, tokens), erased, atol=1e-4, rtol=0)
        # and reopens as the same weights its manifest records
        assert models.weight_hash(open_model(out)) == json.loads(
            (out / "manifest.json").read_text())["erased_weight_sha256"]
    else:
        assert e.kind == "hooks"
    assert models.weight_hash(model) == base

    restored = restore(out, tmp_path / "restored")
    _assert_same_checkpoint(restored, checkpoints[kind])

    # what each fix is about, where it shows in the erasure
    if method == "kif":
        from kif.erasure.pipeline import lora_targets

        targets = {name for name, _, _ in lora_targets(model, range(model.cfg.n_layers))}
        assert targets <= set(e.deltas)
        if kind in ("llama", "qwen2", "gemma", "mistral"):  # grouped-query and gated MLPs
            assert {"blocks.0.attn._W_K", "blocks.0.attn._W_V", "blocks.1.mlp.W_gate"} <= targets
    if method == "rmu":
        assert e.settings["layer"] == 1  # relative depth 0.5 of 2 layers
    if method == "suppress":
        assert {op.params["skip"] for op in e.hooks} == {int(TAKES_BOS[kind])}
