"""Order-k Markov baselines for DNA: held-out bits per base of P(base | the k bases before it).

    python -m titans_lnn.evals.markov                                   # fit on E. coli K-12, score EC590
    python -m titans_lnn.evals.markov --train my.fa --test other.fa --kmax 8 --out markov.md

The model is fitted by counting (k+1)-mers on the training genome (both strands with ``--rc``) and smoothed
with add-``alpha`` (default 0.5, Krichevsky-Trofimov): P(b | c) = (n(c, b) + alpha) / (n(c) + 4 alpha).
Counts are kept sparse (sorted unique codes), so k = 12 (16.7 M possible contexts) costs a few times the
genome's length in memory. Bases whose context (or themselves) hold an N, and the first k bases of each
record, are not scored. The number to beat for a neural model is the best k's figure on the held-out genome.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["kmer_codes", "MarkovModel", "markov_table", "main"]


def kmer_codes(ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every window ids[i:i+k] of the nucleotide ids (L,) (A C G T = 0..3): its base-4 code (int64,
    first base most significant) and whether it holds only A/C/G/T. Both (L - k + 1,)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) - k + 1
    if n < 1:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    code, ok = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    for j in range(k):
        part = ids[j:j + n]
        ok &= part < 4
        code = code * 4 + np.where(part < 4, part, 0)
    return code, ok


class MarkovModel:
    """An order-``k`` Markov chain over A/C/G/T fitted on token-id sequences (see the module docstring)."""

    def __init__(self, k: int, alpha: float = 0.5):
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 15:
            raise ValueError(f"k={k!r} is invalid: expected an order in [0, 15]")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r} is invalid: expected a smoothing count > 0")
        self.k, self.alpha = k, alpha
        self.codes = np.zeros(0, dtype=np.int64)  # sorted (k+1)-mer codes seen
        self.counts = np.zeros(0, dtype=np.int64)  # their counts

    def fit(self, sequences: Sequence[np.ndarray]) -> MarkovModel:
        found = []
        for ids in sequences:
            code, ok = kmer_codes(ids, self.k + 1)
            found.append(code[ok])
        self.codes, self.counts = np.unique(np.concatenate(found) if found else np.zeros(0, np.int64),
                                            return_counts=True)
        return self

    def _count(self, codes: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.codes, codes)
        i = np.minimum(i, max(len(self.codes) - 1, 0))
        hit = (self.codes[i] == codes) if len(self.codes) else np.zeros(len(codes), dtype=bool)
        return np.where(hit, self.counts[i] if len(self.codes) else 0, 0)

    def bits(self, ids: np.ndarray) -> np.ndarray:
        """(M,) bits of each scored base of ids (L,): those with k A/C/G/T bases before them and A/C/G/T
        themselves, in order (the first scored base is position k)."""
        code, ok = kmer_codes(ids, self.k + 1)
        code = code[ok]
        context = code // 4 * 4  # the (k+1)-mer codes of the context followed by each of A, C, G, T
        total = sum(self._count(context + b) for b in range(4))  # (M,) n(c)
        p = (self._count(code) + self.alpha) / (total + 4 * self.alpha)
        return -np.log2(p)


def markov_table(train: Sequence[np.ndarray], tests: dict[str, Sequence[np.ndarray]], ks: Sequence[int], *,
                 alpha: float = 0.5) -> list[dict]:
    """One row per k: ``{"k", name: bits per base on that test set, ...}``."""
    rows = []
    for k in ks:
        model = MarkovModel(k, alpha).fit(train)
        row = {"k": k}
        for name, seqs in tests.items():
            bits = np.concatenate([model.bits(s) for s in seqs])
            row[name] = float(bits.mean()) if len(bits) else math.nan
        rows.append(row)
    return rows


def _records(spec: str, tokenizer) -> list[np.ndarray]:
    from titans_lnn.training.data import BUILTIN_CORPORA, load_corpus

    corpus = load_corpus(spec, tokenizer, format="auto" if spec in BUILTIN_CORPORA else "fasta")
    return [corpus.document(i) for i in range(len(corpus.doc_names))]


def main(argv: list[str] | None = None) -> int:
    from titans_lnn.cli import integer, number
    from titans_lnn.tokenizers import NucleotideTokenizer

    p = argparse.ArgumentParser(prog="python -m titans_lnn.evals.markov", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="ecoli-k12", help="the genome counted: FASTA or built-in (default: ecoli-k12)")
    p.add_argument("--test", default="ecoli-ec590", help="the held-out genome scored (default: ecoli-ec590)")
    p.add_argument("--kmax", type=integer(0, 15), default=12, help="orders 0..kmax (default: 12)")
    p.add_argument("--alpha", type=number(0, math.inf, open_lo=True, open_hi=True), default=0.5,
                   help="add-alpha smoothing (default: 0.5)")
    p.add_argument("--rc", action="store_true", help="count both strands of the training genome")
    p.add_argument("--out", help="write the markdown table to this file too")
    args = p.parse_args(argv)
    tok = NucleotideTokenizer()
    try:
        train = _records(args.train, tok)
        tests = {args.test: _records(args.test, tok), f"{args.train} (training genome)": train}
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"markov: error: {e}", file=sys.stderr)
        return 2
    if args.rc:
        train = train + [tok.reverse_complement(s) for s in train]
    rows = markov_table(train, tests, range(args.kmax + 1), alpha=args.alpha)
    names = list(tests)
    lines = [f"| k | bits/base on {names[0]} (held out) | bits/base on {names[1]} |", "|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r[names[0]]:.4f} | {r[names[1]]:.4f} |" for r in rows]
    best = min(rows, key=lambda r: r[names[0]])
    lines.append(f"\nBest held-out order: k = {best['k']}, {best[names[0]]:.4f} bits/base.")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
