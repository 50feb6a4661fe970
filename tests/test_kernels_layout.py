"""The layout of ``titans_lnn.kernels``: one folder per op, named apart from the dispatching functions;
importing (and running on CPU) never imports Triton or a CUDA attention library; one ``triton_available``.

The checks that import kernel modules run in a fresh interpreter: importing a Triton kernel module here
would decorate its kernels before the Triton tests set ``TRITON_INTERPRET=1``.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TITANS_LNN_")}  # default dispatch
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_import_and_cpu_calls_do_not_load_triton_or_cuda_libraries():
    run_python(
        "import sys, torch\n"
        "import titans_lnn, titans_lnn.kernels as K\n"
        "import titans_lnn.kernels.liquid, titans_lnn.kernels.titans_memory\n"
        "import titans_lnn.kernels.window_attention, titans_lnn.kernels.window_attention.cuda\n"
        "x = torch.randn(1, 5, 3)\n"
        "K.liquid_scan(-x.abs(), x)\n"
        "q = torch.randn(1, 2, 5, 4)\n"
        "g = torch.rand(1, 2, 5)\n"
        "w = (torch.zeros(1, 2, 4, 4),)\n"
        "K.memory_update(q, q, q, g, g, g, w, w, w, chunk_size=2)\n"
        "K.sliding_window_attention(q, q, q, window=3)\n"
        "bad = [m for m in ('triton', 'flash_attn', 'xformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )


def test_no_kernels_module_shares_a_name_with_an_exported_function():
    """Every module of the package imported (Triton ones too): the dispatchers are still functions,
    and no module is named like one of them (which would need an import-order trick)."""
    run_python(
        "import importlib, inspect, pkgutil\n"
        "import titans_lnn.kernels as K\n"
        "functions = {n for n in K.__all__ if inspect.isfunction(getattr(K, n))}\n"
        "assert {'liquid_scan', 'memory_update', 'sliding_window_attention'} <= functions, functions\n"
        "names = []\n"
        "for info in pkgutil.walk_packages(K.__path__, K.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "    names.append(info.name.rsplit('.', 1)[1])\n"
        "assert {'naive', 'chunked', 'blocked', 'triton', 'cuda'} <= set(names), names\n"
        "shared = functions & set(names)\n"
        "assert not shared, f'modules named like exported functions: {sorted(shared)}'\n"
        "for n in functions:\n"
        "    assert inspect.isfunction(getattr(K, n)), (n, getattr(K, n))\n"
    )


def test_every_dispatch_entry_is_the_named_function_of_its_op_folder():
    run_python(
        "from titans_lnn.kernels import dispatch\n"
        "folders = {'liquid_scan': 'liquid', 'memory_update': 'titans_memory',\n"
        "           'sliding_window_attention': 'window_attention'}\n"
        "for op, folder in folders.items():\n"
        "    for impl in dispatch.accepted(op)[1:]:\n"
        "        fn = dispatch.get(op, impl)\n"
        "        assert fn.__module__.startswith(f'titans_lnn.kernels.{folder}.'), (op, impl, fn.__module__)\n"
        "        assert fn.__name__.startswith(op), (op, impl, fn.__name__)\n"
    )


def test_attention_gpu_form_is_named_cuda_and_triton_still_reaches_it():
    """Attention's GPU form is CUDA libraries, not a Triton kernel: "cuda"; "triton" (as in
    TITANS_LNN_IMPL=triton for the whole model) means the same there, and "cuda" only exists there."""
    from titans_lnn.kernels import dispatch

    assert dispatch.resolve("sliding_window_attention", "triton", False) == "cuda"
    assert dispatch.resolve("sliding_window_attention", "cuda", False) == "cuda"
    assert dispatch.resolve("liquid_scan", "triton", False) == "triton"
    for op in ("liquid_scan", "memory_update"):
        with pytest.raises(ValueError, match=f"'cuda' for {op} is invalid"):
            dispatch.resolve(op, "cuda", False)
    with pytest.raises(ValueError, match="op 'scan' is unknown"):
        dispatch.resolve("scan", "ref", False)


def test_one_triton_available_in_the_package():
    folders = [ROOT / "titans_lnn", ROOT / "kernels", ROOT / "memory", ROOT / "evals"]
    defs = [f"{path.relative_to(ROOT)}:{i}" for folder in folders for path in sorted(folder.rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if "def triton_available(" in line]
    assert len(defs) == 1, f"triton_available defined more than once: {defs}"
