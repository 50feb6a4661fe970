"""Sliding-window attention through flash-attn's ``flash_attn_func`` (CUDA; fp16/bf16; head dim <= 256).

Causal with ``window_size=(W - 1, 0)``, or ``(-1, -1)`` for full attention; no second key stream k2,
no segment mode. Cached keys are fine: flash-attn aligns the causal mask bottom-right, so query i sees
keys P+i-W+1 .. P+i. The persistent tokens (sinks) are merged in by log-sum-exp with a small dense
attention over them (``merge_sinks``), but only when no gradient is needed: flash-attn's backward drops
the gradient of its log-sum-exp output, so a merge would get wrong gradients (``cuda.py`` sends
training calls with sinks to FlexAttention). flash-attn is imported only when called.

Shapes as ``sliding_window_attention_ref`` (``naive.py``): q (B, H, T, D); k, v (B, G, P + T, D);
sink_k, sink_v (B or 1, G, N_p, D).
"""

from __future__ import annotations

import math

import torch


def flash_sliding_window_attention(q, k, v, *, window, sink_k=None, sink_v=None):
    """flash-attn on (B, T, H, D) views; sinks merged by log-sum-exp (forward only, see docstring)."""
    from flash_attn import flash_attn_func

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D), (B, P+T, G, D)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if sink_k is None:
        return flash_attn_func(qt, kt, vt, causal=True, window_size=window_size).transpose(1, 2)
    out, lse, _ = flash_attn_func(qt, kt, vt, causal=True, window_size=window_size, return_attn_probs=True)
    return merge_sinks(out.transpose(1, 2), lse[:, :, :q.shape[2]], q, sink_k, sink_v)


def merge_sinks(out, lse, q, sink_k, sink_v):
    """Combine attention over the window (out (B, H, T, D), its log-sum-exp lse (B, H, T)) with
    attention over the sinks, as one softmax over both."""
    B, H, T, D = q.shape
    rep = H // sink_k.shape[1]
    sk = sink_k.float().expand(B, -1, -1, -1).repeat_interleave(rep, 1)  # (B, H, N_p, D)
    sv = sink_v.float().expand(B, -1, -1, -1).repeat_interleave(rep, 1)
    s = torch.einsum("bhtd,bhnd->bhtn", q.float(), sk) / math.sqrt(D)  # (B, H, T, N_p)
    lse_all = torch.logaddexp(lse.float(), s.logsumexp(-1))  # (B, H, T)
    o = out.float() * (lse.float() - lse_all).exp()[..., None] \
        + torch.einsum("bhtn,bhnd->bhtd", (s - lse_all[..., None]).exp(), sv)
    return o.to(q.dtype)
