"""Gated DeltaNet: a linear matrix memory written by the gated delta rule (Yang, Kautz & Hatamizadeh
2024, arXiv 2412.06464, eqs. 8-10; the layer as flash-linear-attention's ``GatedDeltaNet``).

Per head, with a state S of (K, V) (keys -> values):
    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v));  q, k l2-normalised per head
    beta_t = sigmoid(x_t W_b)                                      write strength in (0, 1)
    g_t = -exp(A_log) * softplus(x_t W_a + dt_bias)                log-decay, < 0 (Mamba-2's gate)
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T       (gated delta rule)
    o_t = S_t^T q_t / sqrt(K)
    out = W_o(rmsnorm(o) * silu(x W_g))                            per head, gated after the norm

``gated_delta_reference`` is the rule token by token (fla's ``naive_recurrent_gated_delta_rule``);
``gated_delta_chunked`` is the chunked (WY) form: inside a chunk the writes are a unit lower-triangular
solve, across chunks the state is carried (fla's ``naive_chunk_gated_delta_rule``, with a triangular
solve, an initial state and any length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.layers import OwnInit, residual_output
from titans_lnn.mixers.common import causal_conv, check_impl, check_positive, depthwise_conv, pad_time
from titans_lnn.state import State


def gated_delta_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                          S0: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, one token at a time.

    q, k: (B, T, H, K); v: (B, T, H, V); beta, g: (B, T, H); S0: (B, H, K, V).
    Returns o (B, T, H, V) and the last state (B, H, K, V)."""
    S, outs = S0, []
    for t in range(q.shape[1]):
        S = S * torch.exp(g[:, t])[..., None, None]
        kt = k[:, t]  # (B, H, K)
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt)  # (B, H, V)
        S = S + beta[:, t, :, None, None] * kt[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(outs, dim=1), S


def gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                        S0: torch.Tensor, scale: float, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_delta_reference`` in chunks of ``chunk_size`` tokens (the same function for every chunk size).

    Inside a chunk, with cum the cumulative log-decay and Gm[i, j] = exp(cum_i - cum_j) (i >= j), the
    corrected values U = (I + strict_lower(diag(beta) K K^T * Gm))^-1 diag(beta) V and the decayed keys
    W = (...)^-1 diag(beta) diag(exp(cum)) K give the new values V' = U - W S and
        O = diag(exp(cum)) Q S + (Q K^T * Gm, lower with diagonal) V',
        S <- exp(cum_L) S + (diag(exp(cum_L - cum)) K)^T V'.
    Padded steps have k = 0, beta = 0 and g = 0: no write, no decay."""
    Bsz, T, H, Kd = q.shape
    L = chunk_size
    q, k, v = (pad_time(t.transpose(1, 2), L, dim=2) for t in (q * scale, k, v))  # (B, H, T', D)
    beta, g = (pad_time(t.transpose(1, 2), L, dim=2) for t in (beta, g))  # (B, H, T')
    nc = q.shape[2] // L
    q, k, v = (t.view(Bsz, H, nc, L, -1) for t in (q, k, v))  # (B, H, nc, L, D)
    beta, cum = beta.view(Bsz, H, nc, L), g.view(Bsz, H, nc, L).cumsum(-1)
    lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    Gm = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, -math.inf))  # (B, H, nc, L, L)
    kb = k * beta[..., None]
    Amat = (kb @ k.transpose(-1, -2) * Gm).tril(-1) + torch.eye(L, dtype=q.dtype, device=q.device)
    eye = torch.eye(L, dtype=q.dtype, device=q.device).expand_as(Amat)
    inv = torch.linalg.solve_triangular(Amat, eye, upper=False, unitriangular=True)  # (B, H, nc, L, L)
    U = inv @ (v * beta[..., None])  # (B, H, nc, L, V)
    W = inv @ (kb * torch.exp(cum)[..., None])  # (B, H, nc, L, K)
    qk = (q @ k.transpose(-1, -2)) * Gm  # (B, H, nc, L, L), lower with the diagonal (Gm is 0 above)
    S, outs = S0, []
    for c in range(nc):  # the carried state
        v_new = U[:, :, c] - W[:, :, c] @ S  # (B, H, L, V)
        outs.append((q[:, :, c] * torch.exp(cum[:, :, c])[..., None]) @ S + qk[:, :, c] @ v_new)
        last = cum[:, :, c, -1:]  # (B, H, 1)
        S = S * torch.exp(last)[..., None] + (k[:, :, c] * torch.exp(last - cum[:, :, c])[..., None]).transpose(
            -1, -2) @ v_new
    o = torch.stack(outs, dim=2).view(Bsz, H, nc * L, -1)[:, :, :T]  # (B, H, T, V)
    return o.transpose(1, 2), S


@dataclass
class GatedDeltaState(State):
    """Gated DeltaNet's state: the q/k/v convolutions' last inputs (B, K_conv - 1, width each) and the
    matrix memory S (B, H, K, V)."""

    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    S: torch.Tensor
    pos: int = 0  # tokens read


class GatedDeltaNet(OwnInit, nn.Module):
    """The Gated DeltaNet mixer. x: (B, T, dim) -> (B, T, dim), with a carried ``GatedDeltaState``.

        gdn = GatedDeltaNet(64, heads=4)
        y, state = gdn(torch.randn(2, 100, 64))          # one pass (chunked)
        y2, state = gdn(torch.randn(2, 10, 64), state)   # continues at token 100
    """

    def __init__(self, dim: int, *, heads: int = 4, head_dim: int | None = None, expand_v: int = 1,
                 conv_kernel: int = 4, chunk_size: int = 64, eps: float = 1e-5, impl: str = "chunked"):
        super().__init__()
        head_dim = dim // heads if head_dim is None and isinstance(heads, int) and heads > 0 else head_dim
        check_positive("GatedDeltaNet", dim=dim, heads=heads, head_dim=head_dim, expand_v=expand_v,
                       conv_kernel=conv_kernel, chunk_size=chunk_size)
        self.heads, self.head_k, self.head_v = heads, head_dim, head_dim * expand_v
        self.chunk_size, self.impl = chunk_size, check_impl("GatedDeltaNet", impl)
        key, value = heads * self.head_k, heads * self.head_v
        self.q_proj = nn.Linear(dim, key, bias=False)
        self.k_proj = nn.Linear(dim, key, bias=False)
        self.v_proj = nn.Linear(dim, value, bias=False)
        self.q_conv1d, self.k_conv1d = depthwise_conv(key, conv_kernel, False), depthwise_conv(key, conv_kernel, False)
        self.v_conv1d = depthwise_conv(value, conv_kernel, False)
        self.b_proj = nn.Linear(dim, heads, bias=False)
        self.a_proj = nn.Linear(dim, heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.g_proj = nn.Linear(dim, value, bias=False)
        self.o_norm = nn.RMSNorm(self.head_v, eps=eps)
        self.o_proj = residual_output(nn.Linear(value, dim, bias=False))
        self.reset_own_parameters()

    @classmethod
    def from_config(cls, config) -> GatedDeltaNet:
        c = config
        return cls(c.d_model, heads=c.n_heads, conv_kernel=c.conv_kernel, eps=c.norm_eps)

    def reset_own_parameters(self) -> None:
        """fla's init: A uniform in [0, 16] (decay rates), dt log-uniform in [1e-3, 0.1] as softplus^-1."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1e-4, 16).log())
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> GatedDeltaState:
        def conv(c: nn.Conv1d) -> torch.Tensor:
            return torch.zeros(batch_size, c.kernel_size[0] - 1, c.in_channels, device=device, dtype=dtype)

        S = torch.zeros(batch_size, self.heads, self.head_k, self.head_v, device=device, dtype=dtype)
        return GatedDeltaState(conv(self.q_conv1d), conv(self.k_conv1d), conv(self.v_conv1d), S)

    def forward(self, x: torch.Tensor, state: GatedDeltaState | None = None, *, impl: str | None = None):
        """x: (B, T, dim) continuing ``state``; ``impl`` forces "chunked" or "reference". Returns (B, T, dim)
        and the new state."""
        Bsz, T, _ = x.shape
        impl = check_impl("GatedDeltaNet", impl or self.impl)
        if state is None:
            state = self.init_state(Bsz, x.device, torch.promote_types(x.dtype, torch.float32))
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        q, cq = causal_conv(self.q_proj(x).to(dtype), self.q_conv1d, state.conv_q)
        k, ck = causal_conv(self.k_proj(x).to(dtype), self.k_conv1d, state.conv_k)
        v, cv = causal_conv(self.v_proj(x).to(dtype), self.v_conv1d, state.conv_v)
        q = F.normalize(F.silu(q).view(Bsz, T, self.heads, self.head_k), dim=-1)  # (B, T, H, K)
        k = F.normalize(F.silu(k).view(Bsz, T, self.heads, self.head_k), dim=-1)
        v = F.silu(v).view(Bsz, T, self.heads, self.head_v)  # (B, T, H, V)
        beta = torch.sigmoid(self.b_proj(x).to(dtype))  # (B, T, H)
        g = -torch.exp(self.A_log.to(dtype)) * F.softplus(self.a_proj(x).to(dtype) + self.dt_bias.to(dtype))
        S0, scale = state.S.to(dtype), self.head_k ** -0.5
        if impl == "chunked":
            o, S = gated_delta_chunked(q, k, v, beta, g, S0, scale, self.chunk_size)
        else:
            o, S = gated_delta_reference(q, k, v, beta, g, S0, scale)
        gate = self.g_proj(xf).view(Bsz, T, self.heads, self.head_v)
        o = (self.o_norm(o) * F.silu(gate)).reshape(Bsz, T, -1)
        new = GatedDeltaState(cq.to(state.conv_q.dtype), ck.to(state.conv_k.dtype), cv.to(state.conv_v.dtype),
                              S.to(state.S.dtype), pos=state.pos + T)
        return self.o_proj(o.to(x.dtype)), new
