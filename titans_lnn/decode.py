"""One token at a time: the decode step of every layer, without the chunk machinery.

    logits, state = decode_step(model, next_ids, state)    # next_ids (B, 1) -> logits (B, V)

A decode step is ``model(next_ids, state=state)`` for one token, but a forward call of length 1
goes through machinery built for long pieces (the memory's chunk bookkeeping with L x L decay
matrices, the blocked attention's key windows and masks, the scan's chunk logic, a Conv1d call for
a 4-tap convolution): about 10K small op calls per token for the tiny MAC. Here each layer has a
step form for one token, with the state updated by the same rule:

- sliding-window attention: one query against the visible cached keys (and MAC's memory read-outs,
  and the persistent keys); the cache is kept as ``SlidingWindowAttention`` keeps it;
- neural memory: the per-token update of ``kernels/titans_memory/naive.py`` with its gradient in
  closed form (delta rule through the MLP), the stable step, per-token clipping, then the read;
- the depthwise causal convolutions: one weighted sum over the last K inputs;
- the liquid core: ``h = exp(log_a) h + b`` for one step.

A module with no step form here (the seed mixers: Mamba-2, BASED, LFM2, Gated DeltaNet) runs its
own forward on a piece of length 1, so every variant decodes. The steps equal the chunked forward
(tests/test_decode.py: per-token logits and states == one pass, float64, every variant).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.blocks import Block, MemoryAsContext, MemoryAsGate, MemoryAsLayer, NoMixer
from titans_lnn.kernels.titans_memory.naive import (
    anchor_forward,
    clip_scale,
    curvature_from,
    mlp_forward,
    residual_curvature,
    silu_grad,
    silu_grad2,
    stable_steps,
)
from titans_lnn.layers import CausalConv, Residual, apply_rope, causal_conv, rope_table
from titans_lnn.liquid import LiquidCore
from titans_lnn.memory import NeuralMemory
from titans_lnn.state import AttentionState, BlockState, LiquidState, MACState, MemoryState, ModelState, PairState

# module class -> its step: step(module, x (B, dim), state, **kwargs) -> (y (B, dim), new state)
STEPS: dict[type, Callable] = {}


def _step_of(cls: type):
    def register(fn: Callable) -> Callable:
        STEPS[cls] = fn
        return fn
    return register


def layer_step(module: nn.Module, x: torch.Tensor, state, **kwargs):
    """One token through ``module``: x (B, dim) -> (y (B, dim), new state). Modules without a step form
    run their forward on a piece of length 1."""
    step = STEPS.get(type(module))
    if step is not None:
        return step(module, x, state, **kwargs)
    y, state = module(x[:, None], state, **kwargs)
    return y[:, 0], state


@torch.no_grad()
def decode_step(model, input_ids: torch.Tensor, state: ModelState, dt: torch.Tensor | None = None):
    """The logits after one more token: input_ids (B, 1) ids, ``state`` the state before it (a ModelState
    of this model: ``model.init_state(B)`` at the start); dt (B, 1) its elapsed time (liquid core) or
    None. Returns (logits (B, V), the state after the token), equal to ``model(input_ids, state=state)``'s
    last logits and state. No input checks (the ids of a decode loop come from the model itself); no
    autograd."""
    if input_ids.dim() != 2 or input_ids.shape[1] != 1:
        raise ValueError(f"decode_step takes one token per row, input_ids (B, 1); got shape {tuple(input_ids.shape)}")
    B = input_ids.shape[0]
    x = model.embed(input_ids[:, 0].long())  # (B, d)
    step_dt = None if dt is None else dt[:, 0]
    layers = []
    for block, layer_state in zip(model.blocks, state.layers):
        x, new = layer_step(block, x, layer_state, dt=step_dt)
        layers.append(new)
    x = model.norm(x)
    logits = F.linear(x, model.embed.weight) if model.lm_head is None else model.lm_head(x)  # (B, V)
    return logits, ModelState(state.pos + 1, B, model.fingerprint, layers)


# ----------------------------------------------------------------------------- the block and its mixers


@_step_of(Block)
def _block(m: Block, x, state: BlockState, dt=None):
    x, mixer = layer_step(m.mixer, x, state.mixer)
    liquid = None
    if m.liquid is not None:
        x, liquid = layer_step(m.liquid, x, state.liquid, dt=dt)
    return x + m.mlp(m.norm_mlp(x)), BlockState(mixer, liquid)


@_step_of(Residual)
def _residual(m: Residual, x, state, **kwargs):
    y, state = layer_step(m.layer, m.norm(x), state, **kwargs)
    return x + y, state


@_step_of(NoMixer)
def _no_mixer(m: NoMixer, x, state):
    return x, state


@_step_of(MemoryAsLayer)
def _mal(m: MemoryAsLayer, x, state: PairState):
    x, mem = layer_step(m.mem, x, state.mem)
    x, attn = layer_step(m.attn, x, state.attn)
    return x, PairState(attn, mem)


@_step_of(MemoryAsGate)
def _mag(m: MemoryAsGate, x, state: PairState):
    y, attn = _attention(m.attn, x, state.attn)
    mem_out, mem = _memory(m.mem, x, state.mem)
    return m.gate(y, mem_out), PairState(attn, mem)


@_step_of(MemoryAsContext)
def _mac(m: MemoryAsContext, x, state: MACState):
    """Read with the segment's weights (snapshot at its first token), attend beside the read-out, write the
    attention output, gate it with the read after the write (``MemoryAsContext``)."""
    snapshot = state.segment_weights
    if state.mem.pos % m.segment == 0:
        snapshot = _current_weights(m.mem, state.mem)
    h, conv_read = _memory_read(m.mem, x, snapshot, state.conv_read)
    y, attn = _attention(m.attn, x, state.attn, extra=h)
    mem_out, mem = _memory(m.mem, y, state.mem)
    return m.gate(y, mem_out), MACState(attn, mem, snapshot, conv_read)


# ----------------------------------------------------------------------------- sliding-window attention


@_step_of(SlidingWindowAttention)
def _attention(m: SlidingWindowAttention, x, state: AttentionState, extra: torch.Tensor | None = None):
    """One query at position pos = state.pos over the persistent keys and the keys it sees: the visible
    cached ones and its own (MAC: and the memory read-outs beside them). x, extra: (B, dim)."""
    B = x.shape[0]
    H, G, D = m.n_heads, m.n_kv, m.head_dim
    pos = state.pos
    q = _rope(m.wq(x).view(B, H, 1, D), pos, m.rope_theta)  # (B, H, 1, D)
    k, v = m._kv(x[:, None], None)  # (B, G, 1, D) each
    k = _rope(k, pos, m.rope_theta)
    k, v = m._extend(state.k, k, pos), m._extend(state.v, v, pos)  # (B, G, n, D): the keys it sees
    keys, values = [k], [v]
    k2 = v2 = None
    if m.memory_stream:
        if extra is None:
            raise ValueError("SlidingWindowAttention(memory_stream=True) needs the aligned stream `extra`")
        k2, v2 = m._kv(extra[:, None], None)
        k2 = _rope(k2, pos, m.rope_theta)
        k2, v2 = m._extend(state.k2, k2, pos), m._extend(state.v2, v2, pos)
        keys.append(k2)
        values.append(v2)
    if m.persistent is not None:  # their keys and values depend on the parameters only: kept between steps
        sink_k, sink_v = _prepared(m, f"sinks {x.dtype}", lambda: m._kv(m.persistent(1).to(x.dtype), None))
        keys.insert(0, sink_k.expand(B, -1, -1, -1))  # (B, G, N_p, D)
        values.insert(0, sink_v.expand(B, -1, -1, -1))
    dtype = torch.promote_types(x.dtype, torch.float32)
    kk, vv = torch.cat(keys, dim=2).to(dtype), torch.cat(values, dim=2).to(dtype)  # (B, G, S, D)
    qg = q.to(dtype).view(B, G, H // G, D) * (1.0 / math.sqrt(D))  # head h reads key/value head h // (H / G)
    probs = (qg @ kk.transpose(-1, -2)).softmax(-1)  # (B, G, H / G, S)
    o = (probs @ vv).to(x.dtype).reshape(B, H * D)
    end = pos + 1
    new = AttentionState(m._store(k, end), m._store(v, end), pos=end)
    if m.memory_stream:
        new.k2, new.v2 = m._store(k2, end), m._store(v2, end)
    return m.wo(o), new


_ROPE_TABLES: dict = {}  # (pos, D, theta, device, dtype) -> the rotation at pos, shared by the layers of a step


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """``layers.rope`` for one position, x (B, H, 1, D): ``layers.apply_rope`` with the position's
    ``layers.rope_table`` row, computed once per position (angles in float64, as rope)."""
    key = (pos, x.shape[-1], theta, x.device, x.dtype)
    table = _ROPE_TABLES.get(key)
    if table is None:
        if len(_ROPE_TABLES) > 64:
            _ROPE_TABLES.clear()
        table = _ROPE_TABLES[key] = rope_table(pos, 1, x.shape[-1], theta, x.dtype, x.device)  # (1, D/2)
    return apply_rope(x, table)


# ----------------------------------------------------------------------------- neural memory


def _conv_step(conv: CausalConv, x: torch.Tensor, state: torch.Tensor):
    """y = sum_j w_j x_{t-j} + b for one token: x (B, D), state (B, K - 1, D) the last inputs.
    Returns (y (B, D), the new state)."""
    xx = torch.cat([state.to(x.dtype), x[:, None]], dim=1)  # (B, K, D)
    return causal_conv(xx, conv.conv.weight, conv.conv.bias)[:, 0], xx[:, 1:].clone()


def _conv3_step(m: NeuralMemory, qkv: torch.Tensor, states: tuple[torch.Tensor, ...]):
    """The q, k, v convolutions of one token as one: qkv (B, 3 dim), states three (B, K - 1, dim).
    Returns (y (B, 3 dim), the three new states)."""
    w, bias = _prepared(m, "conv3", lambda: (torch.cat([c.conv.weight[:, 0] for c in m.convs]).t().contiguous(),
                                             torch.cat([c.conv.bias for c in m.convs])))  # (K, 3 dim), (3 dim,)
    xx = torch.cat([torch.cat(states, dim=-1).to(qkv.dtype), qkv[:, None]], dim=1)  # (B, K, 3 dim)
    y = (xx * w).sum(1) + bias
    dim = m.dim
    return y, tuple(xx[:, 1:, i * dim:(i + 1) * dim].clone() for i in range(3))


# module -> {name: (parameter versions, value)}: values derived from parameters, rebuilt when one changes
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared(module: nn.Module, name: str, build: Callable):
    """``build()`` (tensors derived from ``module``'s parameters), cached until a parameter is changed in
    place (its version counter) or replaced."""
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in module.parameters())
    entry = _PREPARED.setdefault(module, {}).get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, build())
        _PREPARED[module][name] = entry
    return entry[1]


def _current_weights(m: NeuralMemory, state: MemoryState) -> tuple[torch.Tensor, ...]:
    """``m.current_weights(state)``: a state that has read nothing (pos 0) is ``fresh`` and its weights are
    the learned initial memory; after any token the model's states have fresh = 0, and the weights are the
    state's own (so the mixing, passes over every weight, runs only at pos 0)."""
    return m.current_weights(state) if state.pos == 0 else state.weights


def _heads(m: NeuralMemory, t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], m.heads, 1, -1)  # (B, dim) -> (B, H, 1, d)


