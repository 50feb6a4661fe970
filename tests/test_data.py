"""Corpora (text, FASTA, built-ins), splits and the resumable batch samplers."""

import gzip

import numpy as np
import pytest
import torch

from titans_lnn.tokenizers import SEP_ID, ByteTokenizer, NucleotideTokenizer
from titans_lnn.training.data import (
    Corpus,
    RandomWindowSampler,
    StreamSampler,
    load_corpus,
    read_fasta,
    read_text,
)


def write(path, data: bytes | str):
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------- text


def test_text_windows_line_endings_and_empty_lines(tmp_path):
    f = write(tmp_path / "a.txt", b"first\r\n\r\nthird\rfourth\n\n")
    assert read_text(f) == "first\n\nthird\nfourth\n\n"
    corpus = load_corpus(str(f))
    assert corpus.tokenizer.decode(corpus.tokens) == "first\n\nthird\nfourth\n\n"
    assert corpus.tokens.dtype == np.uint8


def test_text_bom_and_gzip(tmp_path):
    f = write(tmp_path / "a.txt.gz", gzip.compress("\ufeffcafé\r\n".encode("utf-8")))
    assert read_text(f) == "café\n"


@pytest.mark.parametrize("name,data", [("empty.txt", b""), ("empty.txt.gz", gzip.compress(b""))],
                         ids=["plain", "gzip"])
def test_empty_file_names_path(tmp_path, name, data):
    f = write(tmp_path / name, data)
    with pytest.raises(ValueError, match=f"{name}.*empty"):
        load_corpus(str(f))


def test_invalid_utf8_names_path_and_line(tmp_path):
    f = write(tmp_path / "bad.txt", b"ok\nok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: not valid UTF-8"):
        load_corpus(str(f))


def test_corrupt_gzip_names_path(tmp_path):
    f = write(tmp_path / "bad.txt.gz", gzip.compress(b"hello world" * 100)[:30])
    with pytest.raises(ValueError, match="bad.txt.gz: corrupt gzip"):
        read_text(f)


def test_folder_sorted_hidden_skipped_documents_separated(tmp_path):
    write(tmp_path / "b.txt", "bee\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.md", "sea")
    write(tmp_path / "a.txt", "ay\n")
    write(tmp_path / ".hidden", "never read")
    (tmp_path / ".git").mkdir()
    write(tmp_path / ".git" / "config", "never read")
    corpus = load_corpus(tmp_path)
    assert [n.split("/")[-1] for n in corpus.doc_names] == ["a.txt", "b.txt", "c.md"]
    assert ByteTokenizer().decode(corpus.tokens) == "ay\n\nbee\n\nsea"
    assert ByteTokenizer().decode(corpus.document(2)) == "sea"


def test_folder_with_an_empty_file_and_empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no .*files"):
        load_corpus(tmp_path / "d")
    write(tmp_path / "d" / "full.txt", "x")
    write(tmp_path / "d" / "zero.txt", "")
    with pytest.raises(ValueError, match="zero.txt: empty"):
        load_corpus(tmp_path / "d")


def test_unknown_spec():
    with pytest.raises(FileNotFoundError, match="no-such-corpus"):
        load_corpus("no-such-corpus")


# ----------------------------------------------------------------------------- FASTA

FASTA = (b">chr1 first record\r\nACGTacgt\r\nNNNNnnnn\r\n\r\nRYKM\r\n"
         b">chr2\nggcc\n\n>chr3 lonely\nT\n")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_fasta_multi_record_lower_case_n_runs(tmp_path, gz):
    data = gzip.compress(FASTA) if gz else FASTA
    f = write(tmp_path / ("g.fa.gz" if gz else "g.fasta"), data)
    records = read_fasta(f)
    assert [(r.name, r.seq, r.line) for r in records] == [
        ("chr1 first record", "ACGTACGTNNNNNNNNNNNN", 1), ("chr2", "GGCC", 6), ("chr3 lonely", "T", 9)]
    corpus = load_corpus(str(f))
    assert isinstance(corpus.tokenizer, NucleotideTokenizer)
    assert corpus.tokenizer.decode(corpus.tokens) == "ACGTACGTNNNNNNNNNNNN\nGGCC\nT"
    assert (corpus.tokens == SEP_ID).sum() == 2
    assert corpus.doc_lengths.tolist() == [20, 4, 1]


def test_fasta_with_byte_tokenizer(tmp_path):
    f = write(tmp_path / "g.fna", b">a\nacg\n>b\nt\n")
    corpus = load_corpus(str(f), "byte")
    assert ByteTokenizer().decode(corpus.tokens) == "ACG\nT"


