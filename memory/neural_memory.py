"""The Titans neural long-term memory as a module (Behrouz et al. 2025, sections 3.1 and 4.4).

    x_t <- RMSNorm(x_t)    (MAC writes attention outputs, whose scale is arbitrary)
    q_t = l2norm(silu(conv(x_t W_Q))),  k_t = l2norm(silu(conv(x_t W_K))),  v_t = silu(conv(x_t W_V))
    theta_t = max_lr * sigmoid(x_t w_theta)   (write_gate "sigmoid", the paper's)
            = max_lr * clamp(x_t w_theta, 0, 1)   (write_gate "relu": exactly 0 on the tokens it learns to skip)
    theta_t <- 0 where theta_t < write_threshold * max_lr   (write_threshold > 0: skipped exactly)
    eta_t = sigmoid(x_t w_eta),  alpha_t = max_forget * sigmoid(x_t w_alpha)
    (gate_context: the gates read silu(conv(x W_K)), the key's local context, instead of x_t alone;
     a gate that sees one byte writes every space of the filler if it writes the needle's spaces)
    (S, W) <- the momentum/forgetting update of ||M_W(k_t) - v_t||^2, each token's gradient clipped
              to max_grad_norm, chunked (kernels.memory_update); with stable_step (the default) theta_t
              is first bounded by the curvature so that the inner descent never amplifies a
              perturbation of its weights (issue 17; the rule is in kernels/titans_memory/naive.py).
              For depth >= 2 the bound counts the Hessian's indefinite residual term too (the
              r^T grad^2 M saddle, large where values are unpredictable: on random bytes the tiny
              MAC's perturbation grew 57x in 16K tokens with the Gauss-Newton part alone)
    out_t = W_O (norm(M_{W_t}(q_t)) * sigmoid(x_t W_G))

Why a gate that reaches 0: every write moves the weights, so a needle written once fades with every
later write whose key overlaps its own (roughly exp(-N theta / d) after N writes with unit keys in
d dimensions). A sigmoid gate never writes exactly nothing; after a million filler tokens even
theta ~ 0.01 has erased the needle. A clamped-linear gate writes exactly nothing on the tokens where
its logit is negative, so what it skips costs the memory nothing, however long the text (the
gradient passes straight through below 0, so a skipped token can learn to be written again; the
selective step of Mamba, arXiv 2312.00752 sec. 4.1, and ARMT's sparse writes, arXiv 2407.04841).
``last_theta`` keeps the last call's gates (B, H, T), for a sparsity penalty in training and for
diagnostics (which tokens were written); for the relu gate without the straight-through path.

Per head; every head is an independent memory (an MLP of depth L_M, learned initial weights).
Usable on its own: ``NeuralMemory(dim=256, heads=4)(x)`` or with a carried ``state``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.kernels import memory_update
from titans_lnn.kernels.titans_memory import mlp_forward
from titans_lnn.kernels.titans_memory.chunked import unit_rows
from titans_lnn.layers import CausalConv, OwnInit, RMSNorm, causal_conv, residual_output
from titans_lnn.state import MemoryState


def _conv_forward(x, state, weight, bias):
    """``layers.causal_conv`` on xx = [state, x] (the same values; the K shifted products in place after the
    first). x: (B, T, D), state: (B, K-1, D), weight: (D, 1, K), bias: (D,) -> (y (B, T, D), xx)."""
    K, T = weight.shape[-1], x.shape[1]
    xx = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+T, D)
    if T <= 32:
        return causal_conv(xx, weight, bias), xx
    wt = weight[:, 0].t().contiguous()  # (K, D); contiguous: ``layers.causal_conv`` says why
    y = torch.addcmul(bias, xx[:, :T], wt[0])
    for j in range(1, K):
        y.addcmul_(xx[:, j:j + T], wt[j])
    return y, xx


def _conv_silu_heads(x, state, weight, bias, heads):
    """silu(``_conv_forward``) split in three and in heads: x (B, T, 3 D) -> (y (B, T, 3 D) before the silu,
    xx, out (3, B, heads, T, D / heads) contiguous: q, k, v each a contiguous (B, H, T, d))."""
    y, xx = _conv_forward(x, state, weight, bias)
    B, T, C = y.shape
    out = torch.empty(3, B, heads, T, C // (3 * heads), dtype=y.dtype, device=y.device)
    torch.ops.aten.silu.out(_heads_view(y, heads), out=out)
    return y, xx, out


def _heads_view(t, heads):
    """(B, T, 3 D) -> the (3, B, heads, T, D / heads) view of it."""
    B, T, C = t.shape
    return t.view(B, T, 3, heads, C // (3 * heads)).permute(2, 0, 3, 1, 4)


def _qkv_conv(x, state, weight, bias, heads):
    """q, k, v = silu(causal conv of [state, x]) in heads, (B, H, T, d) each, and the new state (B, K-1, 3 D):
    ``_QKVConv`` where a gradient is wanted, else its forward alone; plain autograd ops under torch.compile
    (dynamo traces neither ``out=`` views nor the hand-written backward)."""
    if torch.compiler.is_compiling():
        y, xx = _conv_forward(x, state, weight, bias)
        q, k, v = _heads_view(F.silu(y), heads).unbind(0)
        return q.contiguous(), k.contiguous(), v.contiguous(), xx[:, x.shape[1]:]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, state, weight, bias)):
        return _QKVConv.apply(x, state, weight, bias, heads)
    _, xx, out = _conv_silu_heads(x, state, weight, bias, heads)
    return (*out.unbind(0), xx[:, x.shape[1]:].clone())


class _QKVConv(torch.autograd.Function):
    """The memory's q, k and v convolutions run as one (3 D channels: ``layers.causal_conv`` on [state, x],
    the same values), their silu, and the split into q, k, v in heads, with a hand-written backward.
    Autograd's backward of these costs ~6 K ops on the whole tensor plus K zero-filled slice gradients, a
    concatenation of the three gradients and their transposes out of the head layout; this one writes silu's
    gradient straight into one buffer and takes 2 K + 2 more ops. x: (B, T, 3 D), state: (B, K-1, 3 D) (the
    K-1 earlier inputs), weight: (3 D, 1, K), bias: (3 D,) -> q, k, v (B, heads, T, D / heads) contiguous,
    and the new state: the last K-1 inputs (B, K-1, 3 D), a copy."""

    @staticmethod
    def forward(ctx, x, state, weight, bias, heads):
        y, xx, out = _conv_silu_heads(x, state, weight, bias, heads)
        ctx.save_for_backward(xx, weight, y)
        ctx.heads, ctx.dtypes = heads, (x.dtype, state.dtype, weight.dtype, bias.dtype)
        ctx.set_materialize_grads(False)  # an output that the loss does not read gets None, not zeros
        return (*out.unbind(0), xx[:, x.shape[1]:].clone())

    @staticmethod
    def backward(ctx, gq, gk, gv, g_state):
        xx, weight, y = ctx.saved_tensors
        K, T = weight.shape[-1], y.shape[1]
        gy = torch.empty_like(y)  # the gradient of the convolution's output, through silu
        for g, gpart, ypart in zip((gq, gk, gv), _heads_view(gy, ctx.heads), _heads_view(y, ctx.heads)):
            if g is None:
                gpart.zero_()
            else:
                torch.ops.aten.silu_backward.grad_input(g, ypart, grad_input=gpart)
        wt = weight[:, 0].t().contiguous()  # (K, 3 D)
        # In gy's dtype (y's: x, state and the weights promoted), each gradient cast to its input's at the end.
        gxx = torch.empty(xx.shape, dtype=gy.dtype, device=gy.device)  # row s gets sum_j gy[s - j] w_j
        torch.mul(gy, wt[K - 1], out=gxx[:, K - 1:])
        gxx[:, :K - 1].zero_()
        for j in range(K - 1):
            gxx[:, j:j + T].addcmul_(gy, wt[j])
        if g_state is not None:
            gxx[:, T:] += g_state
        gw = torch.empty(wt.shape, dtype=gy.dtype, device=gy.device)  # (K, 3 D): sum_(b, t) gy[b, t] xx[b, t + j]
        prod = torch.empty_like(gy)
        for j in range(K):
            torch.sum(torch.mul(gy, xx[:, j:j + T], out=prod), dim=(0, 1), out=gw[j])
        x_dtype, state_dtype, w_dtype, b_dtype = ctx.dtypes
        g_s = gxx[:, :K - 1].to(state_dtype) if ctx.needs_input_grad[1] else None
        return gxx[:, K - 1:].to(x_dtype), g_s, gw.t()[:, None].to(w_dtype), gy.sum((0, 1)).to(b_dtype), None


class _RMSNorm(torch.autograd.Function):
    """``RMSNorm`` for float32/64 (the same values: x rsqrt(mean(x^2) + eps) g) with a hand-written backward
    (6 ops on the whole tensor where autograd takes about 10). x: (..., D), weight: (D,); ``empty``: makes
    the uninitialised output of x's shape (any strides: a transposed one saves a copy later)."""

    @staticmethod
    def forward(ctx, x, weight, eps, empty):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return torch.mul(xhat, weight, out=empty())

    @staticmethod
    def backward(ctx, g):
        xhat, r, weight = ctx.saved_tensors
        gw = (g * xhat).sum(tuple(range(g.dim() - 1)))
        gh = g * weight
        dot = (gh * xhat).mean(-1, keepdim=True)  # (..., 1)
        return torch.addcmul(gh, xhat, dot, value=-1).mul_(r), gw, None, None