def _memory_read(m: NeuralMemory, x, weights, conv_state):
    """``NeuralMemory.read`` for one token: the query only (no k, v), through the read's convolution."""
    dim = m.dim
    q = F.linear(m.norm_in(x), m.wqkv.weight[:dim])  # (B, dim): the query third of W_qkv
    q, conv_state = _conv_step(m.convs[0], q, conv_state)
    q = F.normalize(_heads(m, F.silu(q)), dim=-1)
    return m.read_out(q, torch.sigmoid(m.w_gate_out(x))[:, None], weights)[:, 0], conv_state


@_step_of(NeuralMemory)
def _memory(m: NeuralMemory, x, state: MemoryState):
    """``NeuralMemory.forward`` for one token: project, gate, update the weights, read after the write."""
    B = x.shape[0]
    pos = state.pos
    qkv, convs = _conv3_step(m, m.wqkv(m.norm_in(x)), (state.conv_q, state.conv_k, state.conv_v))
    outs = F.silu(qkv).chunk(3, dim=-1)
    q, k, v = (_heads(m, t) for t in outs)  # (B, H, 1, d)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    gates = m.w_gates(outs[1] if m.gate_context else x).to(dtype).view(B, 3, m.heads)  # (B, 3, H)
    theta, written, eta, alpha = m.gate_values(gates[:, 0], gates[:, 1], gates[:, 2])  # (B, H) each
    m.last_theta = written[..., None]  # (B, H, 1), as forward leaves it
    weights = _current_weights(m, state)
    if pos % m.chunk_size == 0:  # a new chunk: its gradients are taken at the current weights
        anchor, spent = weights, None if state.spent is None else torch.zeros_like(state.spent)
    else:  # inside a chunk, so something was written: the anchor is the state's (as in _current_weights)
        anchor, spent = state.anchor, state.spent
    y, W, S, spent = memory_token(q.to(dtype), k.to(dtype), v.to(dtype), theta, eta, alpha, weights, state.momentum,
                                  anchor, spent, max_grad_norm=m.max_grad_norm)
    new = MemoryState(weights=W, momentum=S, anchor=tuple(anchor), spent=spent, conv_q=convs[0], conv_k=convs[1],
                      conv_v=convs[2], fresh=torch.zeros_like(state.fresh), pos=pos + 1)
    return m._output(y, torch.sigmoid(m.w_gate_out(x))[:, None])[:, 0], new  # (B, dim)


