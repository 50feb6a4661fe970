"""Gene (CDS) vs intergenic windows: a linear probe on the model's embeddings against a k-mer baseline.

    python -m titans_lnn.evals.gene_probe --checkpoint runs/dna/model --out gene_probe.md
    python -m titans_lnn.evals.gene_probe --checkpoint runs/dna/model --bases 1000000 --other-bases 300000 --rc

Labels come from a real gene finder: Prodigal (its Python binding ``pyrodigal``, from PyPI: pip install
'titans-lnn[genomics]'), trained on and run over each whole genome (the "meta" mode for genomes under
100 kbp, too short to train on). The genome is cut into windows of ``--window`` bases; a window is a gene
(1) when at least 90% of its bases lie in a predicted CDS (either strand), intergenic (0) when at most 10%
do, and is left out otherwise.

Features of each window: (a) the model's embedding, the mean over the window of its final hidden states,
read with the context of everything streamed before it ("stream": the genome region is cut into
``--streams`` contiguous parts read side by side, each window seeing its part from the start) or of the
window alone ("window"); (b) the baseline, the window's k-mer frequencies for k = 1..``--kmax``
(k-mers with an N left out). Each goes to the same L2-regularised logistic regression (standardised
features, class-balanced weights, full-batch L-BFGS in torch), fitted on the first ``--train-fraction``
of the first genome's region (default E. coli K-12) and evaluated on the rest of it and on the second
genome (default E. coli EC590, another strain: the probe never saw it). AUROC and F1 (threshold 0.5)
go in one markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from titans_lnn.evals.embed import hidden_pieces, hidden_states, other_strand
from titans_lnn.model import TitansLNN

__all__ = ["gene_mask", "window_labels", "kmer_features", "window_embeddings", "fit_logistic", "auroc", "f1",
           "ProbeRow", "gene_probe", "markdown_table", "main"]

PURE = 0.9  # a window is a gene at >= PURE coding bases, intergenic at <= 1 - PURE; between: left out
MIN_TRAIN_BASES = 100_000  # Prodigal's training needs a long genome; shorter ones use its metagenomic mode


def _import_pyrodigal():
    try:
        import pyrodigal
    except ImportError as e:
        raise ImportError("gene labels need Prodigal's Python binding: pip install pyrodigal "
                          "(or pip install 'titans-lnn[genomics]')") from e
    return pyrodigal


def gene_mask(seq: str) -> np.ndarray:
    """(L,) bool: the bases of ``seq`` (A/C/G/T/N text) inside a CDS that Prodigal predicts on either strand."""
    pyrodigal = _import_pyrodigal()
    meta = len(seq) < MIN_TRAIN_BASES
    finder = pyrodigal.GeneFinder(meta=meta)
    if not meta:
        finder.train(seq)
    mask = np.zeros(len(seq), dtype=bool)
    for gene in finder.find_genes(seq):
        mask[gene.begin - 1:gene.end] = True  # 1-based, inclusive
    return mask


def window_labels(mask: np.ndarray, window: int, pure: float = PURE) -> np.ndarray:
    """(n,) int8 over the n = L // window whole windows of ``mask`` (L,): 1 gene, 0 intergenic, -1 mixed."""
    n = len(mask) // window
    frac = mask[:n * window].reshape(n, window).mean(1)  # (n,) share of coding bases
    labels = np.full(n, -1, dtype=np.int8)
    labels[frac >= pure] = 1
    labels[frac <= 1 - pure] = 0
    return labels


