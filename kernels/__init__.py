"""The ops that the model's hot loops run, each behind one function that dispatches between a
plain-PyTorch reference, a chunked PyTorch form and a Triton kernel (see ``dispatch``).

One folder per op (README.md here has the table), named apart from the functions below:
``liquid/`` (``liquid_scan``), ``titans_memory/`` (``memory_update``), ``window_attention/``
(``sliding_window_attention``); each holds ``naive.py`` (the specification), its PyTorch fast form
and its GPU form.

Importing this package never imports Triton. While ``torch.compile`` traces, the ops go through
their ``torch.library`` registrations (``ops.py``) so that the graph has no breaks.
"""

from __future__ import annotations

import torch

from titans_lnn.kernels import dispatch, ops
from titans_lnn.kernels.triton_utils import triton_available


def liquid_scan(log_a, b, h0=None, *, impl: str | None = None):
    """h_t = exp(log_a_t) h_{t-1} + b_t over (B, T, D); returns (h, h_last). See ``liquid/naive.py``."""
    if torch.compiler.is_compiling():
        return ops.liquid_scan(log_a, b, h0, impl=impl)
    return dispatch.get("liquid_scan", impl, b.is_cuda)(log_a, b, h0)


def memory_update(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size: int, offset: int = 0,
                  max_grad_norm: float | None = None, stable: bool = False, impl: str | None = None):
    """The Titans memory over a sequence; returns (y, weights, momentum, anchor). See ``titans_memory/naive.py``."""
    if torch.compiler.is_compiling():
        return ops.memory_update(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size=chunk_size,
                                 offset=offset, max_grad_norm=max_grad_norm, stable=stable, impl=impl)
    fn = dispatch.get("memory_update", impl, q.is_cuda)
    return fn(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size=chunk_size, offset=offset,
              max_grad_norm=max_grad_norm, stable=stable)


def sliding_window_attention(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                             pos0: int = 0, impl: str | None = None):
    """Causal windowed attention with a persistent prefix; (B, H, T, D). See ``window_attention/naive.py``."""
    if torch.compiler.is_compiling():
        return ops.sliding_window_attention(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2,
                                            segment=segment, pos0=pos0, impl=impl)
    fn = dispatch.get("sliding_window_attention", impl, q.is_cuda)
    return fn(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2, segment=segment, pos0=pos0)


__all__ = ["dispatch", "liquid_scan", "memory_update", "sliding_window_attention", "triton_available"]
