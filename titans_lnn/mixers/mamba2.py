"""Mamba-2's selective state-space mixer, the SSD layer (Dao & Gu 2024, arXiv 2405.21060, sec. 7-8).

Per head h (width P) with a scalar decay and a state of N entries per channel:
    z, xBC, dt = x W_in                                    gate, conv input, time steps (one per head)
    x, B, C = silu(conv(xBC))                              depthwise causal convolution of width K
    dt_t = softplus(dt_t + dt_bias),   A = -exp(A_log)     input-dependent step, negative decay rate
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T             (P, N) per head; B, C shared by a group of heads
    y_t = h_t C_t + D x_t
    out = W_out(rmsnorm_g(y * silu(z)))                    grouped RMSNorm after the gate (norm_before_gate=False)

``ssd_reference`` is the recurrence token by token (the specification); ``ssd_chunked`` is the
state-space dual: inside a chunk a masked, decayed attention C_i B_j^T exp(cum_i - cum_j), across
chunks the carried state (the published ``ssd_minimal``, with an initial state and a loop over
chunks instead of its chunks x chunks matrix, so that long inputs cost linear memory). The
parameter names and layout are HF transformers' ``Mamba2Mixer``'s, so its weights load as they are.
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


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, G, N) group tensors -> (B, T, H, N): each group's B or C serves H / G consecutive heads."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence, one token at a time.

    x: (B, T, H, P); dt: (B, T, H) (after softplus, > 0); A: (H,) (< 0); B, C: (B, T, G, N), G | H;
    h0: (B, H, P, N). Returns y (B, T, H, P) (without the D skip) and the last state (B, H, P, N)."""
    H = x.shape[2]
    B, C = _per_head(B, H), _per_head(C, H)
    h, ys = h0, []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)  # (B, H)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))  # (B, H, P)
    return torch.stack(ys, dim=1), h


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h0: torch.Tensor, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_reference`` in chunks of ``chunk_size`` tokens (the same function for every chunk size).
    Padded steps have dt = 0: no decay and no input, so they leave the state as it was."""
    Bsz, T, H, P = x.shape
    L = chunk_size
    B, C = _per_head(B, H), _per_head(C, H)
    a = pad_time(dt * A, L)  # (B, T', H): log decays, <= 0
    nc = a.shape[1] // L
    a = a.view(Bsz, nc, L, H)
    xdt = pad_time(x * dt[..., None], L).view(Bsz, nc, L, H, P)
    B = pad_time(B, L).view(Bsz, nc, L, H, -1)  # (B, nc, L, H, N)
    C = pad_time(C, L).view(Bsz, nc, L, H, -1)
    cum = a.cumsum(2)  # (B, nc, L, H)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    diff = (cum[:, :, :, None] - cum[:, :, None]).masked_fill(~causal[:, :, None], -math.inf)  # (B, nc, L, L, H)
    scores = torch.einsum("bcihn,bcjhn->bcijh", C, B) * torch.exp(diff)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xdt)  # inside each chunk
    to_end = torch.exp(cum[:, :, -1:] - cum)  # (B, nc, L, H): decay from each token to its chunk's end
    chunk_states = torch.einsum("bcjhn,bcjh,bcjhp->bchpn", B, to_end, xdt)  # (B, nc, H, P, N)
    chunk_decay = torch.exp(cum[:, :, -1])  # (B, nc, H)
    h, entering = h0, []
    for c in range(nc):  # the carried state: one small update per chunk
        entering.append(h)
        h = chunk_decay[:, c, :, None, None] * h + chunk_states[:, c]
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", C, torch.stack(entering, 1), torch.exp(cum))
    return y.reshape(Bsz, nc * L, H, P)[:, :T], h


@dataclass
class Mamba2State(State):
    """Mamba-2's state: the convolution's last inputs (B, K - 1, conv_dim) and the SSM state (B, H, P, N)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    pos: int = 0  # tokens read


