"""Genomics: next-base bits per base on a whole genome, against the context the model has read.

The genome is streamed through the model in one pass, the state carried (fixed memory: the 4.6-Mbp
E. coli genome runs on a CPU), and each base's loss is binned by its position (log-spaced bins
0-128, 128-1K, 1K-8K, ..., up to the genome's length). Two bits per base is the uniform baseline; bacterial
DNA compresses little below it, so the curve's shape (does it keep falling as the context grows?)
says more than its level.

    titans-lnn eval genomics --checkpoint runs/dna/model                    # E. coli EC590 (held out)
    titans-lnn eval genomics --checkpoint runs/dna/model --data my.fasta.gz --max-tokens 1000000
    python -m titans_lnn.evals.genomics --checkpoint runs/dna/model --out eval-results/genomics-markov \\
        --plot benchmarks/plots/genomics_bits.png        # vs order-k Markov tables, and the two combined

The DNA recipe (a 524 K-parameter sliding-window model reading overlapping 4-mer tokens, both strands; 1,500
steps, 12.3 M tokens, 1.3 passes over each strand of K-12; 804 CPU-seconds in one thread, 13.4 CPU-minutes):

    titans-lnn train --data ecoli-k12 --preset dna --tokenizer kmer4 --rc-augment --steps 1500 --seq-len 512 \
        --batch-size 16 --segments 4 --lr 4e-3 --eval-every 250 --out runs/dna

Network alone on all of EC590: 1.9186 bits/base, below every Markov order k <= 8 fitted on K-12 (best k = 7,
1.9334). The k = 12 table (1.878) is a lookup of the sister strain that no network of this size recalls; a
trained product of experts of the tables and the network (``--poe-fit-bases 1000000``: weights fitted on K-12
with the tables cross-fitted, then fixed) gives 1.5744, the same tables without the network 1.5908.

What the network needed, measured: bases seen and a schedule that anneals (held-out K-12 bits sat at 1.954
halfway, at the peak learning rate, and fell to 1.912 as it decayed), so the model that sees the most bases
per CPU-second: attention alone, 15.7 K tokens per CPU-second against 6.3 K for the MAG hybrid of the same
width. The ``kmer4`` tokens (each names the 4 bases ending at it, an input table of k-mers) were used; against
single-base tokens they were within noise after 200 steps at similar learning rates (held-out 1.9564 vs
1.9576), and a full-length single-base run was not made, so their share is not measured.

Input: a built-in genome (``ecoli-ec590``, the default, held out when training on ``ecoli-k12``) or any
FASTA file, gzipped or not (detected by its magic bytes), with one or more records. Sequence lines may be
lower case; U reads as T; the IUPAC ambiguity codes (R Y S W K M B D H V) and N are read as N. Records are
read in file order, one stream, joined by the record-separator token (the state is carried across them, so
"context read" counts from the start of the file). Scored: every base after the first whose true value is
A, C, G or T. Read but not scored: N (an ambiguous base has no single right answer) and the separators.
Each record gets its own figure (bases, scored bases, ambiguous bases, bits per base), and the whole file
the bins by position. A header with no sequence, sequence before the first header, or any other character
(a space, a gap '-', a protein letter) is an error naming the file, line and column.

The model should be trained with the nucleotide tokenizer (A C G T N + separator); with the byte tokenizer
each base is one byte, so the numbers mean the same. A tokenizer that does not spell each base as one token
is an error.

Markov comparison (``python -m titans_lnn.evals.genomics``): the order-k Markov models k = 1..12 fitted on
the training genome (:mod:`titans_lnn.evals.markov`), scored on the same bases, and two combinations, named
for what they are: "Markov orders mixed" (the 12 tables mixed by an online logistic mixer, no network) and
"network + Markov" (the same mixer with the network's prediction as a 13th expert). The mixer learns its
weights while reading, each block predicted before its bases are seen (:class:`~titans_lnn.evals.markov.
OnlineMixer`), as DNA compressors do. All rows are scored on the same bases: those with 12 A/C/G/T bases
before them in their record (so every order has its full context).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from titans_lnn.evals.perplexity import LOG2E, position_edges
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import Tokenizer

__all__ = ["DEFAULT_GENOME", "DEFAULT_TRAIN", "MIN_BASES", "GenomeReading", "base_ids", "candidate_ids", "load_genome",
           "read_genome", "evaluate_genomics", "records_markdown", "markov_comparison", "main"]

DEFAULT_GENOME = "ecoli-ec590"
DEFAULT_TRAIN = "ecoli-k12"
MIN_BASES = 1000  # fewer scored bases than this get a warning: the number says nothing about the model
OTHER = 4  # base index of anything that is not A/C/G/T (N, the record separator)


def base_ids(tokenizer: Tokenizer) -> np.ndarray:
    """(4,) the token ids of A, C, G, T. A tokenizer that does not spell each base as one token is an error, and
    so is one whose base ids depend on the bases before (:class:`~titans_lnn.tokenizers.KmerTokenizer`: see
    :func:`candidate_ids`)."""
    if hasattr(tokenizer, "next_ids"):
        raise ValueError(f"tokenizer {tokenizer.name!r} gives a base a different id in each context: use "
                         f"candidate_ids(tokenizer, tokens) for the ids that can follow each token")
    ids = []
    for base in "ACGT":
        encoded = np.asarray(tokenizer.encode(base))
        if encoded.shape != (1,):
            raise ValueError(f"tokenizer {tokenizer.name!r} encodes the base {base!r} as {encoded.tolist()}: "
                             f"genomics needs one token per base (the nucleotide, kmerK or byte tokenizer)")
        ids.append(int(encoded[0]))
    return np.asarray(ids, dtype=np.int64)


def candidate_ids(tokenizer: Tokenizer, tokens: np.ndarray) -> np.ndarray:
    """The ids a next-base prediction reads at each position of ``tokens`` (N,): (4,) the ids of A, C, G, T
    (:func:`base_ids`) for a tokenizer with one id per base; for a k-mer tokenizer, whose next id depends on
    the token before, (N, 6): row t the ids that can follow token t, those appending A, C, G, T, N, then the
    separator. The first four columns are A, C, G, T in either case."""
    if not hasattr(tokenizer, "next_ids"):
        return base_ids(tokenizer)
    follow = tokenizer.next_ids(tokens)  # (N, 5) appending A, C, G, T, N
    sep = np.full((len(follow), 1), tokenizer.sep_id, dtype=np.int64)
    return np.concatenate([follow, sep], axis=1)  # (N, 6)


def _nucleotide_bases(tokenizer: Tokenizer, tokens: np.ndarray) -> np.ndarray:
    """(N,) uint8 0..3 for A, C, G, T and OTHER for anything else, of ``tokens`` (N,)."""
    if hasattr(tokenizer, "to_bases"):  # a k-mer tokenizer: each token's own base, as a nucleotide id
        nucleotide, ids = tokenizer.to_bases(tokens), np.arange(4)
    else:
        nucleotide, ids = np.asarray(tokens, dtype=np.int64), base_ids(tokenizer)
    lut = np.full(max(int(ids.max()), int(nucleotide.max())) + 1, OTHER, dtype=np.uint8)
    lut[ids] = np.arange(4)
    return lut[np.asarray(nucleotide, dtype=np.int64)]


class GenomeReading(NamedTuple):
    """A genome read by a model: the network's next-base predictions at every position."""

    data: str  # the genome's name or path
    names: list[str]  # record names, in order
    starts: np.ndarray  # (R,) int64 first token of each record (records past max_tokens are left out)
    lengths: np.ndarray  # (R,) int64 bases of each record read (the last may be cut by max_tokens)
    bases: np.ndarray  # (N,) uint8 0..3 for A, C, G, T; OTHER (4) for N and the separators
    logp: np.ndarray  # (N, 4) float32 natural-log p(A, C, G, T | all before); row 0 uniform (no prediction)


