"""Tokenizers: bytes (the default), nucleotides (DNA), and any local Hugging Face ``tokenizers`` file.

Every tokenizer follows the small :class:`Tokenizer` protocol: ``encode(str) -> np.ndarray`` (1-D,
uint8 when the vocabulary fits in a byte, int32 otherwise), ``decode(ids) -> str``, ``vocab_size``,
``name`` and ``to_dict()``. ``tokenizer_from_dict(tok.to_dict())`` rebuilds an equal tokenizer
(a Hugging Face tokenizer carries its whole JSON, so a checkpoint does not depend on the file).

    get_tokenizer("byte")                 # UTF-8 bytes, vocab 256
    get_tokenizer("nucleotide")           # A C G T N + record separator, vocab 6
    get_tokenizer("kmer4")                # DNA, one token per base naming the 4 bases ending at it, vocab 626
    get_tokenizer("path/tokenizer.json")  # tokenizers.Tokenizer.from_file, imported lazily

DNA's two strands: ``reverse_complement("ACGTRn") == "nYACGT"`` on text (IUPAC codes kept), and
``NucleotideTokenizer().reverse_complement(ids)`` on token ids (numpy or torch, reversed on the last axis).
"""

from __future__ import annotations

import os
import re
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def to_dict(self) -> dict: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage dtype of our token arrays: uint8 up to 256 ids, int32 beyond."""
    return np.dtype(np.uint8) if vocab_size <= 256 else np.dtype(np.int32)


def _check_ids(ids, vocab_size: int, name: str) -> np.ndarray:
    """ids (list, numpy array or torch tensor, 1-D) -> int64 numpy array, every id in [0, vocab_size)."""
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} tokenizer: decode expects a 1-D sequence of ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} tokenizer: decode expects integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} tokenizer: id {int(arr[i])} at position {i} is out of range "
                         f"[0, {vocab_size})")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Decoding invalid UTF-8 (a cut multi-byte character) gives U+FFFD."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        arr = _check_ids(ids, self.vocab_size, self.name)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte"}

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Nucleotide ids. SEP marks a record (chromosome, contig) boundary; its text form is a newline.
NUCLEOTIDE_VOCAB = ("A", "C", "G", "T", "N", "\n")
A_ID, C_ID, G_ID, T_ID, N_ID, SEP_ID = range(len(NUCLEOTIDE_VOCAB))
# IUPAC codes that name more than one base: they all become N (as do N and n themselves).
IUPAC_AMBIGUOUS = "RYSWKMBDHVN"


def nucleotide_table(values: dict[str, int], invalid: int) -> bytes:
    """A 256-entry ``bytes.translate`` table: A/C/G/T (U as T), either case, IUPAC codes -> N, else invalid."""
    table = bytearray([invalid]) * 256
    for base in "ACGT":
        table[ord(base)] = table[ord(base.lower())] = values[base]
    table[ord("U")] = table[ord("u")] = values["T"]
    for code in IUPAC_AMBIGUOUS:
        table[ord(code)] = table[ord(code.lower())] = values["N"]
    return bytes(table)


# The complementary strand, character by character: Watson-Crick pairs, and each IUPAC code to the code of
# the complementary set (R = A/G <-> Y = C/T, K = G/T <-> M = A/C, B = not A <-> V = not T, D = not C <->
# H = not G; S = C/G, W = A/T and N are their own complements). Case is kept; U pairs with A.
COMPLEMENT = {"A": "T", "C": "G", "G": "C", "T": "A", "U": "A", "R": "Y", "Y": "R", "S": "S", "W": "W",
              "K": "M", "M": "K", "B": "V", "V": "B", "D": "H", "H": "D", "N": "N"}
_COMPLEMENT_TABLE = str.maketrans({**COMPLEMENT, **{k.lower(): v.lower() for k, v in COMPLEMENT.items()}})
_VALID_DNA = frozenset("".join(COMPLEMENT) + "".join(COMPLEMENT).lower() + "\n")
_VALID_DNA_DELETE = str.maketrans("", "", "".join(_VALID_DNA))


def reverse_complement(seq: str) -> str:
    """The reverse complement of a DNA string (the other strand, read 5' to 3'): IUPAC codes map to their
    complements (:data:`COMPLEMENT`), case is kept, newlines stay (a multi-record text keeps its record
    boundaries, in reverse order). Any other character is an error naming it and its position."""
    leftover = seq.translate(_VALID_DNA_DELETE)
    if leftover:
        i = next(i for i, c in enumerate(seq) if c not in _VALID_DNA)
        raise ValueError(f"reverse_complement: invalid character {seq[i]!r} at position {i} (expected A, C, G, T, "
                         f"U, an IUPAC code or a newline)")
    return seq.translate(_COMPLEMENT_TABLE)[::-1]


_INVALID = 0xFF
_ENCODE_TABLE = bytearray(nucleotide_table({b: NUCLEOTIDE_VOCAB.index(b) for b in "ACGTN"}, _INVALID))
_ENCODE_TABLE[ord("\n")] = SEP_ID
_ENCODE_TABLE = bytes(_ENCODE_TABLE)
_DECODE = np.frombuffer("".join(NUCLEOTIDE_VOCAB).encode("ascii"), dtype=np.uint8)


class NucleotideTokenizer:
    """DNA: A C G T N and a record separator (newline), vocab 6.

    Lower case folds to upper case, U to T, and the IUPAC ambiguity codes (R Y S W K M B D H V) to N,
    so ``decode(encode(s))`` is ``s`` upper-cased with those codes as N. Any other character (a space,
    a gap '-', a protein letter) is an error naming it and its position.
    """

    name = "nucleotide"
    vocab_size = len(NUCLEOTIDE_VOCAB)

    def encode(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8")
        ids = raw.translate(_ENCODE_TABLE)
        bad = ids.find(_INVALID)
        if bad >= 0:
            if text.isascii():
                pos, char = bad, text[bad]
            else:
                pos, char = next((i, c) for i, c in enumerate(text)
                                 if len(c.encode("utf-8")) > 1 or _ENCODE_TABLE[ord(c)] == _INVALID)
            raise ValueError(f"nucleotide tokenizer: invalid character {char!r} at position {pos} "
                             f"(expected A, C, G, T, U, an IUPAC code, or a newline between records)")
        return np.frombuffer(ids, dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        arr = _check_ids(ids, self.vocab_size, self.name)
        return _DECODE[arr].tobytes().decode("ascii")

    # Token id -> the id of its complement: A<->T, C<->G; N and the record separator are their own.
    complement_ids = np.array([T_ID, G_ID, C_ID, A_ID, N_ID, SEP_ID], dtype=np.int64)

    def complement(self, ids):
        """The complement of each id (same shape and type: a numpy array or a torch tensor, any shape)."""
        if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
            import torch

            _check_ids(ids.reshape(-1), self.vocab_size, self.name)
            return torch.as_tensor(self.complement_ids, device=ids.device)[ids.long()].to(ids.dtype)
        arr = np.asarray(ids)
        return self.complement_ids[_check_ids(arr.reshape(-1), self.vocab_size, self.name)].reshape(
            arr.shape).astype(arr.dtype)

    def reverse_complement(self, ids):
        """The other strand of ``ids`` (..., T): complemented and reversed along the last axis, so that
        ``reverse_complement(encode(s)) == encode(titans_lnn.tokenizers.reverse_complement(s))``."""
        out = self.complement(ids)
        return out.flip(-1) if hasattr(out, "detach") else np.ascontiguousarray(out[..., ::-1])

    def to_dict(self) -> dict:
        return {"type": "nucleotide"}

    def __eq__(self, other) -> bool:
        return isinstance(other, NucleotideTokenizer)

    def __repr__(self) -> str:
        return "NucleotideTokenizer()"


MAX_KMER = 6  # 5**6 + 1 = 15,626 ids; the LM head is that wide, so longer contexts belong in the model


class KmerTokenizer:
    """DNA with each base's token naming the ``k`` bases that end at it (overlapping k-mers): one token per
    base, vocab ``5**k + 1``.

    A base's token is the code of the k-mer ending at it, digits A C G T N = 0..4 (the IUPAC codes fold to
    N as in :class:`NucleotideTokenizer`), first base most significant; the first k - 1 bases of a record
    have their missing predecessors read as N. The last id, ``5**k``, is the record separator (a newline).
    So the model's input embedding is a table of k-mers (it reads the last k bases in one lookup instead of
    assembling them with attention), while every token still stands for one base: ``decode`` reads each
    token's last digit, and ``decode(encode(s))`` is ``s`` as :class:`NucleotideTokenizer` writes it. The
    next token is the current k-mer shifted by one base, so only 5 of the ``5**k + 1`` ids can follow a
    token (:meth:`next_ids`); a next-base probability is the model's probability of the id that appends
    that base, renormalised over the four A/C/G/T continuations (``titans_lnn.evals.genomics`` does this).
    ``k = 1`` is the nucleotide tokenizer's ids exactly.

        KmerTokenizer(4).encode("ACGT")  # ids of NNNA, NNAC, NACG, ACGT
        get_tokenizer("kmer4")           # the same tokenizer by name (k = 1..6)
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_KMER:
            raise ValueError(f"KmerTokenizer: k={k!r} is invalid: expected a whole number in [1, {MAX_KMER}]")
        self.k = k
        self.name = f"kmer{k}"
        self.sep_id = 5 ** k
        self.vocab_size = 5 ** k + 1
        self._nucleotide = NucleotideTokenizer()

    def from_bases(self, bases: np.ndarray) -> np.ndarray:
        """Nucleotide-tokenizer ids (N,) (A C G T N = 0..4, SEP_ID the separator) -> this tokenizer's ids (N,)."""
        d = np.asarray(bases, dtype=np.int64)
        is_sep = d == SEP_ID
        # run[i]: bases of the current record up to and including i (0 at a separator).
        idx = np.arange(len(d))
        last_sep = np.maximum.accumulate(np.where(is_sep, idx, -1)) if len(d) else idx
        run = idx - last_sep
        code = np.zeros(len(d), dtype=np.int64)
        for j in range(self.k):  # digit j back from position i, weight 5**j; before the record: N
            prev = np.full(len(d), N_ID, dtype=np.int64)
            if j < len(d):
                prev[j:] = d[:len(d) - j]
            code += np.where(run > j, prev, N_ID) * 5 ** j
        code[is_sep] = self.sep_id
        return code.astype(token_dtype(self.vocab_size))

    def to_bases(self, ids) -> np.ndarray:
        """This tokenizer's ids (N,) -> nucleotide-tokenizer ids (N,) (each token's own base, or the separator)."""
        arr = _check_ids(np.asarray(ids).reshape(-1), self.vocab_size, self.name)
        return np.where(arr == self.sep_id, SEP_ID, arr % 5).astype(np.uint8)

    def encode(self, text: str) -> np.ndarray:
        try:
            bases = self._nucleotide.encode(text)
        except ValueError as e:
            raise ValueError(str(e).replace("nucleotide tokenizer", f"{self.name} tokenizer")) from None
        return self.from_bases(bases)

    def decode(self, ids) -> str:
        return self._nucleotide.decode(self.to_bases(_check_ids(ids, self.vocab_size, self.name)))

    def next_ids(self, ids) -> np.ndarray:
        """(N, 5) int64: the id of the token that follows each of ``ids`` (N,) if the next base is A, C, G, T or N
        (after a separator, a record's first base)."""
        arr = _check_ids(np.asarray(ids).reshape(-1), self.vocab_size, self.name)
        shifted = np.where(arr == self.sep_id, self.sep_id - 1, arr) % 5 ** (self.k - 1) * 5  # (N,)
        return shifted[:, None] + np.arange(5)[None, :]

    def reverse_complement(self, ids):
        """The other strand (1-D ids, numpy or torch): bases complemented and reversed, then re-encoded (each
        token's k-mer now ends at its base on the other strand), so that ``reverse_complement(encode(s)) ==
        encode(titans_lnn.tokenizers.reverse_complement(s))``."""
        if hasattr(ids, "detach"):
            import torch

            return torch.as_tensor(self.reverse_complement(ids.detach().cpu().numpy()), device=ids.device)
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{self.name} tokenizer: reverse_complement expects 1-D ids, got shape {arr.shape}")
        return self.from_bases(self._nucleotide.reverse_complement(self.to_bases(arr))).astype(arr.dtype)

    def to_dict(self) -> dict:
        return {"type": "kmer", "k": self.k}

    def __eq__(self, other) -> bool:
        return isinstance(other, KmerTokenizer) and other.k == self.k

    def __repr__(self) -> str:
        return f"KmerTokenizer(k={self.k})"


