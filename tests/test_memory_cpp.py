"""The memory's chunk loop in C++ (kernels/titans_memory/csrc/chunk_loop.cpp, through cpp.py) == the Python
loop it ports (chunk_loop.py), forward and every gradient, on awkward sizes; the switch
$TITANS_LNN_MEMORY_LOOP; the fallback to Python (no build, CUDA, bf16) with one warning; the source file in
the wheel. (test_memory_speed.py checks both loops against autograd through ``chunked._chunk``.)"""

import pathlib
import re
import warnings

import pytest
import tomllib
import torch
from test_memory_speed import _grads, _inputs, _run
from torch.utils import cpp_extension

from titans_lnn.kernels.titans_memory import cpp
from titans_lnn.memory import NeuralMemory

ROOT = pathlib.Path(__file__).resolve().parents[1]



def _both(tensors, n, C, offset, monkeypatch, **kw):
    """Outputs and gradients of every input with the C++ loop, then with the Python loop."""
    res = []
    for loop in ("cpp", "python"):
        monkeypatch.setenv(cpp.LOOP_ENV, loop)
        outs = _run(tensors, n, C, offset, **kw)
        res.append(([o.detach() for o in outs], _grads(outs, tensors)))
    return res


def _check(a, b, what, close, tol):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert torch.isfinite(a).all(), what
    close(a, b, tol, what)


# (T, C, offset, B, H, D, hidden): one row (T = 1), fewer rows than a chunk, lengths one off a multiple of
# the chunk, a chunk of 1, an offset into the first chunk, an odd number of memories (B H = 3).
SIZES = [(1, 16, 0, 1, 1, 4, 6), (5, 16, 0, 2, 1, 3, 5), (63, 16, 0, 1, 3, 6, 9), (65, 16, 0, 3, 1, 5, 7),
         (17, 1, 0, 1, 2, 4, 4), (130, 16, 7, 1, 2, 8, 12), (33, 8, 5, 2, 2, 5, 11)]


@pytest.fixture(params=[True, False], ids=["blas", "aten"])
def blas(request, cpp_loop):
    """The C++ loop's matmuls straight to BLAS (blas.h), or through the ATen ops: both must equal Python."""
    was = cpp_loop.use_blas(request.param)
    yield request.param
    cpp_loop.use_blas(was)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable"])
