"""Causal sliding-window attention with an always-visible prefix (persistent memory tokens).

Query i (absolute position p_i) attends, with softmax weights, to
    - the persistent keys (every query sees all of them), and
    - the keys at positions lo(p_i) .. p_i, where
        lo(p) = p - W + 1          (sliding window of W keys, self included),
        lo(p) = W * floor(p / W)   (segment mode: MAC attends inside its segment of W tokens),
        lo(p) = 0                  (window=None: full causal attention, the quadratic baseline).
Optionally a second key/value stream aligned with the first (same positions, same mask): MAC's
memory read-outs h_t sit beside the segment tokens and obey the same causal mask.

Shapes: q (B, H, T, D); k, v, k2, v2 (B, G, P + T, D) with G key/value heads dividing H (grouped
query attention) and the first P keys cached from earlier calls (query i is key P + i);
sink_k, sink_v (B or 1, G, N_p, D). Returns (B, H, T, D).

Two forms with one signature: ``sliding_window_attention_ref`` (a loop over queries: the
specification) and ``sliding_window_attention_blocked`` (blocks of queries against the keys they
can see: memory O(T (W + block)), never a T x T mask). On CUDA, ``kernels.dispatch`` routes to
flash-attn / FlexAttention.
"""

from __future__ import annotations

import math

import torch


def _visible_from(pos: torch.Tensor, window: int | None, segment: bool) -> torch.Tensor:
    """lo(p): the first absolute key position a query at absolute position p sees."""
    if window is None:
        return torch.zeros_like(pos)
    if segment:
        return (pos // window) * window
    return pos - window + 1


def _check(q, k, v, k2, v2, sink_k, sink_v, window):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"sliding_window_attention: q must be (B, H, T, D) and k, v (B, G, P+T, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or H % k.shape[1] or k.shape[3] != D or k.shape[2] < T:
        raise ValueError(f"sliding_window_attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)}: "
                         f"expected (B={B}, G dividing H={H}, >= T={T}, D={D})")
    if (k2 is None) != (v2 is None) or (k2 is not None and (k2.shape != k.shape or v2.shape != k.shape)):
        raise ValueError("sliding_window_attention: k2 and v2 must be given together, shaped like k")
    if (sink_k is None) != (sink_v is None):
        raise ValueError("sliding_window_attention: sink_k and sink_v must be given together")
    if window is not None and window < 1:
        raise ValueError(f"sliding_window_attention: window={window} must be >= 1 or None")


def sliding_window_attention_ref(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None,
                                 segment=False, pos0=0):
    """Reference: one query at a time. ``pos0`` is the absolute position of key 0."""
    _check(q, k, v, k2, v2, sink_k, sink_v, window)
    B, H, T, D = q.shape
    G, P = k.shape[1], k.shape[2] - T
    rep = H // G
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, P+T, D)
    if k2 is not None:
        k2, v2 = k2.repeat_interleave(rep, 1), v2.repeat_interleave(rep, 1)
    if sink_k is not None:
        sink_k = sink_k.expand(B, -1, -1, -1).repeat_interleave(rep, 1)
        sink_v = sink_v.expand(B, -1, -1, -1).repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for i in range(T):
        p = pos0 + P + i
        lo = int(_visible_from(torch.tensor(p), window, segment)) - pos0
        lo = max(lo, 0)
        keys, vals = [k[:, :, lo:P + i + 1]], [v[:, :, lo:P + i + 1]]
        if k2 is not None:
            keys.append(k2[:, :, lo:P + i + 1])
            vals.append(v2[:, :, lo:P + i + 1])
        if sink_k is not None:
            keys.insert(0, sink_k)
            vals.insert(0, sink_v)
        kk, vv = torch.cat(keys, 2), torch.cat(vals, 2)
        scores = torch.einsum("bhd,bhsd->bhs", q[:, :, i], kk) / math.sqrt(D)
        out[:, :, i] = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), vv)
    return out


def sliding_window_attention_blocked(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None,
                                     segment=False, pos0=0, block=128):
    """Blocked form of ``sliding_window_attention_ref``: each block of queries meets only the keys
    it can see, so memory is O(T (W + block)). Computes in fp32 at least."""
    _check(q, k, v, k2, v2, sink_k, sink_v, window)
    B, H, T, D = q.shape
    G, P = k.shape[1], k.shape[2] - T
    rep = H // G
    if T == 0:
        return q.new_empty(q.shape)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(D)
    n_blocks = -(-T // block)
    qpos = torch.arange(T, device=q.device) + P + pos0  # absolute positions of the queries
    lo_all = (_visible_from(qpos, window, segment) - pos0).clamp_min(0)  # first visible key index
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
