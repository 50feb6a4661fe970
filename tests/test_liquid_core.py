"""LiquidCore: its blocked forward (the no-grad path with its workspace, and the autograd path) equals a
per-token loop written from the module docstring's equations, forward and backward; the fast path keeps
its buffers from call to call and its op count bounded."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import titans_lnn.liquid as liquid
from titans_lnn import LiquidCore
from titans_lnn.kernels.liquid import chunked, liquid_scan_ref
from titans_lnn.state import LiquidState

DIM = 8


def core_ref(core: LiquidCore, x: torch.Tensor, h0: torch.Tensor, dt: torch.Tensor | None):
    """The core token by token, literally: lambda = 1/tau + f, a = exp(-dt lambda), g = f A / lambda,
    h = a h + (1 - a) g, y = sum_n C_n h_n + skip u, out = W_o (y * silu(z)). h in the state's (D, N) order."""
    B, T, _ = x.shape
    D, N = core.width, core.n_state
    u, f, z, Bt, Ct = core.w_in(x).split([D, D, D, N, N], dim=-1)
    f = F.softplus(f)
    tau = core.log_tau.exp()  # (D, N)
    h = h0.view(B, D, N)
    outs = []
    for t in range(T):
        lam = 1 / tau + f[:, t, :, None]  # (B, D, N)
        a = torch.exp(-(1.0 if dt is None else dt[:, t, None, None]) * lam)
        g = f[:, t, :, None] * u[:, t, :, None] * Bt[:, t, None, :] / lam
        h = a * h + (1 - a) * g
        y = (h * Ct[:, t, None, :]).sum(-1) + core.skip * u[:, t]
        outs.append(core.w_out(y * F.silu(z[:, t])))
    return torch.stack(outs, dim=1), h.reshape(B, D * N)


