"""The core does not import the fact world (DESIGN.md: the fact world is one data source, a
plugin). Checked in a fresh interpreter in which importing `kif.world` or `kif.zoo` fails."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Modules that must import without the fact world: the data layer, model I/O, metrics, kernels,
# signature extractors, the erasure operators and the meter. (The CLI and the benches are the
# fact world's front ends and import it; `kif.data.export` writes the world's files.)
WORLD_FREE = [
    "kif.data", "kif.data.probe", "kif.data.concept", "kif.data.elicit", "kif.data.selfbuilt", "kif.concepts", "kif.errors", "kif.models",
    "kif.metrics", "kif.kernels.dispatch", "kif.kernels.reference", "kif.signatures.base",
    "kif.signatures.registry", "kif.signatures.causal_trace", "kif.signatures.knowledge_neurons",
    "kif.signatures.concept_vectors", "kif.signatures.sae_features", "kif.erasure",
    "kif.erasure.core", "kif.erasure.io", "kif.erasure.hooks", "kif.erasure.stats",
    "kif.erasure.stamp", "kif.erasure.spread", "kif.inplace", "kif.results", "kif.erasure.suppress", "kif.erasure.unbind", "kif.erasure.baselines",
    "kif.erasure.registry", "kif.erasure.pipeline", "kif.evaluation", "kif.truth_ratios",
    "kif.meter", "kif.meter.audit", "kif.meter.calibrate", "kif.meter.leace", "kif.meter.registry",
    "kif.meter.report", "kif.meter.probes.lens", "kif.meter.probes.linear_probe",
    "kif.meter.probes.quantization", "kif.meter.probes.relearning", "kif.meter.probes.signature",
    "kif.meter.probes.restoration", "kif.meter.probes.uds", "kif.meter.probes.membership",
    "kif.meter.probes.in_context", "kif.meter.probes.parametric", "kif.meter.probes.surface",
]

_BLOCKED_IMPORT = """
import importlib, sys

class NoFactWorld:
    def find_spec(self, name, path=None, target=None):
        if name == "kif.world" or name == "kif.zoo" or name.startswith("kif.zoo."):
            raise ImportError(f"the fact world is blocked in this test: {name}")

sys.meta_path.insert(0, NoFactWorld())
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as err:
        failed.append(f"{name}: {err}")
assert not failed, "; ".join(failed)
"""


def test_core_imports_without_the_fact_world():
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, *WORLD_FREE], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]


def test_the_block_is_real():
    """The same check fails on a module that imports the world (so the test above can fail)."""
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, "kif.data.export"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "kif.world" in out.stderr


_ERASE_WITHOUT_WORLD = _BLOCKED_IMPORT.split("failed = []")[0] + """
import pathlib
from kif.data.formats import load_concept
from kif.erasure import erase
from kif.metrics import score_answers
from kif.models import load

folder, data = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
model = load(str(folder))
concept = load_concept(data / "forget.jsonl", [data / "retain.jsonl"],
                       never_knew=data / "never_knew.txt")
erasure = erase(model, concept, method="stamp", config={"cache": False})
def acc(probes):
    return float(score_answers(model, [p.prompt for p in probes],
                               [p.answer for p in probes]).correct.mean())

kept = concept.retain[::20]  # every fourth person's first phrasings: enough to see collateral
with erasure.apply(model):
    forget, retain = acc(concept.forget), acc(kept)
assert forget <= 0.1 and retain >= 0.97, (forget, retain)
assert not any(m == "kif.world" or m.startswith("kif.zoo") for m in sys.modules)
"""


def test_an_erasure_from_files_runs_without_the_fact_world(tmp_path):
    """At run time too: a concept from files is erased and scored with `kif.world` and `kif.zoo`
    unimportable (the model loaded from its folder, not by zoo name)."""
    from kif.data.export import export_world
    from kif.world import FactWorld

    data = export_world(FactWorld.generate(0), "forget01", "kif", out_dir=tmp_path / "data")
    folder = ROOT / "kif" / "zoo" / "fact-world"
    out = subprocess.run([sys.executable, "-c", _ERASE_WITHOUT_WORLD, str(folder), str(data)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]
