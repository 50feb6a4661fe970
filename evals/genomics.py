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

Learning while reading EC590 (``--dynamic-eval 3e-5``, ``--online-orders``, on by default; all of EC590, no base
predicted by anything that saw it): dynamic evaluation of the network 1.9186 -> 1.9143 bits/base, its saving
growing with the context read (0.0000 in the first 512 bases, 0.0025 at 32K-128K, 0.0049 past 2M; on repeats more
than 1K bases back 1.9595 -> 1.9501); tables of EC590 counted as read (orders 12, 16, 20, 24) take the online
mixture 1.6686 -> 1.6437 (with the network 1.6524 -> 1.6277, with the dynamic network 1.6247; on those repeats
0.99 -> 0.10) and the trained product of experts with the network 1.5744 -> 1.5633.

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
           "read_genome", "evaluate_genomics", "records_markdown", "main"]

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


def main(argv: list[str] | None = None) -> int:
    from titans_lnn.cli import integer, number
    from titans_lnn.evals.dynamic_eval import add_dynamic_arguments, cached_dynamic, dynamic_name
    from titans_lnn.evals.genomics_markov import comparison_markdown, comparison_plot, markov_comparison
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
