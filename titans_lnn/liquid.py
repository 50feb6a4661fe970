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

How it runs: in blocks of about ``BLOCK`` state entries x tokens (2 MB), the state carried from block
to block, so that every elementwise pass stays in cache and tokens/s does not fall with T; without
autograd, into a workspace of buffers kept from call to call (no page faults per call); the state
entries n-major inside, so that broadcasts run along D. At width 128 and N = 1 the two matmuls
(131,584 FLOP per token, ~1.2 us at the ~106 GFLOP/s of one core here) are two thirds of the time left.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.kernels import dispatch, liquid_scan
from titans_lnn.kernels.liquid.chunked import liquid_scan_chunked_
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

    def __getstate__(self):
        """Pickles and copies leave out the no-grad path's workspace (scratch buffers, rebuilt on use)."""
        state = super().__getstate__()
        state.pop("_workspace", None)
        return state

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> LiquidState:
        return LiquidState(torch.zeros(batch_size, self.width * self.n_state, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: LiquidState | None = None, *, dt: torch.Tensor | None = None,
                impl: str | None = None):
        """x: (B, T, dim), dt: (B, T) or None (steps of 1) -> out: (B, T, dim), the state after x.

        The sequence runs in blocks of ``block_len`` tokens, the state carried from block to block (the
        same recurrence, so the same values): each block's (B, T_b, N, D) temporaries stay in cache, where
        the whole sequence's (64 MB each at T = 64K, N D = 1024) would be written to and read from memory
        once per elementwise pass. Without autograd (and past ``NO_GRAD_MIN`` elements) the blocks run
        in ``_forward_no_grad``; with it, in ``_block``, the same ops out of place.
        """
        B, T, _ = x.shape
        D, N = self.width, self.n_state
        dtype = torch.promote_types(x.dtype, torch.float32)
        if state is None:
            state = self.init_state(B, x.device, dtype)
        if dt is not None and dt.shape != (B, T):
            raise ValueError(f"LiquidCore: dt must be (B, T) = {(B, T)}; got {tuple(dt.shape)}")
        if T == 0:
            return x.new_zeros(x.shape), LiquidState(state.h.clone())
        # Inside, the state entries run n-major, (N, D): the (B, T, N, D) tensors then broadcast f, u over n
        # and B, C over channels with D contiguous (vectorised), where (B, T, D, N) has N = 8 innermost.
        h = state.h.to(dtype)
        if N > 1:
            h = h.view(B, D, N).transpose(1, 2).reshape(B, N * D)
        neg_inv_tau = -torch.exp(-self.log_tau.to(dtype)).t().contiguous()  # -1/tau: (N, D)
        if B * T * D * N >= NO_GRAD_MIN and self._no_grad_path(x, h, dt, impl):
            out, h = self._forward_no_grad(x, h, dt, neg_inv_tau)
        else:
            Tb = T if torch.compiler.is_compiling() else block_len(B, D * N, T, x.device)
            outs = []
            for t0 in range(0, T, Tb):
                out, h = self._block(x[:, t0:t0 + Tb], h, None if dt is None else dt[:, t0:t0 + Tb], neg_inv_tau,
                                     impl)
                outs.append(out)
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if N > 1:
            h = h.view(B, N, D).transpose(1, 2).reshape(B, D * N)  # back to the state's (D, N) order
        return out, LiquidState(h.to(state.h.dtype, copy=True))  # a copy: a view of h would pin all of h

    def _block(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor | None, neg_inv_tau: torch.Tensor,
               impl: str | None):
        """One block. x: (B, T, dim), h: (B, N D) entering (n-major), dt: (B, T) or None, neg_inv_tau:
        (N, D) -> out: (B, T, dim), h after the block: (B, N D)."""
        B, T, _ = x.shape
        D, N = self.width, self.n_state
        dtype = h.dtype
        u, f, z, Bt, Ct = self.w_in(x).to(dtype).split([D, D, D, N, N], dim=-1)
        f = F.softplus(f)  # (B, T, D)
        # Passes over (B, T, N, D), the widest tensors here, with the signs folded in (the same values,
        # bit for bit, as lam = 1/tau + f, log_a = -dt lam, b = (1 - a) g with 1 - a = -expm1(log_a); at
        # N > 1 with unit steps, expm1(log_a) by parts, to a few ulps: _a_minus_one):
        neg_lam = neg_inv_tau - f[:, :, None, :]  # -lambda: (B, T, N, D)
        log_a = neg_lam if dt is None else dt.to(dtype)[..., None, None] * neg_lam
        em1 = _a_minus_one(log_a, f, neg_inv_tau, dt)  # a - 1, accurate when a is close to 1
        b = (f * u)[:, :, None, :] * Bt[..., None]  # -g * -lambda = f u B: (B, T, N, D)
        b = b.div_(neg_lam).mul_(em1) if not b.requires_grad else b / neg_lam * em1  # (1 - a) g
        log_a, b = log_a.reshape(B, T, N * D), b.reshape(B, T, N * D)
        if b.requires_grad or h.requires_grad or torch.compiler.is_compiling() or \
                dispatch.resolve("liquid_scan", impl, b.is_cuda) != "torch":
            h, _ = liquid_scan(log_a, b, h, impl=impl)
        else:  # no gradient: the decays from expm1 (no exp pass), h written over b
            h = liquid_scan_chunked_(log_a, em1.add_(1).view(B, T, N * D), b, h)
        hv = h.view(B, T, N, D)
        if N == 1:
            y = torch.addcmul(self.skip * u, hv[:, :, 0], Ct)
        else:  # sum_n C_n h_n as (1, N) @ (N, D) per token (4.5x faster than a product and a sum, fwd+bwd)
            y = torch.addcmul(torch.bmm(Ct.reshape(B * T, 1, N), hv.reshape(B * T, N, D)).view(B, T, D), self.skip, u)
        out = self.w_out((y * F.silu(z)).to(x.dtype))
        return out, h[:, -1]

    def _no_grad_path(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor | None, impl: str | None) -> bool:
        """Whether ``_forward_no_grad`` may run: no gradient wanted, the chunked PyTorch scan chosen, not
        under torch.compile (which sees the registered op instead), one floating dtype throughout."""
        if torch.compiler.is_compiling() or dispatch.resolve("liquid_scan", impl, x.is_cuda) != "torch":
            return False
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, *params, *([] if dt is None else [dt]))):
            return False
        return h.dtype in (torch.float32, torch.float64) and all(t.dtype == h.dtype for t in (x, *params))

    def _forward_no_grad(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor | None, neg_inv_tau: torch.Tensor):
        """The forward for inference: the same ops as ``_block`` (the same values), written with ``out=``
        and in place into buffers that a workspace keeps from block to block and from call to call.
        Fresh tensors of a few MB per block, freed and allocated again, cost as much as the arithmetic
        (the allocator returns the pages to the system and takes them back: page faults, measured). The
        workspace is taken off the module for the call, so that a concurrent call builds its own.
        x: (B, T, dim), h: (B, N D) -> out: (B, T, dim), h after x: (B, N D)."""
        B, T, dim = x.shape
        Tb = block_len(B, self.width * self.n_state, T, x.device)
        ws = self.__dict__.pop("_workspace", None) or {}
        out = x.new_empty(B, T, dim)
        for t0 in range(0, T, Tb):
            h = self._block_no_grad(x[:, t0:t0 + Tb], h, None if dt is None else dt[:, t0:t0 + Tb], neg_inv_tau,
                                    out[:, t0:t0 + Tb], ws)
        self._workspace = ws
        return out, h

    def _block_no_grad(self, x, h, dt, neg_inv_tau, out, ws) -> torch.Tensor:
        """``_block`` into buffers of ``ws``: x: (B, T, dim), out: (B, T, dim) written; returns h after."""
        B, T, dim = x.shape
        D, N = self.width, self.n_state
        P = 3 * D + 2 * N
        x2 = x.reshape(B * T, dim) if x.is_contiguous() else _buffer(ws, "x", (B * T, dim), x).copy_(x.flatten(0, 1))
        proj = _buffer(ws, "proj", (B, T, P), x)
        torch.addmm(self.w_in.bias, x2, self.w_in.weight.t(), out=proj.view(B * T, P))  # = self.w_in(x)
        u, f, z, Bt, Ct = proj.split([D, D, D, N, N], dim=-1)
        f = torch.ops.aten.softplus.out(f, 1, 20, out=_buffer(ws, "f", (B, T, D), x))  # = F.softplus(f)
        neg_lam = torch.sub(neg_inv_tau, f[:, :, None, :], out=_buffer(ws, "neg_lam", (B, T, N, D), x))
        log_a = neg_lam if dt is None else torch.mul(dt.to(h.dtype)[..., None, None], neg_lam,
                                                     out=_buffer(ws, "log_a", (B, T, N, D), x))
        em1 = _a_minus_one(log_a, f, neg_inv_tau, dt, out=_buffer(ws, "a", (B, T, N, D), x),
                           tmp=_buffer(ws, "fu", (B, T, D), x))
        fu = torch.mul(f, u, out=_buffer(ws, "fu", (B, T, D), x))
        b = torch.mul(fu[:, :, None, :], Bt[..., None], out=_buffer(ws, "b", (B, T, N, D), x))
        b.div_(neg_lam).mul_(em1)
        hv = liquid_scan_chunked_(log_a.view(B, T, N * D), em1.add_(1).view(B, T, N * D), b.view(B, T, N * D),
                                  h).view(B, T, N, D)  # h over b
        y = _buffer(ws, "y", (B, T, D), x)
        if N == 1:
            torch.mul(self.skip, u, out=y).addcmul_(hv[:, :, 0], Ct)
        else:  # sum_n C_n h_n as (1, N) @ (N, D) per token: one pass (a product and a sum were two)
            torch.bmm(Ct.reshape(B * T, 1, N), hv.view(B * T, N, D), out=y.view(B * T, 1, D)).view(B, T, D)
            y.addcmul_(self.skip, u)
        g = y.mul_(F.silu(z, inplace=True)).view(B * T, D)
        if out.is_contiguous():
            torch.mm(g, self.w_out.weight.t(), out=out.view(B * T, dim))
        else:  # a block of a batch of rows: (B, T, dim) strided in the output
            out.copy_(torch.mm(g, self.w_out.weight.t(), out=_buffer(ws, "out", (B * T, dim), x)).view(B, T, dim))
        return hv[:, -1].reshape(B, N * D).clone()  # a copy: the buffer is written again by the next block


