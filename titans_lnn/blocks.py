"""The model's block and its sequence mixers, one class per variant (Titans section 4, eqs. 21-31,
and the ablations).

A block is pre-norm residual: a sequence mixer, the liquid core when the variant has it, a SwiGLU MLP:
    x = mixer(x);   x += Liquid(norm x);   x += MLP(norm x)
A mixer maps the residual stream to its new value and carries a state; ``MIXERS`` builds the variant's:
    mac    x += MAC(norm x)          read h = M_seg(q), attend [p | h | S], write y, o = y (x) M_t(y)
    mag    x += MAG(norm x)          o = SWA(x) (x) M(x)
    mal    x += M(norm x);  x += SWA(norm x)
    swa    x += SWA(norm x)          ablation: attention only
    full   x += Attn(norm x)         ablation: full causal attention (quadratic)
    lmm    x += M(norm x)            ablation: the memory only
    liquid                           ablation: no mixer, the liquid core only
Each mixer's layers (``MemoryAsContext``, ``MemoryAsGate``, ``SlidingWindowAttention``, ``NeuralMemory``)
also work on their own from keyword arguments, on (B, T, dim), with or without a carried state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.config import TitansLNNConfig
from titans_lnn.layers import Residual, RMSNorm, SwiGLU, residual_output
from titans_lnn.liquid import LiquidCore
from titans_lnn.memory import NeuralMemory
from titans_lnn.mixers import Based, GatedDeltaNet, Lfm2, Mamba2
from titans_lnn.state import BlockState, EmptyState, MACState, PairState


class MemoryGate(nn.Module):
    """o = W (norm_y(y) * sigmoid(norm_m(m))): the non-linear gate (x) of MAC and MAG, with learned
    scales in both normalisations. y, m: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm_y = RMSNorm(dim, eps)
        self.norm_m = RMSNorm(dim, eps)
        self.proj = residual_output(nn.Linear(dim, dim, bias=False))

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


def _memory(dim: int, memory: NeuralMemory | None) -> NeuralMemory:
    if memory is None:
        return NeuralMemory(dim)
    if not isinstance(memory, NeuralMemory) or memory.dim != dim:
        raise ValueError(f"memory must be a NeuralMemory of width dim={dim}; got {memory!r:.80}")
    return memory


def _attention_and_memory(cls, config: TitansLNNConfig):
    """MAC or MAG (the same arguments) from a config: ``cls.from_config(config)``."""
    c = config
    return cls(c.d_model, window=c.window, heads=c.n_heads, kv_heads=c.n_kv_heads, n_persistent=c.n_persistent,
               rope_theta=c.rope_theta, memory=NeuralMemory.from_config(c), eps=c.norm_eps)


