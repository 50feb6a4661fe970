"""One block of the model for each variant (Titans section 4, eqs. 21-31, and the ablations).

Every block is pre-norm residual: a sequence mixer (which differs by variant), the liquid core when
the variant has it, then a SwiGLU MLP:
    mac    x += MAC(norm x)                 read h = M_seg(q), attend [p | h | S], write y, o = y (x) M_t(y)
    mag    x += gate(SWA(norm x), M(norm x))
    mal    x += M(norm x);  x += SWA(norm x)
    swa    x += SWA(norm x)                 ablation: attention only
    full   x += Attn(norm x)                ablation: full causal attention (quadratic)
    liquid                                  ablation: the liquid core only
    lmm    x += M(norm x)                   ablation: the memory only
    then   x += Liquid(norm x)  (mac, mag, mal, liquid);   x += MLP(norm x)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.config import TitansLNNConfig
from titans_lnn.layers import RMSNorm, SwiGLU
from titans_lnn.liquid import LiquidCore
from titans_lnn.memory import NeuralMemory


class MemoryGate(nn.Module):
    """o = W (norm_y(y) * sigmoid(norm_m(m))): the non-linear gate (x) of MAC and MAG, with learned
    scales in both normalisations. y, m: (B, T, d) -> (B, T, d)."""

    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        self.norm_y = RMSNorm(config.d_model, config.norm_eps)
        self.norm_m = RMSNorm(config.d_model, config.norm_eps)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


class MemoryAsContext(nn.Module):
    """MAC (Titans eqs. 21-25), segment by segment (segments of ``window`` tokens):
        h = M_{seg}(q(S))                       read with the weights at the segment start
        y = Attn([p | h | S])                   causal inside the segment; h_t sits beside S_t
        M_t <- write(y)                          the memory learns the attention output
        o = y (x) M_t(y)                        read again after the write, per token
    x: (B, T, d) -> (B, T, d); state: {"attn": ..., "mem": ...}.
    """

    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        self.segment = config.window
        self.attn = SlidingWindowAttention(config, segment=True, memory_stream=True)
        self.mem = NeuralMemory.from_config(config)
        self.gate = MemoryGate(config)

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        return {"attn": self.attn.init_state(batch_size, device, dtype),
                "mem": self.mem.init_state(batch_size, device, dtype)}

    def forward(self, x, state, pos):
        attn_state, mem_state = state["attn"], state["mem"]
        outs = []
        lengths, s, T = [], 0, x.shape[1]  # the segment pieces: up to the next multiple of `segment`
        while s < T:
            lengths.append(min(T - s, self.segment - (pos + s) % self.segment))
            s += lengths[-1]
        # split once, not x[:, s:s + L] per segment: autograd's backward of each slice builds a zero
        # gradient the size of the whole x (a backward quadratic in T); split's backward is one cat.
        s = 0
        for xs in x.split(lengths, dim=1):
            p = pos + s
            if p % self.segment == 0:  # a new segment: snapshot the memory it reads from
                mem_state = dict(mem_state)
                for i, w in enumerate(self.mem._weights(mem_state, "w")):
                    mem_state[f"g{i}"] = w
            h, conv_r = self.mem.read(xs, mem_state, self.mem._weights(mem_state, "g"))
            y, attn_state = self.attn(xs, attn_state, p, extra=h)
            m, mem_state = self.mem(y, {**mem_state, "conv_r": conv_r}, p)
            mem_state["conv_r"] = conv_r
            outs.append(self.gate(y, m))
            s += xs.shape[1]
        return torch.cat(outs, dim=1), {"attn": attn_state, "mem": mem_state}


class MemoryAsGate(nn.Module):
    """MAG (Titans eqs. 26-27): o = SWA([p | x]) (x) M(x). x: (B, T, d) -> (B, T, d)."""

    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        self.attn = SlidingWindowAttention(config)
        self.mem = NeuralMemory.from_config(config)
        self.gate = MemoryGate(config)

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        return {"attn": self.attn.init_state(batch_size, device, dtype),
                "mem": self.mem.init_state(batch_size, device, dtype)}

    def forward(self, x, state, pos):
        y, attn_state = self.attn(x, state["attn"], pos)
        m, mem_state = self.mem(x, state["mem"], pos)
        return self.gate(y, m), {"attn": attn_state, "mem": mem_state}


class Block(nn.Module):
    """One pre-norm residual block of the given variant. x: (B, T, d) -> (B, T, d)."""

    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        c = config
        self.variant = c.variant
        if c.variant in ("mac", "mag", "mal", "swa", "full"):
            self.norm_mix = RMSNorm(c.d_model, c.norm_eps)
        if c.variant == "mac":
            self.mixer = MemoryAsContext(c)
        elif c.variant == "mag":
            self.mixer = MemoryAsGate(c)
        if c.variant in ("mal", "lmm"):
            self.mem = NeuralMemory.from_config(c)
            self.norm_mem = RMSNorm(c.d_model, c.norm_eps)
        if c.variant in ("mal", "swa", "full"):
            self.attn = SlidingWindowAttention(c)
        if "liquid" in c.parts:
            self.liquid = LiquidCore(c)
            self.norm_liquid = RMSNorm(c.d_model, c.norm_eps)
        self.norm_mlp = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.mlp_mult)

    def init_state(self, batch_size, device=None, dtype=torch.float32) -> dict:
        state = {}
        for name in ("mixer", "mem", "attn", "liquid"):
            if hasattr(self, name):
                state[name] = getattr(self, name).init_state(batch_size, device, dtype)
        return state

    def forward(self, x, state: dict, pos: int, dt=None):
        new = {}
        if hasattr(self, "mixer"):
            y, new["mixer"] = self.mixer(self.norm_mix(x), state["mixer"], pos)
            x = x + y
        if hasattr(self, "mem"):
            y, new["mem"] = self.mem(self.norm_mem(x), state["mem"], pos)
            x = x + y
        if hasattr(self, "attn"):
            y, new["attn"] = self.attn(self.norm_mix(x), state["attn"], pos)
            x = x + y
        if hasattr(self, "liquid"):
            y, new["liquid"] = self.liquid(self.norm_liquid(x), state["liquid"], dt)
            x = x + y
        return x + self.mlp(self.norm_mlp(x)), new