def _core(n_state, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    core = LiquidCore(DIM, expand=2, n_state=n_state).to(dtype)
    with torch.no_grad():  # off the initial values (zero biases, skip = 1), so that every term counts
        for p in core.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return core


def _inputs(B, T, n_state, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g, dtype=dtype)
    dt = 0.1 + 2 * torch.rand(B, T, generator=g, dtype=dtype)
    h0 = torch.randn(B, 2 * DIM * n_state, generator=g, dtype=dtype)
    return x, dt, h0


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 1536 elements, 16 tokens at B = 2 and N D = 48 (48 at N D = 16): short inputs cross
    several blocks."""
    monkeypatch.setattr(liquid, "BLOCK", 2 * 48 * 16)
    monkeypatch.setattr(liquid, "NO_GRAD_MIN", 0)  # the no-grad path (workspace) at every size


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("n_state", [1, 3], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("use_dt", [False, True], ids=["dt1", "dt"])
def test_forward_matches_the_per_token_loop(T, n_state, use_dt, small_blocks, close):
    """Both paths, across block boundaries, with a carried state and irregular steps, in float64."""
    core = _core(n_state)
    x, dt, h0 = _inputs(2, T, n_state)
    dt = dt if use_dt else None
    with torch.no_grad():
        ref_out, ref_h = core_ref(core, x, h0, dt)
        out, state = core(x, LiquidState(h0), dt=dt)  # the no-grad path
    close(ref_out, out, 1e-10, "out (no grad)")
    close(ref_h, state.h, 1e-10, "state (no grad)")
    out_g, state_g = core(x, LiquidState(h0), dt=dt)  # the autograd path
    close(ref_out, out_g.detach(), 1e-10, "out (autograd)")
    close(ref_h, state_g.h.detach(), 1e-10, "state (autograd)")


@pytest.mark.parametrize("n_state", [1, 3], ids=lambda n: f"N{n}")
def test_gradients_match_the_per_token_loop(n_state, small_blocks, close):
    core = _core(n_state)
    x, dt, h0 = _inputs(2, 50, n_state)
    leaves = [x.requires_grad_(), dt.requires_grad_(), h0.requires_grad_(), *core.parameters()]
    g = torch.Generator().manual_seed(2)
    w_out = torch.randn(2, 50, DIM, generator=g, dtype=x.dtype)
    w_h = torch.randn(h0.shape, generator=g, dtype=x.dtype)

    def grads(out, h):
        return torch.autograd.grad((out * w_out).sum() + (h * w_h).sum(), leaves)

    ref = grads(*core_ref(core, x, h0, dt))
    out, state = core(x, LiquidState(h0), dt=dt)
    got = grads(out, state.h)
    names = ["x", "dt", "h0", *(n for n, _ in core.named_parameters())]
    for name, r, o in zip(names, ref, got):
        close(r, o, 1e-10, f"d {name}")


def test_no_grad_path_equals_autograd_path_in_fp32(small_blocks):
    """The two paths run the same ops: in fp32 they agree to rounding over 40 blocks."""
    core = _core(8, dtype=torch.float32)
    x, dt, h0 = _inputs(2, 640, 8, dtype=torch.float32)
    with torch.no_grad():
        fast, s_fast = core(x, LiquidState(h0), dt=dt)
    slow, s_slow = core(x, LiquidState(h0), dt=dt)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_fast.h, s_slow.h.detach(), rtol=1e-5, atol=1e-6)


def test_workspace_is_reused_and_never_aliases_the_results(monkeypatch):
    """A second call of the same size allocates no buffer (the point of the workspace); a call of another
    size or dtype gets buffers that fit; no result shares memory with the workspace."""
    monkeypatch.setattr(liquid, "NO_GRAD_MIN", 0)
    core = _core(2, dtype=torch.float32).eval()
    x, _, _ = _inputs(1, 300, 2, dtype=torch.float32)
    with torch.inference_mode():
        out1, s1 = core(x)
        ptrs = {k: v.data_ptr() for k, v in core._workspace.items()}
        kept = out1.clone(), s1.h.clone()
        out2, s2 = core(x)
        assert {k: v.data_ptr() for k, v in core._workspace.items()} == ptrs
        torch.testing.assert_close(out1, kept[0], rtol=0, atol=0)  # the second call wrote nothing of ours
        torch.testing.assert_close(s1.h, kept[1], rtol=0, atol=0)
        torch.testing.assert_close(out2, out1, rtol=0, atol=0)
        out3, _ = core(torch.cat([x, x]))  # B = 2: the same rows, the same values (to rounding: sizes pick forms)
        torch.testing.assert_close(out3, torch.cat([out1, out1]), rtol=1e-5, atol=1e-6)
        core64 = core.double()
        out4, _ = core64(x.double())
        torch.testing.assert_close(out4.float(), out1, rtol=1e-5, atol=1e-6)
    spaces = [t.untyped_storage().data_ptr() for t in core._workspace.values()]
    for t in (out1, s1.h, out2, s2.h, out3, out4):
        assert t.untyped_storage().data_ptr() not in spaces


def test_workspace_filled_under_inference_mode_serves_no_grad_calls_after(monkeypatch):
    """Buffers made under inference_mode are inference tensors, which torch forbids writing into outside
    it: a no_grad call after an inference_mode call (a benchmark's FLOP count, an eval after a generate)
    gets fresh buffers and the same values, and back again."""
    monkeypatch.setattr(liquid, "NO_GRAD_MIN", 0)
    core = _core(2, dtype=torch.float32).eval()
    x = torch.randn(1, 40, DIM)
    with torch.inference_mode():
        first, _ = core(x)
    with torch.no_grad():
        second, _ = core(x)
    with torch.inference_mode():
        third, _ = core(x)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(third, first, rtol=0, atol=0)


def test_copies_and_pickles_leave_the_workspace_out(monkeypatch):
    monkeypatch.setattr(liquid, "NO_GRAD_MIN", 0)
    core = _core(2, dtype=torch.float32).eval()
    x = torch.randn(1, 40, DIM)
    with torch.no_grad():
        out, _ = core(x)
    assert core._workspace
    for twin in (copy.deepcopy(core), pickle.loads(pickle.dumps(core))):
        assert not hasattr(twin, "_workspace")
        with torch.no_grad():
            torch.testing.assert_close(twin(x)[0], out, rtol=0, atol=0)


def test_empty_sequence_returns_the_state_unchanged():
    core = _core(2, dtype=torch.float32)
    h0 = torch.randn(3, 2 * DIM * 2)
    out, state = core(torch.zeros(3, 0, DIM), LiquidState(h0))
    assert out.shape == (3, 0, DIM)
    assert torch.equal(state.h, h0) and state.h.data_ptr() != h0.data_ptr()


def test_bad_dt_is_named():
    core = _core(1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dt must be \(B, T\) = \(2, 5\); got \(2, 4\)"):
        core(torch.zeros(2, 5, DIM), dt=torch.ones(2, 4))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [1000, 16384], ids=lambda t: f"T{t}")
def test_chunked_scan_op_count_grows_like_sqrt_T(T):
    """The chunked scan's cost on short rows is its op count: about 2 sqrt(2 T) steps (two passes of
    sqrt(T/2) and the carry loop), not one op per token; a per-step exp or a copy per step would show."""
    log_a, b = -torch.rand(1, T, 4), torch.randn(1, T, 4)
    with _CountOps() as count:
        chunked.liquid_scan_chunked(log_a, b)
    assert count.n <= 2.5 * (2 * T) ** 0.5 + 40, f"{count.n} ops at T = {T}"  # 133 and 290 now; 436 and 1079 before


def test_in_place_scan_matches_reference_and_refuses_gradients(close):
    g = torch.Generator().manual_seed(0)
    log_a = -2 * torch.rand(2, 333, 5, generator=g, dtype=torch.float64)
    b, h0 = torch.randn(2, 333, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g,
                                                                                   dtype=torch.float64)
    ref, _ = liquid_scan_ref(log_a, b, h0)
    b2 = b.clone()
    h = chunked.liquid_scan_chunked_(log_a, log_a.exp(), b2, h0)
    assert h.data_ptr() == b2.data_ptr()
    close(ref, h, 1e-12, "h")
    with pytest.raises(ValueError, match="require grad"):
        chunked.liquid_scan_chunked_(log_a, log_a.exp(), b.clone().requires_grad_(), h0)
    with pytest.raises(ValueError, match="contiguous"):
        chunked.liquid_scan_chunked_(log_a, log_a.exp()[:, :, :4], b.clone(), h0)


def test_blocks_are_for_the_cpu_only():
    """The blocks keep CPU caches warm; on a GPU one block (few, large launches)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert liquid.block_len(1, 1024, 65536, cpu) == liquid.BLOCK // 1024
    assert liquid.block_len(1, 1024, 65536, gpu) == 65536
    assert liquid.block_len(4096, 1024, 65536, cpu) == liquid.MIN_BLOCK  # wide batches: the floor
    assert chunked.block_steps(1, 1024, 65536, cpu) == chunked.BLOCK // 1024
    assert chunked.block_steps(1, 1024, 65536, gpu) == 65536
