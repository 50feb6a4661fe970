"""The three ops as ``torch.library`` custom ops, so ``torch.compile(model, fullgraph=True)`` traces
the model without graph breaks.

The dispatching functions in ``titans_lnn.kernels`` route here while torch.compile traces (and call
the implementations directly otherwise, so eager behaviour is unchanged). To the compiler each op is
one opaque node with a fake (meta) implementation that gives the output shapes, and a registered
backward:

- ``titans_lnn::liquid_scan(log_a, b, h0, impl) -> (h, h_last)``. Backward in closed form: the
  gradient is itself a liquid scan in reverse time (``g_t = dh_t + a_{t+1} g_{t+1}``), run by the same
  op, then elementwise products; nothing is recomputed.
- ``titans_lnn::memory_update(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size,
  offset, max_grad_norm, stable, impl) -> [y, *W, *S, *A]``. Backward: ``memory_update_backward`` reruns the
  forward of the chosen implementation under autograd and back-propagates (one extra forward; the
  Triton implementation's own backward then recomputes from its chunk checkpoints as usual).
- ``titans_lnn::sliding_window_attention(q, k, v, sink_k, sink_v, k2, v2, window, segment, pos0, impl)``;
  backward likewise by recomputation (``sliding_window_attention_backward``).

``impl`` is the string given to the dispatcher ("" for the default); it is resolved inside the op
at run time (``kernels.dispatch``), so the environment variable still applies to a compiled model.
Outputs are cast to canonical dtypes (y to q's, states to their inputs') so that the fake
implementations can state them, and never alias an input (custom ops may not).

The backward ops need autograd inside an op's implementation, where PyTorch has switched the
autograd dispatch keys off: ``_autograd_inside_op`` switches them back on for that block (a private
guard, ``torch._C._ForceDispatchKeyGuard``, as functorch uses).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.library import custom_op

from titans_lnn.kernels import dispatch

OPS = ("liquid_scan", "memory_update", "sliding_window_attention")


def _fresh(outs: list[Tensor], inputs) -> list[Tensor]:
    """Outputs as the fake implementations state them: contiguous, and sharing storage with no input
    and no other output (cloned where they would)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        res.append(t)
    return res


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside a custom op's implementation (see the module docstring)."""
    K = torch._C.DispatchKey
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.AutogradOther, K.AutogradNestedTensor, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _empty(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _leaves(tensors):
    return [t.detach().requires_grad_() for t in tensors]


def _grads(outs, leaves, grad_outs):
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True) \
        if pairs else [None] * len(leaves)
    return [torch.zeros_like(x) if g is None else g.to(x.dtype) for g, x in zip(grads, leaves)]


# ---------------------------------------------------------------------------------------------------
# liquid_scan


@custom_op("titans_lnn::liquid_scan", mutates_args=())
def liquid_scan_op(log_a: Tensor, b: Tensor, h0: Tensor | None, impl: str) -> tuple[Tensor, Tensor]:
    fn = dispatch.get("liquid_scan", impl or None, b.is_cuda)
    with torch.no_grad():
        h, h_last = fn(log_a, b, h0)
    h, h_last = _fresh([h.to(b.dtype), h_last.to(b.dtype)], (log_a, b, h0))
    return h, h_last


@liquid_scan_op.register_fake
def _(log_a, b, h0, impl):
    B, T, D = b.shape
    return b.new_empty(B, T, D), b.new_empty(B, D)


def _liquid_scan_setup(ctx, inputs, output):
    log_a, b, h0, impl = inputs
    ctx.save_for_backward(log_a, output[0], h0)
    ctx.impl, ctx.has_h0 = impl, h0 is not None


