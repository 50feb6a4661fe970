"""Sliding-window attention as a module: projections, grouped-query heads, RoPE, persistent tokens
as an always-visible prefix, and a bounded key/value cache as streaming state."""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_lnn.config import TitansLNNConfig
from titans_lnn.kernels import sliding_window_attention
from titans_lnn.layers import rope
from titans_lnn.memory import PersistentMemory


class SlidingWindowAttention(nn.Module):
    """o_i = W_o softmax(q_i [K_p; K_{lo(i)..i}]^T / sqrt(D)) [V_p; V_{lo(i)..i}]

    with q, k rotated by RoPE at their absolute positions, K_p, V_p the projections of the N_p
    persistent tokens (no rotation: they have no position), and lo(i) = i - W + 1 (or the segment
    start in MAC's segment mode; 0 for full causal attention).

    x: (B, T, d_model) -> (B, T, d_model). The streaming state holds the rotated keys and values
    that later queries can still see: at most W - 1 of them (a bounded cache; the full-attention
    ablation keeps everything, which is what makes it quadratic).
    """

    def __init__(self, config: TitansLNNConfig, *, segment: bool = False, memory_stream: bool = False):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.window = None if c.full_attention else c.window
        self.segment = segment  # MAC: attention inside segments of `window` tokens
        self.memory_stream = memory_stream  # MAC: a second, aligned key/value stream (memory read-outs)
        self.rope_theta = c.rope_theta
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.wkv = nn.Linear(c.d_model, 2 * c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.persistent = PersistentMemory(c.n_persistent, c.d_model) if c.n_persistent else None

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        empty = torch.zeros(batch_size, self.n_kv, 0, self.head_dim, device=device, dtype=dtype)
        state = {"k": empty, "v": empty.clone()}
        if self.memory_stream:
            state.update(k2=empty.clone(), v2=empty.clone())
        return state

    def _kv(self, x: torch.Tensor, pos: int | None):
        B, T, _ = x.shape
        k, v = self.wkv(x).view(B, T, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, G, T, D) each
        if pos is not None:
            k = rope(k, pos, self.rope_theta)
        return k, v

    def _keep(self, end: int) -> int:
        """How many of the most recent keys a query at position >= end can still see."""
        if self.window is None:
            return end
        if self.segment:
            return end % self.window
        return min(end, self.window - 1)

    def forward(self, x: torch.Tensor, state: dict, pos: int, extra: torch.Tensor | None = None):
        """x: (B, T, d_model) starting at absolute position ``pos``; ``extra`` (B, T, d_model): the
        aligned second stream (MAC). Returns (B, T, d_model) and the new state."""
        B, T, _ = x.shape
        q = rope(self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), pos, self.rope_theta)
        k, v = self._kv(x, pos)
        k = torch.cat([state["k"].to(k.dtype), k], dim=2)  # (B, G, P+T, D)
        v = torch.cat([state["v"].to(v.dtype), v], dim=2)
        P = k.shape[2] - T
        k2 = v2 = None
        if self.memory_stream:
            k2, v2 = self._kv(extra, pos)
            k2 = torch.cat([state["k2"].to(k2.dtype), k2], dim=2)
            v2 = torch.cat([state["v2"].to(v2.dtype), v2], dim=2)
        sink_k = sink_v = None
        if self.persistent is not None:
            sink_k, sink_v = self._kv(self.persistent.tokens[None].to(x.dtype), None)  # (1, G, N_p, D)
        o = sliding_window_attention(q, k, v, window=self.window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2,
                                     segment=self.segment, pos0=pos - P)
        keep = self._keep(pos + T)
        new = {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:]}
        if self.memory_stream:
            new.update(k2=k2[:, :, k2.shape[2] - keep:], v2=v2[:, :, v2.shape[2] - keep:])
        return self.wo(o.transpose(1, 2).reshape(B, T, -1)), new
