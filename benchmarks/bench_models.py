"""The models each benchmark compares, ours and the competitors', built with matched configurations.

Every competitor is imported lazily: a missing one raises ``MissingCompetitor``, whose message names
the extra that installs it. What the matched configurations share, and where the two sides still
differ, is written out in ``DIFFERENCES`` (copied into RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import os
import time
from unittest import mock

import torch

from titans_lnn.kernels.titans_memory import cpp

INSTALL_HINT = "pip install -e '.[bench]'"
COMPETITORS = {"ncps": "ncps", "titans-pytorch": "titans_pytorch"}  # PyPI name -> import name

# Section 1: the tiny model's liquid core width.
LIQUID_WIDTH = 128
# Section 2: the tiny model's memory (TitansLNNConfig "tiny": d_model 128, mem_heads 2, mem_depth 2, mem_chunk 16).
MEMORY = dict(dim=128, heads=2, depth=2, hidden_mult=2.0, chunk_size=16, max_grad_norm=2.0)
# Section 3: titans-pytorch's MAC matched to our "tiny" MAC (d 128, 4 layers, 4 heads of 32, segment 128,
# 4 persistent tokens, SwiGLU/GEGLU 4x, memory 2 heads of 64, depth 2, hidden 128, chunk 16).
MAC_KWARGS = dict(num_tokens=256, dim=128, depth=4, segment_len=128, num_persist_mem_tokens=4,
                  num_longterm_mem_tokens=16, heads=4, dim_head=32, ff_mult=4, neural_memory_segment_len=16)

DIFFERENCES = {
    "liquid": [
        "ncps `CfC(128, 128)` (mode `default`, backbone 1 x 128 units, lecun_tanh) steps through time in a Python "
        "loop: its gates read the previous state, so it cannot run in parallel. `titans_lnn.CfCCell` is the same "
        "state-dependent cell (sequential too), so the like-for-like parallel counterpart is our `LiquidCore` "
        "(input-dependent decay, chunked parallel scan) at the same input/output width 128.",
        "`ours (state 128)` has `liquid_state=1`: 128 state entries, as many as CfC's 128 units. "
        "`ours (tiny)` is the core as the tiny model uses it (`liquid_state=8`: 1024 state entries).",
    ],
    "memory": [
        "Same dim 128, 2 heads of 64, memory MLP 64 -> 128 -> 64 (depth 2), chunk 16, gradient clipping at 2.0.",
        "titans-pytorch `batch_size=None` (its default) takes every chunk's gradient at the *initial* weights "
        "of the call and only carries momentum and decay across chunks: cheaper, and not the paper's update. "
        "`batch_size=16` re-takes the gradients at each chunk's starting weights, as the paper (and ours) do.",
        "Ours keeps per-token momentum, learning rate and decay inside a chunk (titans-pytorch: one value per "
        "chunk for momentum and decay), clips each token's gradient (titans-pytorch: each chunk's), adds a "
        "causal depthwise convolution on q/k/v and an output gate; titans-pytorch adds a LayerNorm + residual "
        "around the memory MLP.",
    ],
    "model": [
        "titans-pytorch `MemoryAsContextTransformer(dim=128, depth=4, segment_len=128, heads=4, dim_head=32, "
        "num_persist_mem_tokens=4, num_longterm_mem_tokens=16, neural_memory_segment_len=16, ff_mult=4)` with "
        "memory heads 2 x 64, depth 2, expansion 2 (as section 2, its default `batch_size=None`). Its default "
        "`num_residual_streams=4` (hyper-connections) is one row; `num_residual_streams=1` another.",
        "The goal compares against those two. A third row, for reference, is the 1-stream MAC with "
        "`neural_memory_batch_size=16`: its memory then takes each chunk's gradient at the weights the previous "
        "chunks left (the paper's update, which ours computes; section 2's `batch_size=16`), where its default takes "
        "all of a call's gradients at the call's initial weights in parallel.",
        "Ours (`tiny`, MAC) also has the liquid core in every block, grouped-query attention (2 KV heads), and "
        "reads one memory token per position (titans-pytorch: 16 long-term memory tokens per 128-token segment).",
        "Training step: forward, next-token cross-entropy, backward, AdamW step; B = 1. Inference: ours streams "
        "the sequence in pieces with its fixed-size state; titans-pytorch has no streaming prefill (its cache "
        "decodes one token per call), so it reads the sequence in one forward call.",
    ],
}


class MissingCompetitor(RuntimeError):
    pass


def missing_competitors(names) -> list[str]:
    """The PyPI names among ``names`` whose package does not import here."""
    return [n for n in names if importlib.util.find_spec(COMPETITORS[n]) is None]


def require(name: str):
    if missing_competitors([name]):
        raise MissingCompetitor(f"{name} is not installed: {INSTALL_HINT}")
    return importlib.import_module(COMPETITORS[name])


# ---------------------------------------------------------------------------------------------------
# builders: each returns a module in eval mode on ``device``


def liquid(impl: str, device) -> torch.nn.Module:
    if impl == "ncps":
        require("ncps")
        from ncps.torch import CfC

        return CfC(LIQUID_WIDTH, LIQUID_WIDTH).to(device).eval()
    from titans_lnn import LiquidCore, TitansLNNConfig

    n_state = {"ours-state128": 1, "ours-tiny": 8}[impl]
    return LiquidCore.from_config(TitansLNNConfig.from_preset("tiny", liquid_state=n_state)).to(device).eval()


def memory(impl: str, device) -> torch.nn.Module:
    m = MEMORY
    if impl == "ours":
        from titans_lnn.memory import NeuralMemory

        return NeuralMemory(m["dim"], heads=m["heads"], depth=m["depth"], hidden_mult=m["hidden_mult"],
                            chunk_size=m["chunk_size"], max_grad_norm=m["max_grad_norm"]).to(device).eval()
    tp = require("titans-pytorch")
    batch_size = {"titans-default": None, "titans-chunked": m["chunk_size"]}[impl]
    mem = tp.NeuralMemory(dim=m["dim"], heads=m["heads"], dim_head=m["dim"] // m["heads"],
                           chunk_size=m["chunk_size"], batch_size=batch_size, max_grad_norm=m["max_grad_norm"],
                           default_model_kwargs=dict(depth=m["depth"], expansion_factor=m["hidden_mult"]))
    return _materialize(mem).to(device).eval()


def model(impl: str, device, vocab_size: int = 256) -> torch.nn.Module:
    """ours-mac | ours-full | ours-swa (our variants of the tiny preset) | titans-mac | titans-mac-1stream |
    titans-mac-1stream-bs16 (its memory with ``batch_size=16``: the paper's per-chunk update, as ours)."""
    if impl.startswith("ours-"):
        from titans_lnn import TitansLNN, TitansLNNConfig

        config = TitansLNNConfig.from_preset("tiny", variant=impl[5:], vocab_size=vocab_size)
        return TitansLNN(config).to(device)
    tp = require("titans-pytorch")
    m = MEMORY
    streams, batch_size = {"titans-mac": (4, None), "titans-mac-1stream": (1, None),
                           "titans-mac-1stream-bs16": (1, m["chunk_size"])}[impl]
    mem_kwargs = dict(heads=m["heads"], dim_head=m["dim"] // m["heads"], max_grad_norm=m["max_grad_norm"],
                      default_model_kwargs=dict(depth=m["depth"], expansion_factor=m["hidden_mult"]))
    use_flex = torch.device(device).type == "cuda"
    mac = tp.MemoryAsContextTransformer(**{**MAC_KWARGS, "num_tokens": vocab_size}, num_residual_streams=streams,
                                        neural_memory_kwargs=mem_kwargs, neural_memory_batch_size=batch_size,
                                        use_flex_attn=use_flex)
    return _materialize(mac).to(device)


def _materialize(module: torch.nn.Module) -> torch.nn.Module:
    """titans-pytorch makes its per-head initial memory weights with ``einops.repeat``, i.e. expanded views
    whose elements share storage; an optimizer's in-place update (AdamW's weight decay) refuses them. Give
    each such parameter its own storage (same values)."""
    with torch.no_grad():
        for p in module.parameters():
            if 0 in p.stride() and p.numel() > 1:
                p.data = p.data.clone()
    return module


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------
# the compute bound (section 5)


def flops_per_token(module: torch.nn.Module, ids: torch.Tensor, tokens: int | None = None) -> float:
    """Matmul and convolution FLOPs (2 per multiply-add, torch.utils.flop_counter's formulas) of one forward
    call of ``module`` on ``ids`` (B, T), per token (``tokens``: how many the input holds, when it is not
    ids, e.g. B * T for features (B, T, D)). Elementwise ops are not counted: this is the work a
    matmul unit must do, the numerator of the compute bound. (A dispatch mode of our own, not
    ``FlopCounterMode``, whose module tracker fails on our persistent tokens under no_grad.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    # The memory's C++ chunk loop calls BLAS directly, below the dispatcher, where no mode sees its matmuls
    # (~22% of the tiny MAC's work): count with its Python loop, the same matmuls through ATen.
    with torch.no_grad(), Count(), mock.patch.dict(os.environ, {cpp.LOOP_ENV: "python"}):
        module(ids)  # (under inference_mode the mode would see matmul, not its mm/bmm)
    return Count.total / (tokens or ids.numel())



def matmul_flops_per_s(device, n: int = 1024, repeats: int = 5, clock=time.perf_counter) -> float:
    """The machine's measured fp32 matmul rate: the best of ``repeats`` (n x n) @ (n x n) products, in FLOP/s,
    with this process's torch threads, timed by ``clock`` (``time.process_time``: per CPU second, which a
    busy machine does not inflate)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        sync()
        t0 = clock()
        a @ b
        sync()
        best = min(best, clock() - t0)
    return 2 * n**3 / best


def compute_bound(module: torch.nn.Module, ids: torch.Tensor, device, tokens: int | None = None,
                  clock=time.perf_counter) -> dict:
    """FLOPs per token of ``module`` on ``ids`` (``tokens`` as in ``flops_per_token``), the matmul rate
    (timed by ``clock``), and their ratio: the tokens/s at which the counted work would keep the matmul unit
    busy all the time (the compute bound)."""
    flops = flops_per_token(module, ids, tokens)
    rate = matmul_flops_per_s(device, clock=clock)
    return dict(flops_per_token=flops, matmul_flops_per_s=rate, bound_tokens_per_s=rate / flops)
