"""MAC's batched form (the read's queries and the attention's q, k, v projected for a whole piece, the
gate applied once) equals the literal segment loop of Titans eqs. 21-25, in float64, forward and
backward, for pieces that start and end inside segments."""

from __future__ import annotations

import pytest
import torch

from titans_lnn.blocks import MemoryAsContext
from titans_lnn.kernels.titans_memory import mlp_forward
from titans_lnn.memory import NeuralMemory
from titans_lnn.state import MACState


def _read(mem: NeuralMemory, x, weights, conv_state):
    """The memory read as written before the batched form: all of q, k, v projected, q kept."""
    q, _, _ = mem.wqkv(mem.norm_in(x)).chunk(3, dim=-1)
    q, conv_state = mem.convs[0](q, conv_state)
    q = torch.nn.functional.normalize(mem._split(torch.nn.functional.silu(q)), dim=-1)
    return mem._output(mlp_forward(weights, q), torch.sigmoid(mem.w_gate_out(x))), conv_state


def _segment_loop(mac: MemoryAsContext, x: torch.Tensor, state: MACState):
    """The specification: per segment read h = M_seg(q), attend [p | h | S], write y, o = y (x) M_t(y)."""
    attn_state, mem_state, snapshot, conv_read = state.attn, state.mem, state.segment_weights, state.conv_read
    pos, T, s, lengths = mem_state.pos, x.shape[1], 0, []
    while s < T:
        lengths.append(min(T - s, mac.segment - (pos + s) % mac.segment))
        s += lengths[-1]
    outs = []
    for xs in x.split(lengths, dim=1):
        if mem_state.pos % mac.segment == 0:
            snapshot = mac.mem.current_weights(mem_state)
        h, conv_read = _read(mac.mem, xs, snapshot, conv_read)
        y, attn_state = mac.attn(xs, attn_state, extra=h)
        m, mem_state = mac.mem(y, mem_state)
        outs.append(mac.gate(y, m))
    return torch.cat(outs, dim=1), MACState(attn_state, mem_state, snapshot, conv_read)


@pytest.mark.parametrize("cuts", [(21,), (5, 6, 19)], ids=lambda c: "cuts" + "-".join(map(str, c)))
def test_batched_mac_equals_the_segment_loop(cuts):
    torch.manual_seed(0)
    mac = MemoryAsContext(16, window=8, heads=4, kv_heads=2, n_persistent=2,
                          memory=NeuralMemory(16, heads=2, chunk_size=3)).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64, requires_grad=True)
    outs = {}
    for name, fn in (("batched", lambda xs, st: mac(xs, st)), ("loop", lambda xs, st: _segment_loop(mac, xs, st))):
        state, ys, bounds = mac.init_state(2, dtype=torch.float64), [], (0, *cuts, x.shape[1])
        for a, b in zip(bounds[:-1], bounds[1:]):
            y, state = fn(x[:, a:b], state)
            ys.append(y)
        y = torch.cat(ys, dim=1)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                    [x, *mac.parameters()])
        outs[name] = (y, state.mem.weights, grads)
    (yb, wb, gb), (yl, wl, gl) = outs["batched"], outs["loop"]
    torch.testing.assert_close(yb, yl, rtol=1e-10, atol=1e-12)
    for a, b in zip((*wb, *gb), (*wl, *gl)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