class MemoryAsContext(nn.Module):
    """MAC (Titans eqs. 21-25), segment by segment (segments of ``window`` tokens):
        h = M_{seg}(q(S))                       read with the weights at the segment start
        y = Attn([p | h | S])                   causal inside the segment; h_t sits beside S_t
        M_t <- write(y)                          the memory learns the attention output
        o = y (x) M_t(y)                        read again after the write, per token
    x: (B, T, dim) -> (B, T, dim); state: ``MACState``.

        mac = MemoryAsContext(64, window=32, heads=4, memory=NeuralMemory(64, heads=2))
        y, state = mac(torch.randn(2, 100, 64))
        y2, state = mac(torch.randn(2, 10, 64), state)
    """

    def __init__(self, dim: int, *, window: int = 128, heads: int = 4, kv_heads: int | None = None,
                 n_persistent: int = 0, rope_theta: float = 10000.0, memory: NeuralMemory | None = None,
                 eps: float = 1e-5):
        super().__init__()
        self.segment = window
        self.attn = SlidingWindowAttention(dim, heads=heads, kv_heads=kv_heads, window=window,
                                           n_persistent=n_persistent, rope_theta=rope_theta, segment=True,
                                           memory_stream=True)
        self.mem = _memory(dim, memory)
        self.gate = MemoryGate(dim, eps)

    @classmethod
    def from_config(cls, config: TitansLNNConfig) -> MemoryAsContext:
        return _attention_and_memory(cls, config)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> MACState:
        mem = self.mem.init_state(batch_size, device, dtype)
        return MACState(self.attn.init_state(batch_size, device, dtype), mem,
                        tuple(w.clone() for w in mem.weights), self.mem.init_read_state(batch_size, device, dtype))

    def forward(self, x: torch.Tensor, state: MACState | None = None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        attn_state, mem_state, snapshot, conv_read = state.attn, state.mem, state.segment_weights, state.conv_read
        pos, T = mem_state.pos, x.shape[1]
        lengths, s = [], 0  # the segment pieces: up to the next multiple of `segment`
        while s < T:
            lengths.append(min(T - s, self.segment - (pos + s) % self.segment))
            s += lengths[-1]
        # What depends on x alone (the read's queries and gate, the attention's q, k, v) for the whole piece
        # in a few large ops; the loop keeps only what the memory's state feeds. Split once, not
        # x[:, s:s + L] per segment: autograd's backward of each slice builds a zero gradient the size
        # of the whole x (a backward quadratic in T); split's backward is one cat.
        q_read, gate_read, conv_read = self.mem.read_queries(x, conv_read)  # (B, Hm, T, d), (B, T, dim)
        table = self.attn.rope_table(attn_state.pos, T, x.dtype, x.device)  # (T, D/2): RoPE for q, k and h's keys
        qkv = self.attn.project(x, attn_state.pos, table)  # (B, H, T, D), (B, G, T, D) x 2
        pieces = zip(q_read.split(lengths, dim=2), gate_read.split(lengths, dim=1), table.split(lengths),
                     *(t.split(lengths, dim=2) for t in qkv))
        sinks = self.attn.sinks(qkv[0].dtype)  # the persistent keys and values: the same for every segment
        ys, ms = [], []
        for q_r, g_r, rot, q, k, v in pieces:
            if mem_state.pos % self.segment == 0:  # a new segment: snapshot the memory it reads from
                snapshot = self.mem.current_weights(mem_state)
            h = self.mem.read_out(q_r, g_r, snapshot)
            y, attn_state = self.attn.attend(q, k, v, attn_state, extra=h, sinks=sinks, table=rot)
            read, mem_state = self.mem.write_read(y, mem_state)
            ys.append(y)
            ms.append(read)
        # the memory's output projection and the gate feed nothing back: one call each for the piece
        y = _join(ys, 1)
        out = self.gate(y, self.mem.output(_join(ms, 2), y))
        return out, MACState(attn_state, mem_state, snapshot, conv_read)


def _join(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The pieces joined along ``dim``: a lone piece as it is (no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


class MemoryAsGate(nn.Module):
    """MAG (Titans eqs. 26-27): o = SWA([p | x]) (x) M(x). x: (B, T, dim) -> (B, T, dim); state: ``PairState``.

        mag = MemoryAsGate(64, window=32, heads=4)
        y, state = mag(torch.randn(2, 100, 64))
    """

    def __init__(self, dim: int, *, window: int = 128, heads: int = 4, kv_heads: int | None = None,
                 n_persistent: int = 0, rope_theta: float = 10000.0, memory: NeuralMemory | None = None,
                 eps: float = 1e-5):
        super().__init__()
        self.attn = SlidingWindowAttention(dim, heads=heads, kv_heads=kv_heads, window=window,
                                           n_persistent=n_persistent, rope_theta=rope_theta)
        self.mem = _memory(dim, memory)
        self.gate = MemoryGate(dim, eps)

    @classmethod
    def from_config(cls, config: TitansLNNConfig) -> MemoryAsGate:
        return _attention_and_memory(cls, config)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> PairState:
        return PairState(self.attn.init_state(batch_size, device, dtype),
                         self.mem.init_state(batch_size, device, dtype))

    def forward(self, x: torch.Tensor, state: PairState | None = None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        y, attn_state = self.attn(x, state.attn)
        m, mem_state = self.mem(x, state.mem)
        return self.gate(y, m), PairState(attn_state, mem_state)


# ----------------------------------------------------------------------------- mixers (residual level)


class MemoryAsLayer(nn.Module):
    """MAL (Titans eq. 28-29): the memory, then sliding-window attention, each a pre-norm residual step:
    x += M(norm x);  x += SWA(norm x). State: ``PairState``."""

    def __init__(self, mem: NeuralMemory, attn: SlidingWindowAttention, eps: float = 1e-5):
        super().__init__()
        self.mem = Residual(mem, mem.dim, eps)
        self.attn = Residual(attn, mem.dim, eps)

    @classmethod
    def from_config(cls, config: TitansLNNConfig) -> MemoryAsLayer:
        return cls(NeuralMemory.from_config(config), SlidingWindowAttention.from_config(config), config.norm_eps)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> PairState:
        return PairState(self.attn.init_state(batch_size, device, dtype),
                         self.mem.init_state(batch_size, device, dtype))

    def forward(self, x: torch.Tensor, state: PairState):
        x, mem_state = self.mem(x, state.mem)
        x, attn_state = self.attn(x, state.attn)
        return x, PairState(attn_state, mem_state)


class NoMixer(nn.Module):
    """The liquid-only ablation's mixer: the stream unchanged, no state."""

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> EmptyState:
        return EmptyState()

    def forward(self, x: torch.Tensor, state: EmptyState):
        return x, state


# variant -> the block's mixer (residual level). New mechanisms register here.
MIXERS: dict[str, Callable[[TitansLNNConfig], nn.Module]] = {
    "mac": lambda c: Residual(MemoryAsContext.from_config(c), c.d_model, c.norm_eps),
    "mag": lambda c: Residual(MemoryAsGate.from_config(c), c.d_model, c.norm_eps),
    "mal": MemoryAsLayer.from_config,
    "swa": lambda c: Residual(SlidingWindowAttention.from_config(c), c.d_model, c.norm_eps),
    "full": lambda c: Residual(SlidingWindowAttention.from_config(c), c.d_model, c.norm_eps),
    "lmm": lambda c: Residual(NeuralMemory.from_config(c), c.d_model, c.norm_eps),
    "liquid": lambda c: NoMixer(),
    # the seed architectures (titans_lnn.mixers)
    "mamba2": lambda c: Residual(Mamba2.from_config(c), c.d_model, c.norm_eps),
    "based": Based.from_config,
    "lfm2": Lfm2.from_config,
    "gdn": lambda c: Residual(GatedDeltaNet.from_config(c), c.d_model, c.norm_eps),
}


class Block(nn.Module):
    """One pre-norm residual block of the config's variant: mixer -> liquid core -> MLP.
    x: (B, T, d) -> (B, T, d); state: ``BlockState``."""

    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        c = config
        self.mixer = MIXERS[c.variant](c)
        self.liquid = Residual(LiquidCore.from_config(c), c.d_model, c.norm_eps) if "liquid" in c.parts else None
        self.norm_mlp = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.mlp_mult)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> BlockState:
        liquid = None if self.liquid is None else self.liquid.init_state(batch_size, device, dtype)
        return BlockState(self.mixer.init_state(batch_size, device, dtype), liquid)

    def forward(self, x: torch.Tensor, state: BlockState, dt: torch.Tensor | None = None):
        x, mixer = self.mixer(x, state.mixer)
        liquid = None
        if self.liquid is not None:
            x, liquid = self.liquid(x, state.liquid, dt=dt)
        return x + self.mlp(self.norm_mlp(x)), BlockState(mixer, liquid)
