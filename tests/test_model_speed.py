"""The model's fast paths outside the memory equal their plain forms (float64, forward and backward):
the window attention's SDPA blocks and cached masks, the depthwise convolution without Conv1d, RoPE as a
complex multiply from a table shared by a MAC piece's segments."""

import pytest
import torch
import torch.nn.functional as F

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.kernels.window_attention import sliding_window_attention_blocked, sliding_window_attention_ref
from titans_lnn.layers import CausalConv, apply_rope, causal_conv, rope, rope_table


def _grads(out, inputs):
    w = torch.randn(out.shape, dtype=out.dtype)  # randn_like would follow the strides: another w per layout
    return torch.autograd.grad((out * w).sum(), inputs)


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("pos0s", [(0, 128, 1024), (5, 133, 1029), (7, 3, 200)], ids=["aligned", "shifted", "mixed"])
@pytest.mark.parametrize("segment", [True, False], ids=["segment", "window"])
def test_cached_masks_follow_pos0(pos0s, segment, close):
    """The blocked attention's masks are cached per shape and pos0 mod W: calls with the same shapes at
    other positions (MAC's segments, streamed pieces) still equal the reference."""
    T, P, W, H, G, D = 21, 3, 8, 4, 2, 6
    for i, pos0 in enumerate(pos0s):
        torch.manual_seed(i)
        q, k, v, k2, v2 = (_rand(2, n, P + T if n == G else T, D, seed=10 * i + j)
                           for j, n in enumerate((H, G, G, G, G)))
        sk, sv = _rand(1, G, 2, D, seed=100 + i), _rand(1, G, 2, D, seed=200 + i)
        kw = dict(window=W, sink_k=sk, sink_v=sv, k2=k2, v2=v2, segment=segment, pos0=pos0)
        ref = sliding_window_attention_ref(q, k, v, **kw)
        got = sliding_window_attention_blocked(q, k, v, **kw, block=8)
        close(ref, got, 1e-12, f"out at pos0={pos0}")
        torch.manual_seed(0)
        g_ref = _grads(ref, (q, k, v, k2, v2, sk, sv))
        torch.manual_seed(0)
        g_got = _grads(got, (q, k, v, k2, v2, sk, sv))
        for name, a, b in zip(("q", "k", "v", "k2", "v2", "sink_k", "sink_v"), g_ref, g_got):
            close(a, b, 1e-12, f"d{name} at pos0={pos0}")


@pytest.mark.parametrize("T", [1, 7, 63, 128], ids=lambda t: f"T{t}")
def test_whole_segment_block(T, close):
    """A MAC segment (no cached keys, one block, T up to the block) takes the no-copy path: equal to the reference."""
    H, G, D = 4, 2, 8
    q, k, v, k2, v2 = (_rand(1, n, T, D, seed=j) for j, n in enumerate((H, G, G, G, G)))
    sk, sv = _rand(1, G, 4, D, seed=7), _rand(1, G, 4, D, seed=8)
    kw = dict(window=128, sink_k=sk, sink_v=sv, k2=k2, v2=v2, segment=True, pos0=256)
    ref = sliding_window_attention_ref(q, k, v, **kw)
    got = sliding_window_attention_blocked(q, k, v, **kw)
    close(ref, got, 1e-12, "out")
    torch.manual_seed(1)
    g_ref = _grads(ref, (q, k, v, k2, v2, sk, sv))
    torch.manual_seed(1)
    for a, b in zip(g_ref, _grads(got, (q, k, v, k2, v2, sk, sv))):
        close(a, b, 1e-12, "grad")


@pytest.mark.parametrize("K", [1, 2, 4, 7])
@pytest.mark.parametrize("T", [1, 5, 32, 33, 63, 200], ids=lambda t: f"T{t}")
def test_causal_conv_equals_conv1d(T, K, close):
    """``causal_conv`` (unfold up to 32 tokens, shifted addcmuls beyond) == the depthwise Conv1d, forward
    and backward."""
    B, D = 2, 5
    xx, w, b = _rand(B, K - 1 + T, D, seed=1), _rand(D, 1, K, seed=2), _rand(D, seed=3)
    ref = F.conv1d(xx.transpose(1, 2), w, b, groups=D).transpose(1, 2)
    got = causal_conv(xx, w, b)
    assert got.shape == (B, T, D)
    close(ref, got, 1e-12, "out")
    torch.manual_seed(0)
    g_ref = _grads(ref, (xx, w, b))
    torch.manual_seed(0)
    for name, a, c in zip(("x", "w", "b"), g_ref, _grads(got, (xx, w, b))):
        close(a, c, 1e-12, f"d{name}")


def test_causal_conv_module_streams(close):
    """CausalConv in pieces with its state == one pass (the pieces cross the unfold/addcmul threshold)."""
    conv = CausalConv(6, 4).double()
    with torch.no_grad():
        conv.conv.weight.normal_()
        conv.conv.bias.normal_()
    x = torch.randn(2, 120, 6, dtype=torch.float64)
    whole, _ = conv(x, conv.init_state(2, dtype=torch.float64))
    state, outs = conv.init_state(2, dtype=torch.float64), []
    for piece in x.split([1, 40, 3, 76], dim=1):
        y, state = conv(piece, state)
        outs.append(y)
    close(whole, torch.cat(outs, dim=1), 1e-12, "streamed")


def _rope_pairs(x, pos, theta):
    """The pair formula RoPE had before the complex form: the oracle."""
    B, H, T, D = x.shape
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(pos, pos + T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pos", [0, 3, 1_000_003])
def test_rope_equals_pair_formula(pos, dtype):
    """The complex-multiply RoPE equals the pair formula (to rounding: the complex kernel fuses multiply-adds,
    an ulp in fp32) and is that formula in bf16; gradients too; a non-contiguous input (a transposed
    projection) works."""
    x = torch.randn(2, 13, 3, 8, dtype=torch.float64).to(dtype).transpose(1, 2).requires_grad_()  # (B, H, T, D)
    ref, got = _rope_pairs(x, pos, 500.0), rope(x, pos, 500.0)
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else {}  # fp32/fp64: torch's defaults, an ulp or two
    torch.testing.assert_close(got, ref, **tol)
    w = torch.randn(ref.shape, dtype=ref.dtype)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    g_got, = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(g_got, g_ref, **tol)


def test_rope_table_slices_are_the_segments_tables():
    """A piece's table sliced at t equals the table built at pos + t (MAC slices one table per segment)."""
    whole = rope_table(100, 50, 8, 1e4, torch.float64)
    torch.testing.assert_close(whole[17:40], rope_table(117, 23, 8, 1e4, torch.float64), rtol=0, atol=0)
    x = torch.randn(1, 2, 23, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, whole[17:40]), _rope_pairs(x, 117, 1e4), rtol=0, atol=0)


def test_attention_module_given_table_and_sinks_equals_default(close):
    """SlidingWindowAttention.attend with the caller's table and sinks == without them (MAC's per-piece
    precomputation), in segment mode with the memory stream."""
    torch.manual_seed(0)
    attn = SlidingWindowAttention(16, heads=4, kv_heads=2, window=8, n_persistent=3, segment=True,
                                  memory_stream=True).double()
    x, h = torch.randn(2, 8, 16, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    state = attn.init_state(2, dtype=torch.float64)
    state.pos = 24
    plain, _ = attn.attend(*attn.project(x, 24), state, extra=h)
    table = attn.rope_table(24, 8, torch.float64)
    fast, _ = attn.attend(*attn.project(x, 24, table), state, extra=h, sinks=attn.sinks(torch.float64), table=table)
    close(plain, fast, 1e-14, "attend")