def memory_token(q, k, v, theta, eta, alpha, weights, momentum, anchor, spent, *, max_grad_norm=None):
    """The memory update and read for one token (``memory_update_ref``'s loop body, the gradient in closed
    form). q, k: (B, H, 1, Dk); v: (B, H, 1, Dv); theta, eta, alpha: (B, H); weights, momentum, anchor:
    tuples of (B, H, out_l, in_l); spent: the chunk's Q (B, H, Dk, Dk) before this token (the stable
    step), or None. Returns (y (B, H, 1, Dv), weights, momentum, Q after the token or None)."""
    n = len(weights)
    out, xs, zs = anchor_forward(anchor, k)
    slopes = [silu_grad(z) for z in zs[:-1]]  # silu'(z_l), l < L: (B, H, 1, out_l)
    x_sq = [x.pow(2).sum(-1) for x in xs]  # ||x_l||^2: (B, H, 1)
    if spent is not None:
        bends = [silu_grad2(z) for z in zs[:-1]]  # silu''(z_l): the residual part of the curvature
        kappa = curvature_from(anchor, x_sq, slopes) + residual_curvature(anchor, xs, slopes, bends, out - v)
        theta, spent = stable_steps(theta[..., None], eta[..., None], kappa, F.normalize(k, dim=-1), spent)
        theta = theta[..., 0]
    # The gradient of ||M_A(k) - v||^2 w.r.t. layer l is delta_l x_l^T (backpropagation by hand).
    delta = 2 * (out - v)  # (B, H, 1, Dv)
    deltas = [delta] * n
    for i in range(n - 1, 0, -1):
        delta = (delta @ anchor[i]) * slopes[i - 1]  # (B, H, 1, in_i)
        deltas[i - 1] = delta
    sq = sum(d.pow(2).sum(-1) * x for d, x in zip(deltas, x_sq))[..., 0]  # (B, H): ||g||^2
    theta = theta * clip_scale(sq, max_grad_norm)
    th, et, keep = theta[..., None, None], eta[..., None, None], (1 - alpha)[..., None, None]
    # S = eta S - theta delta x^T, W = (1 - alpha) W + S: theta scales the small delta, not the outer product,
    # and the outer product accumulates into eta S in one batched matmul (two passes over each weight).
    S, W = [], []
    for s, w, d, xi in zip(momentum, weights, deltas, xs):
        B, H, o, i = s.shape
        s = torch.baddbmm((et * s).view(B * H, o, i), (-th * d).view(B * H, 1, o).transpose(1, 2),
                          xi.reshape(B * H, 1, i)).view(B, H, o, i)
        S.append(s)
        W.append(torch.addcmul(s, keep, w))
    return mlp_forward(W, q), tuple(W), tuple(S), spent