@pytest.mark.parametrize("data,match", [
    (b"ACGT\n>r\nACGT\n", r"g.fa:1: sequence data before the first '>'"),
    (b"\n\nAC\n", r"g.fa:3: sequence data before"),
    (b">r\nACGT\nAC-T\n", r"g.fa:3: invalid character '-' \(column 3\) in FASTA record 'r'"),
    (b">r\nACGT\n>s\nACGT\nACGT\nACGTQ\n", r"g.fa:6: invalid character 'Q' \(column 5\) in FASTA record 's'"),
    (b">r\r\nAC GT\r\n", r"g.fa:2: invalid character ' '"),
    (b">r\n>s\nACGT\n", r"g.fa:1: FASTA record 'r' has no sequence"),
    (b">r\nACGT\n>s\n\n", r"g.fa:3: FASTA record 's' has no sequence"),
    (b"\n\n\n", r"g.fa: no FASTA record"),
], ids=["seq-before-header", "seq-before-header-after-blank", "gap", "later-record", "space",
        "empty-record", "empty-last-record", "only-blank"])
def test_fasta_malformed_names_file_and_line(tmp_path, data, match):
    f = write(tmp_path / "g.fa", data)
    with pytest.raises(ValueError, match=match):
        load_corpus(str(f))


def test_format_override(tmp_path):
    f = write(tmp_path / "seqs.dat", b">x\nacgt\n")
    assert load_corpus(str(f), format="fasta").tokenizer.decode(
        load_corpus(str(f), format="fasta").tokens) == "ACGT"
    assert ByteTokenizer().decode(load_corpus(str(f)).tokens) == ">x\nacgt\n"


# ----------------------------------------------------------------------------- built-in corpora


def test_builtin_kjv():
    corpus = load_corpus("kjv")
    assert len(corpus.doc_names) == 66
    assert corpus.doc_names[0] == "Genesis" and corpus.doc_names[-1] == "Revelation"
    text = corpus.tokenizer.decode(corpus.tokens[:80])
    assert text.startswith("Genesis 1:1 In the beginning God created")
    assert corpus.tokenizer.decode(corpus.document(65)).endswith("Revelation 22:21 The grace of our Lord "
                                                                 "Jesus Christ be with you all. Amen.\n")
    assert 4_000_000 < len(corpus) < 5_000_000


@pytest.mark.parametrize("name,length,header", [
    ("ecoli-k12", 4_646_332, "NC_007779.1"), ("ecoli-ec590", 4_617_703, "NZ_CP016182.2")])
def test_builtin_genomes(name, length, header):
    corpus = load_corpus(name)
    assert len(corpus) == length and corpus.doc_names[0].startswith(header)
    assert corpus.tokens.max() < 4  # both genomes are pure A/C/G/T


# ----------------------------------------------------------------------------- splits


def _doc_corpus(n_docs=10):
    tok = ByteTokenizer()
    docs = [(f"d{i}", tok.encode(chr(ord("a") + i) * (5 + 3 * i))) for i in range(n_docs)]
    return Corpus.from_documents("docs", docs, tok)


def test_split_tail_disjoint_and_complete():
    corpus = _doc_corpus()
    train, val = corpus.split(0.1)
    assert len(val) == round(0.1 * len(corpus))
    assert np.array_equal(np.concatenate([train, val]), corpus.tokens)
    assert np.shares_memory(train, corpus.tokens) and not np.shares_memory(train, val)
    t2, v2 = corpus.split(0.1, seed=123)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)


def test_split_by_document_disjoint_and_deterministic():
    corpus = _doc_corpus()
    train, val = corpus.split(0.25, by="document", seed=7)

    def letters(tokens):
        return set(ByteTokenizer().decode(tokens).replace("\n", ""))

    assert letters(train).isdisjoint(letters(val))
    assert letters(train) | letters(val) == set("abcdefghij")
    n_doc = int(corpus.doc_lengths.sum())
    held = [i for i in range(len(corpus.doc_names)) if chr(ord("a") + i) in letters(val)]
    assert corpus.doc_lengths[held].sum() >= 0.25 * n_doc
    t2, v2 = corpus.split(0.25, by="document", seed=7)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    splits = {tuple(sorted(letters(corpus.split(0.25, by="document", seed=s).val))) for s in range(8)}
    assert len(splits) > 1


def test_split_by_document_keeps_one_training_document():
    train, val = _doc_corpus(2).split(0.99, by="document")
    assert len(train) and len(val)


@pytest.mark.parametrize("kwargs,match", [({"val_fraction": 0}, "val_fraction"),
                                          ({"val_fraction": 1.0}, "val_fraction"),
                                          ({"by": "random"}, "by='random'")])
def test_split_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _doc_corpus().split(**{"val_fraction": 0.1, **kwargs})


def test_split_by_document_needs_two():
    with pytest.raises(ValueError, match="1 document"):
        _doc_corpus(1).split(0.1, by="document")


# ----------------------------------------------------------------------------- samplers

TOKENS = np.arange(1000, dtype=np.int32)  # a token's value is its position


def test_random_windows_are_contiguous_and_shifted():
    s = RandomWindowSampler(TOKENS, batch_size=4, seq_len=63, seed=0)
    for _ in range(5):
        x, y = next(s)
        assert x.shape == y.shape == (4, 63) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # labels are the next token of the same window
        assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= 999


