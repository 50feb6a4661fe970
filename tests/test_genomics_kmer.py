"""The overlapping k-mer DNA tokenizer (one token per base naming the k bases ending at it) and the next-base
predictions read from a model that uses it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from titans_lnn.evals.genomics import base_ids, candidate_ids, evaluate_genomics, stream_base_logprobs
from titans_lnn.evals.runner import load_model
from titans_lnn.tokenizers import (
    KmerTokenizer,
    NucleotideTokenizer,
    get_tokenizer,
    reverse_complement,
    tokenizer_from_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*bases scored:UserWarning")
TEXT = "ACGTRn\nGGA\nTTGCAacgtuCCA"  # records of 6, 3 and 13 bases: lower case, U, IUPAC codes


def test_each_token_is_the_kmer_ending_at_its_base():
    tok = KmerTokenizer(3)
    ids = tok.encode("ACGTN\nG")
    digits = {"A": 0, "C": 1, "G": 2, "T": 3, "N": 4}
    kmers = ["NNA", "NAC", "ACG", "CGT", "GTN", None, "NNG"]  # the record start reads as N; None: the separator
    want = [tok.sep_id if k is None else sum(digits[c] * 5 ** (2 - i) for i, c in enumerate(k)) for k in kmers]
    assert ids.tolist() == want
    assert tok.vocab_size == 126 and ids.dtype == np.uint8 and KmerTokenizer(4).encode("A").dtype == np.int32


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_decode_inverts_encode_as_the_nucleotide_tokenizer_does(k):
    tok, nuc = KmerTokenizer(k), NucleotideTokenizer()
    assert tok.decode(tok.encode(TEXT)) == nuc.decode(nuc.encode(TEXT)) == "ACGTNN\nGGA\nTTGCAACGTTCCA"
    assert tokenizer_from_dict(tok.to_dict()) == tok == get_tokenizer(f"kmer{k}")


def test_k1_is_the_nucleotide_tokenizer():
    assert KmerTokenizer(1).encode(TEXT).tolist() == NucleotideTokenizer().encode(TEXT).tolist()


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_reverse_complement_re_encodes_the_other_strand(as_torch):
    tok = KmerTokenizer(4)
    ids = tok.encode(TEXT)
    got = tok.reverse_complement(torch.from_numpy(ids.astype(np.int64)) if as_torch else ids)
    got = got.numpy() if as_torch else got
    assert got.tolist() == tok.encode(reverse_complement(TEXT)).tolist()


def test_next_ids_lists_the_tokens_that_can_follow():
    tok = KmerTokenizer(3)
    ids = tok.encode("ACGTTGCA\nCA")
    follow = tok.next_ids(ids[:-1])  # (N - 1, 5): appending A, C, G, T, N
    nucleotide = NucleotideTokenizer().encode("ACGTTGCA\nCA")[1:]
    for row, nxt, base in zip(follow, ids[1:], nucleotide):
        if base < 5:  # a base follows: its id is the column of that base
            assert row[base] == nxt
    assert follow[ids[:-1].tolist().index(tok.sep_id)].tolist() == tok.encode("A\nC\nG\nT\nN")[::2].tolist()


@pytest.mark.parametrize("bad, message", [(0, r"k=0"), (7, r"k=7"), (2.0, r"k=2\.0"), (True, "k=True")])
def test_bad_k_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        KmerTokenizer(bad)


def test_bad_text_and_ids_are_clear_errors():
    tok = KmerTokenizer(3)
    with pytest.raises(ValueError, match=r"kmer3 tokenizer: invalid character 'X' at position 2"):
        tok.encode("ACXG")
    with pytest.raises(ValueError, match=r"id 126 at position 1 is out of range \[0, 126\)"):
        tok.decode([0, 126])
    with pytest.raises(ValueError, match="unknown tokenizer 'kmerx'"):
        get_tokenizer("kmerx")


def test_base_ids_refuses_a_context_dependent_tokenizer():
    with pytest.raises(ValueError, match="different id in each context"):
        base_ids(KmerTokenizer(2))
    assert candidate_ids(NucleotideTokenizer(), np.zeros(3, dtype=np.int64)).tolist() == [0, 1, 2, 3]


def test_next_base_probabilities_are_the_model_s_renormalised_over_what_can_follow():
    """Row t: log-softmax of the logits of the 6 ids that can follow token t, A/C/G/T kept (one whole pass)."""
    tok = KmerTokenizer(2)
    model, _ = load_model(preset="debug", tokenizer=tok)
    tokens = tok.encode("ACGTTGCAGGNACCA\nTTGA")
    cand = candidate_ids(tok, tokens)  # (N, 6)
    got = stream_base_logprobs(model, tokens, cand, chunk_len=5, progress=False)  # pieces of 5: state carried
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].double()  # (N, V)
    rows = torch.log_softmax(logits.gather(1, torch.from_numpy(cand)), dim=-1)[:, :4]  # (N, 4)
    np.testing.assert_allclose(got[1:], rows[:-1].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[0], -math.log(4))
    assert np.allclose(np.exp(got).sum(axis=1)[1:] <= 1 + 1e-6, True)


def test_evaluate_genomics_scores_the_bases_of_a_kmer_model(tmp_path):
    path = tmp_path / "g.fa"
    path.write_text(">a\nACGTTGCAGGNACCA\n>b\nttga\n")
    model, tok = load_model(preset="debug", tokenizer="kmer3")
    result = evaluate_genomics(model, tok, path, progress=False)
    # scored: every A/C/G/T base after the first token (the N and the separator are read, not scored)
    assert [r["scored"] for r in result["per_record"]] == [14 - 1, 4] and result["ambiguous"] == 1
    tokens = tok.encode("ACGTTGCAGGNACCA\nTTGA")
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, :-1].double()  # (N - 1, V)
    cand = torch.from_numpy(candidate_ids(tok, tokens)[:-1])  # (N - 1, 6)
    logp = torch.log_softmax(logits.gather(1, cand), dim=-1)  # (N - 1, 6)
    bases = NucleotideTokenizer().encode("ACGTTGCAGGNACCA\nTTGA")[1:]  # the base each row predicts
    scored = bases < 4
    want = -logp[torch.arange(len(bases)), torch.from_numpy(np.minimum(bases, 3).astype(np.int64))][scored]
    assert result["bits"] == pytest.approx(float(want.mean()) / math.log(2), rel=1e-5)


def test_dna_preset_trains_on_kmer_tokens_with_both_strands_and_is_scored(tmp_path, capsys):
    """The DNA recipe's pieces end to end on a tiny genome: --preset dna --tokenizer kmerK --rc-augment, then
    titans-lnn eval genomics on the saved model."""
    from titans_lnn.cli import main
    from titans_lnn.training.config import TrainConfig
    from titans_lnn.training.trainer import Trainer

    rng = np.random.default_rng(0)
    fasta = tmp_path / "g.fa"
    fasta.write_text(">g\n" + "".join(rng.choice(list("ACGT"), size=3000)) + "\n")
    cfg = TrainConfig(model_preset="dna", tokenizer="kmer2", data=str(fasta), rc_augment=True, steps=2, batch_size=2,
                      seq_len=32, segments=2, out=str(tmp_path / "run"), progress=False, tensorboard=False,
                      val_fraction=0.1)
    trainer = Trainer(cfg)
    train, tok = trainer.sampler.tokens, KmerTokenizer(2)
    n = (len(train) - 1) // 2
    assert np.array_equal(train[n + 1:], tok.reverse_complement(train[:n]))  # both strands, each re-encoded
    assert trainer.model_config.vocab_size == 26 and trainer.model_config.variant == "swa"
    trainer.close()
    assert main(["train", "--data", str(fasta), "--preset", "dna", "--tokenizer", "kmer2", "--rc-augment",
                 "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--val-fraction", "0.1", "--no-progress",
                 "--no-tensorboard", "--out", str(tmp_path / "cli")]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "genomics", "--checkpoint", str(tmp_path / "cli" / "model"), "--data", str(fasta),
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["tokenizer"] == "kmer2" and result["tokens"] == 2999 and 1.5 < result["bits"] < 2.6


@pytest.mark.parametrize("window", [0, 5], ids=["per-base", "per-window"])
def test_rc_averaged_kmer_embedding_is_strand_symmetric(window):
    """With k-mer tokens the other strand is re-encoded (each token then names the k bases ending at it on that
    strand); the RC-averaged embedding of a sequence still equals that of its reverse complement, reversed."""
    from titans_lnn.evals.embed import embed_array

    tok = KmerTokenizer(3)
    model, _ = load_model(preset="debug", tokenizer=tok)
    ids = tok.encode("ACGTTGCAGGTACCAGTTGA")  # 20 bases: 4 windows of 5
    fwd = embed_array(model, ids, window=window, rc_complement=tok.reverse_complement, chunk_len=7)
    rev = embed_array(model, tok.reverse_complement(ids), window=window, rc_complement=tok.reverse_complement,
                      chunk_len=6)
    np.testing.assert_allclose(fwd, rev[::-1], atol=1e-5)
    one_strand = embed_array(model, ids, window=window)
    assert not np.allclose(fwd, one_strand, atol=1e-3)

