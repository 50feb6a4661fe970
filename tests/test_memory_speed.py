"""The memory's fast chunk loop (kernels/titans_memory/chunk_loop.py: a hand-written backward for depth 1
and 2) == the autograd loop through ``chunked._chunk`` ($TITANS_LNN_MEMORY_BACKWARD=autograd), forward and
gradients of every input and output, in fp64, with the loop over chunks in C++ (csrc/chunk_loop.cpp) and in
Python ($TITANS_LNN_MEMORY_LOOP); it is the path taken by default; and it issues far fewer ops."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from titans_lnn.kernels.titans_memory import chunked, cpp, memory_update_chunked, memory_update_ref

FLAG = chunked.BACKWARD_ENV



@pytest.fixture(params=["cpp", "python"])
def loop(request, monkeypatch):
    """Runs the test with the chunk loop in C++ and in Python; with "cpp", checks that C++ ran wherever the
    loop did (a call with no whole chunk, T3-C8-off5, runs none)."""
    monkeypatch.setenv(cpp.LOOP_ENV, request.param)
    picked = []
    if request.param == "cpp":
        request.getfixturevalue("cpp_loop")
        module_for = cpp.module_for
        monkeypatch.setattr(cpp, "module_for", lambda t: picked.append(module_for(t)) or picked[-1])
    yield request.param
    if request.param == "cpp":
        assert all(m is not None for m in picked), "the C++ loop was not taken"


def _inputs(T, depth, *, B=2, H=2, D=5, hidden=7, seed=0, stable=False, zero_first_layer=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(r(B, H, T, D), dim=-1), F.normalize(r(B, H, T, D), dim=-1)
    v = r(B, H, T, D)
    u = lambda: torch.rand(B, H, T, generator=g, dtype=torch.float64)  # noqa: E731
    theta, eta, alpha = 0.2 * u(), u(), 0.1 * u()  # (larger steps without the bound blow up: 1e40)
    shapes = [(D, D)] if depth == 1 else [(hidden, D)] + [(hidden, hidden)] * (depth - 2) + [(D, hidden)]
    W = [0.5 * r(B, H, *s) for s in shapes]
    if zero_first_layer:  # z = 0: every hidden unit has the same silu'(0), a tie in the curvature's max
        W[0] = torch.zeros_like(W[0])
    S = [0.05 * r(B, H, *s) for s in shapes]
    A = [w + 0.05 * r(*w.shape) for w in W]
    if stable:
        m = r(B, H, D, D)
        A.append(0.3 * m @ m.transpose(-1, -2))  # the chunk's Q so far (PSD), used when offset > 0
    tensors = [t.requires_grad_() for t in (q, k, v, theta, eta, alpha, *W, *S, *A)]
    return tensors, len(shapes)


def _run(tensors, n, C, offset, update=memory_update_chunked, **kw):
    """``update`` (the chunked form, or the per-token reference) on the flat list of ``_inputs``."""
    q, k, v, theta, eta, alpha = tensors[:6]
    W, S, A = tensors[6:6 + n], tensors[6 + n:6 + 2 * n], tensors[6 + 2 * n:]
    y, W, S, A = update(q, k, v, theta, eta, alpha, tuple(W), tuple(S), tuple(A), chunk_size=C, offset=offset, **kw)
    return [y, *W, *S, *A]


def _grads(outs, tensors, seed=5):
    """Gradients of a random weighted sum of every output w.r.t. every input (None where unused)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _same(a, b, what, close):
    """Relative-RMS closeness (conftest's ``close``), or both absent / zero."""
    if a is None or b is None:
        other = b if a is None else a
        assert other is None or other.abs().max() == 0, what
        return
    close(a, b, 1e-10, what)


CASES = [(1, 1, 0), (16, 4, 0), (13, 4, 0), (13, 4, 3), (20, 5, 2), (63, 16, 0), (65, 8, 0), (3, 8, 5)]