@torch.no_grad()
def stream_base_logprobs(model: TitansLNN, tokens: np.ndarray, ids: np.ndarray, chunk_len: int = 2048,
                         progress: bool = True) -> np.ndarray:
    """(N, 4) float32: row t the model's natural-log probabilities of A, C, G, T at position t, having read
    tokens[:t] (one streamed pass, the state carried); row 0 is log(1/4) (nothing read yet).

    ``ids`` (:func:`candidate_ids`): (4,) the tokens of A, C, G, T, picked from the log-softmax over the whole
    vocabulary; or (N, C), row t the C tokens that can follow token t, A, C, G, T first: the log-softmax is
    taken over those C (the probability the model gives impossible tokens is dropped) and the first 4 kept."""
    x = torch.from_numpy(np.asarray(tokens).astype(np.int64))[None]  # (1, N)
    out = np.full((x.shape[1], 4), -math.log(4), dtype=np.float32)
    pick = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if pick.dim() == 2 and pick.shape[0] != x.shape[1]:
        raise ValueError(f"ids has shape {tuple(pick.shape)}: expected (4,) or ({x.shape[1]}, C), a row per token")
    for piece in model.stream_pieces(x, chunk_len=chunk_len, progress=progress):
        logits = piece.logits[0].float()  # (L, V): row i predicts position start + 1 + i
        if pick.dim() == 1:
            logp = torch.log_softmax(logits, dim=-1)[:, pick]  # (L, 4)
        else:
            rows = pick[piece.start:piece.start + logits.shape[0]]  # (L, C) what can follow each token read
            logp = torch.log_softmax(logits.gather(1, rows), dim=-1)[:, :4]  # (L, 4)
        a = piece.start + 1
        out[a:a + logp.shape[0]] = logp[:len(out) - a].cpu().numpy()
    return out


