"""Multi-query associative recall (MQAR), with the rules of Zoology (Arora et al. 2023).

The vocabulary is split in two: keys are ids ``1 .. vocab_size // 2 - 1``, values
``vocab_size // 2 .. vocab_size - 1``. A sequence of ``seq_len`` tokens starts with
``num_kv_pairs`` distinct keys, each followed by its value (distinct too); each key is then queried
once, at position ``2 * num_kv_pairs + 2 * gap``, where the gaps are drawn without replacement from
``0 .. (seq_len - 2 * num_kv_pairs) // 2 - 1`` with probability proportional to
``power_a * gap ** (power_a - 1)`` (gap counted from 1: short distances are likelier, as repeated
bigrams in text). The label at a query is its key's value (the model predicts it as the next token);
every other label is -100. The remaining positions are random ids from the whole vocabulary
(``random_non_queries``; 0 otherwise).

Deterministic under ``seed`` through a local ``numpy.random.Generator`` (Zoology seeds numpy's
global state, so its draws differ, but the distribution is the same). Zoology also asserts
``vocab_size > seq_len``; that is not needed here, so ``seq_len`` sweeps to long contexts.

    input_ids, labels = make_mqar(num_examples=256, seq_len=512, num_kv_pairs=32, vocab_size=8192)
"""

from __future__ import annotations

import numpy as np
import torch


def make_mqar(num_examples: int, seq_len: int, num_kv_pairs: int, *, vocab_size: int = 8192,
              power_a: float = 0.01, random_non_queries: bool = True,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples: ``(input_ids, labels)``, both int64 of shape (num_examples, seq_len)."""
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples} must be >= 1")
    if seq_len < 4 or seq_len % 2:
        raise ValueError(f"seq_len={seq_len} must be even and >= 4")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs={num_kv_pairs} must be in [1, seq_len / 4 = {seq_len // 4}]")
    key_vocab = vocab_size // 2
    if num_kv_pairs > key_vocab - 1:
        raise ValueError(f"vocab_size={vocab_size} has only {key_vocab - 1} keys for "
                         f"num_kv_pairs={num_kv_pairs}")
    if not power_a > 0:
        raise ValueError(f"power_a={power_a} must be > 0")
    rng = np.random.default_rng(seed)
    B, N = num_examples, num_kv_pairs
    context = 2 * N
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    cdf = np.cumsum(p)
    cdf /= cdf[-1]

    key_ids, value_ids = np.arange(1, key_vocab), np.arange(key_vocab, vocab_size)
    keys = np.stack([rng.choice(key_ids, N, replace=False) for _ in range(B)])  # (B, N)
    values = np.stack([rng.choice(value_ids, N, replace=False) for _ in range(B)])  # (B, N)
    gaps = np.empty((B, N), dtype=np.int64)
    for b in range(B):
        gaps[b] = _power_law_gaps(rng, cdf, p, N)

    inputs = np.zeros((B, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps  # (B, N)
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((B, seq_len), -100, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    if random_non_queries:
        fill = inputs == 0
        inputs[fill] = rng.integers(0, vocab_size, size=int(fill.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _power_law_gaps(rng: np.random.Generator, cdf: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct draws from ``p``, as ``rng.choice(len(p), n, replace=False, p=p)`` (successive
    sampling), by rejecting repeats of draws from the shared ``cdf``; exact choice for the rest."""
    chosen: dict[int, None] = {}
    for _ in range(4):
        for g in np.searchsorted(cdf, rng.random(n - len(chosen)), side="right").tolist():
            chosen.setdefault(min(g, len(p) - 1))
            if len(chosen) == n:
                return np.fromiter(chosen, dtype=np.int64, count=n)
    rest = p.copy()
    rest[list(chosen)] = 0.0
    rest /= rest.sum()
    more = rng.choice(len(p), n - len(chosen), replace=False, p=rest)
    return np.concatenate([np.fromiter(chosen, dtype=np.int64, count=len(chosen)), more])