class GatedGroupRMSNorm(nn.Module):
    """y = rmsnorm over groups of (x * silu(z)) * weight: Mamba-2's output norm (HF ``MambaRMSNormGated``)."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = x * F.silu(z)
        g = h.view(*h.shape[:-1], self.groups, -1)  # (..., G, dim / G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.flatten(-2) * self.weight


class Mamba2(OwnInit, nn.Module):
    """The Mamba-2 (SSD) mixer. x: (B, T, dim) -> (B, T, dim), with a carried ``Mamba2State``.

        mamba = Mamba2(64, state_size=16, expand=2, head_dim=16)
        y, state = mamba(torch.randn(2, 100, 64))          # one pass (chunked SSD)
        y2, state = mamba(torch.randn(2, 10, 64), state)   # continues at token 100
        y_ref, _ = mamba(torch.randn(2, 7, 64), impl="reference")  # token by token
    """

    def __init__(self, dim: int, *, state_size: int = 16, expand: int = 2, head_dim: int = 16, n_groups: int = 1,
                 conv_kernel: int = 4, chunk_size: int = 64, eps: float = 1e-5, dt_min: float = 1e-3,
                 dt_max: float = 0.1, impl: str = "chunked"):
        super().__init__()
        check_positive("Mamba2", dim=dim, state_size=state_size, expand=expand, head_dim=head_dim, n_groups=n_groups,
                       conv_kernel=conv_kernel, chunk_size=chunk_size)
        inner = dim * expand
        if inner % head_dim:
            raise ValueError(f"Mamba2: head_dim={head_dim} must divide the inner width dim * expand = {inner}")
        heads = inner // head_dim
        if heads % n_groups:
            raise ValueError(f"Mamba2: n_groups={n_groups} must divide the number of heads {heads}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: dt_min={dt_min!r}, dt_max={dt_max!r}: expected 0 < dt_min <= dt_max")
        self.dim, self.inner, self.heads, self.head_dim = dim, inner, heads, head_dim
        self.state_size, self.n_groups, self.chunk_size = state_size, n_groups, chunk_size
        self.dt_min, self.dt_max, self.impl = dt_min, dt_max, check_impl("Mamba2", impl)
        self.conv_dim = inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(dim, inner + self.conv_dim + heads, bias=False)  # z | x B C | dt
        self.conv1d = depthwise_conv(self.conv_dim, conv_kernel)
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GatedGroupRMSNorm(inner, n_groups, eps)
        self.out_proj = residual_output(nn.Linear(inner, dim, bias=False))
        self.reset_own_parameters()

    @classmethod
    def from_config(cls, config) -> Mamba2:
        c = config
        return cls(c.d_model, state_size=c.ssm_state, expand=c.ssm_expand, head_dim=c.ssm_head_dim,
                   conv_kernel=c.conv_kernel, eps=c.norm_eps)

    def reset_own_parameters(self) -> None:
        """mamba_ssm's init: A uniform in [1, 16] (decay rates), dt log-uniform in [dt_min, dt_max] stored
        as softplus^-1 in dt_bias, D = 1."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D.fill_(1.0)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> Mamba2State:
        K = self.conv1d.kernel_size[0]
        return Mamba2State(torch.zeros(batch_size, K - 1, self.conv_dim, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.heads, self.head_dim, self.state_size, device=device,
                                       dtype=dtype))

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None, *, impl: str | None = None):
        """x: (B, T, dim) continuing ``state``; ``impl`` forces "chunked" or "reference" (default: the
        constructor's). Returns (B, T, dim) and the new state."""
        Bsz, T, _ = x.shape
        impl = check_impl("Mamba2", impl or self.impl)
        if state is None:
            state = self.init_state(Bsz, x.device, torch.promote_types(x.dtype, torch.float32))
        dtype = torch.promote_types(x.dtype, torch.float32)
        z, xBC, dt = self.in_proj(x).to(dtype).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xBC, conv = causal_conv(xBC, self.conv1d, state.conv)
        GN = self.n_groups * self.state_size
        xs, Bm, Cm = F.silu(xBC).split([self.inner, GN, GN], dim=-1)
        dt = F.softplus(dt + self.dt_bias.to(dtype))  # (B, T, H)
        A = -torch.exp(self.A_log.to(dtype))  # (H,)
        xs = xs.view(Bsz, T, self.heads, self.head_dim)  # (B, T, H, P)
        Bm, Cm = Bm.view(Bsz, T, self.n_groups, -1), Cm.view(Bsz, T, self.n_groups, -1)  # (B, T, G, N)
        h0 = state.ssm.to(dtype)
        if impl == "chunked":
            y, h = ssd_chunked(xs, dt, A, Bm, Cm, h0, self.chunk_size)
        else:
            y, h = ssd_reference(xs, dt, A, Bm, Cm, h0)
        y = (y + self.D.to(dtype)[:, None] * xs).reshape(Bsz, T, self.inner)
        out = self.out_proj(self.norm(y, z).to(x.dtype))
        return out, Mamba2State(conv.to(state.conv.dtype), h.to(state.ssm.dtype), pos=state.pos + T)
