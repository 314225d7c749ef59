"""Triton is a dependency only where it has wheels (Linux x86_64 / aarch64): pyproject's marker
says so, the lock pins it consistently, and without an importable triton (hidden by a meta-path
finder, in a fresh process) kif imports, its kernel dispatchers run the torch references under
backend="auto", and backend="triton" is one clear error."""

import pathlib
import subprocess
import sys
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]

# `import triton` fails as if the package were not installed: every finder of sys.meta_path is
# wrapped so that triton and its submodules are not found (find_spec -> None), whatever the
# finder, and nothing already imported is kept
_HIDE_TRITON = '''
import importlib.abc, sys

class _NoTriton(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "triton":
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()

    def find_distributions(self, *args, **kwargs):  # importlib.metadata: no triton either
        find = getattr(self.inner, "find_distributions", None)
        dists = find(*args, **kwargs) if find else ()
        return (d for d in dists if (d.metadata["Name"] or "").lower() != "triton")

sys.meta_path[:] = [_NoTriton(f) for f in sys.meta_path]
assert not any(m.partition(".")[0] == "triton" for m in sys.modules)
'''

_CHECKS = '''
import importlib, os, pkgutil
import torch

try:
    import triton
    raise SystemExit("triton is still importable")
except ImportError:
    pass
import importlib.metadata
try:
    importlib.metadata.version("triton")
    raise SystemExit("triton's distribution is still visible")
except importlib.metadata.PackageNotFoundError:
    pass

import kif, kif.cli
from kif.kernels import dispatch, reference
# every kif module imports without triton, except the three kernel modules (each one `@triton.jit`
# kernel, imported only when a Triton kernel is launched)
kernel_modules = {"kif.kernels.gated_suppress", "kif.kernels.sae_clamp", "kif.kernels.key_stats"}
import kif.kernels, kif.signatures  # namespace packages: walked on their own
names = [m.name for pkg in (kif, kif.signatures, kif.kernels)
         for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
         if m.name not in kernel_modules]
assert {"kif.erasure.suppress", "kif.signatures.sae_features", "kif.kernels.bench"} <= set(names)
for name in names:
    importlib.import_module(name)
assert not dispatch.triton_installed() and not dispatch.triton_gpu_available()

gen = torch.Generator().manual_seed(0)
h = torch.randn(3, 5, 37, generator=gen)
U = torch.linalg.qr(torch.randn(37, 2, generator=gen, dtype=torch.float64))[0].float()
out, g = dispatch.gated_suppression(h, U, mu=0.0, sigma=0.5, tau=0.5, backend="auto")
ref, ref_g = reference.gated_suppression(h.reshape(-1, 37), U, None, mu=0.0, sigma=0.5, tau=0.5)
assert torch.equal(out, ref.reshape(h.shape)) and torch.equal(g, ref_g.float().reshape(3, 5))
assert (g > 0).any() and not torch.equal(out, h)  # the op did act on some rows

W_enc, b_enc = torch.randn(37, 4, generator=gen), torch.randn(4, generator=gen)
W_dec, b_dec = torch.randn(4, 37, generator=gen), torch.randn(37, generator=gen)
clamped, n = dispatch.sae_conditional_clamp(h, W_enc, b_enc, b_dec, W_dec, c=5.0, backend="auto")
want, want_n = reference.sae_conditional_clamp(h.reshape(-1, 37), W_enc, b_enc, b_dec, W_dec, c=5.0)
assert torch.equal(clamped, want.reshape(h.shape)) and torch.equal(n, want_n.reshape(3, 5))

keys = torch.randn(11, 37, generator=gen)
stats = dispatch.KeyStats(37, backend="auto").update(keys).result()
assert stats.count == 11 and torch.allclose(stats.gram, keys.T @ keys, atol=1e-4)

os.environ["TRITON_INTERPRET"] = "1"  # not even the interpreter can run a missing package
for call in (lambda: dispatch.gated_suppression(h, U, mu=0.0, sigma=0.5, backend="triton"),
             lambda: dispatch.KeyStats(37, backend="triton").update(keys)):
    try:
        call()
        raise SystemExit("backend='triton' ran without triton")
    except dispatch.KernelBackendError as err:
        assert "needs the triton package" in str(err) and len(str(err).splitlines()) == 1, err
from kif.kernels import bench
assert bench.main(["--interpret-smoke"]) == 2
assert kif.cli.main(["zoo", "list", "--json"]) == 0
assert not any(m.partition(".")[0] == "triton" for m in sys.modules)
print("ok")
'''


def test_kif_works_without_triton():
    done = subprocess.run([sys.executable, "-c", _HIDE_TRITON + _CHECKS], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
                               "TRITON_INTERPRET": "0"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert "not installed here" in done.stderr  # the bench's one-line refusal


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def test_triton_is_required_only_where_it_has_wheels():
    marker = _requirements()["triton"].marker
    base = default_environment()
    for system, machine, wanted in (("linux", "x86_64", True), ("linux", "aarch64", True),
                                    ("darwin", "arm64", False), ("darwin", "x86_64", False),
                                    ("win32", "AMD64", False), ("linux", "ppc64le", False)):
        env = {**base, "sys_platform": system, "platform_machine": machine}
        assert marker is not None and marker.evaluate(env) is wanted, (system, machine)


def test_the_lock_pins_every_dependency_within_its_range():
    """constraints.txt pins a version inside pyproject's range for every dependency, triton
    included (a pin for a package a platform does not require is harmless to pip)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for name, req in _requirements().items():
        key = name.lower().replace("_", "-")
        assert key in pins, f"{name} is not in constraints.txt"
        assert req.specifier.contains(pins[key], prereleases=True), (name, pins[key])
