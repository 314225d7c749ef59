"""The meter as an auditor of a checkpoint kif did not make (issue 15, item 3): a plain
`transformers` gradient-ascent loop, written here and sharing no code with kif's `ga`, unlearns
forget05 from the zoo's base until the answers fail; `kif meter` must call it `suppressed` (its
facts are still read from inside), while the oracle trained without those people is `deleted`
and the base itself `intact`."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kif import zoo  # noqa: E402
from kif.cli import main  # noqa: E402
from kif.world import FactWorld  # noqa: E402

SPLIT = "forget05"
PROBES = ["answer-rank", "head-projection", "linear-probe-retrained", "relearning"]
"""Two lens probes, a linear probe and a weight attack: three families, a few seconds each."""


def _rows(tok, probes):
    bos = tok.bos_token_id
    return [([bos] + tok(p.prompt, add_special_tokens=False)["input_ids"],
             tok(p.answer, add_special_tokens=False)["input_ids"]) for p in probes]


def _padded(rows, idx, pad):
    """Right-padded [BOS] + prompt + answer, labels on the answer tokens only (causal attention
    keeps the padding out of the real tokens, so no attention mask is needed)."""
    length = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
    ids = torch.full((len(idx), length), pad)
    labels = torch.full((len(idx), length), -100)
    for r, i in enumerate(idx):
        prompt, answer = rows[i]
        ids[r, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[r, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


@torch.no_grad()
def _first_token_acc(model, rows, pad) -> float:
    idx = list(range(len(rows)))
    ids, _ = _padded(rows, idx, pad)
    logits = model(input_ids=ids).logits
    last = torch.tensor([len(rows[i][0]) - 1 for i in idx])
    pred = logits[torch.arange(len(idx)), last].argmax(-1)
    return float((pred == torch.tensor([rows[i][1][0] for i in idx])).float().mean())


@pytest.fixture(scope="module")
def ga_checkpoint(tmp_path_factory):
    """Gradient ascent on forget05's answers with AdamW (lr 1e-5, batches of 32) until at most
    5 % of their first tokens are still predicted; saved with `save_pretrained`."""
    src = zoo.resolve(zoo.BASE)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    # the zoo ships fp16 weights; AdamW's epsilon underflows in fp16, so train in fp32
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    world = FactWorld.generate(0)
    rows = _rows(tok, world.person_probes(world.split(SPLIT), "train"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    acc, steps = 1.0, 0
    model.train()
    while acc > 0.05 and steps < 400:
        for _ in range(10):
            idx = torch.randint(len(rows), (32,), generator=g).tolist()
            ids, labels = _padded(rows, idx, tok.pad_token_id)
            loss = -model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps += 10
        model.eval()
        acc = _first_token_acc(model, rows, tok.pad_token_id)
        model.train()
    out = tmp_path_factory.mktemp("external") / "ga"
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, acc, steps


def _meter(erased, out, capsys) -> dict:
    capsys.readouterr()
    rc = main(["meter", "--model", zoo.BASE, "--erased", str(erased), "--forget-split", SPLIT,
               "--probes", *PROBES, "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_external_gradient_ascent_is_suppressed(ga_checkpoint, tmp_path, capsys):
    ckpt, acc, steps = ga_checkpoint
    assert acc <= 0.05, f"the external loop did not unlearn ({steps} steps, accuracy {acc})"
    report = _meter(ckpt, tmp_path / "ga", capsys)
    assert report["verdict"] == "suppressed"
    assert report["latent_trace_score"] >= 0.5
    # the answers fail at the surface, yet most people are read back from inside
    verdicts = [c["verdict"] for c in report["concepts"].values()]
    assert verdicts.count("suppressed") >= 8 and "intact" not in verdicts
    md = (tmp_path / "ga" / "report.md").read_text()
    assert "suppressed" in "\n\n".join(md.split("\n\n")[:2])  # the summary at the top


def test_oracle_is_deleted_and_base_intact(tmp_path, capsys):
    oracle = _meter(zoo.oracle_for(SPLIT), tmp_path / "oracle", capsys)
    assert oracle["verdict"] == "deleted"
    assert oracle["latent_trace_score"] <= 0.1
    base = _meter(zoo.BASE, tmp_path / "base", capsys)
    assert base["verdict"] == "intact"