def _rms_norm(norm: RMSNorm, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``norm(x)`` through ``_RMSNorm`` for float32/64 x and weight of one dtype (other dtypes through the
    module). ``transposed``: x is (B, H, T, d) and the result a (B, H, T, d) view of a (B, T, H, d) tensor."""
    if x.dtype not in (torch.float32, torch.float64) or norm.weight.dtype != x.dtype or torch.compiler.is_compiling():
        return norm(x)  # (the module under torch.compile: dynamo traces neither out= views nor the backward)

    def empty():
        if transposed:
            B, H, T, d = x.shape
            return torch.empty(B, T, H, d, dtype=x.dtype, device=x.device).transpose(1, 2)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        return _RMSNorm.apply(x, norm.weight, norm.eps, empty)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return torch.mul(x * r, norm.weight, out=empty())


class NeuralMemory(OwnInit, nn.Module):
    """x: (B, T, dim) -> (B, T, dim), with a carried ``MemoryState`` (per memory layer the weights,
    momentum and chunk anchor, (B, heads, out_l, in_l); the convolutions' last inputs; the tokens
    written, which fix where a call starts in its chunk).

        mem = NeuralMemory(64, heads=2, depth=2, chunk_size=16)
        y, state = mem(torch.randn(2, 100, 64))           # write and read, token by token
        y2, state = mem(torch.randn(2, 10, 64), state)    # continues at token 100
        state.weights                                      # the memory itself, one tensor per layer
    """

    def __init__(self, dim: int, *, heads: int = 4, depth: int = 2, hidden_mult: float = 2.0, chunk_size: int = 16,
                 max_lr: float = 0.2, max_forget: float = 1.0, max_grad_norm: float | None = 2.0,
                 conv_kernel: int = 4, stable_step: bool = True, write_gate: str = "sigmoid",
                 write_threshold: float = 0.0, gate_context: bool = False, eps: float = 1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"NeuralMemory: heads={heads} must divide dim={dim}")
        if depth < 1 or chunk_size < 1:
            raise ValueError(f"NeuralMemory: depth={depth} and chunk_size={chunk_size} must be >= 1")
        self.dim, self.heads, self.depth, self.chunk_size, self.max_lr = dim, heads, depth, chunk_size, max_lr
        if not 0 <= max_forget <= 1:
            raise ValueError(f"NeuralMemory: max_forget={max_forget} must be in [0, 1]")
        if write_gate not in ("sigmoid", "relu"):
            raise ValueError(f"NeuralMemory: write_gate={write_gate!r} must be 'sigmoid' or 'relu'")
        self.max_grad_norm, self.max_forget, self.stable_step = max_grad_norm, max_forget, stable_step
        if not 0 <= write_threshold < 1:
            raise ValueError(f"NeuralMemory: write_threshold={write_threshold} must be in [0, 1)")
        self.write_gate, self.write_threshold, self.gate_context = write_gate, write_threshold, gate_context
        self.last_theta: torch.Tensor | None = None
        d = dim // heads
        hidden = max(1, int(d * hidden_mult))
        self.layer_shapes = [(d, d)] if depth == 1 else [(hidden, d)] + [(hidden, hidden)] * (depth - 2) + [(d, hidden)]
        self.norm_in = RMSNorm(dim, eps)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.convs = nn.ModuleList([CausalConv(dim, conv_kernel) for _ in range(3)])  # q, k, v
        self.w_gates = nn.Linear(dim, 3 * heads)  # theta, eta, alpha logits per head
        self.init_weights_ = nn.ParameterList([nn.Parameter(torch.empty(heads, o, i)) for o, i in self.layer_shapes])
        self.norm = RMSNorm(d, eps)
        self.w_gate_out = nn.Linear(dim, dim, bias=False)
        self.wo = residual_output(nn.Linear(dim, dim, bias=False))
        self.reset_own_parameters()

    @classmethod
    def from_config(cls, config) -> NeuralMemory:
        c = config
        return cls(c.d_model, heads=c.mem_heads, depth=c.mem_depth, hidden_mult=c.mem_hidden_mult,
                   chunk_size=c.mem_chunk, max_lr=c.mem_max_lr, max_forget=c.mem_max_forget,
                   max_grad_norm=c.mem_max_grad_norm, conv_kernel=c.conv_kernel, stable_step=c.mem_stable_step,
                   write_gate=c.mem_write_gate, write_threshold=c.mem_write_threshold,
                   gate_context=c.mem_gate_context, eps=c.norm_eps)

    def reset_own_parameters(self) -> None:
        """Initial memory: small random first layers and a zero last layer when L_M >= 2 (so M starts
        as the identity through its residual); gates start at a small learning rate (theta ~ 0.1
        max_lr; the relu gate writes every token at first, ~0.1 max_lr plus noise), strong momentum
        (eta ~ 0.9) and slow forgetting (alpha ~ 0.01)."""
        for i, w in enumerate(self.init_weights_):
            if self.depth > 1 and i == self.depth - 1:
                nn.init.zeros_(w)
            else:
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))
        with torch.no_grad():
            bias = self.w_gates.bias.view(3, self.heads)
            bias[0].fill_(math.log(0.1 / 0.9) if self.write_gate == "sigmoid" else 0.1)
            bias[1].fill_(math.log(0.9 / 0.1))
            bias[2].fill_(math.log(0.01 / 0.99))

    # State.
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> MemoryState:
        w0 = tuple(w.detach().to(device=device, dtype=dtype)[None].expand(batch_size, -1, -1, -1).clone()
                   for w in self.init_weights_)
        spent = None
        if self.stable_step:  # the steps taken in the current chunk, by key (kernels.memory_update, stable=True)
            d = self.layer_shapes[0][1]
            spent = torch.zeros(batch_size, self.heads, d, d, device=device, dtype=dtype)
        conv_q, conv_k, conv_v = (conv.init_state(batch_size, device, dtype) for conv in self.convs)
        return MemoryState(weights=w0, momentum=tuple(torch.zeros_like(w) for w in w0),
                           anchor=tuple(w.clone() for w in w0), spent=spent, conv_q=conv_q, conv_k=conv_k,
                           conv_v=conv_v, fresh=torch.ones(batch_size, device=device, dtype=dtype))

    def _as_learned(self, state: MemoryState, weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``weights`` of ``state``, except that a fresh state's are the learned initial memory itself
        (so that its gradient reaches the parameters)."""
        if (not torch.is_grad_enabled() and state.fresh.device.type == "cpu" and not torch.compiler.is_compiling()
                and not state.fresh.any()):  # inference on CPU past the first write (no sync to pay): as they are
            return weights
        fresh = state.fresh[:, None, None, None] > 0  # (fresh is 1 or 0: the same as blending by it, in one op)
        return tuple(torch.where(fresh, w0.to(w.dtype), w) for w0, w in zip(self.init_weights_, weights))

    def current_weights(self, state: MemoryState) -> tuple[torch.Tensor, ...]:
        """The memory's weights after everything ``state`` has written, one (B, heads, out, in) per layer."""
        return self._as_learned(state, state.weights)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, d)

    def _project(self, x: torch.Tensor, state: MemoryState):
        """q, k (unit rows) and v, (B, H, T, d) each, and the convolutions' new states: the three
        projections as one matmul, the three convolutions and their silu as one op of 3 dim channels (their
        weights joined at call time; the parameters stay separate)."""
        weight = torch.cat([c.conv.weight for c in self.convs])  # (3 dim, 1, K)
        bias = torch.cat([c.conv.bias for c in self.convs])
        conv_state = torch.cat([state.conv_q, state.conv_k, state.conv_v], dim=-1)  # (B, K-1, 3 dim)
        q, k, v, conv_state = _qkv_conv(self.wqkv(_rms_norm(self.norm_in, x)), conv_state, weight, bias, self.heads)
        convs = list(conv_state.split(self.dim, dim=-1))
        # (B, T, dim): silu(conv(x W_K)), before normalising, what gate_context's gates read (a copy: only then)
        self._k_context = k.transpose(1, 2).flatten(2) if self.gate_context else None
        return unit_rows(q), unit_rows(k), v, convs

    def _output(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """W_O(norm(y) * gate): y (B, H, T, d) what the memory returned, gate sigmoid(x W_G) (B, T, dim).
        The norm writes straight into the (B, T, H, d) layout that W_O reads (no transpose copy)."""
        B, H, T, d = y.shape
        y = _rms_norm(self.norm, y.to(gate.dtype), transposed=True).transpose(1, 2).reshape(B, T, H * d)
        return self.wo(y * gate)

    def gate_values(self, s_theta: torch.Tensor, s_eta: torch.Tensor, s_alpha: torch.Tensor):
        """The gates from their logits (any one shape): (theta, theta as written, eta, alpha). The relu
        gate's theta passes the gradient straight through below 0 (a skipped token still learns whether it
        should have been written); "as written" (``last_theta``) is theta without that path, whose gradient
        is 0 where a token is skipped (through it an L1 penalty would push closed gates down forever).
        Writes below the threshold are skipped (0), the gradient passing straight through. Shared by
        ``forward`` and the one-token decode step (``titans_lnn.decode``)."""
        if self.write_gate == "sigmoid":
            theta = written = self.max_lr * torch.sigmoid(s_theta)
        else:
            s = s_theta
            theta = self.max_lr * (s.clamp(0, 1) + torch.where(s < 0, s - s.detach(), torch.zeros_like(s)))
            written = self.max_lr * s.clamp(0, 1)
        if self.write_threshold:
            keep = theta >= self.write_threshold * self.max_lr
            theta = theta + (torch.where(keep, theta, torch.zeros_like(theta)) - theta).detach()
            written = torch.where(keep, written, torch.zeros_like(theta))
        return theta, written, torch.sigmoid(s_eta), self.max_forget * torch.sigmoid(s_alpha)

    def forward(self, x: torch.Tensor, state: MemoryState | None = None, *, impl: str | None = None):
        """Write x into the memory token by token and read each token's query after its write.
        Returns (out (B, T, dim), new state)."""
        reads, state = self.write_read(x, state, impl=impl)
        return self.output(reads, x), state

    def output(self, reads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output from ``write_read``'s reads (B, H, T, d) and its input x (B, T, dim): W_O(norm(reads)
        * sigmoid(x W_G)), (B, T, dim). Per token: a caller that writes piece by piece (MAC, segment by segment)
        may join the pieces' reads and inputs and take this once."""
        return self._output(reads, torch.sigmoid(self.w_gate_out(x)))

    def write_read(self, x: torch.Tensor, state: MemoryState | None = None, *, impl: str | None = None):
        """``forward`` before its output projection: (the reads M_{W_t}(q_t) (B, H, T, d), new state)."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        pos = state.pos
        q, k, v, convs = self._project(x, state)
        dtype = torch.promote_types(x.dtype, torch.float32)
        gate_in = self._k_context if self.gate_context else x
        gates = self.w_gates(gate_in).to(dtype).view(*x.shape[:2], 3, self.heads).permute(2, 0, 3, 1)  # (3, B, H, T)
        theta, self.last_theta, eta, alpha = self.gate_values(*gates)
        anchor = self._as_learned(state, state.anchor) + ((state.spent,) if self.stable_step else ())
        y, W, S, A = memory_update(q.to(dtype), k.to(dtype), v.to(dtype), theta, eta, alpha,
                                   self.current_weights(state), state.momentum, anchor,
                                   chunk_size=self.chunk_size, offset=pos % self.chunk_size,
                                   max_grad_norm=self.max_grad_norm, stable=self.stable_step, impl=impl)
        new = MemoryState(weights=tuple(W), momentum=tuple(S), anchor=tuple(A[:self.depth]),
                          spent=A[self.depth] if self.stable_step else None, conv_q=convs[0], conv_k=convs[1],
                          conv_v=convs[2], fresh=torch.zeros_like(state.fresh), pos=pos + x.shape[1])
        return y, new

    def init_read_state(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The state of ``read``'s own query convolution (a reader that is not the writer, as MAC's)."""
        return self.convs[0].init_state(batch_size, device, dtype)

    def read(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], conv_state: torch.Tensor):
        """Read without writing: out_t = W_O(norm(M_weights(q_t)) * gate), q from x through the query
        convolution with its state ``conv_state``. Returns (out, the new ``conv_state``)."""
        q, gate, conv_r = self.read_queries(x, conv_state)
        return self.read_out(q, gate, weights), conv_r

    def read_queries(self, x: torch.Tensor, conv_state: torch.Tensor):
        """What ``read`` takes from x alone, whatever the weights: the unit queries (B, H, T, d), the output
        gate sigmoid(x W_G) (B, T, dim), and the query convolution's new state (MAC computes these for a
        whole piece at once, then reads segment by segment with ``read_out`` on slices of them)."""
        w_q = self.wqkv.weight[:self.dim]  # the query rows of the q/k/v projection: k and v are not read
        q, conv_r = self.convs[0](F.linear(self.norm_in(x), w_q), conv_state)
        return F.normalize(self._split(F.silu(q)), dim=-1), torch.sigmoid(self.w_gate_out(x)), conv_r

    def read_out(self, q: torch.Tensor, gate: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``read``'s output from ``read_queries``' q and gate, at ``weights``: (B, T, dim)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        return self._output(mlp_forward(tuple(w.to(dtype) for w in weights), q.to(dtype)), gate)