# ----------------------------------------------------------------------------- liquid core


@_step_of(LiquidCore)
def _liquid(m: LiquidCore, x, state: LiquidState, dt: torch.Tensor | None = None):
    """``LiquidCore.forward`` for one token: h = exp(log_a) h + b. x (B, dim); dt (B,) or None (1)."""
    B = x.shape[0]
    D, N = m.width, m.n_state
    dtype = torch.promote_types(x.dtype, torch.float32)
    u, f, z, Bt, Ct = m.w_in(x).to(dtype).split([D, D, D, N, N], dim=-1)  # (B, D) x 3, (B, N) x 2
    f = F.softplus(f)
    neg_lam = -torch.exp(-m.log_tau.to(dtype)) - f[..., None]  # -lambda: (B, D, N)
    log_a = neg_lam if dt is None else dt.to(dtype)[:, None, None] * neg_lam
    b = torch.expm1(log_a) * ((f * u)[..., None] * Bt[:, None, :] / neg_lam)  # (1 - a) g
    h = torch.addcmul(b, torch.exp(log_a), state.h.to(dtype).view(B, D, N))  # (B, D, N)
    y = torch.addcmul((h * Ct[:, None, :]).sum(-1), m.skip, u)  # (B, D)
    out = m.w_out((y * F.silu(z)).to(x.dtype))
    return out, LiquidState(h.reshape(B, D * N).to(state.h.dtype))
