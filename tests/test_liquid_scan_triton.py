"""Triton liquid scan vs ``liquid_scan_ref``, forward and backward, at awkward sizes.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (fp32 only); with CUDA the
same tests run compiled, in fp32 and bf16. Kernel outputs are NaN-poisoned (TITANS_LNN_POISON_OUTPUTS)
so an element a kernel forgets to write fails the comparison.
"""

import os
import subprocess
import sys

import pytest
import torch

# Triton picks the interpreter when a kernel is decorated, i.e. when the kernel module is imported:
# the flag must be set before that import (and before importing triton), so it is set here, first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import torch.nn.functional as F

from titans_lnn.kernels import triton_utils
from titans_lnn.kernels.liquid import liquid_scan_ref
from titans_lnn.kernels.liquid.triton import liquid_scan_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]  # interpreter: fp32
# Relative RMS error allowed, per dtype of the inputs (fla's get_err_ratio).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(triton_utils.POISON_ENV, "1")


def assert_close(name, ref, tri, dtype):
    assert tri.shape == ref.shape, f"{name}: shape {tuple(tri.shape)} != {tuple(ref.shape)}"
    tri, ref = tri.float(), ref.float()
    assert torch.isfinite(tri).all(), f"{name}: {int((~torch.isfinite(tri)).sum())} non-finite elements"
    err = (tri - ref).pow(2).mean().sqrt().item()
    base = ref.pow(2).mean().sqrt().item()
    assert err <= TOL[dtype] * base + 1e-8, f"{name}: relative RMS error {err / max(base, 1e-30):.2e}"


def make_inputs(B, T, D, dtype, with_h0=True, seed=0):
    """Decays exp(log_a) spread over (0, 1): some near 1 (long memory), some near 0."""
    g = torch.Generator().manual_seed(seed)
    log_a = -F.softplus(2 * torch.randn(B, T, D, generator=g))
    b = torch.randn(B, T, D, generator=g)
    h0 = torch.randn(B, D, generator=g) if with_h0 else None
    w = torch.randn(B, T, D, generator=g)  # upstream gradients
    w_last = torch.randn(B, D, generator=g)

    def to(x):
        return None if x is None else x.to(DEVICE, dtype)

    return to(log_a), to(b), to(h0), to(w), to(w_last)


def run(fn, log_a, b, h0, w, w_last, **kw):
    """Outputs and grads (log_a, b, h0) of fn; inputs are cloned to fresh leaves in fp32 for the ref."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (log_a, b, h0)]
    h, h_last = fn(*leaves, **kw)
    loss = (h.float() * w.float()).sum() + (h_last.float() * w_last.float()).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return h, h_last, grads


def check(B, T, D, dtype, with_h0=True, splits=1):
    log_a, b, h0, w, w_last = make_inputs(B, T, D, dtype, with_h0)
    h, h_last, grads = run(liquid_scan_triton, log_a, b, h0, w, w_last, splits=splits)
    # The reference runs in fp32 on the same (rounded) inputs: the exact answer to compare with.
    f32 = [x.float() if x is not None else None for x in (log_a, b, h0, w, w_last)]
    h_ref, h_last_ref, grads_ref = run(liquid_scan_ref, *f32)
    assert h.dtype == b.dtype and h_last.dtype == b.dtype
    assert torch.equal(h_last, h[:, -1]), "h_last must be the last row of h"
    assert_close("h", h_ref, h, dtype)
    assert_close("h_last", h_last_ref, h_last, dtype)
    for name, g_ref, g in zip(("d_log_a", "db", "dh0"), grads_ref, grads):
        assert g.dtype == dtype, name
        assert_close(name, g_ref, g, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 5, 33, 100])
@pytest.mark.parametrize("T", [1, 63, 65, 200])
@pytest.mark.parametrize("B", [1, 2])
def test_matches_ref(B, T, D, dtype):
    check(B, T, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, splits, with_h0", [
    (1, 3, False),  # more splits than steps: clamps to one span
    (65, 3, True),  # spans of 22, 22, 21
    (65, 10, False),  # ten spans of 7, the last of 2
    (200, 1, False),  # one pass without h0
    (200, 3, False),
    (200, 16, True),  # sixteen spans of 13, the last of 5
])
def test_time_splits_match_ref(T, splits, with_h0, dtype):
    """Spans of time in parallel (summary, carry, rerun) give the one-pass answer; splits > T clamps."""
    check(2, T, 33, dtype, with_h0=with_h0, splits=splits)


def test_grad_through_h_last_only():
    log_a, b, h0, _, w_last = make_inputs(2, 65, 5, torch.float32)
    leaves = [x.clone().requires_grad_() for x in (log_a, b, h0)]
    ref_leaves = [x.clone().requires_grad_() for x in (log_a, b, h0)]
    grads = torch.autograd.grad((liquid_scan_triton(*leaves)[1] * w_last).sum(), leaves)
    grads_ref = torch.autograd.grad((liquid_scan_ref(*ref_leaves)[1] * w_last).sum(), ref_leaves)
    for name, g_ref, g in zip(("d_log_a", "db", "dh0"), grads_ref, grads):
        assert_close(name, g_ref, g, torch.float32)


def test_h0_without_grad():
    log_a, b, h0, w, _ = make_inputs(1, 63, 5, torch.float32)
    b.requires_grad_()
    h, _ = liquid_scan_triton(log_a, b, h0)
    (db,) = torch.autograd.grad((h * w).sum(), b)
    assert torch.isfinite(db).all()


def test_empty_time():
    _, b, h0, _, _ = make_inputs(2, 0, 5, torch.float32)
    h, h_last = liquid_scan_triton(b, b, h0)
    assert h.shape == (2, 0, 5) and torch.equal(h_last, h0)


def test_rejects_bad_inputs():
    log_a, b, h0, _, _ = make_inputs(2, 4, 5, torch.float32)
    with pytest.raises(ValueError):
        liquid_scan_triton(log_a, b[:, :3], h0)
    with pytest.raises(TypeError):
        liquid_scan_triton(log_a.double(), b.double(), h0.double())


def test_poisoned_empty():
    """The harness itself: with the flag set, kernel outputs start as NaN."""
    assert torch.isnan(triton_utils.empty((3,), dtype=torch.float32, device=torch.device(DEVICE))).all()


def test_autotune_keeps_one_config_when_interpreting():
    import triton

    if not triton_utils.is_interpreting():
        pytest.skip("compiled run: autotune keeps every config")

    @triton.jit
    def kernel(x):
        pass

    tuner = triton_utils.autotune([triton.Config({}, num_warps=w) for w in (1, 2, 4)], key=[])(kernel)
    assert len(tuner.configs) == 1


def test_imports_without_triton():
    """The module imports with Triton missing and raises a clear RuntimeError only when called."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from titans_lnn.kernels import triton_utils\n"
        "from titans_lnn.kernels.liquid.triton import liquid_scan_triton\n"
        "assert not triton_utils.triton_available()\n"
        "try:\n"
        "    liquid_scan_triton(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
