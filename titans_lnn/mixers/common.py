"""Pieces the seed mixers share: a depthwise causal convolution whose state is its last inputs, the
checks of their keyword arguments, and the chunk split of the chunked scans."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("chunked", "reference")  # every seed mixer's forms: the fast one and the per-token specification


def check_positive(owner: str, **values) -> None:
    """Raise a ValueError naming the first value that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name}={value!r} is invalid: expected a positive integer")


def check_impl(owner: str, impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl={impl!r} is invalid: expected one of {', '.join(IMPLS)}")
    return impl


def depthwise_conv(channels: int, kernel: int, bias: bool = True) -> nn.Conv1d:
    """A depthwise convolution's weights, (channels, 1, kernel), laid out as HF's and fla's (no padding:
    ``causal_conv`` prepends the carried inputs instead)."""
    return nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias)


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum_j w_j x_{t-K+1+j} + b over the carried inputs and x.

    x: (B, T, D); state: (B, K - 1, D), the last K - 1 inputs (zeros before the sequence).
    Returns y (B, T, D) and the new state (a copy: it must not pin the whole input)."""
    K = conv.kernel_size[0]
    xx = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+T, D)
    y = F.conv1d(xx.transpose(1, 2), conv.weight.to(x.dtype),
                 None if conv.bias is None else conv.bias.to(x.dtype), groups=conv.groups)
    return y.transpose(1, 2), xx[:, xx.shape[1] - (K - 1):].clone()


def pad_time(t: torch.Tensor, multiple: int, dim: int = 1) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to a multiple of ``multiple`` (padded steps must be no-ops of the scan)."""
    pad = (-t.shape[dim]) % multiple
    if not pad:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
