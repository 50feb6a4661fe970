"""Sliding-window attention in plain PyTorch, by blocks of queries (the form for CPU tensors).

Same contract and mask as ``sliding_window_attention_ref`` (``naive.py``, the specification): each
block of queries meets only the keys it can see, so memory is O(T (W + block)), never a T x T mask.
"""

from __future__ import annotations

import math

import torch

from titans_lnn.kernels.window_attention.naive import check_inputs, visible_from


def sliding_window_attention_blocked(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None,
                                     segment=False, pos0=0, block=128):
    """Blocked form of ``sliding_window_attention_ref``: each block of queries meets only the keys
    it can see, so memory is O(T (W + block)). Computes in fp32 at least."""
    check_inputs(q, k, v, k2, v2, sink_k, sink_v, window)
    B, H, T, D = q.shape
    G, P = k.shape[1], k.shape[2] - T
    rep = H // G
    if T == 0:
        return q.new_empty(q.shape)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(D)
    n_blocks = -(-T // block)
    qpos = torch.arange(T, device=q.device) + P + pos0  # absolute positions of the queries
    lo_all = (visible_from(qpos, window, segment) - pos0).clamp_min(0)  # first visible key index
    # No per-block slicing of tensors that need a gradient: autograd's backward of x[:, :, s:e] builds a
    # zero tensor the size of the whole x for every block, which makes the backward quadratic in T.
    # The queries are split once (one SplitBackward); block outputs are concatenated, not written into
    # a preallocated tensor; the key windows, which overlap, are taken all at once with one ``unfold``.
    qb_all = (q.to(dtype).view(B, G, rep, T, D) * scale).split(block, dim=3)  # (B, G, rep, bq, D) each
    streams = [s.to(dtype) for s in (k, v, k2, v2) if s is not None]
    if window is None:
        # Full causal attention: block b sees keys 0 .. P + e - 1, a prefix as long as its cost (the
        # quadratic baseline), so slicing it costs nothing more. The windows start at key 0.
        look = None
        starts = [0] * n_blocks
        windows = [[x[:, :, :P + min(T, s + block)] for s in range(0, T, block)] for x in streams]
    else:
        # Every query at key index P + i sees no key before P + i - (W - 1) (lo(p) >= p - W + 1 in both
        # modes), so the block starting at query s sees keys within [P + s - look, P + s + block). Pad
        # the keys by ``look`` on the left (crop if P > look) and to n_blocks * block queries on the
        # right, then cut all windows (length look + block, stride block) with one unfold: a view, whose
        # backward (after unbind's one stack) is one unfold_backward. Padded keys are masked below.
        look = min(window - 1, P + (n_blocks - 1) * block)
        starts = [P + s - look for s in range(0, T, block)]
        pad = (0, 0, look - P, n_blocks * block - T)
        windows = [torch.nn.functional.pad(x, pad).unfold(2, look + block, block).transpose(-1, -2).unbind(2)
                   for x in streams]  # per stream: n_blocks windows (B, G, look + block, D)
    kw, vw = windows[0], windows[1]
    k2w, v2w = (windows[2], windows[3]) if k2 is not None else (None, None)
    sink_scores_k = sink_k.to(dtype).expand(B, -1, -1, -1) if sink_k is not None else None
    sink_v = sink_v.to(dtype).expand(B, -1, -1, -1) if sink_v is not None else None
    n_sink = sink_scores_k.shape[2] if sink_scores_k is not None else 0
    outs = []
    for b, qb in enumerate(qb_all):
        s = b * block
        e = s + qb.shape[3]
        kb = kw[b]
        n_key = kb.shape[2]
        key_idx = starts[b] + torch.arange(n_key, device=q.device)  # key index of each window slot
        q_idx = P + torch.arange(s, e, device=q.device)  # key index of each query
        mask = (key_idx[None] >= lo_all[s:e, None]) & (key_idx[None] <= q_idx[:, None])
        scores = [torch.einsum("bgrqd,bgkd->bgrqk", qb, kb).masked_fill(~mask, float("-inf"))]
        if k2w is not None:
            scores.append(torch.einsum("bgrqd,bgkd->bgrqk", qb, k2w[b]).masked_fill(~mask, float("-inf")))
        if sink_scores_k is not None:
            scores.insert(0, torch.einsum("bgrqd,bgkd->bgrqk", qb, sink_scores_k))
        probs = torch.cat(scores, dim=-1).softmax(-1).split([n_sink, n_key, n_key if k2w is not None else 0], -1)
        o = torch.einsum("bgrqk,bgkd->bgrqd", probs[1], vw[b])
        if k2w is not None:
            o = o + torch.einsum("bgrqk,bgkd->bgrqd", probs[2], v2w[b])
        if n_sink:
            o = o + torch.einsum("bgrqk,bgkd->bgrqd", probs[0], sink_v)
        outs.append(o)
    return torch.cat(outs, dim=3).view(B, H, T, D).to(q.dtype)
