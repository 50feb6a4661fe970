"""The liquid scan ``h_t = exp(log_a_t) * h_{t-1} + b_t`` in plain PyTorch, parallel over time.

Same contract as ``liquid_scan_ref`` (``naive.py``, the specification): a short loop inside chunks
of length L, run for all chunks at once, then the carried state between chunks (itself a scan,
solved the same way), then one fix-up. It multiplies decays (all <= 1) and never divides by a
cumulative product, so it cannot overflow the way the closed form ``cumprod``/``cumsum`` does by
T ~ 4K. Its backward is the reverse scan, by the same code (a custom autograd function), so the
activations it keeps are O(T D), not O(T D) per loop step.
"""

from __future__ import annotations

import math

import torch

from titans_lnn.kernels.liquid.naive import check_inputs


def _scan_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t with decays a in [0, 1]. a, b: (B, T, D); h0: (B, D) -> h: (B, T, D)."""
    B, T, D = b.shape
    if T <= 64:
        out = torch.empty_like(b)
        h = h0
        for t in range(T):
            h = a[:, t] * h + b[:, t]
            out[:, t] = h
        return out
    L = max(16, int(math.isqrt(T)))  # chunk length: L loop steps here, T/L in the carry scan
    N = -(-T // L)
    pad = N * L - T
    if pad:  # padding with a = 1, b = 0 leaves the state unchanged
        a = torch.cat([a, a.new_ones(B, pad, D)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, D)], dim=1)
    # Time-major inside chunks, (L, B, N, D) contiguous: every loop step and the cumulative product
    # then run over contiguous memory (a strided cumprod over dim 2 was a third of the model's time).
    a = a.view(B, N, L, D).permute(2, 0, 1, 3).contiguous()
    b = b.view(B, N, L, D).permute(2, 0, 1, 3).contiguous()
    # Local scans, every chunk at once, from a zero state.
    # decay: the product of decays since the chunk start. Written in place step by step (out=), which
    # beats torch.cumprod (slow on CPU) and a copy per step.
    local, decay = torch.empty_like(b), torch.empty_like(a)  # (L, B, N, D)
    local[0], decay[0] = b[0], a[0]
    for j in range(1, L):
        torch.addcmul(b[j], a[j], local[j - 1], out=local[j])
        torch.mul(a[j], decay[j - 1], out=decay[j])
    # The state entering each chunk: a scan over chunks with the chunk's total decay.
    ends = _scan_forward(decay[-1], local[-1], h0)  # (B, N, D)
    carry = torch.cat([h0[:, None], ends[:, :-1]], dim=1)  # (B, N, D)
    out = torch.addcmul(local, decay, carry[None])  # (L, B, N, D)
    out = out.permute(1, 2, 0, 3)  # (B, N, L, D)
    return out.reshape(B, N * L, D)[:, :T]


class _LiquidScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, b, h0):
        a = torch.exp(log_a)
        h = _scan_forward(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        B, T, D = h.shape
        # g_t = dL/dh_t in total: g_t = dh_t + a_{t+1} g_{t+1}, a reverse scan.
        a_next = torch.cat([a[:, 1:], a.new_ones(B, 1, D)], dim=1)
        g = _scan_forward(a_next.flip(1), dh.flip(1), torch.zeros_like(h0)).flip(1)
        h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
        d_log_a = g * a * h_prev
        dh0 = a[:, 0] * g[:, 0]
        return d_log_a, g, dh0


def liquid_scan_chunked(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """Chunked parallel scan, same contract as ``liquid_scan_ref``. Computes in fp32 at least."""
    check_inputs(log_a, b, h0)
    B, T, D = b.shape
    dtype = torch.promote_types(b.dtype, torch.float32)
    h0 = b.new_zeros(B, D, dtype=dtype) if h0 is None else h0.to(dtype)
    if T == 0:
        return b.new_zeros(B, 0, D), h0.to(b.dtype)
    h = _LiquidScan.apply(log_a.to(dtype), b.to(dtype), h0)
    return h.to(b.dtype), h[:, -1].to(b.dtype)
