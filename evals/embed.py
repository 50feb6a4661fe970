"""Embeddings of DNA (or any token) sequences: the model's final hidden states, streamed in constant memory.

    titans-lnn embed --checkpoint runs/dna/model --data genome.fa.gz --out emb.safetensors            # per base
    titans-lnn embed --checkpoint runs/dna/model --data ecoli-k12 --out emb.npy --window 200 --rc     # pooled

The embedding of position t is the final RMS-normed hidden state after reading tokens 0..t (the vector the
LM head reads), for each FASTA record separately (the state starts fresh at each record). The model reads
the sequence in pieces of ``--chunk-len`` tokens with its state carried (``hidden_pieces``), so the work
memory is one piece's activations plus the fixed-size state, whatever the genome's length; the output is
written into a memory-mapped file as the pieces come (``--window W``: the mean over each W-base window).

``--rc`` (post-hoc conjoining, as in Caduceus): the model also reads each record's reverse complement, and
the embedding of base t is the mean of the forward embedding at t and the reverse-strand embedding of the
same base (position L-1-t of the reverse complement). A causal model then sees the whole record from both
sides, and the embedding of a sequence equals that of its reverse complement reversed (tested).

Output: ``.safetensors`` (tensor ``embeddings``, the record index as JSON in the header's metadata) or
``.npy`` (the array; the same JSON beside it in ``OUT.json``). Rows: the records' positions (or windows)
one after another; ``records`` lists each record's name, length, first row and row count.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from titans_lnn.model import TitansLNN
from titans_lnn.state import ModelState

__all__ = ["hidden_states", "hidden_pieces", "embed_tokens", "embed_fasta", "open_embedding_file", "add_parser"]

DTYPES = {"float32": (np.float32, "F32"), "float16": (np.float16, "F16")}


def hidden_states(model: TitansLNN, input_ids: torch.Tensor, state: ModelState | None = None
                  ) -> tuple[torch.Tensor, ModelState]:
    """The final normed hidden states of ``input_ids`` (B, T) -> ((B, T, d), the state after the piece).

    What ``model(input_ids, state=state)`` computes up to its LM head (the logits are these states times
    the output embedding), with the same state carried, so pieces read in turn give one pass's states."""
    model._check_inputs(input_ids, None, state, None)
    B, T = input_ids.shape
    state = model.init_state(B) if state is None else state
    x = model.embed(input_ids.long())  # (B, T, d)
    layers = []
    for block, layer_state in zip(model.blocks, state.layers):
        x, new = block(x, layer_state, None)
        layers.append(new)
    return model.norm(x), ModelState(state.pos + T, B, model.fingerprint, layers)


