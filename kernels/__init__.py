"""The ops that the model's hot loops run, each behind one function that dispatches between a
plain-PyTorch reference, a chunked PyTorch form and a Triton kernel (see ``dispatch``).

Importing this package never imports Triton.
"""

from __future__ import annotations

from titans_lnn.kernels import dispatch


def liquid_scan(log_a, b, h0=None, *, impl: str | None = None):
    """h_t = exp(log_a_t) h_{t-1} + b_t over (B, T, D); returns (h, h_last). See ``liquid_scan.py``."""
    return dispatch.get("liquid_scan", impl, b.is_cuda)(log_a, b, h0)


def memory_update(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size: int, offset: int = 0,
                  max_grad_norm: float | None = None, impl: str | None = None):
    """The Titans memory over a sequence; returns (y, weights, momentum, anchor). See ``memory_update.py``."""
    fn = dispatch.get("memory_update", impl, q.is_cuda)
    return fn(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size=chunk_size, offset=offset,
              max_grad_norm=max_grad_norm)


def sliding_window_attention(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                             pos0: int = 0, impl: str | None = None):
    """Causal windowed attention with a persistent prefix; (B, H, T, D). See ``attention.py``."""
    fn = dispatch.get("sliding_window_attention", impl, q.is_cuda)
    return fn(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2, segment=segment, pos0=pos0)


__all__ = ["dispatch", "liquid_scan", "memory_update", "sliding_window_attention"]
