"""The core does not import the fact world (DESIGN.md: the fact world is one data source, a
plugin). Checked in a fresh interpreter in which importing `kif.world` or `kif.zoo` fails."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Modules that must import without the fact world: the data layer, model I/O, metrics, kernels,
# signature extractors and the erasure operators' building blocks.
WORLD_FREE = [
    "kif.data", "kif.data.probe", "kif.data.concept", "kif.concepts", "kif.errors", "kif.models",
    "kif.metrics", "kif.kernels.dispatch", "kif.kernels.reference", "kif.signatures.base",
    "kif.signatures.registry", "kif.signatures.causal_trace", "kif.signatures.knowledge_neurons",
    "kif.signatures.concept_vectors", "kif.signatures.sae_features", "kif.erasure",
    "kif.erasure.core", "kif.erasure.io", "kif.erasure.hooks", "kif.erasure.stats",
    "kif.erasure.stamp", "kif.erasure.suppress", "kif.erasure.unbind", "kif.erasure.baselines",
    "kif.erasure.registry", "kif.meter.calibrate", "kif.meter.leace", "kif.meter.registry",
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
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, "kif.evaluation"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "kif.world" in out.stderr
