"""The Titans neural memory's test-time update over a sequence (Behrouz et al. 2025, eqs. 8-15), in
three forms with one signature ``(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size,
offset, max_grad_norm, stable) -> (y, weights, momentum, anchor)``:

- ``naive.py``: ``memory_update_ref``, the per-token loop with autograd gradients (the specification,
  the tests' oracle), plus the memory MLP (``mlp_forward``), its curvature bound and the stable step;
- ``chunked.py``: ``memory_update_chunked``, the chunk-parallel closed form in plain PyTorch (its loop over
  whole chunks in ``chunk_loop.py`` for depth 1 and 2: no autograd recording, a hand-written backward; that
  loop runs in C++, ``csrc/chunk_loop.cpp`` built on first use by ``cpp.py``, with the Python loop as its
  reference and fallback: $TITANS_LNN_MEMORY_LOOP=cpp|python);
- ``triton.py``: ``memory_update_triton``, the Triton kernel (imported only when dispatched to or
  imported by name, so that this package never imports Triton).

``titans_lnn.kernels.memory_update`` chooses between them (``titans_lnn.kernels.dispatch``).
"""

from titans_lnn.kernels.titans_memory.chunked import memory_update_chunked, stable_steps_sequence
from titans_lnn.kernels.titans_memory.naive import (
    anchor_forward,
    curvature,
    memory_update_ref,
    mlp_forward,
    stable_steps,
)

__all__ = ["anchor_forward", "curvature", "memory_update_chunked", "memory_update_ref", "mlp_forward",
           "stable_steps", "stable_steps_sequence"]