def load_genome(tokenizer: Tokenizer, data: str | os.PathLike | None = None, *,
                max_tokens: int | None = None) -> tuple[GenomeReading, np.ndarray]:
    """``(reading, tokens)``: ``data`` (a FASTA path or a built-in genome; default ``"ecoli-ec590"``) as tokens
    (N,), its first ``max_tokens``, and a :class:`GenomeReading` of them with ``logp`` still to fill
    (uniform)."""
    from titans_lnn.training.data import BUILTIN_CORPORA, load_corpus

    spec = os.fspath(data) if data is not None else DEFAULT_GENOME
    candidate_ids(tokenizer, np.zeros(0, dtype=np.int64))  # a tokenizer without one token per base fails here
    corpus = load_corpus(spec, tokenizer, format="auto" if spec in BUILTIN_CORPORA else "fasta")
    tokens = corpus.tokens if max_tokens is None else corpus.tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"{spec}: {len(tokens)} base(s) to read: expected at least 2 (a next-base prediction "
                         f"needs a base to read and one to predict)")
    keep = corpus.doc_starts < len(tokens)
    starts = corpus.doc_starts[keep]
    lengths = np.minimum(corpus.doc_lengths[keep], len(tokens) - starts)
    uniform = np.full((len(tokens), 4), -math.log(4), dtype=np.float32)
    reading = GenomeReading(spec, [n for n, k in zip(corpus.doc_names, keep) if k], starts, lengths,
                            _nucleotide_bases(tokenizer, tokens), uniform)
    return reading, tokens


def read_genome(model: TitansLNN, tokenizer: Tokenizer, data: str | os.PathLike | None = None, *,
                max_tokens: int | None = None, chunk_len: int = 2048, progress: bool = True) -> GenomeReading:
    """:func:`load_genome`, then stream its tokens through ``model`` once (see the module docstring for what is
    read and scored)."""
    reading, tokens = load_genome(tokenizer, data, max_tokens=max_tokens)
    return reading._replace(logp=stream_base_logprobs(model, tokens, candidate_ids(tokenizer, tokens), chunk_len,
                                                      progress))


def scored_bits(reading: GenomeReading, logp: np.ndarray | None = None) -> np.ndarray:
    """(N,) bits of each base under ``logp`` (default: the network's), NaN where not scored (position 0, N,
    separators)."""
    logp = reading.logp if logp is None else logp
    b = reading.bases
    bits = -logp[np.arange(len(b)), np.minimum(b, 3)].astype(np.float64) * LOG2E
    bits[b == OTHER] = np.nan
    bits[0] = np.nan
    return bits


def summarise(bits: np.ndarray, edges: Sequence[int]) -> dict:
    """Mean bits of the non-NaN entries of ``bits`` (N,) by position bin: ``{"tokens", "bits", "nll_sum", "bins"}``
    in :func:`~titans_lnn.evals.perplexity.bits_by_position`'s layout (``nll_sum`` in nats)."""
    ok = ~np.isnan(bits)
    pos = np.flatnonzero(ok)
    which = np.searchsorted(np.asarray(edges[1:-1]), pos, side="right")
    sums = np.bincount(which, bits[ok], minlength=len(edges) - 1)
    counts = np.bincount(which, minlength=len(edges) - 1)
    bins = [{"start": int(a), "end": int(b), "tokens": int(c), "bits": float(s / c) if c else None}
            for a, b, s, c in zip(edges, edges[1:], sums, counts)]
    total = int(counts.sum())
    mean = float(sums.sum() / total) if total else math.nan
    return {"tokens": total, "bits": mean, "nll_sum": float(sums.sum() / LOG2E), "bins": bins}


def evaluate_genomics(model: TitansLNN, tokenizer: Tokenizer, data: str | os.PathLike | None = None, *,
                      max_tokens: int | None = None, chunk_len: int = 2048, edges: Sequence[int] | None = None,
                      progress: bool = True, dynamic: dict | None = None) -> dict:
    """Bits per base by position on ``data`` (a FASTA path or a built-in genome name; default
    ``"ecoli-ec590"``), its first ``max_tokens`` tokens. Returns ``{"tokens", "bits", "nll_sum", "bins"}`` as
    :func:`~titans_lnn.evals.perplexity.bits_by_position` (``bits`` = bits per base) plus ``data``,
    ``tokenizer``, ``records`` (record names), ``ambiguous`` (N bases read, not scored) and ``per_record``
    (one dict per record: ``name``, ``bases``, ``scored``, ``ambiguous``, ``bits``).

    ``dynamic``: read with dynamic evaluation instead, ``{"lr", "block", "optimizer", "decay"}`` (the keywords of
    :func:`~titans_lnn.evals.dynamic_eval.dynamic_base_logprobs`; kept in the result as ``dynamic``)."""
    if dynamic is None:
        reading = read_genome(model, tokenizer, data, max_tokens=max_tokens, chunk_len=chunk_len, progress=progress)
    else:
        from titans_lnn.evals.dynamic_eval import read_genome_dynamic

        reading = read_genome_dynamic(model, tokenizer, data, max_tokens=max_tokens, progress=progress, **dynamic)
    n = len(reading.bases)
    edges = list(edges) if edges is not None else position_edges(n)
    if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[-1] < n:
        raise ValueError(f"edges={edges} must rise strictly from 0 to at least the length {n}")
    bits = scored_bits(reading)
    result = summarise(bits, edges)
    if result["tokens"] == 0:
        raise ValueError(f"{reading.data}: no base was scored (every base after the first is N): expected "
                         f"A, C, G or T bases to predict")
    if result["tokens"] < MIN_BASES:
        warnings.warn(f"{reading.data}: only {result['tokens']} bases scored: bits per base over fewer than "
                      f"{MIN_BASES} bases is noise, not a measurement of the model", UserWarning, stacklevel=2)
    per_record = []
    for name, a, length in zip(reading.names, reading.starts, reading.lengths):
        part = bits[a:a + length]
        scored = int((~np.isnan(part)).sum())
        per_record.append({"name": name, "bases": int(length), "scored": scored,
                           "ambiguous": int((reading.bases[a:a + length] == OTHER).sum()),
                           "bits": float(np.nanmean(part)) if scored else None})
    return {"data": reading.data, "tokenizer": tokenizer.name, "records": list(reading.names), **result,
            "ambiguous": sum(r["ambiguous"] for r in per_record), "per_record": per_record, "dynamic": dynamic}


