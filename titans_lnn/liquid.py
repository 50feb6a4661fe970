"""The liquid core: a liquid time-constant recurrence solved in closed form and run in parallel.

The LTC ODE (Hasani et al. 2021) ``dh/dt = -(1/tau + f(x)) h + f(x) A``, with the conductance f and
the reversal potential A depending on the input only, has over a step of length dt with the input
held constant the exact solution (DESIGN.md)

    h_t = a_t * h_{t-1} + (1 - a_t) * g_t,    a_t = exp(-dt_t * lambda_t),
    lambda_t = 1/tau + f(x_t) > 0,            g_t = f(x_t) * A_t / lambda_t.

Per channel c of width D_l and state entry n of N (a state expansion, like Mamba's d_state):
    f_{t,c} = softplus(x_t W_f + b_f)          input-dependent conductance
    A_{t,c,n} = u_{t,c} * B_{t,n}               input-dependent reversal potential, u = x W_u, B = x W_B
    tau_{c,n}                                   learned, initialised log-uniform in [tau_min, tau_max]
    y_{t,c} = sum_n C_{t,n} h_{t,c,n} + D_c u_{t,c},   out = W_o (y * silu(x W_z))

A diagonal, input-dependent linear recurrence: ``kernels.liquid_scan`` runs it in parallel over
time, and the streaming state is h: (B, D_l * N). ``dt`` (B, T) gives per-token elapsed times for
irregularly sampled series (default 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.kernels import liquid_scan
from titans_lnn.layers import OwnInit, residual_output
from titans_lnn.state import LiquidState


class LiquidCore(OwnInit, nn.Module):
    """x: (B, T, dim) -> (B, T, dim), with a carried state h: (B, dim * expand * n_state).

        core = LiquidCore(64, n_state=8)
        y, state = core(torch.randn(2, 100, 64))           # one pass
        y2, state = core(torch.randn(2, 10, 64), state)    # continues; dt=(B, T) for irregular steps
    """

    def __init__(self, dim: int, *, expand: int = 1, n_state: int = 8, tau_min: float = 1.0, tau_max: float = 1000.0):
        super().__init__()
        for name, value in (("dim", dim), ("expand", expand), ("n_state", n_state)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LiquidCore: {name}={value!r} must be a positive integer")
        if not 0 < tau_min <= tau_max < float("inf"):
            raise ValueError(f"LiquidCore: tau_min={tau_min!r}, tau_max={tau_max!r}: expected 0 < tau_min <= tau_max, "
                             "both finite")
        self.width, self.n_state = dim * expand, n_state
        D, N = self.width, self.n_state
        self.w_in = nn.Linear(dim, 3 * D + 2 * N)  # u, f, z (D each), B, C (N each)
        self.log_tau = nn.Parameter(torch.empty(D, N))
        self.skip = nn.Parameter(torch.ones(D))
        self.w_out = residual_output(nn.Linear(D, dim, bias=False))
        self.tau_min, self.tau_max = tau_min, tau_max
        self.reset_own_parameters()

    @classmethod
    def from_config(cls, config) -> LiquidCore:
        c = config
        return cls(c.d_model, expand=c.liquid_expand, n_state=c.liquid_state, tau_min=c.liquid_tau_min,
                   tau_max=c.liquid_tau_max)

    def reset_own_parameters(self) -> None:
        """Time constants spread log-uniformly over [tau_min, tau_max] across the state entries, so
        that the core starts with both fast and slow memories; the conductance starts small
        (f ~ 0.01) so that the slow time constants are not drowned at initialisation."""
        D, N = self.width, self.n_state
        grid = torch.linspace(math.log(self.tau_min), math.log(self.tau_max), N)
        with torch.no_grad():
            self.log_tau.copy_(grid[None].expand(D, N) + 0.1 * torch.randn(D, N))
            self.w_in.bias.zero_()
            self.w_in.bias[D:2 * D].fill_(math.log(math.expm1(0.01)))

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> LiquidState:
        return LiquidState(torch.zeros(batch_size, self.width * self.n_state, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: LiquidState | None = None, *, dt: torch.Tensor | None = None,
                impl: str | None = None):
        B, T, _ = x.shape
        D, N = self.width, self.n_state
        if state is None:
            state = self.init_state(B, x.device, torch.promote_types(x.dtype, torch.float32))
        dtype = torch.promote_types(x.dtype, torch.float32)
        u, f, z, Bt, Ct = self.w_in(x).to(dtype).split([D, D, D, N, N], dim=-1)
        f = F.softplus(f)  # (B, T, D)
        # Five passes over (B, T, D, N), the widest tensors here, with the signs folded in (the same values,
        # bit for bit, as lam = 1/tau + f, log_a = -dt lam, b = (1 - a) g with 1 - a = -expm1(log_a)):
        neg_lam = -torch.exp(-self.log_tau.to(dtype)) - f[..., None]  # -lambda: (B, T, D, N)
        log_a = neg_lam if dt is None else dt.to(dtype)[..., None, None] * neg_lam
        neg_g = (f * u)[..., None] * Bt[:, :, None, :] / neg_lam  # -g = -f u B / lambda
        b = torch.expm1(log_a) * neg_g  # (1 - a) g, accurate when a is close to 1
        h, h_last = liquid_scan(log_a.reshape(B, T, D * N), b.reshape(B, T, D * N), state.h.to(dtype), impl=impl)
        y = torch.addcmul((h.view(B, T, D, N) * Ct[:, :, None, :]).sum(-1), self.skip, u)  # (B, T, D)
        out = self.w_out((y * F.silu(z)).to(x.dtype))
        return out, LiquidState(h_last.to(state.h.dtype, copy=True))  # a copy: a view of h would pin all of h
