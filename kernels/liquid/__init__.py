"""The liquid scan ``h_t = exp(log_a_t) * h_{t-1} + b_t`` over (B, T, D), in three forms with one
signature ``(log_a, b, h0) -> (h, h_last)``:

- ``naive.py``: ``liquid_scan_ref``, the per-token loop (the specification, the tests' oracle);
- ``chunked.py``: ``liquid_scan_chunked``, plain PyTorch, parallel over time;
- ``triton.py``: ``liquid_scan_triton``, the Triton kernel (imported only when dispatched to or
  imported by name, so that this package never imports Triton).

``titans_lnn.kernels.liquid_scan`` chooses between them (``titans_lnn.kernels.dispatch``).
"""

from titans_lnn.kernels.liquid.chunked import liquid_scan_chunked
from titans_lnn.kernels.liquid.naive import liquid_scan_ref

__all__ = ["liquid_scan_chunked", "liquid_scan_ref"]