def test_random_windows_reach_the_last_token():
    s = RandomWindowSampler(np.arange(10, dtype=np.int32), batch_size=64, seq_len=9)
    assert int(next(s).labels[:, -1].max()) == 9


def test_random_sampler_deterministic_and_resumable():
    a = RandomWindowSampler(TOKENS, 3, 17, seed=5)
    first = [next(a) for _ in range(4)]
    state = a.state_dict()
    rest = [next(a) for _ in range(3)]
    b = RandomWindowSampler(TOKENS, 3, 17, seed=5)
    b.load_state_dict(state)
    for x, y in zip(rest, [next(b) for _ in range(3)]):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    c = RandomWindowSampler(TOKENS, 3, 17, seed=5)
    assert all(torch.equal(p.input_ids, next(c).input_ids) for p in first)
    other = RandomWindowSampler(TOKENS, 3, 17, seed=6)
    assert not torch.equal(next(other).input_ids, first[0].input_ids)
    rank1 = RandomWindowSampler(TOKENS, 3, 17, seed=5, rank=1)
    assert not torch.equal(next(rank1).input_ids, first[0].input_ids)


def test_sampler_resume_refuses_a_different_setup():
    state = RandomWindowSampler(TOKENS, 3, 17, seed=5).state_dict()
    with pytest.raises(ValueError, match="seq_len: saved 17 vs now 16"):
        RandomWindowSampler(TOKENS, 3, 16, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        StreamSampler(TOKENS, 3, 17, seed=5).load_state_dict(state)


@pytest.mark.parametrize("args,match", [((TOKENS[:10], 2, 10), "too few"), ((TOKENS, 0, 8), "batch_size"),
                                        ((TOKENS.reshape(10, 100), 2, 8), "1-D"),
                                        ((TOKENS.astype(np.float32), 2, 8), "integer")],
                         ids=["short", "batch0", "2d", "float"])
def test_sampler_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        RandomWindowSampler(*args)


def test_stream_segments_are_consecutive_with_resets_per_epoch():
    B, T = 4, 30
    s = StreamSampler(TOKENS, B, T, seed=1)
    shard = len(TOKENS) // B
    assert s.steps_per_epoch == (shard - 1) // T == 8
    batches = [next(s) for _ in range(2 * s.steps_per_epoch + 1)]
    assert batches[0].input_ids[:, 0].tolist() == [b * shard for b in range(B)]  # epoch 0 from shard starts
    for k, b in enumerate(batches):
        assert b.input_ids.shape == (B, T) and b.reset.shape == (B,) and b.reset.dtype == torch.bool
        assert torch.equal(b.labels, (b.input_ids + 1) % len(TOKENS))
        assert bool(b.reset.all()) == (k % s.steps_per_epoch == 0) and bool(b.reset.any()) == bool(b.reset.all())
        if k % s.steps_per_epoch:  # carried state: this segment continues the previous one
            assert torch.equal(b.input_ids[:, 0], batches[k - 1].labels[:, -1])
    epoch0 = torch.cat([b.input_ids for b in batches[:8]], dim=1)  # (B, 8T)
    assert len(set(epoch0.flatten().tolist())) == epoch0.numel()  # streams never overlap
    assert not torch.equal(batches[8].input_ids, batches[0].input_ids)  # later epochs rotate


def test_stream_resume_and_ranks():
    a = StreamSampler(TOKENS, 2, 16, seed=3, doc_len=48)
    [next(a) for _ in range(5)]
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]
    b = StreamSampler(TOKENS, 2, 16, seed=3, doc_len=48)
    b.load_state_dict(state)
    for x, y in zip(expected, [next(b) for _ in range(4)]):
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    r0 = StreamSampler(TOKENS, 2, 10, rank=0, world_size=2)
    r1 = StreamSampler(TOKENS, 2, 10, rank=1, world_size=2)
    seen0 = torch.cat([next(r0).input_ids for _ in range(r0.steps_per_epoch)]).flatten().tolist()
    seen1 = torch.cat([next(r1).input_ids for _ in range(r1.steps_per_epoch)]).flatten().tolist()
    assert set(seen0).isdisjoint(seen1)


def test_stream_random_documents():
    s = StreamSampler(TOKENS, 3, 16, seed=0, doc_len=64)
    batches = [next(s) for _ in range(9)]
    for k, b in enumerate(batches):
        assert bool(b.reset.all()) == (k % 4 == 0)
        if k % 4:
            assert torch.equal(b.input_ids[:, 0], batches[k - 1].labels[:, -1])
    assert not torch.equal(batches[4].input_ids[:, 0], batches[3].labels[:, -1])
    with pytest.raises(ValueError, match="multiple of seq_len"):
        StreamSampler(TOKENS, 3, 16, doc_len=40)
    with pytest.raises(ValueError, match="too few"):
        StreamSampler(TOKENS[:50], 3, 16)