def records_markdown(result: dict) -> str:
    """The per-record figures of :func:`evaluate_genomics` as a Markdown table."""
    lines = ["", "| record | bases | scored | N (read, not scored) | bits per base |", "|---|---:|---:|---:|---:|"]
    for r in result["per_record"]:
        bits = "" if r["bits"] is None else f"{r['bits']:.4f}"
        lines.append(f"| {r['name']} | {r['bases']:,} | {r['scored']:,} | {r['ambiguous']:,} | {bits} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- against Markov models


def markov_comparison(reading: GenomeReading, train: Sequence[np.ndarray], *, kmax: int = 12, lr: float = 0.002,
                      edges: Sequence[int] | None = None, progress: bool = True,
                      poe_fold: GenomeReading | None = None, dynamic: tuple[str, np.ndarray] | None = None,
                      online_orders: Sequence[int] = ()) -> dict:
    """Order-k Markov models k = 1..kmax fitted on ``train`` (nucleotide ids, one array per record), the network
    of ``reading``, and their online mixtures (module docstring), all scored on the same bases of the genome.

    With ``poe_fold`` (the network's reading of the first bases of ``train``'s first record), two more rows: a
    trained product of experts (:func:`~titans_lnn.evals.markov.fit_poe`) of the orders 1..kmax and
    :data:`~titans_lnn.evals.markov.POE_LONG`, without and with the network, its weights fitted on the fold's
    bases with tables counted on the rest of ``train`` (cross-fitted), then fixed; scored with tables counted on
    all of ``train``. Nothing is learnt while reading the scored genome.

    Test-time learning, each as more rows: ``dynamic`` ``(name, logp (N, 4))``, the network's readings under
    dynamic evaluation (:mod:`~titans_lnn.evals.dynamic_eval`), alone and mixed online with the tables;
    ``online_orders`` (e.g. 12, 16, 20, 24): tables of the scored genome counted as it is read
    (:func:`~titans_lnn.evals.markov.online_table_logprobs`), mixed online with the orders 1..kmax, without and
    with the network (and with the dynamic network when given).

    Returns ``{"rows", "tokens", "edges", "best_markov", "kmax", "lr", "seen"}``: ``rows`` one dict per predictor
    (``name``, ``bits``, ``bins`` by position, ``seen``: bits per :data:`SEEN_GROUPS` group), ``seen`` the share of
    the scored bases in each group (how often their kmax-base context occurs in ``train``)."""
    from titans_lnn.evals.markov import MarkovModel, kmer_codes, mix_bits

    if not isinstance(kmax, int) or not 1 <= kmax <= 15:
        raise ValueError(f"kmax={kmax!r} is invalid: expected an order in [1, 15]")
    bases = reading.bases
    n = len(bases)
    edges = list(edges) if edges is not None else position_edges(n)
    _, ok = kmer_codes(bases, kmax + 1)  # windows of kmax context bases and the predicted base, all A/C/G/T
    common = np.zeros(n, dtype=bool)
    common[kmax:] = ok
    models = [MarkovModel(k).fit(train) for k in range(1, kmax + 1)]
    logps = {}
    logps[kmax], count = models[-1].logprobs(bases)
    seen = np.searchsorted(np.asarray(SEEN_EDGES), count, side="right") - 1  # (N,) SEEN_GROUPS index (-1: none)
    repeat = repeat_group(repeat_distance(bases, REPEAT_K))  # (N,) REPEAT_GROUPS index

    def means(bits: np.ndarray, group: np.ndarray, n_groups: int) -> list[float | None]:
        return [float(np.nanmean(bits[group == i])) if (common & (group == i)).any() else None
                for i in range(n_groups)]

    def row(name: str, bits: np.ndarray, **extra) -> dict:
        bits = np.where(common, bits, np.nan)
        out = {"name": name, **extra, **_summary(bits, edges), "seen": means(bits, seen, len(SEEN_GROUPS)),
               "repeat": means(bits, repeat, len(REPEAT_GROUPS))}
        if progress:
            print(f"  {name}: {out['bits']:.4f} bits/base ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return out

    rows = []
    for m in models:
        t0 = time.perf_counter()
        logp = logps.pop(m.k) if m.k in logps else m.logprobs(bases)[0]
        rows.append(row(f"Markov k = {m.k}", scored_bits(reading, logp), k=m.k))
    best = min(rows, key=lambda r: r["bits"])
    t0 = time.perf_counter()
    rows.append(row("network alone (ours)", scored_bits(reading)))
    for name, extra in ((f"Markov orders 1-{kmax} mixed online (no network)", None),
                        (f"network + Markov 1-{kmax}, mixed online", reading.logp[:, None])):
        t0 = time.perf_counter()
        rows.append(row(name, mix_bits(models, bases, extra, lr=lr)))
    if dynamic is not None:
        t0 = time.perf_counter()
        rows.append(row(dynamic[0], scored_bits(reading, dynamic[1]), against="network alone (ours)"))
    if online_orders:
        t0 = time.perf_counter()
        for name, bits, against in _online_rows(reading, models, online_orders, lr, dynamic):
            rows.append(row(name, bits, against=against))
            t0 = time.perf_counter()
    if poe_fold is not None:
        t0 = time.perf_counter()
        for name, bits in _poe_rows(reading, train, models, poe_fold, kmax):
            rows.append(row(name, bits))
            t0 = time.perf_counter()
    total = max(int(common.sum()), 1)
    shares = [float((common & (seen == i)).sum() / total) for i in range(len(SEEN_GROUPS))]
    repeats = [float((common & (repeat == i)).sum() / total) for i in range(len(REPEAT_GROUPS))]
    return {"rows": rows, "tokens": int(common.sum()), "edges": edges, "best_markov": best["name"], "kmax": kmax,
            "lr": lr, "seen": [{"group": g, "share": sh} for g, sh in zip(SEEN_GROUPS, shares)],
            "repeat_k": REPEAT_K, "repeat": [{"group": g, "share": sh} for g, sh in zip(REPEAT_GROUPS, repeats)],
            "poe_fit_bases": None if poe_fold is None else len(poe_fold.bases), "online_orders": list(online_orders)}


def _online_rows(reading: GenomeReading, models: list, orders: Sequence[int], lr: float,
                 dynamic: tuple[str, np.ndarray] | None) -> list[tuple[str, np.ndarray, str]]:
    """The rows of :func:`markov_comparison` with tables of the scored genome counted as it is read:
    ``[(name, bits (N,), against), ...]``, mixed online with the fixed tables ``models``; without and with the
    network (and with ``dynamic``'s network when given); ``against`` names the same row without them."""
    from titans_lnn.evals.markov import mix_bits, online_table_logprobs

    bad = [k for k in orders if not isinstance(k, int) or not 1 <= k <= 29]
    if bad:
        raise ValueError(f"online_orders={list(orders)}: {bad} invalid: expected orders in [1, 29]")
    kmax = models[-1].k
    online = np.stack([online_table_logprobs(reading.bases, k)[0] for k in orders], axis=1)  # (N, O, 4)
    tables = f"Markov 1-{kmax} + this genome's orders {', '.join(map(str, orders))} counted as read"
    fixed, with_net = f"Markov orders 1-{kmax} mixed online (no network)", f"network + Markov 1-{kmax}, mixed online"
    out = [(f"{tables}, mixed online (no network)", mix_bits(models, reading.bases, online, lr=lr), fixed),
           (f"network + {tables}, mixed online",
            mix_bits(models, reading.bases, np.concatenate([reading.logp[:, None], online], axis=1), lr=lr),
            with_net)]
    if dynamic is not None:
        extra = np.concatenate([dynamic[1][:, None], online], axis=1)
        out.append((f"{dynamic[0]} + {tables}, mixed online", mix_bits(models, reading.bases, extra, lr=lr),
                    with_net))
    return out


# Within-genome repeats (rRNA operons, IS elements, REP sequences): a base whose REPEAT_K bases before it occurred
# earlier in the genome being read can be recalled from the context, by a model that holds it. Grouped by how far
# back the latest earlier occurrence is: within a sliding window's reach, or only a long-term memory's.
REPEAT_K = 20
REPEAT_EDGES = (0, 1024)
REPEAT_GROUPS = ("not earlier in this genome", "earlier, <= 1K bases back", "earlier, > 1K bases back")


def repeat_distance(bases: np.ndarray, k: int = REPEAT_K) -> np.ndarray:
    """(N,) int64: for each position t of ``bases`` (N,) (0..3 A/C/G/T, others not), how many bases back the
    latest earlier position t' < t whose k bases before it equal the k bases before t is (t - t'); -1 where
    there is none or t has no k A/C/G/T bases before it."""
    from titans_lnn.evals.markov import kmer_codes

    n = len(bases)
    out = np.full(n, -1, dtype=np.int64)
    code, ok = kmer_codes(bases, k)  # window j = the context of position j + k
    code, ok = code[:max(n - k, 0)], ok[:max(n - k, 0)]
    where = np.flatnonzero(ok)  # (M,) windows with a full context, in position order
    order = np.argsort(code[where], kind="stable")  # equal codes stay in position order
    c, w = code[where][order], where[order]
    same = np.zeros(len(c), dtype=bool)
    same[1:] = c[1:] == c[:-1]
    dist = np.full(len(c), -1, dtype=np.int64)
    dist[1:] = np.where(same[1:], w[1:] - w[:-1], -1)
    out[w + k] = dist
    return out


def repeat_group(distance: np.ndarray) -> np.ndarray:
    """(N,) :func:`repeat_distance` -> (N,) index into :data:`REPEAT_GROUPS`."""
    return np.where(distance < 0, 0, np.searchsorted(np.asarray(REPEAT_EDGES), distance, side="left"))


def _poe_rows(reading: GenomeReading, train: Sequence[np.ndarray], models: list, fold: GenomeReading,
              kmax: int) -> list[tuple[str, np.ndarray]]:
    """The two trained product-of-experts rows of :func:`markov_comparison`: ``[(name, bits (N,)), ...]``."""
    from titans_lnn.evals.markov import POE_KREF, POE_LONG, MarkovModel, fit_poe, poe_bits

    n = len(fold.bases)
    if not train or n >= len(train[0]):
        raise ValueError(f"the product of experts' fold has {n} bases: expected fewer than the training genome's "
                         f"first record ({len(train[0]) if train else 0} bases), so that tables can be counted on "
                         f"the rest")
    kref = min(POE_KREF, kmax)
    orders = [*range(1, kmax + 1), *(k for k in POE_LONG if k > kmax)]
    apart = [np.asarray(train[0])[n:], *train[1:]]  # every base but the fold's: the tables that predict the fold
    models_apart = [MarkovModel(k).fit(apart) for k in orders]
    full = list(models) + [MarkovModel(k).fit(train) for k in orders if k > kmax]
    out = []
    for fold_extra, extra in ((None, None), (fold.logp[:, None], reading.logp[:, None])):
        mixer = fit_poe(models_apart, fold.bases, fold_extra, kref=kref)
        tables = f"Markov 1-{kmax}" + "".join(f", {k}" for k in orders[kmax:])
        name = (f"{tables}: trained product of experts (no network)" if fold_extra is None
                else f"network + {tables}: trained product of experts")
        out.append((name, poe_bits(mixer, full, reading.bases, extra, kref=kref)))
    return out


# How often a scored base's kmax-base context occurs in the training genome (never, once, 2-9, 10+ times):
# where two strains share long stretches, a kmax table fitted on one is a lookup of the other.
SEEN_EDGES = (0, 1, 2, 10)
SEEN_GROUPS = ("never", "once", "2-9 times", "10+ times")


def _summary(bits: np.ndarray, edges: Sequence[int]) -> dict:
    out = summarise(bits, edges)
    return {"bits": out["bits"], "bins": out["bins"]}


def comparison_markdown(comparison: dict, title: str) -> str:
    """The table of :func:`markov_comparison`: overall bits per base, then by position for the main rows."""
    from titans_lnn.evals.report import format_length

    rows = comparison["rows"]
    lines = [f"### {' '.join(title.split())}", "",
             f"{comparison['tokens']:,} bases scored (each row on the same ones).", "",
             "| predictor | bits per base |", "|---|---:|"]
    lines += [f"| {r['name']} | {r['bits']:.4f} |" for r in rows]
    if comparison.get("poe_fit_bases"):
        lines += ["", f"Trained product of experts: one weight per table (and the network) for each bucket of the "
                      f"order-{min(12, comparison['kmax'])} context's count and the longest longer order that has "
                      f"seen its context, fitted on the training genome's first {comparison['poe_fit_bases']:,} "
                      f"bases with the tables counted on the rest of it (cross-fitted), then fixed; scored with the "
                      f"tables counted on all of it. Nothing is learnt on the scored genome (the online mixtures "
                      f"above learn while reading it)."]
    main_rows = [r for r in rows if "k" not in r or r["name"] == comparison["best_markov"]]
    lines += ["", "By position (bases read before the predicted one):", "",
              "| position | bases | " + " | ".join(r["name"] for r in main_rows) + " |",
              "|---|---:|" + "---:|" * len(main_rows)]
    for i, b in enumerate(main_rows[0]["bins"]):
        cells = ["" if r["bins"][i]["bits"] is None else f"{r['bins'][i]['bits']:.4f}" for r in main_rows]
        lines.append(f"| {format_length(b['start'])} - {format_length(b['end'])} | {b['tokens']:,} | "
                     + " | ".join(cells) + " |")
    kmax = comparison["kmax"]
    lines += ["", f"By how often the {kmax} bases before the predicted one occur in the training genome:", "",
              "| context seen in training | share of bases | " + " | ".join(r["name"] for r in main_rows) + " |",
              "|---|---:|" + "---:|" * len(main_rows)]
    for i, g in enumerate(comparison["seen"]):
        cells = ["" if r["seen"][i] is None else f"{r['seen'][i]:.4f}" for r in main_rows]
        lines.append(f"| {g['group']} | {g['share']:.3f} | " + " | ".join(cells) + " |")
    if "repeat" in comparison:
        lines += ["", f"By whether the {comparison['repeat_k']} bases before the predicted one occurred earlier in "
                      f"the genome being read (a within-genome repeat: recallable from the context):", "",
                  "| context earlier in this genome | share of bases | " + " | ".join(r["name"] for r in main_rows)
                  + " |", "|---|---:|" + "---:|" * len(main_rows)]
        for i, g in enumerate(comparison["repeat"]):
            cells = ["" if r["repeat"][i] is None else f"{r['repeat'][i]:.4f}" for r in main_rows]
            lines.append(f"| {g['group']} | {g['share']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_plot(comparison: dict, path: str | os.PathLike, title: str) -> Path:
    """Bits per base against the context read (log x), one line per main row of :func:`markov_comparison`:
    the network, the best Markov order (the baseline) and the mixtures; a dotted line at 2 bits. With rows
    that learn while reading (dynamic evaluation, tables counted as read), a second panel: each one's bits
    below the same predictor without that learning, on the same bases, by context read (regions of the genome
    cancel out: what is left is what reading the genome so far bought)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    main_rows = [r for r in comparison["rows"] if "k" not in r or r["name"] == comparison["best_markov"]]
    styles = [dict(color="C3", marker="s", linestyle="--"), dict(color="C0", marker="o", linewidth=2),
              dict(color="C2", marker="^", linestyle="-."), dict(color="C1", marker="."),
              dict(color="C4", marker="v", linestyle=":"), dict(color="C5", marker="x"),
              dict(color="C6", marker="D"), dict(color="C7", marker="P"), dict(color="C8", marker="*"),
              dict(color="C9", marker="h")]  # in main_rows' order
    learners = [r for r in main_rows if r.get("against")]
    fig, axes = plt.subplots(1, 2 if learners else 1, figsize=(14 if learners else 7.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    for r, style in zip(main_rows, styles):
        bins = [b for b in r["bins"] if b["bits"] is not None]
        xs = [math.sqrt(max(b["start"], 1) * b["end"]) for b in bins]  # geometric middle of the bin
        label = r["name"] + (" (the best Markov row, fitted on the training genome)" if "k" in r else "")
        ax.plot(xs, [b["bits"] for b in bins], label=label, **style)
    ax.text(0.01, 0.01, f"Markov rows read only the last {comparison['kmax']} bases: their changes from bin to bin "
            "are regions of the genome\n(e.g. stretches shared with the training strain), not context; "
            "only the network reads all that comes before.", transform=ax.transAxes, fontsize=6.5, va="bottom")
    ax.axhline(2.0, color="grey", linestyle=":", linewidth=1, label="uniform (2 bits)")
    ax.set_xscale("log")
    ax.set_xlabel("context read (bases)")
    ax.set_ylabel("bits per base")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    if learners:
        _gain_panel(axes[0, 1], learners, {r["name"]: r for r in main_rows},
                    {r["name"]: st for r, st in zip(main_rows, styles)})
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _gain_panel(ax, learners: list[dict], by_name: dict, styles: dict) -> None:
    """Bits per base saved by learning while reading: each learner's row against its ``against`` row, by bin."""
    for r in learners:
        base = by_name[r["against"]]
        pairs = [(b, a) for b, a in zip(r["bins"], base["bins"]) if b["bits"] is not None and a["bits"] is not None]
        xs = [math.sqrt(max(b["start"], 1) * b["end"]) for b, _ in pairs]
        ax.plot(xs, [a["bits"] - b["bits"] for b, a in pairs], label=f"{r['name']}\n  vs {r['against']}",
                **styles[r["name"]])
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("context read (bases)")
    ax.set_ylabel("bits per base saved (same bases)")
    ax.set_title("what learning while reading buys, by context read", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")


def main(argv: list[str] | None = None) -> int:
    from titans_lnn.cli import integer, number
    from titans_lnn.evals.dynamic_eval import add_dynamic_arguments, cached_dynamic, dynamic_name
    from titans_lnn.evals.markov import _records
    from titans_lnn.evals.runner import load_model
    from titans_lnn.tokenizers import NucleotideTokenizer

    p = argparse.ArgumentParser(prog="python -m titans_lnn.evals.genomics", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a save_pretrained directory trained on DNA")
    p.add_argument("--data", default=DEFAULT_GENOME, help=f"the genome scored: FASTA or built-in (default: "
                                                          f"{DEFAULT_GENOME})")
    p.add_argument("--train", default=DEFAULT_TRAIN, help=f"the genome the Markov models count (default: "
                                                          f"{DEFAULT_TRAIN}, the network's training genome)")
    p.add_argument("--kmax", type=integer(1, 15), default=12, help="Markov orders 1..kmax (default: 12)")
    p.add_argument("--lr", type=number(0, math.inf, open_hi=True), default=0.002,
                   help="the online mixer's learning rate (default: 0.002, between the two best of 0.0003, 0.001, "
                        "0.003, 0.01 for Markov tables fitted on K-12's first 80%% and mixed on its next 300 kbp)")
    p.add_argument("--max-tokens", type=integer(2), help="read only this many tokens of --data (default: all)")
    p.add_argument("--bin-factor", type=integer(2), default=8,
                   help="position bins 0-128, then each this many times the one before (default: 8)")
    p.add_argument("--chunk-len", type=integer(1), default=2048, help="tokens per forward pass (default: 2048)")
    p.add_argument("--cache", metavar="FILE.npy", help="the network's (N, 4) log-probabilities: read from this file "
                                                       "when it exists (same genome and length), else saved to it")
    p.add_argument("--out", default="eval-results/genomics-markov", metavar="DIR",
                   help="results.md, results.json and bits.png go here (default: eval-results/genomics-markov)")
    p.add_argument("--plot", metavar="PNG", help="also write the plot to this path (e.g. benchmarks/plots/...)")
    p.add_argument("--poe-fit-bases", type=integer(1000), metavar="N",
                   help="also fit a product of experts (Markov tables and the network, weights fixed after fitting) "
                        "on the first N bases of --train, tables counted on the rest (cross-fitted); e.g. 1000000")
    p.add_argument("--online-orders", type=_orders, default=ONLINE_ORDERS, metavar="K,K,...",
                   help="tables of --data itself counted as it is read, mixed online with the K-12 tables (a DNA "
                        "compressor's adaptive models; 'none' for none) (default: "
                        + ",".join(map(str, ONLINE_ORDERS)) + ")")
    add_dynamic_arguments(p)
    p.add_argument("--dynamic-cache", metavar="FILE.npy", help="as --cache, for the dynamic evaluation's readings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-row timings")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model, tok = load_model(args.checkpoint)
        reading = _cached_reading(args, model, tok)
        train = _records(args.train, NucleotideTokenizer())
        fold = None
        if args.poe_fit_bases:
            fold = read_genome(model, tok, args.train, max_tokens=args.poe_fit_bases, chunk_len=args.chunk_len,
                               progress=not args.no_progress)
        dynamic = None
        if args.dynamic_eval is not None:
            dynamic = (dynamic_name(args), cached_dynamic(args, model, tok))
        comparison = markov_comparison(reading, train, kmax=args.kmax, lr=args.lr, progress=not args.no_progress,
                                       poe_fold=fold, dynamic=dynamic, online_orders=args.online_orders,
                                       edges=position_edges(len(reading.bases), 128, args.bin_factor))
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"genomics: error: {e}", file=sys.stderr)
        return 2
    title = (f"bits per base on {reading.data} ({len(reading.bases):,} tokens read in one pass)\n"
             f"Markov fitted on {args.train}; network {Path(args.checkpoint).name} "
             f"({model.num_parameters():,} parameters)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_markdown(comparison, title)
    (out / "results.md").write_text(table)
    meta = {"checkpoint": args.checkpoint, "data": reading.data, "train": args.train, "tokens_read": len(reading.bases),
            "config": model.config.to_dict(), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, **comparison}, indent=1) + "\n")
    plots = [comparison_plot(comparison, out / "bits.png", title)]
    if args.plot:
        plots.append(comparison_plot(comparison, args.plot, title))
    print(table, end="")
    print(f"in {time.perf_counter() - t0:.0f} s; " + ", ".join(str(x) for x in [out / "results.md", *plots]))
    return 0


ONLINE_ORDERS = (12, 16, 20, 24)  # tables of the scored genome counted as read: repeats need long, exact contexts


def _orders(text: str) -> tuple[int, ...]:
    """argparse type: 'K,K,...' orders in [1, 29], or 'none'."""
    if text.strip().lower() == "none":
        return ()
    try:
        orders = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of orders: expected e.g. 12,16,20,24 or none") \
            from None
    if not orders or any(not 1 <= k <= 29 for k in orders):
        raise argparse.ArgumentTypeError(f"{text!r}: expected orders in [1, 29], e.g. 12,16,20,24, or none")
    return orders


def _cached_reading(args: argparse.Namespace, model: TitansLNN, tok: Tokenizer) -> GenomeReading:
    """:func:`read_genome`, the network's log-probabilities taken from ``--cache`` when it holds this genome's."""
    if not args.cache or not os.path.exists(args.cache):
        reading = read_genome(model, tok, args.data, max_tokens=args.max_tokens, chunk_len=args.chunk_len,
                              progress=not args.no_progress)
        if args.cache:
            np.save(args.cache, reading.logp)
        return reading
    reading, _ = load_genome(tok, args.data, max_tokens=args.max_tokens)
    logp = np.load(args.cache)
    if logp.shape != reading.logp.shape:
        raise ValueError(f"--cache {args.cache}: log-probabilities of shape {logp.shape}, but {reading.data} has "
                         f"{len(reading.bases)} tokens: expected a cache of this genome (delete it to recompute)")
    return reading._replace(logp=logp)


if __name__ == "__main__":
    raise SystemExit(main())
