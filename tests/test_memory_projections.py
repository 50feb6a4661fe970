"""The memory module's hand-written pieces outside the chunk loop (memory/neural_memory.py: the q/k/v
convolutions + silu + heads as one op, RMSNorm; chunked.unit_rows) == the plain autograd composition they
replace (layers.causal_conv per projection, F.silu, F.normalize, the RMSNorm modules): outputs, states and
every gradient, fp64, whole and streamed calls, short (T <= 32) and long pieces."""

import pytest
import torch
import torch.nn.functional as F

import titans_lnn.kernels.titans_memory.chunked as chunked
import titans_lnn.memory.neural_memory as nm
from titans_lnn.layers import causal_conv
from titans_lnn.memory import NeuralMemory

TIGHT = dict(atol=1e-8, rtol=1e-6)  # gradcheck's defaults (rtol 1e-3) would pass a gradient 0.1% off


def _plain_qkv_conv(x, state, weight, bias, heads):
    """What ``nm._qkv_conv`` replaces, with autograd's backward."""
    xx = torch.cat([state.to(x.dtype), x], dim=1)
    y = F.silu(causal_conv(xx, weight, bias))
    B, T, C = y.shape
    q, k, v = (t.view(B, T, heads, -1).transpose(1, 2) for t in y.split(C // 3, dim=-1))
    return q, k, v, xx[:, T:].clone()


def _plain(monkeypatch):
    monkeypatch.setattr(nm, "_qkv_conv", _plain_qkv_conv)
    monkeypatch.setattr(nm, "unit_rows", lambda x: F.normalize(x, dim=-1))
    monkeypatch.setattr(chunked, "unit_rows", lambda x: F.normalize(x, dim=-1))
    monkeypatch.setattr(nm, "_rms_norm", lambda norm, x, transposed=False: norm(x))


def _module(seed, **kw):
    torch.manual_seed(seed)
    m = NeuralMemory(32, heads=2, chunk_size=8, **kw).double()
    with torch.no_grad():  # taps, biases and norm gains away from their identity initialisation
        for c in m.convs:
            c.conv.weight.normal_(0, 0.5)
            c.conv.bias.normal_(0, 0.1)
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm_in.weight.uniform_(0.5, 1.5)
    return m


def _run(m, x, split, use_state):
    """Outputs, final state tensors and every gradient of a loss that reads y, and, when ``use_state``,
    the final weights and convolution states (their gradients flow back through the streamed call)."""
    xr = x.clone().requires_grad_()
    if split is None:
        y, st = m(xr)
    else:
        y1, st = m(xr[:, :split])
        y2, st = m(xr[:, split:], st)
        y = torch.cat([y1, y2], dim=1)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * w).sum()
    if use_state:
        loss = loss + sum(t.pow(2).sum() for t in (*st.weights, st.conv_q, st.conv_k, st.conv_v))
    m.zero_grad()
    loss.backward()
    grads = [xr.grad] + [p.grad for p in m.parameters()]
    return [y, *st.weights, *st.momentum, st.conv_q, st.conv_k, st.conv_v, *grads]


@pytest.mark.parametrize("T, split", [(45, None), (13, None), (45, 37), (7, 3)])
@pytest.mark.parametrize("kw", [dict(depth=2), dict(depth=1, stable_step=False), dict(depth=2, gate_context=True)])
@pytest.mark.parametrize("use_state", [True, False])
def test_fast_projections_equal_plain_autograd(T, split, kw, use_state, monkeypatch):
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    fast = _run(_module(0, **kw), x, split, use_state)
    _plain(monkeypatch)
    plain = _run(_module(0, **kw), x, split, use_state)
    assert len(fast) == len(plain)
    for a, b in zip(fast, plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_qkv_conv_gradcheck_with_unread_outputs():
    """``_QKVConv`` against finite differences, reading all its outputs, then only q (the others get None)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 12, dtype=torch.float64, generator=g, requires_grad=True)
    state = torch.randn(2, 3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(12, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: nm._QKVConv.apply(*a, 2), (x, state, weight, bias), **TIGHT)
    assert torch.autograd.gradcheck(lambda *a: nm._QKVConv.apply(*a, 2)[0], (x, state, weight, bias), **TIGHT)


def test_unit_rows_and_rms_norm_gradcheck():
    """``_UnitRows`` and ``_RMSNorm`` (also written into the transposed layout) against finite differences,
    and ``_UnitRows`` on a row shorter than eps against autograd through ``F.normalize``."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: chunked.unit_rows(t, 1e-12), (x,), **TIGHT)
    torch.testing.assert_close(chunked.unit_rows(x), F.normalize(x, dim=-1), rtol=0, atol=0)
    # a row shorter than eps (finite differences would cross the clamp): autograd's gradient through F.normalize
    with torch.no_grad():
        x[0, 0, 0] = 1e-14
    w = torch.randn(x.shape, dtype=torch.float64, generator=g)
    fast, = torch.autograd.grad((chunked.unit_rows(x) * w).sum(), x)
    plain, = torch.autograd.grad((F.normalize(x, dim=-1) * w).sum(), x)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
    assert fast[0, 0, 0].abs().max() > 1e11  # divided by eps, no projection
    norm = nm.RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    y = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    for transposed in (False, True):
        rms = lambda t, w, tr=transposed: nm._rms_norm(norm, t, tr)  # noqa: E731 (w: norm.weight, perturbed in place)
        assert torch.autograd.gradcheck(rms, (y, norm.weight), **TIGHT)
        torch.testing.assert_close(nm._rms_norm(norm, y, transposed), norm(y), rtol=0, atol=0)


@pytest.mark.parametrize("T, split", [(45, None), (7, 3)])
def test_the_paths_taken_under_torch_compile_equal_the_fast_ones(T, split, monkeypatch):
    """Under torch.compile the memory takes plain autograd ops (no out= views, no hand-written backwards, the
    Python chunk loop): the same outputs, states and gradients (is_compiling patched to True in eager)."""
    kw = dict(depth=2, gate_context=True)
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    fast = _run(_module(0, **kw), x, split, True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = _run(_module(0, **kw), x, split, True)
    for a, b in zip(fast, traced, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
