"""The LFM2 mixer (Liquid AI's LFM2, 2025): gated short convolutions interleaved with grouped-query
attention. LFM2 stacks ~10 convolution blocks and ~6 attention blocks; here each block holds one of
each, at the residual level (like MAL):

    x += GatedShortConv(norm x)        (``titans_lnn.mixers.short_conv``: C * conv(B * h))
    x += Attn(norm x)                   grouped-query attention with RoPE, over a sliding window

LFM2's attention is global with QK-norm; this one is the package's ``SlidingWindowAttention`` (no
QK-norm), so that the state has a fixed size like every other mixer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.layers import Residual
from titans_lnn.mixers.short_conv import GatedShortConv, ShortConvState
from titans_lnn.state import AttentionState, State


@dataclass
class Lfm2State(State):
    """The LFM2 mixer's states: the convolution's and the attention's."""

    conv: ShortConvState
    attn: AttentionState


class Lfm2(nn.Module):
    """x: (B, T, dim) -> (B, T, dim) (the residual stream), with a carried ``Lfm2State``.

        lfm2 = Lfm2(64, heads=4, kv_heads=2, window=64)
        x, state = lfm2(torch.randn(2, 100, 64))
        x2, state = lfm2(torch.randn(2, 10, 64), state)
    """

    def __init__(self, dim: int, *, conv_kernel: int = 3, heads: int = 4, kv_heads: int | None = None,
                 window: int | None = 128, n_persistent: int = 0, rope_theta: float = 10000.0, eps: float = 1e-5):
        super().__init__()
        self.conv = Residual(GatedShortConv(dim, kernel=conv_kernel), dim, eps)
        self.attn = Residual(SlidingWindowAttention(dim, heads=heads, kv_heads=kv_heads, window=window,
                                                    n_persistent=n_persistent, rope_theta=rope_theta), dim, eps)

    @classmethod
    def from_config(cls, config) -> Lfm2:
        c = config
        return cls(c.d_model, conv_kernel=c.short_conv, heads=c.n_heads, kv_heads=c.n_kv_heads, window=c.window,
                   n_persistent=c.n_persistent, rope_theta=c.rope_theta, eps=c.norm_eps)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> Lfm2State:
        return Lfm2State(self.conv.init_state(batch_size, device, dtype), self.attn.init_state(batch_size, device,
                                                                                                dtype))

    def forward(self, x: torch.Tensor, state: Lfm2State | None = None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        x, conv = self.conv(x, state.conv)
        x, attn = self.attn(x, state.attn)
        return x, Lfm2State(conv, attn)