def _a_minus_one(log_a: torch.Tensor, f: torch.Tensor, neg_inv_tau: torch.Tensor, dt: torch.Tensor | None, *,
                 out: torch.Tensor | None = None, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """a - 1 = expm1(log_a): (B, T, N, D), from log_a (B, T, N, D), f (B, T, D), neg_inv_tau (N, D).

    With unit steps and N > 1, log_a = x + y with x = -1/tau (N, D) and y = -f (B, T, D), and
    expm1(x + y) = expm1(x) + exp(x) expm1(y): one expm1 over (B, T, D) instead of N of them over
    (B, T, N, D) (the most expensive pass of the core at N = 8), for inputs of 16K elements or more.
    Both terms are <= 0, so nothing cancels: a few ulps, as expm1 of the rounded sum is. ``out``
    (B, T, N, D) and ``tmp`` (B, T, D): buffers to write into (no autograd)."""
    if dt is not None or log_a.shape[2] == 1 or log_a.numel() < 1 << 14:  # (small: the 5 ops cost more than N)
        return torch.expm1(log_a) if out is None else torch.expm1(log_a, out=out)
    if out is None:
        return torch.addcmul(torch.expm1(neg_inv_tau), torch.exp(neg_inv_tau), torch.expm1(-f)[:, :, None, :])
    em1_f = torch.neg(f, out=tmp).expm1_()[:, :, None, :]
    return torch.addcmul(torch.expm1(neg_inv_tau), torch.exp(neg_inv_tau), em1_f, out=out)


def _buffer(ws: dict, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` (uninitialised) from the workspace ``ws``, reused while large enough (and not
    an inference tensor outside inference mode, where torch forbids writing into one)."""
    n = math.prod(shape)
    buf = ws.get(name)
    if (buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device
            or (buf.is_inference() and not torch.is_inference_mode_enabled())):
        buf = ws[name] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


NO_GRAD_MIN = 1 << 16  # (B, T, N, D) elements from which the workspace pays (smaller tensors come from the heap)
BLOCK = 1 << 19  # (B, T_b, N, D) elements per block: 2 MB in fp32, in cache (measured, 2^16 to 2^21)
MIN_BLOCK = 16  # tokens at least, when B N D alone passes BLOCK (wide batches): every op still spans B N D elements


def block_len(B: int, states: int, T: int, device: torch.device) -> int:
    """Tokens per block for B rows of ``states`` (N D) state entries: BLOCK elements, at least
    MIN_BLOCK tokens, at most T. Off the CPU one block: the blocks are for CPU caches, and a GPU
    wants few, large launches."""
    if device.type != "cpu":
        return max(1, T)
    return max(1, min(T, max(MIN_BLOCK, BLOCK // (B * states))))