def kmer_features(ids: np.ndarray, window: int, kmax: int) -> np.ndarray:
    """(n, 4 + 16 + ... + 4^kmax) float32: each whole window's k-mer frequencies, k = 1..kmax, of the
    nucleotide ids (L,) (A C G T = 0..3; a k-mer with another id is not counted; a k-mer counts in the
    window where it starts when it ends there too)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // window
    ids = ids[:n * window]
    base = ids < 4
    parts = []
    for k in range(1, kmax + 1):
        L = len(ids) - k + 1
        code = np.zeros(L, dtype=np.int64)
        ok = np.ones(L, dtype=bool)
        for j in range(k):
            code = code * 4 + np.where(base[j:j + L], ids[j:j + L], 0)
            ok &= base[j:j + L]
        start = np.arange(L)
        ok &= (start % window) + k <= window  # the whole k-mer inside its window
        counts = np.bincount(start[ok] // window * 4 ** k + code[ok], minlength=n * 4 ** k).reshape(n, 4 ** k)
        parts.append(counts / np.maximum(counts.sum(1, keepdims=True), 1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def window_embeddings(model: TitansLNN, ids: np.ndarray, window: int, context: str, *, rc_complement=None,
                      streams: int = 16, chunk_len: int = 4096, batch: int = 64) -> np.ndarray:
    """(n, d): the mean final hidden state over each of the n = L // window whole windows of ``ids`` (L,).

    ``context="stream"``: the region is cut into ``streams`` contiguous parts read side by side as one
    batch (a CPU reads a batch of B pieces far faster than B pieces in turn), each streamed with its state
    carried, so every window is read with everything before it in its part (up to L / streams bases).
    ``"window"``: each window read alone. ``rc_complement``: the mean with the reverse strand's embeddings."""
    n = len(ids) // window
    ids = np.asarray(ids[:n * window])
    if context not in ("stream", "window"):
        raise ValueError(f"context={context!r} is invalid: expected 'stream' or 'window'")
    read = _stream_windows if context == "stream" else _alone_windows
    size = streams if context == "stream" else batch
    out = read(model, ids, window, size, chunk_len)
    if rc_complement is not None:  # the reverse strand's windows are the forward windows in reverse order
        rc = other_strand(rc_complement, ids)
        out = (out + read(model, rc, window, size, chunk_len)[::-1]) / 2
    return out


def _stream_windows(model: TitansLNN, ids: np.ndarray, window: int, streams: int, chunk_len: int) -> np.ndarray:
    n = len(ids) // window
    per = -(-n // streams)  # windows per stream; the last stream is padded with N after its real bases
    padded = np.full(streams * per * window, 4, dtype=ids.dtype)  # N: read after the real bases only (causal)
    padded[:len(ids)] = ids
    rows = torch.from_numpy(padded.reshape(streams, per * window))  # (S, per * W)
    sums = torch.zeros(streams, per, model.config.d_model, dtype=torch.float64)  # (S, per, d)
    for start, h in hidden_pieces(model, rows, chunk_len=chunk_len):
        w = torch.arange(start, start + h.shape[1]) // window  # (L,) the window of each position
        sums.index_add_(1, w, h.double().cpu())
    return (sums.reshape(streams * per, -1)[:n] / window).float().numpy()


def _alone_windows(model: TitansLNN, ids: np.ndarray, window: int, batch: int, chunk_len: int) -> np.ndarray:
    rows = ids.reshape(-1, window)  # (n, W)
    out = np.empty((len(rows), model.config.d_model), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            h, _ = hidden_states(model, torch.from_numpy(rows[s:s + batch].astype(np.int64)))  # (b, W, d)
            out[s:s + batch] = h.mean(1).float().numpy()
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, iters: int = 200):
    """An L2-regularised, class-balanced logistic regression on standardised ``x`` (N, F), ``y`` (N,) in
    {0, 1}; returns ``predict(x) -> (M,) probabilities``. Full-batch L-BFGS in float64 (deterministic)."""
    y = np.asarray(y)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"the probe needs both classes in its training windows; got labels {np.unique(y).tolist()}")
    X = torch.from_numpy(np.asarray(x, dtype=np.float64))
    mean, std = X.mean(0), X.std(0).clamp_min(1e-8)
    X = (X - mean) / std
    t = torch.from_numpy(y.astype(np.float64))
    weights = torch.where(t > 0, 0.5 / t.mean(), 0.5 / (1 - t.mean()))  # (N,) class-balanced, mean 1
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, t, weight=weights)
        loss = loss + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()

    def predict(x_new: np.ndarray) -> np.ndarray:
        Z = (torch.from_numpy(np.asarray(x_new, dtype=np.float64)) - mean) / std
        return torch.sigmoid(Z @ w + b).numpy()

    return predict


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN without both classes."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # Average ranks over ties: each run of equal scores gets the mean of its positions (1-based).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def f1(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of the positive class (gene) at ``threshold``."""
    y, pred = np.asarray(y).astype(bool), np.asarray(prob) >= threshold
    tp = int((y & pred).sum())
    return 2 * tp / max(1, int(y.sum()) + int(pred.sum()))


