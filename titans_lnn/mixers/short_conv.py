"""LFM2's gated short convolution (Liquid AI, LFM2 technical report 2025; HF transformers' ``Lfm2ShortConv``):

    B, C, h = split(x W_in)            input-dependent gates B, C and the signal h
    y = W_out(C * conv(B * h))         depthwise causal convolution of width K (LFM2: 3)

A double gate around a short convolution: local mixing whose taps the input switches on and off.
It is already parallel in time (one convolution); the streaming state is its last K - 1 inputs.
The parameter names and layout are ``Lfm2ShortConv``'s, so its weights load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from titans_lnn.layers import residual_output
from titans_lnn.mixers.common import causal_conv, check_positive, depthwise_conv
from titans_lnn.state import State


@dataclass
class ShortConvState(State):
    """The gated short convolution's last K - 1 inputs B * h, (B, K - 1, dim)."""

    conv: torch.Tensor
    pos: int = 0  # tokens read


class GatedShortConv(nn.Module):
    """x: (B, T, dim) -> (B, T, dim), with a carried ``ShortConvState``.

        conv = GatedShortConv(64, kernel=3)
        y, state = conv(torch.randn(2, 100, 64))
        y2, state = conv(torch.randn(2, 10, 64), state)
    """

    def __init__(self, dim: int, *, kernel: int = 3, bias: bool = False):
        super().__init__()
        check_positive("GatedShortConv", dim=dim, kernel=kernel)
        self.dim = dim
        self.conv = depthwise_conv(dim, kernel, bias)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = residual_output(nn.Linear(dim, dim, bias=bias))

    @classmethod
    def from_config(cls, config) -> GatedShortConv:
        return cls(config.d_model, kernel=config.short_conv)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> ShortConvState:
        K = self.conv.kernel_size[0]
        return ShortConvState(torch.zeros(batch_size, K - 1, self.dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: ShortConvState | None = None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        b, c, h = self.in_proj(x).chunk(3, dim=-1)  # (B, T, dim) each
        y, conv = causal_conv(b * h, self.conv, state.conv)
        return self.out_proj(c * y), ShortConvState(conv.to(state.conv.dtype), pos=state.pos + x.shape[1])
