"""Sliding-window attention on CUDA: chooses, per call, the fastest library that can express it.

Same contract and mask as ``sliding_window_attention_ref`` (``naive.py``): q (B, H, T, D);
k, v, k2, v2 (B, G, P + T, D) with P cached keys; sink_k, sink_v (B or 1, G, N_p, D) always visible.
The backends, each in its own module, in the order "auto" tries them for CUDA tensors:

- **flash-attn** (``flash.py``): fp16/bf16, head dim <= 256, no second key stream k2, not segment
  mode, and persistent tokens (sinks) only when no gradient is needed;
- **xformers** (``xformers.py``): no sinks, no k2, not segment mode, and only where its local mask
  keeps exactly W keys (checked once per device and dtype);
- **FlexAttention** (``flex.py``): every call, exact gradients;
- otherwise the blocked PyTorch form (``blocked.py``).

This is the implementation that ``titans_lnn.kernels.dispatch`` names "cuda" (and also runs for
"triton", which forces every op's GPU form: attention has no Triton kernel of ours). CPU tensors
always take the blocked PyTorch form, so forcing it works on any machine.
(FlexAttention runs on CPU only without gradients; the tests call it there directly through
``flex_sliding_window_attention``.) The backend can be forced with ``backend=`` or the environment
variable ``TITANS_LNN_ATTN_BACKEND`` (auto, flash, xformers, flex, blocked). flash-attn and xformers
are imported only when used.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from titans_lnn.kernels.window_attention.blocked import sliding_window_attention_blocked
from titans_lnn.kernels.window_attention.flash import flash_sliding_window_attention
from titans_lnn.kernels.window_attention.flex import flex_available, flex_sliding_window_attention
from titans_lnn.kernels.window_attention.naive import check_inputs
from titans_lnn.kernels.window_attention.xformers import xformers_sliding_window_attention, xformers_window_ok

BACKENDS = ("auto", "flash", "xformers", "flex", "blocked")
BACKEND_ENV = "TITANS_LNN_ATTN_BACKEND"


@functools.cache
def _installed(module: str) -> bool:
    """True when ``module`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def choose_backend(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                   pos0=0) -> str:
    """The backend "auto" runs for this call (see the module docstring)."""
    if not q.is_cuda:
        return "blocked"
    simple = k2 is None and not segment
    if (simple and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and (sink_k is None or not _needs_grad(q, k, v, sink_k, sink_v)) and _installed("flash_attn")):
        return "flash"
    if simple and sink_k is None and _installed("xformers") and xformers_window_ok(q.device, q.dtype):
        return "xformers"
    if flex_available():
        return "flex"
    return "blocked"


def sliding_window_attention_cuda(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                                  pos0=0, backend: str | None = None):
    """Same contract as ``sliding_window_attention_blocked``; picks a library backend (module docstring).

    CPU tensors run the blocked PyTorch form unless a backend is forced.
    """
    check_inputs(q, k, v, k2, v2, sink_k, sink_v, window)
    kw = dict(window=window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2, segment=segment, pos0=pos0)
    choice = backend or os.environ.get(BACKEND_ENV, "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"attention backend {choice!r} is invalid: expected one of {', '.join(BACKENDS)} "
                         f"(from backend= or ${BACKEND_ENV})")
    if choice == "auto":
        choice = choose_backend(q, k, v, **kw)
    if choice in ("flash", "xformers"):
        if k2 is not None or segment:
            raise ValueError(f"attention backend {choice!r} cannot express k2/v2 or segment mode")
        if choice == "xformers" and sink_k is not None:
            raise ValueError("attention backend 'xformers' cannot express persistent tokens (sinks)")
        if choice == "flash" and sink_k is not None and _needs_grad(q, k, v, sink_k, sink_v):
            raise ValueError("attention backend 'flash' has no gradient for persistent tokens (sinks)")
    if choice == "flash":
        return flash_sliding_window_attention(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v)
    if choice == "xformers":
        return xformers_sliding_window_attention(q, k, v, window=window)
    if choice == "flex":
        return flex_sliding_window_attention(q, k, v, **kw)
    return sliding_window_attention_blocked(q, k, v, **kw)
