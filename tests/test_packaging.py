"""The distribution maps the top-level folders onto kif.signatures and kif.kernels (DESIGN.md),
installs no generic top-level `signatures` or `kernels` module, and its source tree shadows no
installed distribution's import name from the repository root."""

import importlib
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_subpackages_import_from_their_folders():
    for mod_name, folder in (("kif.signatures.registry", "signatures"),
                             ("kif.kernels.dispatch", "kernels")):
        mod = importlib.import_module(mod_name)
        assert pathlib.Path(mod.__file__).resolve().parent == ROOT / folder


def _top_level_folders() -> list[str]:
    """The repository's top-level folders whose names are importable identifiers."""
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and p.name.isidentifier() and not p.name.startswith("."))


def test_source_tree_shadows_no_installed_distribution():
    """From the repository root (where `python -m pytest` and a user's `python` put the current
    folder first on sys.path), every installed distribution whose top-level import name equals
    one of the repository's folders imports as itself, not as that folder; and
    transformers.activations, which imports Hugging Face's `kernels` when it is installed, imports.
    With `kernels/__init__.py` in the tree this failed (transformers 5.25, kernels 0.19)."""
    import importlib.metadata
    import subprocess
    import sys

    dists = importlib.metadata.packages_distributions()
    clashes = [name for name in _top_level_folders() if name != "kif" and name in dists]
    code = ("import importlib, pathlib, sys\n"
            "root = pathlib.Path.cwd().resolve()  # the repository root\n"
            "for name in sys.argv[1:]:\n"
            "    mod = importlib.import_module(name)\n"
            "    where = [pathlib.Path(p).resolve() for p in getattr(mod, '__path__', [])]\n"
            "    if getattr(mod, '__file__', None):\n"
            "        where.append(pathlib.Path(mod.__file__).resolve())\n"
            "    folder = root / name\n"
            "    inside = [str(p) for p in where if p == folder or folder in p.parents]\n"
            "    assert not inside, f'{name} imports from the source tree: {inside}'\n"
            "import transformers.activations\n")
    out = subprocess.run([sys.executable, "-c", code, *clashes], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]


def test_top_level_folders_are_not_packages():
    """The rule behind the test above, checked even where no clashing distribution is installed:
    a top-level folder other than `kif/` is never a regular package."""
    packages = [name for name in _top_level_folders()
                if name != "kif" and (ROOT / name / "__init__.py").exists()]
    assert packages == [], f"top-level folders with __init__.py shadow same-named distributions: {packages}"


def test_import_kif_is_light_and_lazy():
    import subprocess
    import sys
    code = "import sys, kif; print('transformer_lens' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_console_script_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'kif = "kif.cli:main"' in text
