"""Sliding-window attention in plain PyTorch, by blocks of queries (the form for CPU tensors).

Same contract and mask as ``sliding_window_attention_ref`` (``naive.py``, the specification): each
block of queries meets only the keys it can see, so memory is O(T (W + block)), never a T x T mask.
Each block is one ``F.scaled_dot_product_attention`` call over its keys ``[sinks | window | window of
k2]`` with an additive mask (grouped-query heads by ``enable_gqa``): one fused op forward and backward
instead of ~10 einsum/softmax/split ops (a 128-token MAC segment: 1.07 -> 0.35 ms forward,
2.8 -> 1.1 ms forward+backward on one CPU thread). The masks depend only on the sizes, so they are
built once per shape and dtype (``_additive_masks``, cached).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from titans_lnn.kernels.window_attention.naive import check_inputs, visible_from


@functools.lru_cache(maxsize=64)
def _block_masks(T: int, P: int, pos_mod: int, window: int | None, segment: bool, block: int, n_sink: int,
                 two_streams: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The masks of the blocks of queries: block b's keys are [sinks | keys starts[b] .. starts[b] + n - 1 |
    (the same of k2)] (the windows ``sliding_window_attention_blocked`` cuts); its mask (bq, n_sink + n (+ n))
    is True where a query sees a key. ``pos_mod`` is pos0 reduced to what the mask depends on (pos0 mod W
    in segment mode, 0 otherwise: a sliding window's and full attention's first visible index, clamped at
    key 0, do not depend on pos0)."""
    n_blocks = -(-T // block)
    qpos = torch.arange(T, device=device) + P + pos_mod  # absolute positions of the queries (up to a shift)
    lo_all = (visible_from(qpos, window, segment) - pos_mod).clamp_min(0)  # first visible key index
    if window is None:
        starts = [0] * n_blocks
        lengths = [P + min(T, s + block) for s in range(0, T, block)]
    else:
        look = min(window - 1, P + (n_blocks - 1) * block)
        starts = [P + s - look for s in range(0, T, block)]
        # one block with no cached keys (a MAC segment) sees only its own T keys: no padding
        lengths = [T] if n_blocks == 1 and P == 0 else [look + block] * n_blocks
    masks = []
    for b, s in enumerate(range(0, T, block)):
        e = min(T, s + block)
        key_idx = starts[b] + torch.arange(lengths[b], device=device)  # key index of each window slot
        q_idx = P + torch.arange(s, e, device=device)  # key index of each query
        mask = (key_idx[None] >= lo_all[s:e, None]) & (key_idx[None] <= q_idx[:, None])  # (bq, n)
        parts = [torch.ones(e - s, n_sink, dtype=torch.bool, device=device), mask] + [mask] * two_streams
        masks.append(torch.cat(parts, dim=1))
    return tuple(masks)


@functools.lru_cache(maxsize=64)
def _additive_masks(T: int, P: int, pos_mod: int, window: int | None, segment: bool, block: int, n_sink: int,
                    two_streams: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``_block_masks`` as the additive masks scaled_dot_product_attention adds to the scores (0 where a query
    sees a key, -inf elsewhere): given a boolean mask it builds this one on every call (~40 us for a MAC
    segment's, a tenth of its attention). Built outside inference mode whatever the caller's: autograd saves
    the mask for the backward, and a cached inference tensor would fail every later training call."""
    with torch.inference_mode(False):
        return tuple(torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, float("-inf"))
                     for m in _block_masks(T, P, pos_mod, window, segment, block, n_sink, two_streams, device))


def sliding_window_attention_blocked(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None,
                                     segment=False, pos0=0, block=128):
    """Blocked form of ``sliding_window_attention_ref``: each block of queries meets only the keys
    it can see, so memory is O(T (W + block)). Computes in fp32 at least."""
    check_inputs(q, k, v, k2, v2, sink_k, sink_v, window)
    B, H, T, D = q.shape
    G, P = k.shape[1], k.shape[2] - T
    if T == 0:
        return q.new_empty(q.shape)
    dtype = torch.promote_types(q.dtype, torch.float32)
    n_blocks = -(-T // block)
    n_sink = 0 if sink_k is None else sink_k.shape[2]
    pos_mod = pos0 % window if segment and window is not None else 0
    masks = _additive_masks(T, P, pos_mod, window, segment, block, n_sink, k2 is not None, q.device, dtype)
    # No per-block slicing of tensors that need a gradient: autograd's backward of x[:, :, s:e] builds a
    # zero tensor the size of the whole x for every block, which makes the backward quadratic in T.
    # The queries are split once (one SplitBackward); block outputs are concatenated, not written into
    # a preallocated tensor; the key windows, which overlap, are taken all at once with one ``unfold``.
    qb_all = q.to(dtype).split(block, dim=2)  # (B, H, bq, D) each
    streams = [s.to(dtype) for s in (k, v, k2, v2) if s is not None]
    if window is None:
        # Full causal attention: block b sees keys 0 .. P + e - 1, a prefix as long as its cost (the
        # quadratic baseline), so slicing it costs nothing more.
        windows = [[x[:, :, :P + min(T, s + block)] for s in range(0, T, block)] for x in streams]
    elif n_blocks == 1 and P == 0:
        windows = [[x] for x in streams]  # one block that sees only its own keys (a MAC segment): no copy
    else:
        # Every query at key index P + i sees no key before P + i - (W - 1) (lo(p) >= p - W + 1 in both
        # modes), so the block starting at query s sees keys within [P + s - look, P + s + block). Pad
        # the keys by ``look`` on the left (crop if P > look) and to n_blocks * block queries on the
        # right, then cut all windows (length look + block, stride block) with one unfold: a view, whose
        # backward (after unbind's one stack) is one unfold_backward. Padded keys are masked.
        look = min(window - 1, P + (n_blocks - 1) * block)
        pad = (0, 0, look - P, n_blocks * block - T)
        windows = [F.pad(x, pad).unfold(2, look + block, block).transpose(-1, -2).unbind(2)
                   for x in streams]  # per stream: n_blocks windows (B, G, look + block, D)
    sinks = [] if sink_k is None else [s.to(dtype).expand(B, -1, -1, -1) for s in (sink_k, sink_v)]
    two = k2 is not None
    outs = []
    for b, qb in enumerate(qb_all):
        keys = sinks[:1] + [windows[0][b]] + ([windows[2][b]] if two else [])  # (B, G, n_sink + n (+ n), D)
        vals = sinks[1:] + [windows[1][b]] + ([windows[3][b]] if two else [])
        kb = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
        vb = vals[0] if len(vals) == 1 else torch.cat(vals, dim=2)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=masks[b], enable_gqa=G != H))
    out = outs[0] if n_blocks == 1 else torch.cat(outs, dim=2)
    return out.to(q.dtype)
