"""Sliding-window attention through xformers' ``memory_efficient_attention`` (CUDA).

A bottom-right causal local mask (``LowerTriangularFromBottomRightMask().make_local_attention(W)``), so
cached keys are fine; no sinks, no second key stream k2, no segment mode. The window's off-by-one has
changed between xformers versions, so ``xformers_window_ok`` checks it once per device and dtype
against the blocked PyTorch form; ``cuda.py`` skips xformers where it disagrees. xformers is imported
only when called.

Shapes as ``sliding_window_attention_ref`` (``naive.py``): q (B, H, T, D); k, v (B, G, P + T, D).
"""

from __future__ import annotations

import functools

import torch

from titans_lnn.kernels.window_attention.blocked import sliding_window_attention_blocked


def xformers_sliding_window_attention(q, k, v, *, window):
    """xformers' memory-efficient attention; grouped heads as its 5-D (B, M, G, H/G, D) layout."""
    from xformers.ops import fmha

    B, H, T, D = q.shape
    G, L = k.shape[1], k.shape[2]
    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
    if window is not None:
        bias = bias.make_local_attention(window)
    qx = q.transpose(1, 2).reshape(B, T, G, H // G, D)  # head h = g * (H/G) + r, as repeat_interleave
    kx = k.transpose(1, 2)[:, :, :, None].expand(B, L, G, H // G, D)
    vx = v.transpose(1, 2)[:, :, :, None].expand(B, L, G, H // G, D)
    out = fmha.memory_efficient_attention(qx, kx, vx, attn_bias=bias)  # (B, T, G, H/G, D)
    return out.reshape(B, T, H, D).transpose(1, 2)


@functools.cache
def xformers_window_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """True when xformers' local mask keeps exactly W keys (checked once on a tiny problem)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, 2, 9, 16, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(1, 1, 11, 16, device=device, dtype=dtype, generator=g) for _ in range(2))
        with torch.no_grad():
            got = xformers_sliding_window_attention(q, k, v, window=3).float()
            ref = sliding_window_attention_blocked(q, k, v, window=3).float()
    except Exception:  # noqa: BLE001 - any failure (no kernel for this GPU or dtype) means "do not use"
        return False
    return bool((got - ref).abs().max() < 2e-2)