def hidden_pieces(model: TitansLNN, input_ids: torch.Tensor, *, chunk_len: int = 4096,
                  state: ModelState | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Read ``input_ids`` (B, T) in pieces of ``chunk_len`` tokens without autograd, the state carried;
    yield ``(start, hidden (B, L, d))`` for each piece, as ``model.stream_pieces`` yields logits."""
    if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len!r} is invalid: expected a positive integer")
    device = model.embed.weight.device
    with torch.no_grad():
        for s in range(0, input_ids.shape[1], chunk_len):
            h, state = hidden_states(model, input_ids[:, s:s + chunk_len].to(device), state)
            yield s, h


def embed_tokens(model: TitansLNN, ids: np.ndarray, add: Callable[[np.ndarray, np.ndarray], None], *,
                 rc_complement: np.ndarray | None = None, chunk_len: int = 4096,
                 progress: Callable[[int], None] | None = None) -> None:
    """Stream the tokens ``ids`` (L,) through ``model`` and call ``add(positions (n,), hidden (n, d))`` per
    piece (float32 numpy). With ``rc_complement`` (the tokenizer's id -> complement id table, or a function of
    the ids (L,) giving the other strand's (L,), e.g. ``KmerTokenizer.reverse_complement``) the reverse
    complement is read as well, its rows given at the forward positions of the same bases (L-1-j), each
    position then receiving two rows (the caller averages). ``progress(n)`` is told the tokens read."""
    ids = np.asarray(ids)
    L = len(ids)
    if ids.ndim != 1 or L == 0:
        raise ValueError(f"ids must be a non-empty 1-D token array, got shape {ids.shape}")
    strands = [False] if rc_complement is None else [False, True]
    for reverse in strands:
        seq = other_strand(rc_complement, ids) if reverse else np.ascontiguousarray(ids)
        tokens = torch.from_numpy(seq)[None]  # (1, L), the token dtype (uint8): each piece is widened by the model
        for start, h in hidden_pieces(model, tokens, chunk_len=chunk_len):
            n = h.shape[1]
            pos = np.arange(start, start + n)
            add(L - 1 - pos if reverse else pos, h[0].float().cpu().numpy())
            if progress is not None:
                progress(n)


def other_strand(rc_complement, ids: np.ndarray) -> np.ndarray:
    """The reverse complement of the token ids (L,): ``rc_complement`` an id -> complement id table (one token
    per base, as the nucleotide tokenizer's ``complement_ids``) or a function of the ids (a k-mer tokenizer's
    ``reverse_complement``, which re-encodes the other strand)."""
    if callable(rc_complement):
        return np.ascontiguousarray(rc_complement(ids)).astype(ids.dtype)
    return np.ascontiguousarray(rc_complement.astype(ids.dtype)[ids[::-1]])


def _rows(length: int, window: int) -> int:
    return length if window == 0 else -(-length // window)


class _Accumulator:
    """Sums rows into ``out`` (R, d) by position (window 0) or by window (the mean of its positions)."""

    def __init__(self, out: np.ndarray, length: int, window: int, passes: int):
        self.out, self.window, self.passes = out, window, passes
        if window:
            self.sums = torch.zeros(len(out), out.shape[1], dtype=torch.float64)  # (R, d): small, R = L / W
            self.counts = np.bincount(np.arange(length) // window, minlength=len(out)) * passes  # (R,)
        else:
            out[:] = 0

    def __call__(self, pos: np.ndarray, h: np.ndarray) -> None:
        if self.window:
            self.sums.index_add_(0, torch.from_numpy(pos // self.window), torch.from_numpy(h).double())
        elif self.passes == 1:
            self.out[pos] = h
        else:  # the reverse strand's positions run downwards: one contiguous block either way
            lo = int(pos.min())
            block = h if pos[0] == lo else h[::-1]
            self.out[lo:lo + len(pos)] += block.astype(self.out.dtype) / self.passes

    def finish(self) -> None:
        if self.window:
            self.out[:] = (self.sums.numpy() / self.counts[:, None]).astype(self.out.dtype)


def embed_array(model: TitansLNN, ids: np.ndarray, *, window: int = 0, rc_complement: np.ndarray | None = None,
                chunk_len: int = 4096) -> np.ndarray:
    """In memory: the embeddings of ``ids`` (L,), per position (L, d) or per ``window`` (ceil(L / W), d)."""
    _check_window(window)
    out = np.zeros((_rows(len(ids), window), model.config.d_model), dtype=np.float32)
    acc = _Accumulator(out, len(ids), window, 1 if rc_complement is None else 2)
    embed_tokens(model, ids, acc, rc_complement=rc_complement, chunk_len=chunk_len)
    acc.finish()
    return out


def _check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window={window!r} is invalid: expected 0 (per position) or a window length >= 1")


def open_embedding_file(path: str | os.PathLike, rows: int, width: int, dtype: str, metadata: dict) -> np.ndarray:
    """A writable memory map of a new (rows, width) array in a ``.safetensors`` or ``.npy`` file at ``path``
    (``metadata``: JSON-able, in the safetensors header or ``path + '.json'``). Flush it with ``.flush()``."""
    path = Path(path)
    np_dtype, st_dtype = DTYPES[dtype]
    if path.suffix == ".npy":
        path.with_name(path.name + ".json").write_text(json.dumps(metadata, indent=1) + "\n")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(rows, width))
    if path.suffix != ".safetensors":
        raise ValueError(f"--out {str(path)!r}: expected a file name ending in .safetensors or .npy")
    nbytes = rows * width * np.dtype(np_dtype).itemsize
    header = {"__metadata__": {"titans_lnn": json.dumps(metadata)},
              "embeddings": {"dtype": st_dtype, "shape": [rows, width], "data_offsets": [0, nbytes]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + nbytes)
    if nbytes == 0:
        return np.zeros((rows, width), dtype=np_dtype)
    return np.memmap(path, dtype=np_dtype, mode="r+", offset=8 + len(text), shape=(rows, width))


def embed_fasta(model: TitansLNN, tokenizer, data: str | os.PathLike, out: str | os.PathLike, *, window: int = 0,
                rc: bool = False, chunk_len: int = 4096, dtype: str = "float32", max_bases: int | None = None,
                progress: bool = True) -> dict:
    """Embed every record of ``data`` (a FASTA path or a built-in genome name) into the file ``out``; each
    record's first ``max_bases`` bases when given. Returns the metadata written with it."""
    from tqdm.auto import tqdm

    from titans_lnn.training.data import BUILTIN_CORPORA, load_corpus

    _check_window(window)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    if rc and not hasattr(tokenizer, "reverse_complement"):
        raise ValueError(f"--rc needs a DNA tokenizer (nucleotide or kmerK); this model's is {tokenizer.name!r}")
    spec = os.fspath(data)
    corpus = load_corpus(spec, tokenizer, format="auto" if spec in BUILTIN_CORPORA else "fasta")
    records, row = [], 0
    for i, name in enumerate(corpus.doc_names):
        length = int(corpus.doc_lengths[i]) if max_bases is None else min(max_bases, int(corpus.doc_lengths[i]))
        records.append({"name": name, "length": length, "first_row": row, "rows": _rows(length, window)})
        row += records[-1]["rows"]
    meta = {"data": spec, "window": window, "rc_averaged": rc, "pooling": "mean" if window else "none",
            "d_model": model.config.d_model, "tokenizer": tokenizer.name, "records": records}
    array = open_embedding_file(out, row, model.config.d_model, dtype, meta)
    complement = None if not rc else (tokenizer.complement_ids if hasattr(tokenizer, "complement_ids")
                                      else tokenizer.reverse_complement)
    with tqdm(total=sum(r["length"] for r in records) * (2 if rc else 1), unit="base", unit_scale=True,
              desc="embed", disable=not progress) as bar:
        for i, rec in enumerate(records):
            part = array[rec["first_row"]:rec["first_row"] + rec["rows"]]
            acc = _Accumulator(part, rec["length"], window, 2 if rc else 1)
            ids = corpus.document(i)[:rec["length"]]
            if len(ids):
                embed_tokens(model, ids, acc, rc_complement=complement, chunk_len=chunk_len, progress=bar.update)
            acc.finish()
    if isinstance(array, np.memmap):
        array.flush()
    del array
    return meta


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    from titans_lnn.cli import integer

    p = subparsers.add_parser("embed", help="write a FASTA's per-base or per-window embeddings (streamed)",
                              description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a save_pretrained directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, help="a FASTA file (.gz too, multi-record) or a built-in genome "
                                                 "(ecoli-k12, ecoli-ec590)")
    p.add_argument("--out", required=True, help="output file: .safetensors or .npy")
    p.add_argument("--window", type=integer(0), default=0,
                   help="0: one embedding per base (default); W: the mean over each W-base window")
    p.add_argument("--rc", action="store_true", help="average with the reverse-complement strand's embeddings")
    p.add_argument("--chunk-len", type=integer(1), default=4096, help="tokens per streamed piece (default: 4096)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="stored dtype (default: float32)")
    p.add_argument("--max-bases", type=integer(1), help="embed only each record's first N bases")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from titans_lnn.evals.runner import load_model

    if not os.path.isdir(args.checkpoint):
        print(f"titans-lnn embed: error: --checkpoint {args.checkpoint!r} is not a folder: expected a "
              f"save_pretrained directory", file=sys.stderr)
        return 2
    if not args.out.endswith((".safetensors", ".npy")):
        print(f"titans-lnn embed: error: --out {args.out!r}: expected a file name ending in .safetensors or .npy",
              file=sys.stderr)
        return 2
    model, tok = load_model(args.checkpoint, device=args.device)
    try:
        meta = embed_fasta(model, tok, args.data, args.out, window=args.window, rc=args.rc,
                           chunk_len=args.chunk_len, dtype=args.dtype, max_bases=args.max_bases,
                           progress=args.progress)
    except ValueError as e:
        print(f"titans-lnn embed: error: {e}", file=sys.stderr)
        return 2
    rows = sum(r["rows"] for r in meta["records"])
    unit = f"{args.window}-base windows" if args.window else "per base"
    print(f"wrote {args.out}: {rows} x {meta['d_model']} ({unit}{', RC-averaged' if args.rc else ''}) from "
          f"{len(meta['records'])} record(s)")
    return 0