@pytest.mark.parametrize("clip", [None, 0.5, 1e3], ids=["noclip", "clip", "clip-never"])
@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable"])
@pytest.mark.parametrize("depth", [1, 2], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-C{}-off{}".format(*c))
def test_hand_backward_equals_autograd(case, depth, stable, clip, loop, monkeypatch, close):
    T, C, offset = case
    tensors, n = _inputs(T, depth, stable=stable)
    monkeypatch.setenv(FLAG, "autograd")
    ref = _run(tensors, n, C, offset, max_grad_norm=clip, stable=stable)
    g_ref = _grads(ref, tensors)
    monkeypatch.setenv(FLAG, "hand")
    got = _run(tensors, n, C, offset, max_grad_norm=clip, stable=stable)
    g_got = _grads(got, tensors)
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        _same(a, b, f"output {i}", close)
    for i, (a, b) in enumerate(zip(g_ref, g_got)):
        _same(a, b, f"grad of input {i}", close)


def test_ties_in_the_curvature_max_share_the_gradient_as_autograd(loop, monkeypatch, close):
    """A zero first layer makes every hidden unit's silu'(z) equal: max|silu'| is a tie on every token;
    its gradient is shared evenly between the tied units, as autograd's amax does."""
    tensors, n = _inputs(21, 2, stable=True, zero_first_layer=True, seed=3)
    monkeypatch.setenv(FLAG, "autograd")
    g_ref = _grads(_run(tensors, n, 8, 0, max_grad_norm=0.5, stable=True), tensors)
    monkeypatch.setenv(FLAG, "hand")
    g_got = _grads(_run(tensors, n, 8, 0, max_grad_norm=0.5, stable=True), tensors)
    assert g_ref[6].abs().max() > 0  # the zero layer does get a gradient
    for i, (a, b) in enumerate(zip(g_ref, g_got)):
        _same(a, b, f"grad of input {i}", close)


@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable"])
def test_no_grad_forward_equals_the_reference(stable, loop, close):
    """Without a gradient the loop runs without ``ChunkLoop``: the same outputs as the per-token oracle."""
    tensors, n = _inputs(29, 2, stable=stable, seed=1)
    with torch.no_grad():
        got = _run(tensors, n, 8, 3, max_grad_norm=0.5, stable=stable)
        ref = [t.detach() for t in _run(tensors, n, 8, 3, update=memory_update_ref, max_grad_norm=0.5, stable=stable)]
    for i, (a, b) in enumerate(zip(ref, got)):
        _same(a, b, f"output {i}", close)


def _backward_nodes(out):
    """The names of the autograd nodes that ``out`` was computed through."""
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("depth, flag, fast", [(1, "hand", True), (2, "hand", True), (3, "hand", False),
                                               (2, "autograd", False)], ids=["depth1", "depth2", "depth3", "off"])
def test_the_fast_loop_is_the_default_for_depth_1_and_2(depth, flag, fast, monkeypatch):
    monkeypatch.setenv(FLAG, flag)
    tensors, n = _inputs(20, depth, stable=True)
    y = _run(tensors, n, 4, 0, max_grad_norm=0.5, stable=True)[0]
    assert ("ChunkLoopBackward" in _backward_nodes(y)) == fast


def test_backward_flag_is_checked(monkeypatch):
    monkeypatch.setenv(FLAG, "fast")
    tensors, n = _inputs(9, 2)
    with pytest.raises(ValueError, match="TITANS_LNN_MEMORY_BACKWARD='fast' is invalid"):
        _run(tensors, n, 4, 0)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ops(tensors, n):
    with _CountOps() as mode:
        outs = _run(tensors, n, 16, 0, max_grad_norm=2.0, stable=True)
        _grads(outs, tensors)
    return sum(mode.count.values())


def test_the_fast_loop_issues_under_half_the_ops(monkeypatch):
    """Per-op overhead, not arithmetic, is the memory's cost on a CPU (issue 12): forward + backward over
    32 chunks of the tiny memory's shape issue under half the ops of the autograd loop."""
    tensors, n = _inputs(512, 2, B=1, H=2, D=64, hidden=128, stable=True)
    monkeypatch.setenv(FLAG, "autograd")
    slow = _ops(tensors, n)
    monkeypatch.setenv(FLAG, "hand")
    fast = _ops(tensors, n)
    assert fast < 0.5 * slow, (fast, slow)