@pytest.mark.parametrize("depth", [1, 2], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T{}-C{}-off{}-B{}H{}".format(*s[:5]))
def test_cpp_loop_equals_python_loop(size, depth, stable, clip, blas, cpp_loop, monkeypatch, close):
    T, C, offset, B, H, D, hidden = size
    tensors, n = _inputs(T, depth, B=B, H=H, D=D, hidden=hidden, stable=stable, seed=T)
    (y_c, g_c), (y_p, g_p) = _both(tensors, n, C, offset, monkeypatch, max_grad_norm=clip, stable=stable)
    for i, (a, b) in enumerate(zip(y_c, y_p)):
        _check(a, b, f"output {i}", close, 1e-12)
    assert any(g is not None and g.abs().max() > 0 for g in g_c)
    for i, (a, b) in enumerate(zip(g_c, g_p)):
        _check(a, b, f"grad of input {i}", close, 1e-12)



def _tapeless(tensors, n, C, offset, cpp_loop, monkeypatch, loop, infer, **kw):
    """The outputs of ``_run`` without a gradient (no tape), with the loop ``loop`` and chunk_infer.h on or off."""
    monkeypatch.setenv(cpp.LOOP_ENV, loop)
    was = cpp_loop.use_infer(infer)
    try:
        with torch.inference_mode():
            return _run([t.detach() for t in tensors], n, C, offset, **kw)
    finally:
        cpp_loop.use_infer(was)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T{}-C{}-off{}-B{}H{}".format(*s[:5]))
def test_tapeless_forward_equals_the_loops(size, clip, cpp_loop, monkeypatch, close):
    """Without a gradient, depth 2 with the stable step takes chunk_infer.h (buffers reused, raw BLAS): the same
    outputs as the C++ loop's chunk_forward and as the Python loop, in fp64."""
    T, C, offset, B, H, D, hidden = size
    tensors, n = _inputs(T, 2, B=B, H=H, D=D, hidden=hidden, stable=True, seed=T)
    kw = dict(max_grad_norm=clip, stable=True)
    calls = cpp_loop.infer_calls()
    got = _tapeless(tensors, n, C, offset, cpp_loop, monkeypatch, "cpp", True, **kw)
    assert cpp_loop.infer_calls() == calls + (T - min(T, (C - offset) % C) > 0)  # whole chunks: one call
    for name, loop, infer in (("chunk_forward", "cpp", False), ("the Python loop", "python", True)):
        ref = _tapeless(tensors, n, C, offset, cpp_loop, monkeypatch, loop, infer, **kw)
        for i, (a, b) in enumerate(zip(got, ref)):
            _check(a, b, f"output {i} vs {name}", close, 1e-12)


def test_tapeless_forward_in_fp32_matches_fp64(cpp_loop, monkeypatch, close):
    tensors, n = _inputs(70, 2, B=1, H=2, D=16, hidden=32, stable=True, seed=2)
    calls = cpp_loop.infer_calls()
    got = _tapeless([t.float() for t in tensors], n, 16, 0, cpp_loop, monkeypatch, "cpp", True, max_grad_norm=2.0,
                    stable=True)
    assert cpp_loop.infer_calls() == calls + 1
    ref = _tapeless(tensors, n, 16, 0, cpp_loop, monkeypatch, "python", True, max_grad_norm=2.0, stable=True)
    for i, (a, b) in enumerate(zip(got, ref)):
        close(a.double(), b, 1e-5, f"output {i}")


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_tapeless_forward_split_between_threads_is_bitwise_the_same(mode, cpp_loop, monkeypatch):
    """With two torch threads the tape-less forward runs the memories in two parts, one per thread: the same
    numbers as in one part (an odd count of memories, a ragged last chunk)."""
    tensors, n = _inputs(37, 2, B=3, H=1, D=8, hidden=12, stable=True, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    was, calls = cpp_loop.use_parallel(False), cpp_loop.infer_calls()
    monkeypatch.setenv(cpp.LOOP_ENV, "cpp")
    try:
        runs = []
        for split in (False, True):
            cpp_loop.use_parallel(split)
            with mode():
                runs.append(_run([t.detach() for t in tensors], n, 8, 0, max_grad_norm=0.5, stable=True))
    finally:
        cpp_loop.use_parallel(was)
        torch.set_num_threads(threads)
    assert cpp_loop.infer_calls() == calls + 2
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"output {i}"


def test_module_inference_equals_its_forward_with_a_gradient(cpp_loop, close):
    """The memory module under inference_mode (chunk_infer.h from the raw rows; the learned initial weights not
    blended in again past the first write) gives the outputs and states of its forward with a gradient (the loop
    with a tape, the blend), call after call: calls that end inside a chunk, one that starts and ends inside one."""
    torch.manual_seed(0)
    mem = NeuralMemory(16, heads=2, depth=2, chunk_size=4).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    calls = cpp_loop.infer_calls()
    runs = []
    for mode in (torch.inference_mode, torch.enable_grad):
        state, ys = mem.init_state(2, dtype=torch.float64), []
        with mode():
            for a, b in ((0, 9), (9, 10), (10, 23)):
                y, state = mem(x[:, a:b], state)
                ys.append(y.detach())
        runs.append((torch.cat(ys, 1), state))
        if mode is torch.inference_mode:
            assert cpp_loop.infer_calls() == calls + 2  # the calls with whole chunks past their offset
    (y_i, s_i), (y_g, s_g) = runs
    assert s_g.weights[0].requires_grad  # (the forward with a gradient did run with one)
    close(y_i, y_g, 1e-12, "outputs")
    for name in ("weights", "momentum", "anchor"):
        for a, b in zip(getattr(s_i, name), getattr(s_g, name)):
            close(a, b.detach(), 1e-12, name)
    close(s_i.spent, s_g.spent.detach(), 1e-12, "spent")


def test_blas_is_found_where_torch_ships_it(cpp_loop):
    """x86-64 Linux wheels of torch carry MKL, whose sgemm_/dgemm_ the loop calls directly; were they not
    found, the loop would still be right (the ATen ops) but slower: this says so."""
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64" or not torch.backends.mkl.is_available():
        pytest.skip("the direct BLAS path is checked on x86-64 Linux builds with MKL")
    assert cpp_loop.blas_found()


@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable"])
def test_cpp_loop_in_fp32_matches_fp64(stable, blas, cpp_loop, monkeypatch, close):
    """fp32 runs in C++ too (bf16 goes to Python), and its outputs and gradients agree with fp64's."""
    tensors, n = _inputs(70, 2, B=1, H=2, D=16, hidden=32, stable=stable, seed=2)
    monkeypatch.setenv(cpp.LOOP_ENV, "cpp")
    outs64 = _run(tensors, n, 16, 3, max_grad_norm=2.0, stable=stable)
    weights = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    g64 = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs64, weights)), tensors, allow_unused=True)
    t32 = [t.detach().float().requires_grad_() for t in tensors]
    assert cpp.module_for(t32[0]) is cpp_loop
    outs32 = _run(t32, n, 16, 3, max_grad_norm=2.0, stable=stable)
    g32 = torch.autograd.grad(sum((o * w.float()).sum() for o, w in zip(outs32, weights)), t32, allow_unused=True)
    for i, (a, b) in enumerate(zip(outs32, outs64)):
        close(a.double(), b, 1e-4, f"output {i}")
    for i, (a, b) in enumerate(zip(g32, g64)):
        if b is not None:
            close(a.double(), b, 1e-4, f"grad of input {i}")


