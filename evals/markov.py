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

__all__ = ["kmer_codes", "MarkovModel", "online_table_logprobs", "OnlineMixer", "count_selector", "mix_bits",
           "TrainedMixer", "poe_experts", "n_poe_selectors", "fit_poe", "poe_bits", "markov_table", "main"]

MAX_ORDER = 30  # a (k+1)-mer's base-4 code must fit in an int64


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
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_ORDER:
            raise ValueError(f"k={k!r} is invalid: expected an order in [0, {MAX_ORDER}]")
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

    def logprobs(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prediction at every position of ids (L,): ``(logp, count)``, ``logp`` (L, 4) float32 natural-log
        P(b | the k bases before position i) for b = A, C, G, T and ``count`` (L,) int64 n(c), the training
        count of that context; where position i has no k A/C/G/T bases before it (i < k, or an N among them)
        the row is uniform and the count -1. Position i's own base is not looked at (an N there gets a row)."""
        ids = np.asarray(ids)
        L = len(ids)
        logp = np.full((L, 4), -math.log(4), dtype=np.float32)
        count = np.full(L, -1, dtype=np.int64)
        code, ok = kmer_codes(ids, self.k)  # window j = the context of position j + k
        code, ok = code[:max(L - self.k, 0)], ok[:max(L - self.k, 0)]
        where = np.flatnonzero(ok) + self.k  # (M,) positions with a full context
        n = np.stack([self._count(code[ok] * 4 + b) for b in range(4)], axis=1)  # (M, 4) n(c, b)
        total = n.sum(axis=1)  # (M,) n(c)
        logp[where] = np.log((n + self.alpha) / (total[:, None] + 4 * self.alpha))
        count[where] = total
        return logp, count

    def bits(self, ids: np.ndarray) -> np.ndarray:
        """(M,) bits of each scored base of ids (L,): those with k A/C/G/T bases before them and A/C/G/T
        themselves, in order (the first scored base is position k)."""
        code, ok = kmer_codes(ids, self.k + 1)
        code = code[ok]
        context = code // 4 * 4  # the (k+1)-mer codes of the context followed by each of A, C, G, T
        total = sum(self._count(context + b) for b in range(4))  # (M,) n(c)
        p = (self._count(code) + self.alpha) / (total + 4 * self.alpha)
        return -np.log2(p)


def online_table_logprobs(ids: np.ndarray, k: int, alpha: float = 1 / 16) -> tuple[np.ndarray, np.ndarray]:
    """An order-``k`` table of the genome being read, counted as it is read (a DNA compressor's adaptive model):
    ``(logp, count)`` as :meth:`MarkovModel.logprobs`, row t from the (k+1)-mers of ``ids`` (L,) that end
    before position t only, P(b | c) = (n_<t(c, b) + alpha) / (n_<t(c) + 4 alpha). A context not seen yet gives
    a uniform row (count 0): in a product of experts it says nothing. Within-genome repeats (rRNA operons, IS
    elements) are what a long order finds here."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < MAX_ORDER:
        raise ValueError(f"k={k!r} is invalid: expected an order in [1, {MAX_ORDER - 1}]")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is invalid: expected a smoothing count > 0")
    ids = np.asarray(ids)
    L = len(ids)
    logp = np.full((L, 4), -math.log(4), dtype=np.float32)
    count = np.full(L, -1, dtype=np.int64)
    full, full_ok = kmer_codes(ids, k + 1)  # window j: positions j..j+k, the context of j+k and its base
    ctx, ctx_ok = kmer_codes(ids, k)  # window j: the context of position j+k
    M = len(full)
    if M == 0:
        return logp, count
    seen = np.flatnonzero(full_ok)  # (S,) windows that count, in position order
    uniq, dense = np.unique(full[seen], return_inverse=True)
    keys = np.sort(dense.astype(np.int64) * M + seen)  # (S,) by (code, position): a code's windows in order
    j = np.flatnonzero(ctx_ok[:M])  # (Q,) windows whose position j + k has a full context
    n = np.zeros((len(j), 4), dtype=np.int64)
    for b in range(4):
        q = ctx[j] * 4 + b  # the (k+1)-mer that appends b
        qi = np.minimum(np.searchsorted(uniq, q), max(len(uniq) - 1, 0))
        hit = uniq[qi] == q if len(uniq) else np.zeros(len(q), dtype=bool)
        before = np.searchsorted(keys, qi * M + j) - np.searchsorted(keys, qi * M)  # windows j' < j with code q
        n[:, b] = np.where(hit, before, 0)
    total = n.sum(axis=1)
    logp[j + k] = np.log((n + alpha) / (total[:, None] + 4 * alpha))
    count[j + k] = total
    return logp, count


# ----------------------------------------------------------------------------- mixing predictors


COUNT_EDGES = (0, 1, 2, 4, 8, 32)  # selector buckets of the top order's context count: none, 0, 1, 2-3, 4-7, 8-31, 32+


def count_selector(count: np.ndarray) -> np.ndarray:
    """(L,) context counts (-1: no context) -> (L,) int64 bucket in [0, len(COUNT_EDGES)] by :data:`COUNT_EDGES`."""
    return np.searchsorted(np.asarray(COUNT_EDGES), np.asarray(count), side="right").astype(np.int64)


class OnlineMixer:
    """Logistic mixing of E predictors' next-base distributions, the weights learnt while reading.

    p(b) is proportional to exp(sum_e w[s, e] log p_e(b)): a product of experts with learnt exponents, one
    weight row per selector s (a bucket of how often the longest Markov context was seen in training, so that
    a long context seen once can be trusted differently from one seen a thousand times). This is how DNA
    compressors (XM, GeCo3, cmix) combine their models. It is causal: each block of ``block`` bases is
    predicted with the weights fitted on the blocks before it, then the weights take one gradient step
    (``lr`` times the block's summed gradient of the loss in nats), so no base is predicted by weights that
    have seen it. The weights start at ``1 / E`` (the geometric mean of the experts).
    """

    def __init__(self, n_experts: int, n_selectors: int = 1, *, lr: float = 0.002, block: int = 256):
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts={n_experts!r} is invalid: expected a whole number >= 1")
        if not isinstance(n_selectors, int) or n_selectors < 1:
            raise ValueError(f"n_selectors={n_selectors!r} is invalid: expected a whole number >= 1")
        if not lr >= 0:
            raise ValueError(f"lr={lr!r} is invalid: expected a learning rate >= 0")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block={block!r} is invalid: expected a whole number of bases >= 1")
        self.lr, self.block = lr, block
        self.weights = np.full((n_selectors, n_experts), 1.0 / n_experts)  # (S, E)

    def __call__(self, logp: np.ndarray, target: np.ndarray, selector: np.ndarray | None = None) -> np.ndarray:
        """Mix ``logp`` (N, E, 4) (each expert's natural-log probabilities of A, C, G, T) for the targets
        (N,) (0..3; any other value is predicted but neither scored nor learnt from), reading in order and
        updating the weights. Returns (N,) nats of each target (NaN where the target is not A/C/G/T)."""
        N, E = logp.shape[:2]
        S = self.weights.shape[0]
        if logp.shape != (N, E, 4) or E != self.weights.shape[1]:
            raise ValueError(f"logp has shape {logp.shape}: expected (N, {self.weights.shape[1]}, 4)")
        selector = np.zeros(N, dtype=np.int64) if selector is None else np.asarray(selector, dtype=np.int64)
        if selector.shape != (N,) or (N and (selector.min() < 0 or selector.max() >= S)):
            raise ValueError(f"selector must be (N,) = ({N},) ids in [0, {S}), got shape {selector.shape}")
        target = np.asarray(target)
        nll = np.full(N, np.nan)
        for a in range(0, N, self.block):
            lp, y, s = logp[a:a + self.block].astype(np.float64), target[a:a + self.block], selector[a:a + self.block]
            z = np.einsum("ne,neb->nb", self.weights[s], lp)  # (n, 4) mixed logits
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)  # (n, 4)
            ok = y < 4
            yy = np.where(ok, y, 0).astype(np.int64)
            nll[a:a + self.block] = np.where(ok, -np.log(p[np.arange(len(yy)), yy]), np.nan)
            p[np.arange(len(yy)), yy] -= 1.0  # d nll / d z = p - onehot(y)
            grad = np.einsum("nb,neb->ne", p * ok[:, None], lp)  # (n, E)
            np.add.at(self.weights, s, -self.lr * grad)
        return nll


def mixed_logprobs(models: Sequence[MarkovModel], ids: np.ndarray, a: int, b: int,
                   extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The experts of positions a..b-1 of ids (L,): ``(logp, selector)``, logp (b - a, E, 4) the Markov models'
    rows (in order) then ``extra``'s experts ((L, X, 4), e.g. a network's log-probabilities), selector the
    bucket of the last model's context count (:func:`count_selector`)."""
    lo = max(a - max(m.k for m in models), 0)  # the context of position a starts up to k bases before it
    parts, count = [], None
    for m in models:
        logp, count = m.logprobs(ids[lo:b])
        parts.append(logp[a - lo:])
    logp = np.stack(parts, axis=1)  # (b - a, K, 4)
    if extra is not None:
        logp = np.concatenate([logp, extra[a:b].astype(np.float32)], axis=1)  # (b - a, K + X, 4)
    return logp, count_selector(count[a - lo:])


def mix_bits(models: Sequence[MarkovModel], ids: np.ndarray, extra: np.ndarray | None = None, *,
             lr: float = 0.002, block: int = 256, slab: int = 1 << 18) -> np.ndarray:
    """(L,) bits of each base of ids (L,) under the :class:`OnlineMixer` of the Markov ``models`` (and the
    experts of ``extra`` (L, X, 4)), read once from the start (NaN where the base is not A/C/G/T). The
    experts are built ``slab`` positions at a time, so memory stays bounded on a whole genome."""
    ids = np.asarray(ids)
    if extra is not None and (extra.ndim != 3 or extra.shape[0] != len(ids) or extra.shape[2] != 4):
        raise ValueError(f"extra has shape {extra.shape}: expected ({len(ids)}, X, 4)")
    n_experts = len(models) + (0 if extra is None else extra.shape[1])
    mixer = OnlineMixer(n_experts, len(COUNT_EDGES) + 1, lr=lr, block=block)
    out = np.full(len(ids), np.nan)
    for a in range(0, len(ids), slab):
        logp, selector = mixed_logprobs(models, ids, a, min(a + slab, len(ids)), extra)
        out[a:a + len(logp)] = mixer(logp, ids[a:a + slab], selector) / math.log(2)
    return out


# ----------------------------------------------------------------------------- a trained product of experts


POE_LONG = (16, 20, 24)  # long orders: a context this long found in the other genome is a shared stretch, not chance
POE_KREF = 12  # the order whose context count (bucketed by count_selector) picks the weight row, with the long match


class TrainedMixer:
    """A product of experts with weights fitted once, offline, then fixed: p(b) is proportional to
    exp(sum_e w[s, e] log p_e(b)), one weight row per selector s (as :class:`OnlineMixer`, which learns while
    reading instead). ``fit`` minimises the mean log loss over (N,) fitting bases with L-BFGS; the caller
    keeps those bases apart from the ones the experts were counted on (:func:`fit_poe` cross-fits)."""

    def __init__(self, n_experts: int, n_selectors: int = 1):
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts={n_experts!r} is invalid: expected a whole number >= 1")
        if not isinstance(n_selectors, int) or n_selectors < 1:
            raise ValueError(f"n_selectors={n_selectors!r} is invalid: expected a whole number >= 1")
        self.weights = np.full((n_selectors, n_experts), 1.0 / n_experts)  # (S, E)

    def _check(self, logp: np.ndarray, target: np.ndarray, selector: np.ndarray) -> None:
        S, E = self.weights.shape
        N = len(target)
        if logp.shape != (N, E, 4):
            raise ValueError(f"logp has shape {logp.shape}: expected (N, E, 4) = ({N}, {E}, 4)")
        if selector.shape != (N,) or (N and (selector.min() < 0 or selector.max() >= S)):
            raise ValueError(f"selector must be (N,) = ({N},) ids in [0, {S}), got shape {selector.shape}")

    def fit(self, logp: np.ndarray, target: np.ndarray, selector: np.ndarray, *, steps: int = 200) -> TrainedMixer:
        """Fit the weights on ``logp`` (N, E, 4), ``target`` (N,) 0..3 (others ignored), ``selector`` (N,)."""
        import torch

        self._check(logp, target, selector)
        ok = np.asarray(target) < 4
        lp = torch.from_numpy(np.ascontiguousarray(logp[ok], dtype=np.float32))  # (M, E, 4)
        y = torch.from_numpy(np.asarray(target)[ok].astype(np.int64))  # (M,)
        s = torch.from_numpy(np.asarray(selector)[ok].astype(np.int64))  # (M,)
        w = torch.tensor(self.weights, dtype=torch.float32, requires_grad=True)  # (S, E)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = torch.einsum("me,meb->mb", w[s], lp)  # (M, 4) mixed logits
            loss = torch.nn.functional.cross_entropy(z, y)
            loss.backward()
            return loss

        opt.step(closure)
        self.weights = w.detach().double().numpy()
        return self

    def __call__(self, logp: np.ndarray, target: np.ndarray, selector: np.ndarray) -> np.ndarray:
        """(N,) nats of each target under the fixed weights (NaN where the target is not A/C/G/T)."""
        self._check(logp, target, selector)
        z = np.einsum("ne,neb->nb", self.weights[selector], logp.astype(np.float64))  # (N, 4)
        z -= z.max(axis=1, keepdims=True)
        logz = np.log(np.exp(z).sum(axis=1))
        target = np.asarray(target)
        ok = target < 4
        picked = z[np.arange(len(target)), np.where(ok, target, 0).astype(np.int64)]
        return np.where(ok, logz - picked, np.nan)


def poe_experts(models: Sequence[MarkovModel], ids: np.ndarray, a: int, b: int, extra: np.ndarray | None = None,
                *, kref: int = POE_KREF) -> tuple[np.ndarray, np.ndarray]:
    """The experts of positions a..b-1 of ids (L,) for a :class:`TrainedMixer`: ``(logp, selector)``, logp
    (b - a, E, 4) the Markov models' rows (in order) then ``extra``'s ((L, X, 4)); selector = the
    :func:`count_selector` bucket of order ``kref``'s context count times (1 + the number of models of order >
    ``kref``) plus how many of those longer orders have seen their context (contexts nest, so that is the
    longest one seen): a long shared stretch is trusted differently from a short chance match."""
    orders = [m.k for m in models]
    if kref not in orders:
        raise ValueError(f"kref={kref} is not among the models' orders {orders}")
    lo = max(a - max(orders), 0)
    parts, counts = [], {}
    for m in models:
        logp, count = m.logprobs(ids[lo:b])
        parts.append(logp[a - lo:])
        counts[m.k] = count[a - lo:]
    logp = np.stack(parts, axis=1)  # (b - a, K, 4)
    if extra is not None:
        logp = np.concatenate([logp, extra[a:b].astype(np.float32)], axis=1)  # (b - a, K + X, 4)
    longer = [k for k in orders if k > kref]
    seen = sum((counts[k] > 0).astype(np.int64) for k in longer) if longer else np.zeros(b - a, dtype=np.int64)
    return logp, count_selector(counts[kref]) * (len(longer) + 1) + seen


def n_poe_selectors(models: Sequence[MarkovModel], kref: int = POE_KREF) -> int:
    """How many selector values :func:`poe_experts` gives for these models."""
    return (len(COUNT_EDGES) + 1) * (1 + sum(m.k > kref for m in models))


def fit_poe(models_apart: Sequence[MarkovModel], ids: np.ndarray, extra: np.ndarray | None = None, *,
            kref: int = POE_KREF, steps: int = 200) -> TrainedMixer:
    """A :class:`TrainedMixer` fitted on the bases of ids (L,), predicted by ``models_apart`` (Markov models
    counted on sequences that do not contain these bases: cross-fitting, so that no table predicts a base it
    counted) and by ``extra`` (L, X, 4)."""
    logp, selector = poe_experts(models_apart, ids, 0, len(ids), extra, kref=kref)
    mixer = TrainedMixer(logp.shape[1], n_poe_selectors(models_apart, kref))
    return mixer.fit(logp, np.asarray(ids), selector, steps=steps)


def poe_bits(mixer: TrainedMixer, models: Sequence[MarkovModel], ids: np.ndarray, extra: np.ndarray | None = None,
             *, kref: int = POE_KREF, slab: int = 1 << 18) -> np.ndarray:
    """(L,) bits of each base of ids (L,) under the fixed ``mixer`` (NaN where the base is not A/C/G/T); the
    experts are built ``slab`` positions at a time."""
    ids = np.asarray(ids)
    out = np.full(len(ids), np.nan)
    for a in range(0, len(ids), slab):
        b = min(a + slab, len(ids))
        logp, selector = poe_experts(models, ids, a, b, extra, kref=kref)
        out[a:b] = mixer(logp, ids[a:b], selector) / math.log(2)
    return out


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
    p.add_argument("--kmax", type=integer(0, MAX_ORDER), default=12, help="orders 0..kmax (default: 12)")
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
