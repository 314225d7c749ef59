"""No pickle anywhere in kif (DESIGN convention 10): every file kif reads is safetensors or
JSON, and nothing crosses between its processes as a pickle. Unpickling runs code named by the
file; a checkpoint, SAE, signature or erasure folder from someone else must never get to.

The check reads the syntax tree of every module of the installed package (`kif`, with
`kif.signatures` and `kif.kernels`), so a comment that names pickle does not trip it and an
aliased import does."""

import ast
import os
import pathlib

import pytest

import kif

# modules whose only use is (un)pickling
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal",
                  "cloudpickle"}
# torch.distributed collectives that pickle their objects
OBJECT_COLLECTIVES = {"all_gather_object", "gather_object", "broadcast_object_list",
                      "scatter_object_list", "send_object_list", "recv_object_list"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function (`torch.load`, `np.load`), '' when not a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _kw(call: ast.Call, key: str):
    for k in call.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else k.value
    return None


def violations(source: str, where: str = "<source>") -> list[str]:
    """Every place in `source` that could read or write a pickle."""
    out = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{line}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in PICKLE_MODULES]
        elif (isinstance(node, ast.ImportFrom)
              and (node.module or "").split(".")[0] in PICKLE_MODULES):
            out.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                out.append(f"{line}: torch.load without weights_only=True")
            elif name == "torch.save":
                out.append(f"{line}: torch.save writes a pickle")
            elif (last == "load" and name.split(".")[0] in ("np", "numpy")
                  and _kw(node, "allow_pickle") not in (None, False)):
                out.append(f"{line}: numpy load with allow_pickle")
            elif last in ("read_pickle", "to_pickle"):
                out.append(f"{line}: {name}")
            elif last in OBJECT_COLLECTIVES:
                out.append(f"{line}: {name} pickles what it sends")
    return out


@pytest.mark.parametrize("source", [
    "import pickle", "import joblib as j", "from dill import loads", "import torch\ntorch.load(f)",
    "torch.load(f, weights_only=False)", "torch.save(x, f)", "np.load(f, allow_pickle=True)",
    "numpy.load(f, allow_pickle=flag)", "dist.all_gather_object(out, obj)",
    "torch.distributed.broadcast_object_list(xs)", "pd.read_pickle(p)",
])
def test_the_check_finds_each_way_in(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    "torch.load(f, weights_only=True)", "np.load(f)", "np.load(f, allow_pickle=False)",
    "# pickle is refused\nx = 1", "json.load(f)", "load_file(path)",
])
def test_the_check_lets_safe_reads_pass(source):
    assert not violations(source), source


def test_the_installed_package_reads_and_writes_no_pickle():
    root = pathlib.Path(kif.__file__).resolve().parent
    # kif/signatures and kif/kernels are links to the top-level folders in a checkout
    files = sorted({(pathlib.Path(d) / f).resolve()
                    for d, _, names in os.walk(root, followlinks=True)
                    for f in names if f.endswith(".py")})
    assert len(files) > 50 and any(p.parent.name == "kernels" for p in files)
    found = [v for p in files for v in violations(p.read_text(), str(p))]
    assert not found, "\n".join(found)