def test_loop_flag_picks_and_checks(cpp_loop, monkeypatch):
    x = torch.zeros(2, dtype=torch.float64)
    monkeypatch.delenv(cpp.LOOP_ENV, raising=False)
    assert cpp.module_for(x) is cpp_loop  # the default
    assert cpp.module_for(x.float()) is cpp_loop
    assert cpp.module_for(x.bfloat16()) is None  # bf16: the Python loop
    assert cpp.module_for(torch.zeros(2, device="meta")) is None  # not the CPU (CUDA): the Python loop
    monkeypatch.setenv(cpp.LOOP_ENV, "python")
    assert cpp.module_for(x) is None
    monkeypatch.setenv(cpp.LOOP_ENV, "c++")
    with pytest.raises(ValueError, match="TITANS_LNN_MEMORY_LOOP='c\\+\\+' is invalid: expected 'cpp'"):
        cpp.module_for(x)


def test_mixed_dtypes_take_the_python_loop(cpp_loop, monkeypatch, close):
    """Gates in fp32 beside fp64 inputs: the Python loop promotes them; the C++ loop is skipped, not failed."""
    tensors, n = _inputs(20, 2, stable=True, seed=6)
    mixed = [t.detach().float().requires_grad_() if i == 3 else t for i, t in enumerate(tensors)]  # theta fp32
    monkeypatch.setenv(cpp.LOOP_ENV, "python")
    ref = _run(mixed, n, 8, 0, max_grad_norm=0.5, stable=True)
    g_ref = _grads(ref, mixed)
    monkeypatch.setenv(cpp.LOOP_ENV, "cpp")
    got = _run(mixed, n, 8, 0, max_grad_norm=0.5, stable=True)
    for i, (a, b) in enumerate(zip(ref, got)):
        close(b, a, 1e-14, f"output {i}")
    for i, (a, b) in enumerate(zip(g_ref, _grads(got, mixed))):
        if a is not None:
            close(b, a, 1e-14, f"grad of input {i}")


def test_failed_build_falls_back_to_python_with_one_warning(monkeypatch, close):
    """A build that fails (no compiler, say) warns once, naming why, and the Python loop gives the results."""
    tensors, n = _inputs(21, 2, stable=True, seed=4)
    monkeypatch.setenv(cpp.LOOP_ENV, "python")
    ref = _run(tensors, n, 8, 0, max_grad_norm=0.5, stable=True)
    g_ref = _grads(ref, tensors)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(cpp, "_state", {})  # as in a fresh process
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv(cpp.LOOP_ENV, "cpp")
    with pytest.warns(RuntimeWarning, match="could not be built .*g\\+\\+: command not found"):
        got = _run(tensors, n, 8, 0, max_grad_norm=0.5, stable=True)
    assert "g++: command not found" in cpp.build_error()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call: no second warning, no second try
        again = _run(tensors, n, 8, 0, max_grad_norm=0.5, stable=True)
    for i, (a, b, c) in enumerate(zip(ref, got, again)):
        close(b, a, 1e-14, f"output {i}")
        close(c, a, 1e-14, f"output {i}")
    for i, (a, b) in enumerate(zip(g_ref, _grads(got, tensors))):
        if a is not None:
            close(b, a, 1e-14, f"grad of input {i}")


def test_the_cpp_sources_ship_in_the_wheel():
    """csrc/ (chunk_loop.cpp and the headers it includes) is built on first use from the installed package:
    pyproject's package-data must put every file of it in the wheel (setuptools ships only Python files
    otherwise)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = "titans_lnn.kernels.titans_memory"
    folder = ROOT / cfg["package-dir"]["titans_lnn.kernels"] / "titans_memory"
    assert cpp.SOURCE == folder / "csrc" / "chunk_loop.cpp" and cpp.SOURCE.is_file()
    included = set(re.findall(r'#include "([^"]+)"', cpp.SOURCE.read_text()))
    assert included and all((cpp.CSRC / name).is_file() for name in included), included
    patterns = cfg.get("package-data", {}).get(package, [])
    shipped = {p for pattern in patterns for p in folder.glob(pattern)}
    assert set(cpp.CSRC.iterdir()) <= shipped, (patterns, sorted(shipped))
