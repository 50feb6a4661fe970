"""Tokenizers: round trips, awkward input, clear errors, (de)serialisation."""

import json

import numpy as np
import pytest
import torch

from titans_lnn.tokenizers import (
    SEP_ID,
    ByteTokenizer,
    HFTokenizer,
    NucleotideTokenizer,
    Tokenizer,
    get_tokenizer,
    token_dtype,
    tokenizer_from_dict,
)

TEXTS = ["", "a", "hello world\n", "naïve café — 東京 🚀", "line1\r\nline2\n\n\ttab", "\x00\xff"]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == text


def test_byte_decode_cut_character_is_replaced():
    ids = ByteTokenizer().encode("é")[:1]
    assert ByteTokenizer().decode(ids) == "\ufffd"


@pytest.mark.parametrize("bad", [[256], [-1], [0, 1, 300]], ids=["256", "-1", "300-at-2"])
def test_decode_out_of_range_names_the_id(bad):
    with pytest.raises(ValueError, match=str(max(bad, key=abs))):
        ByteTokenizer().decode(bad)


def test_decode_rejects_2d_and_float():
    with pytest.raises(ValueError, match="1-D"):
        ByteTokenizer().decode([[1, 2]])
    with pytest.raises(ValueError, match="integer"):
        ByteTokenizer().decode([1.5])


def test_nucleotide_round_trip_and_folding():
    tok = NucleotideTokenizer()
    assert tok.vocab_size == 6
    assert tok.decode(tok.encode("ACGTN\nNNNN")) == "ACGTN\nNNNN"
    assert tok.decode(tok.encode("acgtn")) == "ACGTN"
    assert tok.decode(tok.encode("RYSWKMBDHVryswkmbdhv")) == "N" * 20
    assert tok.decode(tok.encode("UuT")) == "TTT"
    ids = tok.encode("AC\nGT")
    assert ids.dtype == np.uint8 and ids.tolist() == [0, 1, SEP_ID, 2, 3]
    assert tok.encode("").shape == (0,)


@pytest.mark.parametrize("text,char,pos", [("ACGT-A", "-", 4), ("AC GT", " ", 2), ("ACÉ", "É", 2),
                                           ("AC\r\n", "\r", 2), ("ACGTX", "X", 4)],
                         ids=["gap", "space", "non-ascii", "cr", "protein"])
def test_nucleotide_invalid_character_named(text, char, pos):
    with pytest.raises(ValueError, match=f"{char!r} at position {pos}".replace("\\", "\\\\")):
        NucleotideTokenizer().encode(text)


def test_nucleotide_decode_out_of_range():
    with pytest.raises(ValueError, match="id 6 at position 1"):
        NucleotideTokenizer().decode([0, 6])


def test_get_tokenizer_specs_and_errors(tmp_path):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    assert isinstance(get_tokenizer("nucleotide"), NucleotideTokenizer)
    tok = NucleotideTokenizer()
    assert get_tokenizer(tok) is tok
    assert isinstance(tok, Tokenizer)
    with pytest.raises(ValueError, match="'bpe'"):
        get_tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        get_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="42"):
        get_tokenizer(42)
    for t in (ByteTokenizer(), NucleotideTokenizer()):
        assert tokenizer_from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="wordpiece"):
        tokenizer_from_dict({"type": "wordpiece"})


def test_token_dtype():
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.int32


def _tiny_hf_file(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_file(tmp_path):
    path = _tiny_hf_file(tmp_path / "tok.json")
    tok = get_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 6 and tok.name == "hf:tok.json"
    ids = tok.encode("the cat sat on the dog")
    assert ids.tolist() == [1, 2, 3, 4, 1, 0]
    assert ids.dtype == np.uint8
    assert tok.decode(ids[:3]) == "the cat sat"
    with pytest.raises(ValueError, match="id 6"):
        tok.decode([6])
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode("the mat").tolist() == [1, 5]


def test_hf_tokenizer_bad_file(tmp_path):
    pytest.importorskip("tokenizers")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        get_tokenizer(str(bad))


def test_hf_tokenizer_missing_package_message(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "tok.json"
    path.write_text("{}")
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        get_tokenizer(str(path))
