"""Figures with provenance: results files carry their command, commit, machine and date, and
the README's tables of measured figures equal the files they are rendered from."""

import json
import pathlib

import pytest

from kif import results
from kif.cli import main
from kif.errors import KifError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_readme_tables_equal_their_results_files():
    text = (ROOT / "README.md").read_text()
    found = results.tables(text, ROOT)
    assert found, "the README renders no table from results/"
    for spec, body, want in found:
        assert body == want, f"the README's table from {spec.split('|')[0]} is stale " \
                             f"(python -m kif.results --write)"
    assert results.main([str(ROOT / "README.md"), "--check"]) == 0


def test_every_results_file_says_how_it_was_made():
    for path in sorted((ROOT / "results").glob("*.json")):
        data = json.loads(path.read_text())
        assert all(data.get(k) for k in results.PROVENANCE), path.name


def _readme(tmp_path, rows, spec="r.json | method=method:code | forget=forget_acc:.3f "
                                 "| FQ=forget_quality:.2g"):
    results.write(tmp_path / "r.json", ["bench", "methods", "--json"], rows=rows)
    body = "| method | forget | FQ |\n| --- | --- | --- |\n| `stamp` | 0.500 | 1e-05 |\n"
    (tmp_path / "README.md").write_text(f"intro\n\n<!-- results: {spec} -->\n{body}"
                                        f"<!-- /results -->\n\nafter\n")
    return tmp_path / "README.md"


def test_a_stale_table_fails_the_check_and_write_renders_it(tmp_path, capsys):
    readme = _readme(tmp_path, [{"method": "stamp", "forget_acc": 0.5, "forget_quality": 1e-5},
                                {"method": "kif", "forget_acc": 0.0123, "forget_quality": None}])
    assert results.main([str(readme), "--check"]) == 1
    assert "r.json differs" in capsys.readouterr().err
    assert results.main([str(readme), "--write"]) == 0
    text = readme.read_text()
    assert "| `kif` | 0.012 | — |\n<!-- /results -->" in text
    assert text.startswith("intro\n") and text.endswith("after\n")
    assert results.main([str(readme), "--check"]) == 0


def test_where_filters_rows_and_provenance_is_recorded(tmp_path):
    readme = _readme(tmp_path, [{"method": "stamp", "profile": "auto", "forget_acc": 0.1},
                                {"method": "stamp", "profile": "fact-world", "forget_acc": 0.5}],
                     spec="r.json | where=profile:auto | method=method | forget=forget_acc:.2f")
    spec, _, table = results.tables(readme.read_text(), tmp_path)[0]
    assert table.splitlines()[2:] == ["| stamp | 0.10 |"]
    # a pattern keeps every row it matches (the retrains of a bench run: where=method:retrain*)
    spec = "r.json | where=profile:fact-* | method=method | forget=forget_acc:.2f"
    assert results.render(spec, tmp_path).splitlines()[2:] == ["| stamp | 0.50 |"]
    spec = "r.json | where=profile:nope,auto | method=method | forget=forget_acc:.2f"
    assert results.render(spec, tmp_path).splitlines()[2:] == ["| stamp | 0.10 |"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["command"] == "kif bench methods --json" and data["date"] and data["machine"]
    assert data["commit"]


def test_a_table_from_a_file_without_provenance_is_refused(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(KifError, match="has no command, commit, machine, date"):
        results.render("r.json | a=a", tmp_path)
    (tmp_path / "README.md").write_text("<!-- results: nope.json | a=a -->\n<!-- /results -->\n")
    assert results.main([str(tmp_path / "README.md"), "--check"]) == 2


@pytest.mark.parametrize("bad", ["out.txt", "."])
def test_record_needs_a_json_path_and_runs_nothing_otherwise(bad, capsys, tmp_path):
    assert main(["bench", "methods", "--record", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a .json file path" in err


def test_rows_may_be_a_nested_list_or_an_object_keyed_by_name(tmp_path):
    # a bench that writes one object per shape or per fitted quantity (`kif bench scale`)
    results.write(tmp_path / "s.json", ["bench", "scale"],
                  shapes=[{"shape": "zoo", "stages": {"kif": {"seconds": 4.5}}}],
                  exponents={"params": {"kif.seconds": {"exponent": 0.81},
                                        "load.seconds": {"exponent": 0.46}}},
                  targets={"ratio": 0.96})
    spec = "s.json | rows=shapes | shape=shape | kif=stages.kif.seconds:.1f"
    assert results.render(spec, tmp_path).splitlines()[2:] == ["| zoo | 4.5 |"]
    spec = "s.json | rows=exponents.params | where=key:kif.* | quantity=key:code | a=exponent:.2f"
    assert results.render(spec, tmp_path).splitlines()[2:] == ["| `kif.seconds` | 0.81 |"]
    spec = "s.json | rows=targets | what=key | value=value:.2f"
    assert results.render(spec, tmp_path).splitlines()[2:] == ["| ratio | 0.96 |"]
    with pytest.raises(KifError, match="no list or object 'exponents.nope'"):
        results.render("s.json | rows=exponents.nope | a=a", tmp_path)