def _liquid_scan_backward(ctx, dh, dh_last):
    log_a, h, h0 = ctx.saved_tensors
    B, T, D = h.shape
    dtype = torch.promote_types(h.dtype, torch.float32)
    dh = torch.zeros_like(h, dtype=dtype) if dh is None else dh.to(dtype)
    dh_last = torch.zeros(B, D, dtype=dtype, device=h.device) if dh_last is None else dh_last.to(dtype)
    if T == 0:
        return torch.zeros_like(log_a), torch.zeros_like(h), (dh_last.to(h0.dtype) if ctx.has_h0 else None), None
    # g_t = dL/dh_t in total = dh_t (+ dh_last at t = T) + a_{t+1} g_{t+1}: a scan in reverse time.
    dh = torch.cat([dh[:, :-1], (dh[:, -1] + dh_last)[:, None]], dim=1)  # (B, T, D)
    log_a = log_a.to(dtype)
    log_a_next = torch.cat([log_a[:, 1:], log_a.new_zeros(B, 1, D)], dim=1)
    g, _ = torch.ops.titans_lnn.liquid_scan(log_a_next.flip(1), dh.flip(1), None, ctx.impl)
    g = g.flip(1)
    a = log_a.exp()
    first = h0.to(dtype) if ctx.has_h0 else h.new_zeros(B, D, dtype=dtype)
    h_prev = torch.cat([first[:, None], h[:, :-1].to(dtype)], dim=1)
    d_log_a = (g * a * h_prev).to(ctx.saved_tensors[0].dtype)
    dh0 = (a[:, 0] * g[:, 0]).to(h0.dtype) if ctx.has_h0 else None
    return d_log_a, g.to(h.dtype), dh0, None


liquid_scan_op.register_autograd(_liquid_scan_backward, setup_context=_liquid_scan_setup)


# ---------------------------------------------------------------------------------------------------
# memory_update


def _memory_outputs(q, weights, momentum, anchor, out):
    y, W, S, A = out
    return [y.to(q.dtype), *(w.to(x.dtype) for w, x in zip(W, weights)),
            *(s.to(x.dtype) for s, x in zip(S, momentum)), *(a.to(x.dtype) for a, x in zip(A, anchor))]


@custom_op("titans_lnn::memory_update", mutates_args=())
def memory_update_op(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                     weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], chunk_size: int,
                     offset: int, max_grad_norm: float | None, stable: bool, impl: str) -> list[Tensor]:
    fn = dispatch.get("memory_update", impl or None, q.is_cuda)
    with torch.no_grad():
        out = fn(q, k, v, theta, eta, alpha, tuple(weights), tuple(momentum), tuple(anchor), chunk_size=chunk_size,
                 offset=offset, max_grad_norm=max_grad_norm, stable=stable)
    return _fresh(_memory_outputs(q, weights, momentum, anchor, out),
                  (q, k, v, theta, eta, alpha, *weights, *momentum, *anchor))


@memory_update_op.register_fake
def _(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset, max_grad_norm, stable, impl):
    y = q.new_empty(*q.shape[:3], v.shape[-1])
    return [y, *(_empty(x) for x in (*weights, *momentum, *anchor))]


@custom_op("titans_lnn::memory_update_backward", mutates_args=())
def memory_update_backward_op(inputs: list[Tensor], grad_outputs: list[Tensor], chunk_size: int, offset: int,
                              max_grad_norm: float | None, stable: bool, impl: str) -> list[Tensor]:
    """Gradients w.r.t. [q, k, v, theta, eta, alpha, *W, *S, *A], by rerunning the forward."""
    n = (len(inputs) - 6) // 3
    fn = dispatch.get("memory_update", impl or None, inputs[0].is_cuda)
    with _autograd_inside_op():
        leaves = _leaves(inputs)
        W, S, A = leaves[6:6 + n], leaves[6 + n:6 + 2 * n], leaves[6 + 2 * n:]
        out = fn(*leaves[:6], tuple(W), tuple(S), tuple(A), chunk_size=chunk_size, offset=offset,
                 max_grad_norm=max_grad_norm, stable=stable)
        outs = _memory_outputs(leaves[0], W, S, A, out)
        return _fresh(_grads(outs, leaves, grad_outputs), (*inputs, *grad_outputs))


@memory_update_backward_op.register_fake
def _(inputs, grad_outputs, chunk_size, offset, max_grad_norm, stable, impl):
    return [_empty(x) for x in inputs]


def _memory_setup(ctx, inputs, output):
    q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset, max_grad_norm, stable, impl = inputs
    ctx.save_for_backward(q, k, v, theta, eta, alpha, *weights, *momentum, *anchor)
    ctx.args = (chunk_size, offset, max_grad_norm, stable, impl)
    ctx.n = len(weights)


