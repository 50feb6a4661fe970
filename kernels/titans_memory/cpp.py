"""The C++ build of the memory's chunk loop (``csrc/chunk_loop.cpp``) and the switch that picks it.

``chunk_loop.py`` runs its loop over chunks either in Python (the reference, and the fallback) or in one
call of the C++ extension: the same matmuls per chunk through ATen, without the interpreter and the autograd
dispatch between them, and the elementwise chains between them fused into loops (issue 12: per-op overhead
is the memory's cost on a CPU). The extension is built on first use with ``torch.utils.cpp_extension.load``
(g++ and ninja) into torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions):
~50 s of one core once, then ~0.3 s per process to load the cached library. Importing this module builds
nothing.

$TITANS_LNN_MEMORY_LOOP (read at each call): "cpp" (default) runs the C++ loop on CPU tensors of fp32 or fp64
when the extension builds, and the Python loop otherwise (CUDA tensors, bf16, or a failed build, which warns
once with the reason); "python" always runs the Python loop.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings

import torch

LOOP_ENV = "TITANS_LNN_MEMORY_LOOP"
LOOPS = ("cpp", "python")
CSRC = pathlib.Path(__file__).parent / "csrc"
SOURCE = CSRC / "chunk_loop.cpp"  # includes the headers chunk_fused*.h beside it
_DTYPES = (torch.float32, torch.float64)
# -fopenmp: ATen's parallel_for (which chunk_infer.h uses to split the memories between torch's threads) is a
# header template whose OpenMP pragma compiles to a serial loop without it. The runtime it links, libgomp.so.1, is
# the one torch has loaded already (the same soname): one thread pool, torch's.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_state: dict = {}  # "module": the loaded extension, or "error": why it could not be built (after one try)


def loop_flag() -> str:
    """$TITANS_LNN_MEMORY_LOOP, checked: "cpp" (default) or "python"."""
    flag = os.environ.get(LOOP_ENV, "cpp") or "cpp"
    if flag not in LOOPS:
        raise ValueError(f"${LOOP_ENV}={flag!r} is invalid: expected 'cpp' (the C++ chunk loop) or 'python'")
    return flag


def load():
    """The extension module (built on the first call of the process, cached on disk), or None when it cannot
    be built: then one warning names why, and later calls return None without trying again."""
    if "module" in _state or "error" in _state:
        return _state.get("module")
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(name=_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                    verbose=False)
    except Exception as err:  # noqa: BLE001 (a compiler, linker or loader failure of any kind falls back)
        _state["error"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"titans-lnn: the C++ chunk loop of the memory could not be built ({_state['error']}); "
                      f"the Python loop runs instead (set ${LOOP_ENV}=python to silence this)", RuntimeWarning,
                      stacklevel=2)
        return None
    _state["module"] = module
    return module


def _name() -> str:
    """The extension's name, with a digest of every file in csrc/: torch rebuilds when the .cpp changes but not
    when only a header does, and a per-version name also keeps two versions of the package apart in the cache."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for path in sorted(CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"titans_lnn_chunk_loop_{digest.hexdigest()[:12]}"


def build_error() -> str | None:
    """Why the extension could not be built (after ``load`` failed), else None."""
    return _state.get("error")


def module_for(t: torch.Tensor):
    """The extension to run the loop on tensors like ``t`` with, or None for the Python loop: None when
    $TITANS_LNN_MEMORY_LOOP is "python", ``t`` is not on the CPU or not fp32/fp64, the build failed, or
    torch.compile is tracing (dynamo traces the Python loop, not the extension)."""
    if torch.compiler.is_compiling() or loop_flag() == "python" or t.device.type != "cpu" or t.dtype not in _DTYPES:
        return None
    return load()