@dataclass
class ProbeRow:
    features: str  # "embedding (stream)", "k-mer k<=6", ...
    test: str  # the evaluation set's name
    windows: int  # labelled windows in it
    genes: float  # their share of gene windows
    auroc: float
    f1: float


@dataclass
class _Genome:
    name: str
    ids: np.ndarray  # (L,) nucleotide ids of the region used
    labels: np.ndarray  # (L // W,) int8: 1 gene, 0 intergenic, -1 left out


def _load_genome(spec: str, tokenizer, bases: int | None, window: int) -> _Genome:
    from titans_lnn.training.data import BUILTIN_CORPORA, load_corpus

    corpus = load_corpus(spec, tokenizer, format="auto" if spec in BUILTIN_CORPORA else "fasta")
    ids = corpus.document(0)  # the first record (the chromosome of a complete genome)
    seq = tokenizer.decode(ids)
    labels = window_labels(gene_mask(seq), window)  # Prodigal sees the whole record, the probe a region
    n = len(ids) if bases is None else min(bases, len(ids))
    n -= n % window
    if n < 2 * window:
        raise ValueError(f"{spec}: {n} bases to probe: expected at least two windows of {window}")
    return _Genome(f"{spec}:{corpus.doc_names[0].split()[0]}", ids[:n], labels[:n // window])


def gene_probe(model: TitansLNN | None, tokenizer, genome: str = "ecoli-k12", other: str | None = "ecoli-ec590", *,
               bases: int | None = 1_000_000, other_bases: int | None = 300_000, window: int = 100,
               train_fraction: float = 0.7, kmax: int = 6, contexts: Sequence[str] = ("stream", "window"),
               rc: bool = False, streams: int = 16, chunk_len: int = 4096, log=print) -> list[ProbeRow]:
    """Fit and evaluate the probes (see the module docstring); ``model=None`` runs the k-mer baseline only."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction!r} is invalid: expected a number in (0, 1)")
    t0 = time.perf_counter()
    first = _load_genome(genome, tokenizer, bases, window)
    cut = round(train_fraction * len(first.labels))
    sets = [("train", first.ids[:cut * window], first.labels[:cut]),
            (f"{first.name} held out (last {1 - train_fraction:.0%})", first.ids[cut * window:], first.labels[cut:])]
    if other is not None:
        second = _load_genome(other, tokenizer, other_bases, window)
        sets.append((f"{second.name} (other strain)", second.ids, second.labels))
    log(f"labels in {time.perf_counter() - t0:.1f} s: " + ", ".join(
        f"{name.split(' ')[0]} {int((y >= 0).sum())} windows ({(y == 1).sum() / max(1, (y >= 0).sum()):.0%} gene)"
        for name, _, y in sets))

    # A k-mer tokenizer's ids name k bases each: the baseline counts the bases themselves (each token's own).
    bases_of = tokenizer.to_bases if hasattr(tokenizer, "to_bases") else (lambda ids: ids)
    featurisers = {f"k-mer frequencies, k <= {kmax}": lambda ids: kmer_features(bases_of(ids), window, kmax)}
    complement = None if not rc else (tokenizer.complement_ids if hasattr(tokenizer, "complement_ids")
                                      else tokenizer.reverse_complement)
    for context in (contexts if model is not None else ()):
        seen = "streamed genome" if context == "stream" else "window alone"
        name = f"embedding ({seen}{', RC-averaged' if rc else ''})"
        featurisers[name] = (lambda ids, c=context: window_embeddings(model, ids, window, c, rc_complement=complement,
                                                                       streams=streams, chunk_len=chunk_len))
    rows = []
    for feat_name, featurise in featurisers.items():
        t1 = time.perf_counter()
        feats = [featurise(ids) for _, ids, _ in sets]
        keep = [y >= 0 for _, _, y in sets]
        predict = fit_logistic(feats[0][keep[0]], sets[0][2][keep[0]])
        for (set_name, _, y), x, k in zip(sets[1:], feats[1:], keep[1:]):
            prob = predict(x[k])
            rows.append(ProbeRow(feat_name, set_name, int(k.sum()), float(y[k].mean()), auroc(y[k], prob),
                                 f1(y[k], prob)))
        log(f"{feat_name}: {time.perf_counter() - t1:.1f} s")
    return rows


def markdown_table(rows: Sequence[ProbeRow]) -> str:
    lines = ["| features | evaluated on | windows | gene share | AUROC | F1 |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.features} | {r.test} | {r.windows} | {r.genes:.2f} | {r.auroc:.3f} | {r.f1:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from titans_lnn.cli import integer, number

    p = argparse.ArgumentParser(prog="python -m titans_lnn.evals.gene_probe", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", help="a save_pretrained DNA model; without it only the k-mer "
                                                       "baseline runs")
    p.add_argument("--genome", default="ecoli-k12", help="the genome the probe is fitted on (and tested on its "
                                                        "held-out tail): a FASTA file or a built-in genome "
                                                        "(default: ecoli-k12)")
    p.add_argument("--other", default="ecoli-ec590", help="a second genome to test on (default: ecoli-ec590; "
                                                          "'none' to skip)")
    p.add_argument("--bases", type=integer(1), default=1_000_000, help="bases of --genome used (default: 1000000)")
    p.add_argument("--other-bases", type=integer(1), default=300_000, help="bases of --other used (default: 300000)")
    p.add_argument("--window", type=integer(8), default=100, help="bases per window (default: 100)")
    p.add_argument("--train-fraction", type=number(0, 1, open_lo=True, open_hi=True), default=0.7,
                   help="share of --genome's windows the probe is fitted on, from its start (default: 0.7)")
    p.add_argument("--kmax", type=integer(1, 8), default=6, help="the baseline's longest k-mer (default: 6)")
    p.add_argument("--contexts", default="stream,window", help="comma-separated: stream (each window with the "
                                                               "genome before it), window (alone)")
    p.add_argument("--rc", action="store_true", help="RC-averaged embeddings (both strands)")
    p.add_argument("--streams", type=integer(1), default=16, help="contiguous parts of each genome region streamed "
                                                                 "side by side (default: 16)")
    p.add_argument("--chunk-len", type=integer(1), default=4096, help="tokens per streamed piece (default: 4096)")
    p.add_argument("--out", help="write the markdown table to this file too")
    args = p.parse_args(argv)
    contexts = [c.strip() for c in args.contexts.split(",") if c.strip()]
    bad = [c for c in contexts if c not in ("stream", "window")]
    if bad:
        p.error(f"--contexts: {bad[0]!r} is not a context: expected stream and/or window")
    from titans_lnn.tokenizers import NucleotideTokenizer

    tokenizer, model = NucleotideTokenizer(), None
    if args.checkpoint is not None:
        from titans_lnn.evals.runner import load_model

        if not os.path.isdir(args.checkpoint):
            p.error(f"--checkpoint {args.checkpoint!r} is not a folder: expected a save_pretrained directory")
        model, tokenizer = load_model(args.checkpoint)
        if not hasattr(tokenizer, "reverse_complement"):
            p.error(f"--checkpoint {args.checkpoint}: its tokenizer is {tokenizer.name!r}: expected a DNA model "
                    f"(the nucleotide or a kmerK tokenizer)")
    try:
        rows = gene_probe(model, tokenizer, args.genome, None if args.other == "none" else args.other,
                          bases=args.bases, other_bases=args.other_bases, window=args.window,
                          train_fraction=args.train_fraction, kmax=args.kmax, contexts=contexts, rc=args.rc,
                          streams=args.streams, chunk_len=args.chunk_len, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"gene_probe: error: {e}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
