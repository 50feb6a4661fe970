"""Causal sliding-window attention with persistent tokens, (B, H, T, D), in forms with one signature
``(q, k, v, *, window, sink_k, sink_v, k2, v2, segment, pos0) -> out``:

- ``naive.py``: ``sliding_window_attention_ref``, a loop over queries (the specification, the tests'
  oracle);
- ``blocked.py``: ``sliding_window_attention_blocked``, blocks of queries in plain PyTorch (CPU);
- ``cuda.py``: ``sliding_window_attention_cuda``, which picks a CUDA library per call: flash-attn
  (``flash.py``), xformers (``xformers.py``) or FlexAttention (``flex.py``). The libraries are imported
  only when called.

``titans_lnn.kernels.sliding_window_attention`` chooses between them (``titans_lnn.kernels.dispatch``).
"""

from titans_lnn.kernels.window_attention.blocked import sliding_window_attention_blocked
from titans_lnn.kernels.window_attention.naive import sliding_window_attention_ref

__all__ = ["sliding_window_attention_blocked", "sliding_window_attention_ref"]
