"""The distribution maps the top-level folders onto kif.signatures and kif.kernels (DESIGN.md),
and installs no generic top-level `signatures` or `kernels` module."""

import importlib
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_subpackages_import_from_their_folders():
    for sub, folder in (("kif.signatures", "signatures"), ("kif.kernels", "kernels")):
        mod = importlib.import_module(sub)
        assert pathlib.Path(mod.__file__).resolve().parent == ROOT / folder


def test_import_kif_is_light_and_lazy():
    import subprocess
    import sys
    code = "import sys, kif; print('transformer_lens' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_console_script_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'kif = "kif.cli:main"' in text
