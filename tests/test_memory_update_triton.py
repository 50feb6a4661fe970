"""Triton memory update vs ``memory_update_ref``, forward and backward, at awkward sizes.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (fp32 only); with CUDA the
same tests run compiled. Kernel outputs are NaN-poisoned (TITANS_LNN_POISON_OUTPUTS) so an element a
kernel forgets to write fails the comparison.
"""

import os
import subprocess
import sys

import pytest
import torch

# Triton picks the interpreter when a kernel is decorated, i.e. when the kernel module is imported:
# the flag must be set before that import (and before importing triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import torch.nn.functional as F

from titans_lnn.kernels import dispatch, triton_utils
from titans_lnn.kernels.titans_memory import memory_update_chunked, memory_update_ref, mlp_forward
from titans_lnn.kernels.titans_memory import triton as mut

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative RMS error allowed, per dtype (fla's get_err_ratio); the kernel computes in fp32.
TOL = {torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(triton_utils.POISON_ENV, "1")


def assert_close(name, ref, tri, dtype=torch.float32):
    assert tri.shape == ref.shape, f"{name}: shape {tuple(tri.shape)} != {tuple(ref.shape)}"
    tri, ref = tri.detach().float().cpu(), ref.detach().float().cpu()
    assert torch.isfinite(tri).all(), f"{name}: {int((~torch.isfinite(tri)).sum())} non-finite elements"
    err = (tri - ref).pow(2).mean().sqrt().item()
    base = ref.pow(2).mean().sqrt().item()
    assert err <= TOL[dtype] * base + 1e-7, f"{name}: relative RMS error {err / max(base, 1e-30):.2e}"


def make_inputs(depth, B=2, H=2, T=13, Dk=12, Dv=12, Dh=20, seed=0):
    """Small learning rates and unit q, k keep the memory from blowing up over a sequence."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    q = F.normalize(rand(B, H, T, Dk), dim=-1)
    k = F.normalize(rand(B, H, T, Dk), dim=-1)
    v = rand(B, H, T, Dv)
    theta = 0.1 * torch.rand(B, H, T, generator=g)
    eta = 0.5 + 0.5 * torch.rand(B, H, T, generator=g)
    alpha = 0.1 * torch.rand(B, H, T, generator=g)
    shapes = [(Dv, Dk)] if depth == 1 else [(Dh, Dk)] + [(Dh, Dh)] * (depth - 2) + [(Dv, Dh)]
    W = tuple(rand(B, H, *s, scale=0.3) for s in shapes)
    S = tuple(rand(B, H, *s, scale=0.05) for s in shapes)
    A = tuple(rand(B, H, *s, scale=0.3) for s in shapes)
    return [x.to(DEVICE) for x in (q, k, v, theta, eta, alpha)], [[x.to(DEVICE) for x in t] for t in (W, S, A)]


def flat_outputs(out):
    y, W, S, A = out
    return [y, *W, *S, *A]


def run(fn, seqs, states, chunk_size, offset, seed=1, max_grad_norm=None, stable=False):
    """Outputs of fn and grads of a random weighted sum of them w.r.t. every input (zeros if unused)."""
    leaves = [x.detach().clone().requires_grad_() for x in seqs]
    st = [[x.detach().clone().requires_grad_() for x in t] for t in states]
    out = fn(*leaves, *(tuple(t) for t in st), chunk_size=chunk_size, offset=offset, max_grad_norm=max_grad_norm,
             stable=stable)
    outs = flat_outputs(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    inputs = leaves + [x for t in st for x in t]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [gr if gr is not None else torch.zeros_like(x) for gr, x in zip(grads, inputs)]
    return outs, grads


NAMES_SEQ = ["q", "k", "v", "theta", "eta", "alpha"]


def check(depth, T, chunk_size, offset, max_grad_norm=None, stable=False, Dk=12, **dims):
    seqs, states = make_inputs(depth, T=T, Dk=Dk, **dims)
    if stable:  # the chunk's Q (steps taken by key, PSD) rides at the end of the anchor
        r = torch.rand(*states[2][0].shape[:2], Dk, Dk, dtype=states[2][0].dtype)
        states[2] = [*states[2], (0.3 * r @ r.transpose(-1, -2)).to(DEVICE)]
    outs, grads = run(mut.memory_update_triton, seqs, states, chunk_size, offset, max_grad_norm=max_grad_norm,
                      stable=stable)
    outs_ref, grads_ref = run(memory_update_ref, seqs, states, chunk_size, offset, max_grad_norm=max_grad_norm,
                              stable=stable)
    n = depth
    out_names = ["y"] + [f"{s}{i}" for s in "WSA" for i in range(n)] + (["Q"] if stable else [])
    for name, r, o in zip(out_names, outs_ref, outs):
        assert o.dtype == r.dtype, f"{name}: dtype {o.dtype} != {r.dtype}"
        assert_close(name, r, o)
    grad_names = [f"d{s}" for s in NAMES_SEQ] + [f"d{s}{i}" for s in "WSA" for i in range(n)]
    grad_names += ["dQ"] if stable else []
    for name, r, o in zip(grad_names, grads_ref, grads):
        assert_close(name, r, o)


# (T, chunk_size, offset): T = 1, 13, 65; chunk sizes that do not divide T; calls starting mid-chunk.
CASES = [
    (1, 1, 0), (1, 4, 0), (1, 4, 3),
    (13, 1, 0), (13, 4, 0), (13, 4, 2), (13, 16, 0), (13, 16, 7),
    (65, 4, 1), (65, 16, 0), (65, 16, 9),
]


@pytest.mark.parametrize("T,chunk_size,offset", CASES, ids=[f"T{t}-C{c}-off{o}" for t, c, o in CASES])
@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
def test_matches_reference(depth, T, chunk_size, offset):
    check(depth, T, chunk_size, offset)


CLIP_CASES = [(1, 4, 0), (13, 4, 2), (13, 16, 0), (65, 16, 9)]


@pytest.mark.parametrize("T,chunk_size,offset", CLIP_CASES, ids=[f"T{t}-C{c}-off{o}" for t, c, o in CLIP_CASES])
@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
def test_clipped_matches_reference(depth, T, chunk_size, offset):
    """max_grad_norm=0.5 clips every token's gradient (its norm is ~2 ||v|| here)."""
    check(depth, T, chunk_size, offset, max_grad_norm=0.5)


@pytest.mark.parametrize("T,chunk_size,offset", CLIP_CASES, ids=[f"T{t}-C{c}-off{o}" for t, c, o in CLIP_CASES])
@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
def test_stable_matches_reference(depth, T, chunk_size, offset):
    """stable=True: the linear memory's rescaled theta goes through the kernel (the MLP's runs the
    chunked PyTorch form), clipped too; the chunk's Q carried in and out."""
    check(depth, T, chunk_size, offset, max_grad_norm=0.5, stable=True)


@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
def test_clipped_some_tokens(depth):
    """A norm between the tokens' gradient norms clips some tokens and leaves the others."""
    seqs, states = make_inputs(depth, T=24)
    q, k, v = seqs[:3]
    W = [w.detach().requires_grad_() for w in states[0]]
    norms = []  # gradient norms of the first chunk's tokens (all taken at the initial weights)
    for t in range(8):
        loss = (mlp_forward(W, k[:, :, t:t + 1]) - v[:, :, t:t + 1]).pow(2).sum((-2, -1))  # (B, H)
        grads = torch.autograd.grad(loss.sum(), W)
        norms.append(sum(g.pow(2).sum((-2, -1)) for g in grads).sqrt())
    norms = torch.stack(norms)
    assert norms.min() < 7.0 < norms.max(), norms
    check(depth, 24, 8, 0, max_grad_norm=7.0)


def test_clipping_changes_the_result():
    """Guard against a test that passes because clipping never triggers."""
    seqs, states = make_inputs(2, T=13)
    args = (*seqs, *(tuple(t) for t in states))
    with torch.no_grad():
        y0 = mut.memory_update_triton(*args, chunk_size=4)[0]
        y1 = mut.memory_update_triton(*args, chunk_size=4, max_grad_norm=0.5)[0]
    assert (y0 - y1).abs().max() > 1e-3


def test_linear_rectangular_heads():
    """Depth 1 allows Dk != Dv (neither a power of two)."""
    check(1, 21, 8, 3, Dk=12, Dv=7)


def test_per_token_long():
    """C = 1 over many chunks: the exact per-token update."""
    check(2, 40, 1, 0, Dk=5, Dv=5, Dh=9)


@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
def test_checkpoint_groups(monkeypatch, depth, G):
    """Saving the state every G chunks (groups recomputed together) gives the same gradients."""
    seqs, states = make_inputs(depth, T=37)
    outs1, grads1 = run(mut.memory_update_triton, seqs, states, 4, 1, max_grad_norm=1.0)
    monkeypatch.setattr(mut, "CHECKPOINT_EVERY", G)
    outs_g, grads_g = run(mut.memory_update_triton, seqs, states, 4, 1, max_grad_norm=1.0)
    for i, (a, b) in enumerate(zip(outs1 + grads1, outs_g + grads_g)):
        assert_close(f"#{i}", a, b)


@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
def test_inference_path(depth):
    """Without autograd no checkpoints are kept; the outputs are those of the autograd path."""
    seqs, states = make_inputs(depth, T=29)
    with torch.no_grad():
        out = mut.memory_update_triton(*seqs, *(tuple(t) for t in states), chunk_size=8, offset=2)
    ref = memory_update_ref(*seqs, *(tuple(t) for t in states), chunk_size=8, offset=2)
    for i, (r, o) in enumerate(zip(flat_outputs(ref), flat_outputs(out))):
        assert_close(f"#{i}", r, o)


def test_streaming_split():
    """Two calls carrying (W, S, A) and the offset equal one call (the streaming contract)."""
    seqs, states = make_inputs(2, T=30)
    C, split = 8, 11
    whole = mut.memory_update_triton(*seqs, *(tuple(t) for t in states), chunk_size=C)
    y1, W, S, A = mut.memory_update_triton(*(x[:, :, :split] for x in seqs), *(tuple(t) for t in states),
                                           chunk_size=C)
    y2, W, S, A = mut.memory_update_triton(*(x[:, :, split:] for x in seqs), W, S, A, chunk_size=C,
                                           offset=split % C)
    for i, (r, o) in enumerate(zip(flat_outputs(whole), flat_outputs((torch.cat([y1, y2], 2), W, S, A)))):
        assert_close(f"#{i}", r, o)


def test_other_depth_falls_back():
    seqs, states = make_inputs(3, T=9)
    out = mut.memory_update_triton(*seqs, *(tuple(t) for t in states), chunk_size=4, offset=1)
    ref = memory_update_chunked(*seqs, *(tuple(t) for t in states), chunk_size=4, offset=1)
    for r, o in zip(flat_outputs(ref), flat_outputs(out)):
        torch.testing.assert_close(o, r)


def test_registered_in_dispatch():
    assert dispatch.get("memory_update", "triton") is mut.memory_update_triton


def test_imports_without_triton():
    """The module imports with Triton missing; calling the op raises a clear RuntimeError."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from titans_lnn.kernels.titans_memory.triton import memory_update_triton\n"
        "x = torch.zeros(1, 1, 2, 4); g = torch.zeros(1, 1, 2); w = (torch.zeros(1, 1, 4, 4),)\n"
        "try:\n"
        "    memory_update_triton(x, x, x, g, g, g, w, w, w, chunk_size=2)\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
