"""Bits per token against the context read: stream a long text once, bin the losses by position.

A model with long-range memory predicts better the more it has read; a window-only model stops
improving past its window. The text is read in one pass with the state carried (fixed memory, any
length), and each token's loss lands in the bin of its position: log-spaced bins 0-128, 128-1K,
1K-8K, 8K-64K, ... up to the text's length (K = 1024).

    titans-lnn eval perplexity --checkpoint runs/tiny/model                 # KJV held-out tail
    titans-lnn eval perplexity --checkpoint runs/tiny/model --data book.txt --max-tokens 100000

Default text: the last ``val_fraction`` (1%, training's default hold-out) of the King James Bible,
the tail that ``titans-lnn train`` never trains on. Bits per byte divide the total bits by the UTF-8
bytes of the predicted text (equal to bits per token for the byte tokenizer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from titans_lnn.evals.runner import stream_nll
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import Tokenizer

__all__ = ["bits_by_position", "evaluate_perplexity", "position_edges"]

LOG2E = 1 / math.log(2)


def position_edges(n: int, first: int = 128, factor: int = 8) -> list[int]:
    """Bin edges ``[0, first, first * factor, ..., n]`` (each edge < n, then n itself)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    edges, e = [0], first
    while e < n:
        edges.append(e)
        e *= factor
    return edges + [n]


def bits_by_position(model: TitansLNN, tokens, chunk_len: int = 2048, edges: Sequence[int] | None = None, *,
                     ignore_ids: Sequence[int] = (), progress: bool = True) -> dict:
    """Stream ``tokens`` (1-D) through ``model`` and average the per-token loss in position bins.

    Token ``t`` (its prediction read ``t`` tokens) counts in the bin ``edges[i] <= t < edges[i + 1]``;
    token 0 has no prediction, and targets in ``ignore_ids`` (record separators) are left out.
    Returns ``{"tokens", "bits", "bins": [{"start", "end", "tokens", "bits"}]}`` (bits per token,
    None for an empty bin) and ``"nll_sum"`` (total nats).
    """
    n = len(tokens)
    if n < 2:
        raise ValueError(f"{n} token(s): need at least 2 to score a prediction")
    edges = list(edges) if edges is not None else position_edges(n)
    if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[-1] < n:
        raise ValueError(f"edges={edges} must rise strictly from 0 to at least the length {n}")
    inner = torch.tensor(edges[1:-1], dtype=torch.long)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    ignore = torch.tensor(sorted(set(ignore_ids)), dtype=torch.long)
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens.astype(np.int64, copy=False))
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    for start, nll, _ in stream_nll(model, tokens, chunk_len, progress=progress):
        nll = nll[0].double().cpu()  # (L,)
        pos = torch.arange(start, start + nll.shape[0])  # (L,)
        keep = ~torch.isin(tokens[start:start + nll.shape[0]], ignore)
        which = torch.bucketize(pos[keep], inner, right=True)
        sums.index_add_(0, which, nll[keep])
        counts.index_add_(0, which, torch.ones_like(which))
    bins = [{"start": a, "end": b, "tokens": int(c), "bits": float(s / c * LOG2E) if c else None}
            for a, b, s, c in zip(edges, edges[1:], sums.tolist(), counts.tolist())]
    total, nll_sum = int(counts.sum()), float(sums.sum())
    if total == 0:
        raise ValueError("no token was scored (every target is in ignore_ids)")
    return {"tokens": total, "bits": nll_sum / total * LOG2E, "nll_sum": nll_sum, "bins": bins}


def evaluate_perplexity(model: TitansLNN, tokenizer: Tokenizer, data: str | os.PathLike | None = None, *,
                        max_tokens: int | None = None, val_fraction: float = 0.01, chunk_len: int = 2048,
                        edges: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Bits per token (and per byte) by position on ``data`` (a text file or folder; default: the KJV's
    held-out tail), the first ``max_tokens`` tokens of it. Returns :func:`bits_by_position`'s dict
    plus ``bits_per_byte``, ``bytes``, ``data``, ``tokenizer``."""
    from titans_lnn.training.data import load_corpus

    if data is None:
        tokens, name = load_corpus("kjv", tokenizer).split(val_fraction, by="tail").val, f"kjv (last {val_fraction:g})"
    else:
        tokens, name = load_corpus(data, tokenizer, format="text").tokens, os.fspath(data)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    result = bits_by_position(model, tokens, chunk_len, edges, progress=progress)
    n_bytes = result["tokens"] if tokenizer.name == "byte" else len(tokenizer.decode(tokens[1:]).encode("utf-8"))
    return {"data": name, "tokenizer": tokenizer.name, **result, "bytes": n_bytes,
            "bits_per_byte": result["nll_sum"] * LOG2E / max(n_bytes, 1)}
