"""BASED (Arora et al. 2024, arXiv 2402.18668): linear attention with a 2nd-order Taylor feature map for
long-range recall, a short gated convolution and a small sliding window for local detail.

Taylor linear attention, per head with q, k of width F (~16) and the feature map (its eq. 3)
    phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))],   phi(q) . phi(k) = 1 + s + s^2 / 2,  s = q.k / sqrt(F)
    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),   S_t = sum_{j<=t} phi(k_j)^T v_j,   z_t = sum_{j<=t} phi(k_j)
(exp(s) to second order: positive, since 1 + s + s^2/2 >= 1/2). The state (S, z) has 1 + F + F^2 rows
per head whatever the length read: BASED's recall/memory trade-off is this F.

``taylor_reference`` runs the sums token by token; ``taylor_chunked`` takes the kernel 1 + s + s^2/2
inside a chunk (causal, quadratic in the chunk only) and the carried (S, z) across chunks.

The BASED mixer is residual-level (like MAL): x += ShortConv(norm x); x += Taylor(norm x); x += SWA(norm x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.layers import Residual, residual_output
from titans_lnn.mixers.common import check_impl, check_positive, pad_time
from titans_lnn.mixers.short_conv import GatedShortConv, ShortConvState
from titans_lnn.state import AttentionState, State


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x): (..., F) -> (..., 1 + F + F^2), with phi(q) . phi(k) = 1 + q.k / sqrt(F) + (q.k)^2 / (2F)."""
    F_ = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)  # (..., F^2)
    return torch.cat([torch.ones_like(x[..., :1]), x / F_ ** 0.25, outer / math.sqrt(2 * F_)], dim=-1)


def taylor_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: torch.Tensor, z0: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal Taylor linear attention, one token at a time.

    q, k: (B, H, T, F); v: (B, H, T, V); S0: (B, H, 1 + F + F^2, V); z0: (B, H, 1 + F + F^2).
    Returns o (B, H, T, V) and the last (S, z)."""
    S, z, outs = S0, z0, []
    for t in range(q.shape[2]):
        fk, fq = taylor_features(k[:, :, t]), taylor_features(q[:, :, t])  # (B, H, D_phi)
        S = S + fk[..., None] * v[:, :, t, None, :]
        z = z + fk
        num = torch.einsum("bhd,bhdv->bhv", fq, S)
        outs.append(num / ((fq * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2), S, z


def taylor_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: torch.Tensor, z0: torch.Tensor,
                   eps: float = 1e-6, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``taylor_reference`` in chunks of ``chunk_size`` tokens. Padded keys are masked out of (S, z)."""
    B, H, T, F_ = q.shape
    L = chunk_size
    valid = pad_time(torch.ones(T, dtype=q.dtype, device=q.device), L, dim=0)  # (T',): 0 on padding
    q, k, v = (pad_time(t, L, dim=2) for t in (q, k, v))
    nc = q.shape[2] // L
    q, k, v = (t.view(B, H, nc, L, -1) for t in (q, k, v))  # (B, H, nc, L, D)
    s = q @ k.transpose(-1, -2) / math.sqrt(F_)  # (B, H, nc, L, L)
    kern = (1 + s + 0.5 * s * s).tril()  # causal inside the chunk
    fq = taylor_features(q)  # (B, H, nc, L, D_phi)
    fk = taylor_features(k) * valid.view(nc, L, 1)
    S, z, outs = S0, z0, []
    for c in range(nc):  # the carried sums
        num = kern[:, :, c] @ v[:, :, c] + fq[:, :, c] @ S  # (B, H, L, V)
        den = kern[:, :, c].sum(-1) + torch.einsum("bhld,bhd->bhl", fq[:, :, c], z)  # (B, H, L)
        outs.append(num / (den[..., None] + eps))
        S = S + fk[:, :, c].transpose(-1, -2) @ v[:, :, c]
        z = z + fk[:, :, c].sum(2)
    return torch.stack(outs, dim=2).view(B, H, nc * L, -1)[:, :, :T], S, z


@dataclass
class TaylorState(State):
    """Taylor linear attention's sums: S (B, H, 1 + F + F^2, V) and z (B, H, 1 + F + F^2)."""

    S: torch.Tensor
    z: torch.Tensor
    pos: int = 0  # tokens read


