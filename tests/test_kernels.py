"""kif.kernels: the Triton kernels (under Triton's CPU interpreter here, compiled on a GPU) and the
torch references against a float64 reference on irregular shapes (rows 37, d 50, k 3, n 5), with
one tolerance table; gate-closed rows and rows without an active feature bit-identical; masked
rows out of K^T K; streaming updates equal to one shot; clean errors for an impossible backend.

Triton 3.9 reads TRITON_INTERPRET when `@triton.jit` decorates a function (measured): for our
kernels when kif.kernels.<op> is first imported, for triton.language's own jit functions (the
tl.sum combiner, tl.sigmoid) when `triton` is first imported. So the variable is set here, at
collection, and the interpreter tests run in this process only if nothing imported triton before
(transformer_lens and sae_lens do, so in a full-suite run an earlier test module may have); else
they run once in a child pytest process (test_interpreter_tests_in_child_process).
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

_GPU = torch.cuda.is_available()
if not _GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kif.kernels.dispatch as K  # noqa: E402
from kif.kernels import reference as R  # noqa: E402


def _interpreter_ready() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True  # the first kernel launch imports it, in interpreter mode
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sigmoid, InterpretedFunction)


IN_PROCESS = _GPU or _interpreter_ready()  # Triton kernels can run in this process

DEVICE = torch.device("cuda" if _GPU else "cpu")
ROWS, D, RANK, N_FEAT = 37, 50, 3, 5
BF16_ULP = 2.0 ** -7  # bf16 spacing relative to a value at the bottom of its binade (8-bit significand)

# name -> (atol, rtol, reason). Actual vs a float64 reference computed on the same (upcast) inputs;
# measured worst cases (both backends) in brackets.
TOL = {
    "suppress_out_f32": (2e-5, 1e-5, "fp32 dot products over d=50 and sums of |h'| <= ~8: a few fp32 "
                                     "ulps (1.2e-7 relative) per term [1.5e-6 abs]"),
    "suppress_out_bf16": (1e-4, BF16_ULP, "one rounding of the fp32 result to bf16: half an ulp to nearest "
                                           "(torch, GPU), but Triton's interpreter truncates fp32 -> bf16, up "
                                           "to one ulp = 2^-7 relative; atol for the fp32 result's own "
                                           "~1e-6 relative error on values <= 20 [7.6e-3 relative]"),
    "gate": (3e-6, 1e-5, "sigmoid' <= 1/4 times k_gate/sigma = 6.4 times the fp32 score's error, a few "
                         "ulps of p <= 4 (~1.5e-6) [6.3e-7 abs]"),
    "clamp_out_f32": (5e-5, 1e-5, "fp32 encoder dot products over d=50 feed coefficients up to c + a ~ 30 "
                                  "times decoder rows ~1: ~1e-6 relative of ~30 per feature [1.3e-6 abs]"),
    "clamp_out_bf16": (1e-4, BF16_ULP, "one rounding of the fp32 result to bf16, see suppress_out_bf16 "
                                       "[7.6e-3 relative]"),
    "gram": (1e-4, 1e-5, "fp32 accumulation of 37 products ~1 (sums ~40, fp32 ulp 4e-6); keys of every "
                         "dtype are exact in fp32 and fp16/bf16 products are exact in fp32 [6.4e-6 abs]"),
    "mean": (1e-6, 1e-5, "fp32 column sums of 37 keys ~1, divided by the count [5.9e-8 abs]"),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol, _ = TOL[name]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bit-identity (not float equality: -0 == 0, NaN != NaN)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _backend(backend: str) -> str:
    if backend == "triton" and not IN_PROCESS:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 in this process: the Triton "
                    "tests run in test_interpreter_tests_in_child_process")
    return backend


# ---- gated suppression ---------------------------------------------------------------------

MU, SIGMA = 1.0, 0.25  # score z = (p - 1) / 0.25: closed below p ~ 0.4, open above p ~ 2


def _suppress_case(k: int, dtype: torch.dtype, seed: int = 0):
    """Rows in three groups, none near the gate floor: closed (subspace part ~0.1, g ~ 3e-5),
    half-open (norm 1.2-2.2, g 0.03-0.97) and open (norm 4, g ~ 1)."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, k, generator=gen, dtype=torch.float64))
    U = U.float()
    r = torch.randn(D, generator=gen, dtype=torch.float64)
    r = r - U.double() @ (U.double().T @ r)
    r = (r / r.norm()).float()
    noise = torch.randn(ROWS, D, generator=gen, dtype=torch.float64)
    noise = noise - (noise @ U.double()) @ U.double().T
    direction = torch.randn(ROWS, k, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    norm = torch.empty(ROWS, dtype=torch.float64)
    group = torch.arange(ROWS) % 3
    norm[group == 0] = 0.1
    norm[group == 1] = torch.linspace(1.2, 2.2, int((group == 1).sum()), dtype=torch.float64)
    norm[group == 2] = 4.0
    h = (noise + (direction * norm[:, None]) @ U.double().T).to(dtype)
    return h.to(DEVICE), U.to(DEVICE), r.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,k", [(torch.float32, RANK), (torch.bfloat16, RANK), (torch.float32, 1)])
def test_gated_suppression_matches_float64(backend, dtype, k):
    h, U, r = _suppress_case(k, dtype)
    out, g = K.gated_suppression(h, U, r, mu=MU, sigma=SIGMA, backend=_backend(backend))
    ref, g_ref = R.gated_suppression(h.double(), U.double(), r.double(), mu=MU, sigma=SIGMA)
    assert out.dtype == dtype and out.shape == h.shape
    assert g.dtype == torch.float32 and g.shape == (ROWS,)
    assert_close("gate", g, g_ref)
    assert_close("suppress_out_f32" if dtype == torch.float32 else "suppress_out_bf16", out, ref)
    closed = g_ref == 0
    assert 0 < int(closed.sum()) < ROWS and torch.equal(g == 0, closed.to(g.device))
    assert torch.equal(bits(out[closed]), bits(h[closed]))  # literally the input rows
    opened = ~closed
    assert (out[opened] != h[opened]).any(dim=1).all()
    if dtype == torch.float32:  # the part of h orthogonal to U and r_hat is untouched (bf16
        # rounding of |h'| ~ 15 would spill ~0.06 into every direction)
        basis = torch.cat([U.double(), r.double()[:, None]], dim=1)
        resid = lambda x: x.double() - (x.double() @ basis) @ basis.T  # noqa: E731
        assert_close("suppress_out_f32", resid(out), resid(h))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's
# numpy exp(80) for a far-closed gate; sigmoid is still exactly 0 there, as on a GPU
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_suppression_defaults_and_shapes(backend):
    """No refusal direction, leading [batch, pos] dims, and the gate closed everywhere."""
    h, U, _ = _suppress_case(RANK, torch.float32, seed=1)
    h3 = h[:36].reshape(4, 9, D)
    backend = _backend(backend)
    out, g = K.gated_suppression(h3, U, None, mu=MU, sigma=SIGMA, backend=backend)
    ref, g_ref = R.gated_suppression(h[:36].double(), U.double(), None, mu=MU, sigma=SIGMA)
    assert out.shape == (4, 9, D) and g.shape == (4, 9)
    assert_close("suppress_out_f32", out.reshape(36, D), ref)
    out, g = K.gated_suppression(h3, U, None, mu=100.0, sigma=SIGMA, backend=backend)
    assert not g.any() and torch.equal(bits(out), bits(h3))


# ---- SAE conditional clamp -----------------------------------------------------------------

C = 25.0
D_SAE, SELECTED = 12, [1, 4, 6, 9, 10]
THRESHOLDS = [0.0, 0.3, -0.5, 0.8, 0.1]  # JumpReLU; a negative one behaves as ReLU (a = ReLU(pre) first)


def _clamp_case(dtype: torch.dtype):
    """A full SAE (d_sae 12) and rows h; the kernels get only the 5 selected features' weights."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(ROWS, D, generator=gen).to(dtype)
    W_enc = torch.randn(D, D_SAE, generator=gen) / D ** 0.5
    b_enc = torch.full((D_SAE,), -1.0)  # each feature fires on ~16 % of rows: ~40 % of rows have none
    b_dec = 0.1 * torch.randn(D, generator=gen)
    W_dec = torch.randn(D_SAE, D, generator=gen) / D ** 0.5
    return [t.to(DEVICE) for t in (h, W_enc, b_enc, b_dec, W_dec)]


def _selected(W_enc, b_enc, W_dec):
    return W_enc[:, SELECTED], b_enc[SELECTED], W_dec[SELECTED]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,jump", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_sae_clamp_matches_float64(backend, dtype, jump):
    h, W_enc, b_enc, b_dec, W_dec = _clamp_case(dtype)
    thr = torch.tensor(THRESHOLDS, device=DEVICE) if jump else None
    out, n_active = K.sae_conditional_clamp(h, *_selected(W_enc, b_enc, W_dec)[:2], b_dec,
                                            _selected(W_enc, b_enc, W_dec)[2], c=C, threshold=thr,
                                            backend=_backend(backend))
    # float64 reference through the full SAE (Farrell et al. 2024): e = h - dec(a), a' = a with the
    # active selected features set to -c, h' = e + dec(a')
    h64, W_enc64, b_enc64, b_dec64, W_dec64 = (t.double() for t in (h, W_enc, b_enc, b_dec, W_dec))
    pre = (h64 - b_dec64) @ W_enc64 + b_enc64
    a = pre.clamp(min=0)
    if thr is not None:
        jump_thr = torch.zeros(D_SAE, dtype=torch.float64, device=DEVICE)
        jump_thr[SELECTED] = thr.double()
        a = a * (pre > jump_thr)
    e = h64 - (a @ W_dec64 + b_dec64)
    hit = torch.zeros_like(a, dtype=torch.bool)
    hit[:, SELECTED] = a[:, SELECTED] > 0
    ref = e + (torch.where(hit, torch.full_like(a, -C), a) @ W_dec64 + b_dec64)
    # the test's premise: no selected pre-activation within 1e-3 of its firing boundary, so
    # rounding cannot flip a feature between backends
    assert (pre[:, SELECTED].abs() > 1e-3).all()
    if thr is not None:
        assert ((pre[:, SELECTED] - thr.double()).abs() > 1e-3).all()
    assert out.dtype == dtype and n_active.dtype == torch.int32
    assert torch.equal(n_active.cpu().long(), hit.sum(dim=1).cpu())
    assert_close("clamp_out_f32" if dtype == torch.float32 else "clamp_out_bf16", out, ref)
    idle = n_active == 0
    assert 0 < int(idle.sum()) < ROWS
    assert torch.equal(bits(out[idle]), bits(h[idle]))


# ---- key statistics ------------------------------------------------------------------------

def _keys(dtype: torch.dtype, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(ROWS, D, generator=gen).to(dtype)
    mask = torch.rand(ROWS, generator=gen) > 0.35
    excluded = (~mask).nonzero().flatten()
    keys[excluded] = float("nan")  # excluded rows must never be read
    keys[excluded[0]] = float("inf")
    return keys.to(DEVICE), mask.to(DEVICE)


def _expected(keys, mask):
    k = keys[mask].double()
    return k.T @ k, k.mean(dim=0), int(mask.sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_stats_matches_float64(backend, dtype):
    keys, mask = _keys(dtype)
    st = K.KeyStats(D, backend=_backend(backend)).update(keys, mask).result()
    gram, mean, count = _expected(keys, mask)
    assert isinstance(st, K.KeyStatistics) and st.count == count
    assert st.gram.dtype == torch.float32 and st.gram.shape == (D, D)
    assert torch.isfinite(st.gram).all()
    assert_close("gram", st.gram, gram)
    assert_close("mean", st.mean, mean)


@pytest.mark.parametrize("split", [1, 3])
def test_key_gram_triton_tiles(split):
    """The launcher with 16-wide tiles on d = 50 (a partial last tile, off-diagonal tiles written
    twice), 16-row steps over 37 rows (a partial last step), and split = 3: the atomic path."""
    _backend("triton")
    from kif.kernels import key_stats

    keys, mask = _keys(torch.float32, seed=4)
    gram = torch.zeros(D, D, device=DEVICE)
    colsum = torch.ones(D, device=DEVICE)  # the kernel adds into what is there
    key_stats.launch(keys, mask, gram, colsum, block_m=16, block_r=16, split=split)
    g64, mean64, count = _expected(keys, mask)
    assert_close("gram", gram, g64)
    assert_close("gram", colsum - 1, mean64 * count)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_key_stats_streaming_equals_one_shot(backend):
    """Integer-valued keys make every fp32 sum exact: streaming must equal one shot bit for bit."""
    backend = _backend(backend)
    gen = torch.Generator().manual_seed(5)
    keys = torch.randint(-3, 4, (ROWS, D), generator=gen).float().to(DEVICE)
    mask = (torch.rand(ROWS, generator=gen) > 0.3).to(DEVICE)
    one = K.KeyStats(D, backend=backend).update(keys, mask).result()
    stream = K.KeyStats(D, device=DEVICE, backend=backend)
    early = stream.update(keys[:10], mask[:10]).result()
    stream.update(keys[10:11], mask[10:11]).update(keys[11:].reshape(2, 13, D), mask[11:].reshape(2, 13))
    full = stream.result()
    assert full.count == one.count
    assert torch.equal(full.gram, one.gram) and torch.equal(full.mean, one.mean)
    assert early.count == int(mask[:10].sum())  # a result is frozen: later updates leave it alone
    assert torch.equal(early.gram, R.key_moments(keys[:10], mask[:10])[0])
    unmasked = K.KeyStats(D, backend=backend).update(keys).result()
    assert unmasked.count == ROWS and torch.equal(unmasked.gram, keys.T @ keys)


def test_key_stats_empty():
    st = K.KeyStats(D).result()
    assert st.count == 0 and not st.gram.any() and not st.mean.any()


# ---- dispatch ------------------------------------------------------------------------------

def test_auto_is_torch_on_cpu_and_float64_has_no_kernel():
    h, U, r = (t.cpu() for t in _suppress_case(RANK, torch.float32))
    auto, _ = K.gated_suppression(h, U, r, mu=MU, sigma=SIGMA)
    ref, _ = K.gated_suppression(h, U, r, mu=MU, sigma=SIGMA, backend="torch")
    assert torch.equal(bits(auto), bits(ref))
    K.gated_suppression(h.double(), U, r, mu=MU, sigma=SIGMA)  # auto: the reference, in float64
    with pytest.raises(K.KernelBackendError, match="float16, bfloat16 or float32"):
        K.gated_suppression(h.double(), U, r, mu=MU, sigma=SIGMA, backend="triton")


@pytest.mark.skipif(_GPU, reason="checks the CPU error path")
def test_cpu_errors_without_interpreter():
    """In a fresh process without TRITON_INTERPRET: `import kif.kernels` does not import Triton,
    auto runs the reference, and backend='triton' raises KernelBackendError for every op."""
    code = (
        "import sys, torch\n"
        "import kif.kernels.dispatch as K\n"
        "assert 'triton' not in sys.modules, 'import kif.kernels imported triton'\n"
        "h = torch.randn(4, 8); U = torch.eye(8)[:, :2]\n"
        "K.gated_suppression(h, U, mu=0.0, sigma=1.0)\n"
        "K.KeyStats(8).update(h).result()\n"
        "assert 'triton' not in sys.modules, 'the CPU path imported triton'\n"
        "calls = [lambda: K.gated_suppression(h, U, mu=0.0, sigma=1.0, backend='triton'),\n"
        "         lambda: K.sae_conditional_clamp(h, U, torch.zeros(2), torch.zeros(8), U.T, c=5.0,\n"
        "                                         backend='triton'),\n"
        "         lambda: K.KeyStats(8, backend='triton').update(h)]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except K.KernelBackendError as e:\n"
        "        assert 'TRITON_INTERPRET' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.skipif(_GPU, reason="checks the CPU error path")
def test_stale_compiled_kernel_fails_cleanly(monkeypatch):
    from kif.kernels import sae_clamp

    monkeypatch.setattr(sae_clamp, "_sae_clamp_kernel", object())  # stands for a compiled JITFunction
    h, W_enc, b_enc, b_dec, W_dec = _clamp_case(torch.float32)
    with pytest.raises(K.KernelBackendError, match="imported before TRITON_INTERPRET"):
        K.sae_conditional_clamp(h, W_enc, b_enc, b_dec, W_dec, c=C, backend="triton")


@pytest.mark.skipif(_GPU, reason="checks the CPU paths of the benchmark script")
def test_bench_triton_interpret_smoke(capsys):
    import json

    from kif.kernels import bench

    assert bench.main(["--op", "clamp"]) == 2  # no CUDA: says so, exits 2
    assert "no CUDA" in capsys.readouterr().err
    _backend("triton")
    assert bench.main(["--op", "suppress", "--interpret-smoke", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["op"] for r in rows] == ["suppress"] and rows[0]["ok"] and rows[0]["triton_ms"] > 0


@pytest.mark.skipif(IN_PROCESS, reason="the Triton tests run in this process")
def test_interpreter_tests_in_child_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                          "-k", "triton"], cwd=pathlib.Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout, (
        out.stdout[-4000:] + out.stderr[-2000:])