def _memory_backward(ctx, grad_outputs):
    inputs = list(ctx.saved_tensors)
    templates = _output_templates(inputs, ctx.n)
    grad_outputs = [torch.zeros_like(t) if g is None else g for g, t in zip(grad_outputs, templates)]
    grads = torch.ops.titans_lnn.memory_update_backward(inputs, grad_outputs, *ctx.args)
    n = ctx.n
    return (*grads[:6], grads[6:6 + n], grads[6 + n:6 + 2 * n], grads[6 + 2 * n:], None, None, None, None, None)


def _output_templates(inputs, n):
    """Tensors shaped like the op's outputs (for zero gradients of unused outputs)."""
    q, v = inputs[0], inputs[2]
    return [q.new_empty(*q.shape[:3], v.shape[-1]), *inputs[6:]]


memory_update_op.register_autograd(_memory_backward, setup_context=_memory_setup)


# ---------------------------------------------------------------------------------------------------
# sliding_window_attention


def _attention_kwargs(sink_k, sink_v, k2, v2, window, segment, pos0):
    return dict(window=window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2, segment=segment, pos0=pos0)


@custom_op("titans_lnn::sliding_window_attention", mutates_args=())
def sliding_window_attention_op(q: Tensor, k: Tensor, v: Tensor, sink_k: Tensor | None, sink_v: Tensor | None,
                                k2: Tensor | None, v2: Tensor | None, window: int | None, segment: bool, pos0: int,
                                impl: str) -> Tensor:
    fn = dispatch.get("sliding_window_attention", impl or None, q.is_cuda)
    with torch.no_grad():
        out = fn(q, k, v, **_attention_kwargs(sink_k, sink_v, k2, v2, window, segment, pos0))
    return _fresh([out.to(q.dtype)], (q, k, v, sink_k, sink_v, k2, v2))[0]


@sliding_window_attention_op.register_fake
def _(q, k, v, sink_k, sink_v, k2, v2, window, segment, pos0, impl):
    return _empty(q)


@custom_op("titans_lnn::sliding_window_attention_backward", mutates_args=())
def sliding_window_attention_backward_op(inputs: list[Tensor], present: list[bool], grad_output: Tensor,
                                         window: int | None, segment: bool, pos0: int, impl: str) -> list[Tensor]:
    """Gradients w.r.t. the given ones of (q, k, v, sink_k, sink_v, k2, v2) (``present`` marks them)."""
    fn = dispatch.get("sliding_window_attention", impl or None, inputs[0].is_cuda)
    with _autograd_inside_op():
        leaves = _leaves(inputs)
        it = iter(leaves)
        full = [next(it) if p else None for p in present]
        out = fn(*full[:3], **_attention_kwargs(*full[3:], window, segment, pos0)).to(inputs[0].dtype)
        return _fresh(_grads([out], leaves, [grad_output]), (*inputs, grad_output))


@sliding_window_attention_backward_op.register_fake
def _(inputs, present, grad_output, window, segment, pos0, impl):
    return [_empty(x) for x in inputs]


def _attention_setup(ctx, inputs, output):
    tensors = inputs[:7]
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*(t for t in tensors if t is not None))
    ctx.args = inputs[7:]


def _attention_backward(ctx, grad_output):
    grads = iter(torch.ops.titans_lnn.sliding_window_attention_backward(
        list(ctx.saved_tensors), ctx.present, grad_output, *ctx.args))
    return (*(next(grads) if p else None for p in ctx.present), None, None, None, None)


sliding_window_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------------
# Python-facing wrappers with the dispatchers' signatures.


def liquid_scan(log_a, b, h0=None, *, impl: str | None = None):
    return torch.ops.titans_lnn.liquid_scan(log_a, b, h0, impl or "")


def memory_update(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size: int, offset: int = 0,
                  max_grad_norm: float | None = None, stable: bool = False, impl: str | None = None):
    n = len(weights)
    out = torch.ops.titans_lnn.memory_update(q, k, v, theta, eta, alpha, list(weights), list(momentum), list(anchor),
                                             chunk_size, offset, max_grad_norm, stable, impl or "")
    return out[0], tuple(out[1:1 + n]), tuple(out[1 + n:1 + 2 * n]), tuple(out[1 + 2 * n:])


def sliding_window_attention(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                             pos0: int = 0, impl: str | None = None):
    return torch.ops.titans_lnn.sliding_window_attention(q, k, v, sink_k, sink_v, k2, v2, window, segment, pos0,
                                                         impl or "")
