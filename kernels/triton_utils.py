"""Helpers shared by the Triton kernels in ``titans_lnn.kernels``.

Nothing here imports Triton at module import time: ``triton_available()`` tries the import once and
never raises, so the package (and every kernel module) imports on machines without Triton, and a
kernel raises a clear ``RuntimeError`` only when it is called (``require_triton``).

Kernels run compiled on CUDA, or on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
fp32 only), which is how the tests run them without a GPU. The interpreter cannot benchmark, so
multi-config autotuning fails there: kernels are decorated with ``autotune`` below, which keeps only
the first config when interpreting.

Setting ``TITANS_LNN_POISON_OUTPUTS=1`` makes ``empty`` fill new outputs with NaN, so a test catches a
kernel that leaves an element unwritten (the trick fla plays by patching ``torch.empty``).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

POISON_ENV = "TITANS_LNN_POISON_OUTPUTS"
_TRUE = {"1", "true", "yes", "on", "y"}


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works. Never raises (a broken install counts as missing)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install can fail with anything in its import code
        return False
    return True


def is_interpreting() -> bool:
    """True when Triton will run kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton decides this when a kernel is decorated, so set the variable before importing a kernel
    module. Reads Triton's own knob where it exists (it honours overrides), the variable otherwise.
    """
    if triton_available():
        try:
            import triton

            return bool(triton.knobs.runtime.interpret)
        except AttributeError:  # triton < 3.3 has no knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def require_triton(op: str) -> None:
    """Raise a clear ``RuntimeError`` when Triton is missing; call at the top of a Triton op."""
    if not triton_available():
        raise RuntimeError(f"{op}: Triton is not installed (or fails to import); install the 'cuda' extra "
                           "(pip install 'titans-lnn[cuda]') or use the PyTorch form of this op")


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Triton kernels take CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices: {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type == "cuda" or (device.type == "cpu" and is_interpreting()):
        return
    raise ValueError(f"{op}: Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                     f"got {device}")


def check_dtype(op: str, *tensors: torch.Tensor | None) -> None:
    """Kernels load fp32/fp16/bf16 and accumulate in fp32; fp64 would silently lose precision."""
    for t in tensors:
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: dtype {t.dtype} is not supported (float32, float16, bfloat16); "
                            "use the PyTorch form for float64")


def device_guard(t: torch.Tensor):
    """Launch kernels on ``t``'s GPU even when it is not the current device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled when ``TITANS_LNN_POISON_OUTPUTS=1`` (tests)."""
    if os.environ.get(POISON_ENV, "0").strip().lower() in _TRUE:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device (sizes grids); 1 on CPU."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def autotune(configs, key, **kwargs):
    """``triton.autotune`` that keeps only ``configs[0]`` under the interpreter (which cannot time runs).

    Decorate kernels with it inside a ``if triton_available():`` block (it imports Triton).
    """
    import triton

    if is_interpreting():
        configs = list(configs)[:1]
    return triton.autotune(configs=configs, key=key, **kwargs)
