"""Sliding-window attention through FlexAttention (``torch.nn.attention.flex_attention``): every call.

The keys are ``[sinks | k | k2]``; one ``mask_mod`` says what each query sees, and the block-sparse
``BlockMask`` is built directly at block granularity (no T x T mask is ever formed):
O(T/128 x (N_p + 2(P + T))/128) booleans. Exact gradients on CUDA. Compiled with ``torch.compile`` when
called eagerly on CUDA (eager FlexAttention is an unfused T x T computation). On CPU it runs forward
only (FlexAttention has no CPU backward): the tests check it there against the reference.

Shapes as ``sliding_window_attention_ref`` (``naive.py``): q (B, H, T, D); k, v, k2, v2
(B, G, P + T, D); sink_k, sink_v (B or 1, G, N_p, D).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from titans_lnn.kernels.window_attention.naive import check_inputs, visible_from

FLEX_BLOCK = 128  # FlexAttention's sparse block size (queries and keys)


def _mask_mod(P: int, Np: int, L: int, KV: int, has_k2: bool, window: int | None, segment: bool, pos0: int):
    """FlexAttention's mask over the keys [sinks (Np) | k (L) | k2 (L)]; L = P + T, query i is key P + i."""

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - Np  # index in k (or k2)
        if has_k2:
            j = torch.where(j >= L, j - L, j)
        qk = q_idx + P
        seen = j <= qk
        if window is not None:
            lo = (pos0 + qk) // window * window - pos0 if segment else qk - window + 1
            seen = seen & (j >= lo)
        return ((kv_idx < Np) | seen) & (kv_idx < KV)

    return mask_mod


def _block_mask(T, P, Np, has_k2, window, segment, pos0, device, block=FLEX_BLOCK):
    """The ``BlockMask`` of ``_mask_mod``, built at block granularity.

    For the queries of a block [qs, qe] the visible keys of k form one interval per query, [lo(q), P+q],
    with lo and P+q non-decreasing: some query sees [lo(qs), P+qe], every query sees [lo(qe), P+qs].
    A key block meeting the first set (or the sinks) is computed; one inside the second (or the sinks) is
    full (its mask is skipped); the rest are partial (masked). k2 repeats k's intervals L keys later.
    """
    from torch.nn.attention.flex_attention import BlockMask

    L = P + T
    KV = Np + L * (2 if has_k2 else 1)
    NQ, NKV = -(-T // block), -(-KV // block)
    qs = torch.arange(NQ, device=device) * block
    qe = torch.clamp(qs + block, max=T) - 1

    def lo(i):  # first visible key index of query i
        return (visible_from(pos0 + P + i, window, segment) - pos0).clamp_min(0)

    some, every = [], []  # (start, end) key intervals, inclusive, each (NQ,)
    if Np:
        sinks = (torch.zeros_like(qs), torch.full_like(qs, Np - 1))
        some.append(sinks)
        every.append(sinks)
    for off in (Np, Np + L) if has_k2 else (Np,):
        some.append((off + lo(qs), off + P + qe))
        every.append((off + lo(qe), off + P + qs))
    ks = torch.arange(NKV, device=device) * block
    ke = torch.clamp(ks + block, max=KV) - 1
    any_ = torch.zeros(NQ, NKV, dtype=torch.bool, device=device)
    full = torch.zeros_like(any_)
    for s, e in some:
        any_ |= (ks[None] <= e[:, None]) & (ke[None] >= s[:, None])
    for s, e in every:
        full |= (ks[None] >= s[:, None]) & (ke[None] <= e[:, None])
    full &= (ks + block <= KV)[None]  # a ragged last key block always goes through the mask
    partial = any_ & ~full

    def ordered(m):  # (NQ, NKV) -> counts (1, 1, NQ), indices (1, 1, NQ, NKV), the set ones first
        m = m.to(torch.int32)
        idx = torch.argsort(m, dim=-1, descending=True, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32)[None, None], idx[None, None]

    mask_mod = _mask_mod(P, Np, L, KV, has_k2, window, segment, pos0)
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=mask_mod, seq_lengths=(T, KV))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def flex_available() -> bool:
    """True when this torch has FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except (ImportError, ValueError):
        return False


def flex_sliding_window_attention(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None,
                                  segment=False, pos0=0, compiled: bool | None = None, block: int = FLEX_BLOCK):
    """The FlexAttention backend, on any device (on CPU: forward only, as FlexAttention has no CPU
    backward). ``compiled`` (default: on CUDA when not already inside torch.compile) wraps
    ``flex_attention`` in ``torch.compile``; eager FlexAttention is unfused (dense T x (Np + 2L))."""
    from torch.nn.attention.flex_attention import flex_attention

    check_inputs(q, k, v, k2, v2, sink_k, sink_v, window)
    B, H, T, D = q.shape
    G, L = k.shape[1], k.shape[2]
    keys, vals = [k], [v]
    if k2 is not None:
        keys.append(k2)
        vals.append(v2)
    Np = 0
    if sink_k is not None:
        Np = sink_k.shape[2]
        keys.insert(0, sink_k.expand(B, -1, -1, -1))
        vals.insert(0, sink_v.expand(B, -1, -1, -1))
    kk = torch.cat([x.to(q.dtype) for x in keys], dim=2)  # (B, G, Np + L [+ L], D)
    vv = torch.cat([x.to(q.dtype) for x in vals], dim=2)
    block_mask = _block_mask(T, L - T, Np, k2 is not None, window, segment, pos0, q.device, block)
    if compiled is None:
        compiled = q.is_cuda and not torch.compiler.is_compiling()
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, kk, vv, block_mask=block_mask, scale=1.0 / math.sqrt(D), enable_gqa=H != G)