class TaylorLinearAttention(nn.Module):
    """BASED's linear attention. x: (B, T, dim) -> (B, T, dim), with a carried ``TaylorState``.

        lin = TaylorLinearAttention(64, heads=4, feature_dim=16)
        y, state = lin(torch.randn(2, 100, 64))          # one pass (chunked)
        y2, state = lin(torch.randn(2, 10, 64), state)   # continues at token 100
    """

    def __init__(self, dim: int, *, heads: int = 4, feature_dim: int = 16, chunk_size: int = 64, eps: float = 1e-6,
                 impl: str = "chunked"):
        super().__init__()
        check_positive("TaylorLinearAttention", dim=dim, heads=heads, feature_dim=feature_dim, chunk_size=chunk_size)
        if dim % heads:
            raise ValueError(f"TaylorLinearAttention: heads={heads} must divide dim={dim}")
        self.heads, self.feature_dim, self.head_v = heads, feature_dim, dim // heads
        self.chunk_size, self.eps, self.impl = chunk_size, eps, check_impl("TaylorLinearAttention", impl)
        self.q_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = residual_output(nn.Linear(dim, dim, bias=False))

    @classmethod
    def from_config(cls, config) -> TaylorLinearAttention:
        return cls(config.d_model, heads=config.n_heads, feature_dim=config.feature_dim)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> TaylorState:
        D = 1 + self.feature_dim + self.feature_dim ** 2
        return TaylorState(torch.zeros(batch_size, self.heads, D, self.head_v, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.heads, D, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: TaylorState | None = None, *, impl: str | None = None):
        B, T, _ = x.shape
        impl = check_impl("TaylorLinearAttention", impl or self.impl)
        if state is None:
            state = self.init_state(B, x.device, torch.promote_types(x.dtype, torch.float32))
        dtype = torch.promote_types(x.dtype, torch.float32)
        q = self.q_proj(x).to(dtype).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, F)
        k = self.k_proj(x).to(dtype).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).to(dtype).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, V)
        S0, z0 = state.S.to(dtype), state.z.to(dtype)
        if impl == "chunked":
            o, S, z = taylor_chunked(q, k, v, S0, z0, self.eps, self.chunk_size)
        else:
            o, S, z = taylor_reference(q, k, v, S0, z0, self.eps)
        out = self.o_proj(o.transpose(1, 2).reshape(B, T, -1).to(x.dtype))
        return out, TaylorState(S.to(state.S.dtype), z.to(state.z.dtype), pos=state.pos + T)


@dataclass
class BasedState(State):
    """The BASED mixer's three sub-layers' states."""

    conv: ShortConvState
    linear: TaylorState
    attn: AttentionState


class Based(nn.Module):
    """The BASED mixer at the residual level: x += ShortConv(norm x); x += Taylor(norm x); x += SWA(norm x).
    x: (B, T, dim) -> (B, T, dim) (the residual stream), with a carried ``BasedState``.

        based = Based(64, heads=4, feature_dim=16, window=64)
        x, state = based(torch.randn(2, 100, 64))
        x2, state = based(torch.randn(2, 10, 64), state)
    """

    def __init__(self, dim: int, *, heads: int = 4, feature_dim: int = 16, conv_kernel: int = 3, window: int = 64,
                 kv_heads: int | None = None, n_persistent: int = 0, rope_theta: float = 10000.0, eps: float = 1e-5):
        super().__init__()
        self.conv = Residual(GatedShortConv(dim, kernel=conv_kernel), dim, eps)
        self.linear = Residual(TaylorLinearAttention(dim, heads=heads, feature_dim=feature_dim), dim, eps)
        self.attn = Residual(SlidingWindowAttention(dim, heads=heads, kv_heads=kv_heads, window=window,
                                                    n_persistent=n_persistent, rope_theta=rope_theta), dim, eps)

    @classmethod
    def from_config(cls, config) -> Based:
        c = config
        return cls(c.d_model, heads=c.n_heads, feature_dim=c.feature_dim, conv_kernel=c.short_conv, window=c.window,
                   kv_heads=c.n_kv_heads, n_persistent=c.n_persistent, rope_theta=c.rope_theta, eps=c.norm_eps)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> BasedState:
        return BasedState(*(m.init_state(batch_size, device, dtype) for m in (self.conv, self.linear, self.attn)))

    def forward(self, x: torch.Tensor, state: BasedState | None = None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        x, conv = self.conv(x, state.conv)
        x, linear = self.linear(x, state.linear)
        x, attn = self.attn(x, state.attn)
        return x, BasedState(conv, linear, attn)
