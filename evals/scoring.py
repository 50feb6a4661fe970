"""Scoring of generations, and accuracy tables over (length, depth).

- :func:`exact_match` (BABILong's one-word answers): normalised equality, normalised meaning
  stripped, lower-cased and without trailing punctuation.
- :func:`all_values_contained`: RULER's ``string_match_all``, the fraction of the expected values
  found (case-insensitively) in the generation; RULER scores every NIAH task and VT with it.
- :func:`passkey_correct` (Mohtashami & Jaggi 2023): the first 5-digit number in the output is the key.
- :func:`score` picks the scorer a :class:`~titans_lnn.evals.haystack.Sample` names; :func:`mqar_accuracy`
  scores MQAR predictions; :func:`accuracy_table` averages scores by (length, depth).
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from titans_lnn.evals.haystack import Sample

_FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")
_WORD = re.compile(r"[^\s.,;:!?]+")  # a word ends at whitespace or sentence punctuation


def normalize(text: str) -> str:
    """Strip, lower-case, and drop trailing punctuation: ``" Kitchen.\\n"`` -> ``"kitchen"``."""
    return text.strip().lower().rstrip(string.punctuation + string.whitespace)


def exact_match(prediction: str, answer: str | Sequence[str], *, first_word: bool = False) -> float:
    """1.0 if the normalised prediction equals the (or any listed) normalised answer, else 0.0.

    ``first_word``: compare only the prediction's first word, for a generation that runs on past a
    one-word answer (``"kitchen. Mary went"``, ``"kitchen.rd"``: punctuation ends the word too).
    """
    if first_word:
        words = _WORD.findall(prediction)
        prediction = words[0] if words else ""
    answers = [answer] if isinstance(answer, str) else list(answer)
    return float(normalize(prediction) in {normalize(a) for a in answers})


def all_values_contained(prediction: str, answers: str | Sequence[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (case-insensitive substrings)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("answers is empty")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def passkey_correct(prediction: str, key: str | int) -> float:
    """1.0 if the first 5-digit number in ``prediction`` is ``key``."""
    found = _FIVE_DIGITS.search(prediction)
    return float(found is not None and found.group() == str(key))


def score(sample: Sample, prediction: str) -> float:
    """Score a generation for ``sample`` with the metric the sample names (0.0 .. 1.0)."""
    if sample.metric == "passkey":
        return passkey_correct(prediction, sample.answer)
    if sample.metric == "contains_all":
        return all_values_contained(prediction, sample.answer)
    if sample.metric == "exact_match":
        return exact_match(prediction, sample.answer, first_word=True)
    raise ValueError(f"unknown metric {sample.metric!r}; known: ['contains_all', 'exact_match', 'passkey']")


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% for z = 1.96): sensible at 0/n and n/n, where
    the normal approximation collapses to a point. Returns (low, high) in [0, 1]; (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mqar_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of MQAR answer positions (labels != -100) predicted right.

    ``predictions``: token ids (B, T), or logits (B, T, V) whose argmax is taken.
    """
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.dim() == labels.dim() + 1:
        predictions = predictions.argmax(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} do not match labels {tuple(labels.shape)}")
    mask = labels != -100
    if not mask.any():
        raise ValueError("labels hold no answer positions")
    return (predictions[mask] == labels[mask]).float().mean().item()


def _depth_key(depth: float | None) -> float | None:
    return None if depth is None else round(float(depth), 6)


def aggregate(records: Iterable[tuple[int, float | None, float]]) -> dict[tuple[int, float | None],
                                                                           tuple[float, int]]:
    """``(length, depth, score)`` records -> ``{(length, depth): (mean score, count)}``."""
    sums: dict[tuple[int, float | None], list[float]] = defaultdict(lambda: [0.0, 0])
    for length, depth, value in records:
        cell = sums[(int(length), _depth_key(depth))]
        cell[0] += float(value)
        cell[1] += 1
    return {k: (s / n, int(n)) for k, (s, n) in sums.items()}


@dataclass
class AccuracyTable:
    """Mean score per (length, depth): ``accuracy[i][j]`` for ``lengths[i]``, ``depths[j]`` (NaN if empty)."""

    lengths: list[int]
    depths: list[float | None]
    accuracy: list[list[float]]
    counts: list[list[int]]

    def format(self, digits: int = 2) -> str:
        """A plain-text table: one row per length, one column per depth."""
        head = ["length"] + ["-" if d is None else f"{d:g}" for d in self.depths]
        rows = [head] + [
            [str(length)] + ["" if math.isnan(a) else f"{a:.{digits}f}" for a in accs]
            for length, accs in zip(self.lengths, self.accuracy)
        ]
        widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def accuracy_table(records: Iterable[tuple[int, float | None, float]]) -> AccuracyTable:
    """Average ``(length, depth, score)`` records into a length x depth grid.

    Build the records as ``[(s.length, s.depth, score(s, generation)) for s, generation in ...]``.
    """
    cells = aggregate(records)
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells}, key=lambda d: -1.0 if d is None else d)
    accuracy = [[cells.get((n, d), (math.nan, 0))[0] for d in depths] for n in lengths]
    counts = [[cells.get((n, d), (math.nan, 0))[1] for d in depths] for n in lengths]
    return AccuracyTable(lengths, depths, accuracy, counts)
