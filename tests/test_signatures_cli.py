"""`kif signatures` end to end on the shipped base model: it writes a signature that loads back
against the same model and is refused against another; bad input writes nothing."""

import json

import pytest

from kif import models, zoo
from kif.cli import main
from kif.signatures.base import Signature, SignatureMismatchError
from kif.world import FactWorld

PERSON = FactWorld.generate().split("forget10")[3].name


def test_concept_vectors_signature_round_trip(tmp_path, capsys):
    out = tmp_path / "sig"
    assert main(["signatures", "--model", zoo.BASE, "--concept", PERSON,
                 "--kind", "concept-vectors", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["concept"] == PERSON and summary["components"] > 0
    assert all(h.startswith("blocks.") for h in summary["hooks"])
    assert (out / "scores.png").stat().st_size > 1000
    base = models.load(zoo.BASE)
    sig = Signature.load(out, model=base)
    assert sig.kind == "concept-vectors" and len(sig) == summary["components"]
    assert bool((sig.scores[:-1] >= sig.scores[1:]).all())  # sorted by score
    oracle = models.load(zoo.oracle_name("forget10"))
    with pytest.raises(SignatureMismatchError):
        Signature.load(out, model=oracle)


def test_unknown_person_and_unknown_kind_write_nothing(tmp_path, capsys):
    out = tmp_path / "sig"
    assert main(["signatures", "--concept", "Nobody Atall", "--kind", "concept-vectors",
                 "--out", str(out)]) == 2
    assert "not a person" in capsys.readouterr().err
    assert main(["signatures", "--concept", PERSON, "--kind", "no-such-kind",
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_corrupt_signature_file_is_a_clear_error(tmp_path):
    from kif.signatures.base import SignatureError

    (tmp_path / "signature.json").write_text("{not json")
    (tmp_path / "signature.safetensors").write_bytes(b"garbage")
    with pytest.raises(SignatureError, match="corrupt"):
        Signature.load(tmp_path)
