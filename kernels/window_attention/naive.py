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

``sliding_window_attention_ref`` is a loop over queries: the specification, the tests' oracle.
The other forms have its signature: ``sliding_window_attention_blocked`` (``blocked.py``) and, on
CUDA, ``sliding_window_attention_cuda`` (``cuda.py``: flash-attn, xformers or FlexAttention).
"""

from __future__ import annotations

import math

import torch


def visible_from(pos: torch.Tensor, window: int | None, segment: bool) -> torch.Tensor:
    """lo(p): the first absolute key position a query at absolute position p sees."""
    if window is None:
        return torch.zeros_like(pos)
    if segment:
        return (pos // window) * window
    return pos - window + 1


def check_inputs(q, k, v, k2, v2, sink_k, sink_v, window):
    """Raise ``ValueError`` unless the arguments have the shapes of the module docstring."""
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
    check_inputs(q, k, v, k2, v2, sink_k, sink_v, window)
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
        lo = int(visible_from(torch.tensor(p), window, segment)) - pos0
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
