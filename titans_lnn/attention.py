"""Sliding-window attention as a module: projections, grouped-query heads, RoPE, persistent tokens
as an always-visible prefix, and a preallocated key/value cache as streaming state."""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_lnn.kernels import sliding_window_attention
from titans_lnn.layers import apply_rope, residual_output, rope_table, rope_table_dtype
from titans_lnn.memory import PersistentMemory
from titans_lnn.state import AttentionState


class SlidingWindowAttention(nn.Module):
    """o_i = W_o softmax(q_i [K_p; K_{lo(i)..i}]^T / sqrt(D)) [V_p; V_{lo(i)..i}]

    with q, k rotated by RoPE at their absolute positions, K_p, V_p the projections of the N_p
    persistent tokens (no rotation: they have no position), and lo(i) = i - W + 1 (or the segment
    start in MAC's segment mode; 0 for full causal attention, ``window=None``).

    x: (B, T, dim) -> (B, T, dim). The streaming state (``AttentionState``) holds the rotated keys and
    values that later queries can still see: W - 1 of them, preallocated, so the state has the same
    size from the first token on (full attention keeps everything: that is what makes it quadratic).

        attn = SlidingWindowAttention(64, heads=4, window=32)
        y, state = attn(torch.randn(2, 100, 64))          # one pass
        y2, state = attn(torch.randn(2, 10, 64), state)   # continues at position 100
    """

    def __init__(self, dim: int, *, heads: int = 4, kv_heads: int | None = None, window: int | None = 128,
                 n_persistent: int = 0, rope_theta: float = 10000.0, segment: bool = False,
                 memory_stream: bool = False):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(heads, int) or heads < 1 or dim % heads or (dim // heads) % 2:
            raise ValueError(f"SlidingWindowAttention: heads={heads!r} must divide dim={dim} into even head widths")
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"SlidingWindowAttention: kv_heads={kv_heads!r} must be a divisor of heads={heads}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"SlidingWindowAttention: window={window!r} must be a positive integer or None (full)")
        if segment and window is None:
            raise ValueError("SlidingWindowAttention: segment=True needs a window (the segment length)")
        self.n_heads, self.n_kv, self.head_dim = heads, kv_heads, dim // heads
        self.window = window
        self.segment = segment  # MAC: attention inside segments of `window` tokens
        self.memory_stream = memory_stream  # MAC: a second, aligned key/value stream (memory read-outs)
        self.rope_theta = rope_theta
        self.cache_size = None if window is None else window - 1  # keys a later query can still see
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = residual_output(nn.Linear(heads * self.head_dim, dim, bias=False))
        self.persistent = PersistentMemory(n_persistent, dim) if n_persistent else None

    @classmethod
    def from_config(cls, config, *, segment: bool = False, memory_stream: bool = False) -> SlidingWindowAttention:
        c = config
        return cls(c.d_model, heads=c.n_heads, kv_heads=c.n_kv_heads, window=None if c.full_attention else c.window,
                   n_persistent=c.n_persistent, rope_theta=c.rope_theta, segment=segment, memory_stream=memory_stream)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> AttentionState:
        size = 0 if self.cache_size is None else self.cache_size
        empty = torch.zeros(batch_size, self.n_kv, size, self.head_dim, device=device, dtype=dtype)
        if self.memory_stream:
            return AttentionState(empty, empty.clone(), empty.clone(), empty.clone())
        return AttentionState(empty, empty.clone())

    def rope_table(self, pos: int, T: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The RoPE rotations of positions pos .. pos + T - 1 (``layers.rope_table``), for ``project`` and
        ``attend``: MAC builds one per piece and slices it per segment."""
        return rope_table(pos, T, self.head_dim, self.rope_theta, dtype, device)

    def _rotate(self, x: torch.Tensor, pos: int, table: torch.Tensor | None) -> torch.Tensor:
        """x (B, H, T, D) rotated for positions pos, pos + 1, ... by ``table`` (built when None or of
        another precision than x)."""
        if table is None or table.shape[0] != x.shape[2] or table.dtype != rope_table_dtype(x.dtype):
            table = self.rope_table(pos, x.shape[2], x.dtype, x.device)
        return apply_rope(x, table)

    def _kv(self, x: torch.Tensor, pos: int | None, table: torch.Tensor | None = None):
        """Keys and values (B, G, T, D) of x, the keys rotated for positions pos, ... (None: no rotation)."""
        B, T, _ = x.shape
        k, v = self.wkv(x).view(B, T, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, G, T, D) each
        if pos is not None:
            k = self._rotate(k, pos, table)
        return k, v

    def _visible(self, end: int) -> int:
        """How many of the most recent keys a query at position >= end can still see."""
        if self.window is None:
            return end
        if self.segment:
            return end % self.window
        return min(end, self.window - 1)

    def _extend(self, cache: torch.Tensor, new: torch.Tensor, pos: int) -> torch.Tensor:
        """The visible cached keys (in order) followed by the new ones: (B, G, P + T, D)."""
        if self.cache_size is not None:
            visible = self._visible(pos)
            if visible == 0:  # a MAC segment's start: nothing cached is visible (no copy of the new keys)
                return new
            cache = cache[:, :, self.cache_size - visible:]
        return torch.cat([cache.to(new.dtype), new], dim=2)

    def _store(self, keys: torch.Tensor, end: int) -> torch.Tensor:
        """The cache after position ``end``: the last visible keys, zero-padded in front to the fixed size."""
        if self.cache_size is None:
            return keys
        keep = self._visible(end)
        if keep == 0:  # a MAC segment's end: nothing stays visible
            return keys.new_zeros(*keys.shape[:2], self.cache_size, keys.shape[3])
        tail = keys[:, :, keys.shape[2] - keep:].clone()  # a copy: the state must not pin the whole chunk
        if keep == self.cache_size:
            return tail
        pad = keys.new_zeros(*keys.shape[:2], self.cache_size - keep, keys.shape[3])
        return torch.cat([pad, tail], dim=2)

    def project(self, x: torch.Tensor, pos: int, table: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries (B, H, T, D), keys and values (B, G, T, D) of x, rotated for positions pos, pos + 1, ...
        (MAC projects a whole piece at once, then attends segment by segment on slices of them); ``table``:
        ``self.rope_table(pos, T, x.dtype)`` when the caller has it already."""
        B, T, _ = x.shape
        if table is None:
            table = self.rope_table(pos, T, x.dtype, x.device)
        q = self._rotate(self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), pos, table)
        k, v = self._kv(x, pos, table)
        return q, k, v

    def forward(self, x: torch.Tensor, state: AttentionState | None = None, *, extra: torch.Tensor | None = None):
        """x: (B, T, dim) continuing ``state`` (a fresh one at position 0 when None); ``extra`` (B, T, dim):
        the aligned second stream (MAC). Returns (B, T, dim) and the new state."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        return self.attend(*self.project(x, state.pos), state, extra=extra)

    def sinks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The persistent tokens' keys and values (1, G, N_p, D) each (unrotated), or None without them.
        MAC computes them once per piece and hands them to every segment's ``attend``."""
        if self.persistent is None:
            return None
        return self._kv(self.persistent(1).to(dtype), None)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: AttentionState, *,
               extra: torch.Tensor | None = None, sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
               table: torch.Tensor | None = None):
        """``forward`` from ``project``'s q, k, v of the T tokens at ``state.pos`` onwards; ``sinks``
        (``self.sinks(q.dtype)``) and ``table`` (``self.rope_table(state.pos, T, ...)``, which rotates the
        memory stream's keys) when the caller has them already. Returns (B, T, dim) and the new state."""
        B, _, T, _ = q.shape
        pos = state.pos
        k, v = self._extend(state.k, k, pos), self._extend(state.v, v, pos)  # (B, G, P+T, D)
        P = k.shape[2] - T
        k2 = v2 = None
        if self.memory_stream:
            if extra is None:
                raise ValueError("SlidingWindowAttention(memory_stream=True) needs the aligned stream `extra`")
            k2, v2 = self._kv(extra, pos, table)
            k2, v2 = self._extend(state.k2, k2, pos), self._extend(state.v2, v2, pos)
        if sinks is None:
            sinks = self.sinks(q.dtype)
        sink_k, sink_v = (None, None) if sinks is None else sinks  # (1, G, N_p, D) each
        o = sliding_window_attention(q, k, v, window=self.window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2,
                                     segment=self.segment, pos0=pos - P)
        end = pos + T
        new = AttentionState(self._store(k, end), self._store(v, end), pos=end)
        if self.memory_stream:
            new.k2, new.v2 = self._store(k2, end), self._store(v2, end)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1)), new