def _import_hf_tokenizers(what: str):
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"{what} needs the 'tokenizers' package: pip install tokenizers "
                          f"(or pip install 'titans-lnn[data]')") from e
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (from a local JSON file). No special tokens are added."""

    def __init__(self, tokenizer, *, path: str | None = None):
        self._tok = tokenizer
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = f"hf:{os.path.basename(path)}" if path else "hf"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        tokenizers = _import_hf_tokenizers(f"reading the tokenizer file {path!r}")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception on a bad file
            raise ValueError(f"tokenizer file {path!r} is not a valid tokenizers JSON file: {e}") from e
        return cls(tok, path=path)

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=token_dtype(self.vocab_size))

    def decode(self, ids) -> str:
        arr = _check_ids(ids, self.vocab_size, self.name)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "hf", "path": self.path, "json": self._tok.to_str()}

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Inverse of ``Tokenizer.to_dict()``."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "nucleotide":
        return NucleotideTokenizer()
    if kind == "kmer":
        return KmerTokenizer(d.get("k"))
    if kind == "hf":
        if "json" not in d:
            raise ValueError("hf tokenizer dict has no 'json' entry")
        tokenizers = _import_hf_tokenizers("rebuilding a Hugging Face tokenizer")
        return HFTokenizer(tokenizers.Tokenizer.from_str(d["json"]), path=d.get("path"))
    raise ValueError(f"unknown tokenizer dict {d!r}: expected 'type' to be 'byte', 'nucleotide', 'kmer' or 'hf'")


def get_tokenizer(spec) -> Tokenizer:
    """'byte', 'nucleotide', 'kmerK' (K = 1..6), a path to a tokenizers JSON file, or a tokenizer (returned as
    is)."""
    if not isinstance(spec, (str, os.PathLike)) and isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be a string or a path, got {type(spec).__name__}: {spec!r}")
    spec = os.fspath(spec)
    if spec == "byte":
        return ByteTokenizer()
    if spec == "nucleotide":
        return NucleotideTokenizer()
    if re.fullmatch(r"kmer\d+", spec):
        return KmerTokenizer(int(spec[4:]))
    if os.path.exists(spec) or spec.endswith(".json") or os.sep in spec:
        return HFTokenizer.from_file(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'byte', 'nucleotide', 'kmerK' (K = 1..{MAX_KMER}) or "
                     f"a path to a Hugging Face tokenizers JSON file")
