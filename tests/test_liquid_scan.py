"""liquid_scan: the chunked PyTorch form equals the per-token reference, forward and backward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from titans_lnn.kernels import liquid_scan
from titans_lnn.kernels.liquid import chunked, liquid_scan_chunked, liquid_scan_ref


def _inputs(B, T, D, seed=0, dtype=torch.float64, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    scale = 20.0 if strong_decay else 2.0
    log_a = (-torch.rand(B, T, D, generator=g, dtype=dtype) * scale).requires_grad_()
    b = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    h0 = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_()
    return log_a, b, h0


def _grads(fn, log_a, b, h0, seed=1):
    h, last = fn(log_a, b, h0)
    g = torch.Generator().manual_seed(seed)
    loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum() + (last * torch.randn(
        last.shape, generator=g, dtype=h.dtype)).sum()
    return (h, last, *torch.autograd.grad(loss, (log_a, b, h0)))


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 256, 500, 4099], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("D", [1, 7], ids=lambda d: f"D{d}")
def test_chunked_matches_reference(T, D, close):
    inputs = _inputs(2, T, D)
    ref = _grads(liquid_scan_ref, *inputs)
    got = _grads(liquid_scan_chunked, *inputs)
    for name, r, o in zip(("h", "h_last", "d_log_a", "db", "dh0"), ref, got):
        close(r, o, 1e-10, name)


@pytest.mark.parametrize("T", [65, 300, 301, 500, 4099], ids=lambda t: f"T{t}")
def test_blocks_match_reference(T, close, monkeypatch):
    """Inputs past ``BLOCK`` elements run in blocks (here of 300 steps: one block up to T = 300, two-pass
    chunks inside), the state carried forward, the gradient backward: the same values and gradients."""
    monkeypatch.setattr(chunked, "BLOCK", 2 * 3 * 300)
    inputs = _inputs(2, T, 3)
    for name, r, o in zip(("h", "h_last", "d_log_a", "db", "dh0"), _grads(liquid_scan_ref, *inputs),
                          _grads(liquid_scan_chunked, *inputs)):
        close(r, o, 1e-10, name)


def test_strided_inputs(close):
    """Inputs that are views (time-major storage, a slice) give the reference's values and gradients."""
    log_a, b, h0 = _inputs(3, 300, 5)
    log_a_t = log_a.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (B, T, D), T-major
    b_s = torch.cat([b.detach(), b.detach()], dim=2)[..., ::2].requires_grad_(False)  # every other channel
    ref = _grads(liquid_scan_ref, log_a_t, b_s.requires_grad_(), h0)
    got = _grads(liquid_scan_chunked, log_a_t, b_s, h0)
    for name, r, o in zip(("h", "h_last", "d_log_a", "db", "dh0"), ref, got):
        close(r, o, 1e-10, name)


def test_no_overflow_over_long_sequences():
    """A closed form through cumulative products overflows by T ~ 4K; the chunked scan must not."""
    log_a, b, h0 = _inputs(1, 20000, 3, strong_decay=True, dtype=torch.float32)
    h, last = liquid_scan_chunked(log_a.detach(), b.detach(), h0.detach())
    assert torch.isfinite(h).all()
    ref_tail, _ = liquid_scan_ref(log_a.detach()[:, -50:], b.detach()[:, -50:], h[:, -51])
    torch.testing.assert_close(h[:, -50:], ref_tail, rtol=1e-4, atol=1e-5)


def test_zero_initial_state_and_dispatch():
    log_a, b, _ = _inputs(1, 70, 4)
    h_ref, _ = liquid_scan_ref(log_a, b, None)
    for impl in ("ref", "torch"):
        h, _ = liquid_scan(log_a, b, None, impl=impl)
        torch.testing.assert_close(h, h_ref)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(B, T, D\).*\(2, 3\)"):
        liquid_scan_chunked(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="h0 must be"):
        liquid_scan_chunked(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 5))


@given(T=st.integers(1, 300), D=st.integers(1, 5), split=st.integers(0, 300), seed=st.integers(0, 1000))
def test_split_anywhere_equals_whole(T, D, split, seed):
    """Scanning two pieces, carrying h_last, equals scanning the whole (streaming invariance)."""
    split = min(split, T)
    log_a, b, h0 = (t.detach() for t in _inputs(1, T, D, seed=seed))
    whole, last = liquid_scan_chunked(log_a, b, h0)
    h1, mid = liquid_scan_chunked(log_a[:, :split], b[:, :split], h0)
    h2, last2 = liquid_scan_chunked(log_a[:, split:], b[:, split:], mid)
    torch.testing.assert_close(torch.cat([h1, h2], 1), whole)
    torch.testing.assert_close(last2, last)
