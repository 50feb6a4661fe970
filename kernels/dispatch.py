"""Choose an implementation for each op: "ref" (the plain-PyTorch specification, ``naive.py``),
"torch" (the chunked/blocked PyTorch form), the GPU form, or "auto".

The GPU form of ``liquid_scan`` and ``memory_update`` is a Triton kernel, named "triton". That of
``sliding_window_attention`` is no Triton kernel of ours but a choice of CUDA libraries (flash-attn,
xformers, FlexAttention: ``window_attention/cuda.py``), named "cuda"; "triton" is accepted for it too
and means "cuda", so that ``TITANS_LNN_IMPL=triton`` forces every op's GPU form.

"auto" picks the GPU form for CUDA tensors when Triton imports, the PyTorch form otherwise. The
choice can be forced per call (``impl=...``) or for the whole process with the environment variable
``TITANS_LNN_IMPL`` (read at each call, so tests can set it with monkeypatch). Triton is imported
only when a Triton implementation is actually called.
"""

from __future__ import annotations

import importlib
import os

from titans_lnn.kernels.triton_utils import triton_available

IMPLS = ("auto", "ref", "torch", "triton")  # accepted for every op
ENV_VAR = "TITANS_LNN_IMPL"

# op -> impl -> (module under titans_lnn.kernels, function name)
_REGISTRY: dict[str, dict[str, tuple[str, str]]] = {
    "liquid_scan": {
        "ref": ("liquid.naive", "liquid_scan_ref"),
        "torch": ("liquid.chunked", "liquid_scan_chunked"),
        "triton": ("liquid.triton", "liquid_scan_triton"),
    },
    "memory_update": {
        "ref": ("titans_memory.naive", "memory_update_ref"),
        "torch": ("titans_memory.chunked", "memory_update_chunked"),
        "triton": ("titans_memory.triton", "memory_update_triton"),
    },
    "sliding_window_attention": {
        "ref": ("window_attention.naive", "sliding_window_attention_ref"),
        "torch": ("window_attention.blocked", "sliding_window_attention_blocked"),
        "cuda": ("window_attention.cuda", "sliding_window_attention_cuda"),
    },
}
# op -> {name accepted: implementation it means}
_ALIASES: dict[str, dict[str, str]] = {"sliding_window_attention": {"triton": "cuda"}}
# op -> its GPU form, which "auto" takes for CUDA tensors
_GPU = {"liquid_scan": "triton", "memory_update": "triton", "sliding_window_attention": "cuda"}


def resolve(op: str, impl: str | None, is_cuda: bool) -> str:
    """The implementation name that a call of ``op`` with ``impl`` on (non-)CUDA tensors runs."""
    choice = impl or os.environ.get(ENV_VAR, "auto") or "auto"
    names = accepted(op)
    if choice not in names:
        raise ValueError(f"implementation {choice!r} for {op} is invalid: expected one of {', '.join(names)} "
                         f"(from impl= or ${ENV_VAR})")
    if choice == "auto":
        return _GPU[op] if is_cuda and triton_available() else "torch"
    return _ALIASES.get(op, {}).get(choice, choice)


def accepted(op: str) -> tuple[str, ...]:
    """The names ``impl=`` takes for ``op``: "auto", its implementations, and their aliases."""
    if op not in _REGISTRY:
        raise ValueError(f"op {op!r} is unknown: expected one of {', '.join(_REGISTRY)}")
    return tuple(dict.fromkeys([*IMPLS, *_REGISTRY[op], *_ALIASES.get(op, {})]))


def get(op: str, impl: str | None = None, is_cuda: bool = False):
    """The function implementing ``op`` for the given choice."""
    module, name = _REGISTRY[op][resolve(op, impl, is_cuda)]
    return getattr(importlib.import_module(f"titans_lnn.kernels.{module}"), name)


def available(op: str) -> list[str]:
    """Implementations of ``op`` whose module imports here (GPU forms count if Triton imports)."""
    found = []
    for impl, (module, _) in _REGISTRY[op].items():
        try:
            importlib.import_module(f"titans_lnn.kernels.{module}")
        except Exception:
            continue
        if impl == _GPU[op] and not triton_available():
            continue
        found.append(impl)
    return found
