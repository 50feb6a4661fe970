"""Genomics as its users expect it: the reverse complement (text, token ids, training augmentation,
RC-averaged embeddings), the streamed ``titans-lnn embed`` command, and the gene-vs-intergenic probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.cli import main
from titans_lnn.evals.embed import embed_array, hidden_pieces, hidden_states
from titans_lnn.tokenizers import COMPLEMENT, NucleotideTokenizer, reverse_complement
from titans_lnn.training.config import TrainConfig
from titans_lnn.training.data import with_reverse_complement

TOK = NucleotideTokenizer()


@pytest.fixture(scope="module")
def dna_model():
    torch.manual_seed(0)
    return TitansLNN(TitansLNNConfig.from_preset("debug", vocab_size=6)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dna_model):
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    dna_model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(json.dumps(TOK.to_dict()))
    return directory


# ----------------------------------------------------------------------------- complement


@pytest.mark.parametrize("base, partner", [("A", "T"), ("C", "G"), ("U", "A"), ("R", "Y"), ("K", "M"), ("B", "V"),
                                           ("D", "H"), ("S", "S"), ("W", "W"), ("N", "N")], ids=lambda v: v)
def test_complement_table_iupac(base, partner):
    """Each IUPAC code names a set of bases; its complement names the set of their complements."""
    sets = {"A": "A", "C": "C", "G": "G", "T": "T", "U": "T", "R": "AG", "Y": "CT", "S": "CG", "W": "AT",
            "K": "GT", "M": "AC", "B": "CGT", "D": "AGT", "H": "ACT", "V": "ACG", "N": "ACGT"}
    pair = {"A": "T", "C": "G", "G": "C", "T": "A"}
    assert COMPLEMENT[base] == partner
    assert set(sets[partner]) == {pair[b] for b in sets[base]}
    assert reverse_complement(base.lower()) == partner.lower()


def test_reverse_complement_text_round_trip():
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACGTacgtRYSWKMBDHVN"), size=500))
    rc = reverse_complement(seq)
    assert reverse_complement(rc) == seq
    assert reverse_complement("AACGTn") == "nACGTT"
    assert reverse_complement("ACG\nTT") == "AA\nCGT"  # record boundaries stay, in reverse order


def test_reverse_complement_text_rejects_non_dna():
    with pytest.raises(ValueError, match=r"invalid character 'X' at position 3"):
        reverse_complement("ACGXT")


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_tokenizer_reverse_complement_matches_text(as_torch):
    seq = "ACGTNRYacgtkm\nGGAT"
    ids = TOK.encode(seq)
    ids = torch.from_numpy(ids) if as_torch else ids
    rc = TOK.reverse_complement(ids)
    assert type(rc) is type(ids) and rc.dtype == ids.dtype
    assert TOK.decode(rc) == TOK.decode(TOK.encode(reverse_complement(seq)))
    assert TOK.decode(TOK.reverse_complement(rc)) == TOK.decode(ids)
    batch = np.stack([TOK.encode("AACG"), TOK.encode("TTTG")])  # (2, 4): reversed along the last axis
    assert [TOK.decode(row) for row in TOK.reverse_complement(batch)] == ["CGTT", "CAAA"]


def test_tokenizer_complement_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"id 7 at position 1 is out of range \[0, 6\)"):
        TOK.complement(np.array([0, 7]))


# ----------------------------------------------------------------------------- augmentation


def test_rc_augmentation_appends_the_other_strand():
    tokens = TOK.encode("AACGTN")
    both = with_reverse_complement(tokens, TOK)
    assert TOK.decode(both) == "AACGTN\nNACGTT" and both.dtype == tokens.dtype


def test_rc_augmentation_needs_dna():
    from titans_lnn.tokenizers import ByteTokenizer

    with pytest.raises(ValueError, match="needs the nucleotide tokenizer.*'byte'"):
        with_reverse_complement(np.zeros(4, dtype=np.uint8), ByteTokenizer())
    with pytest.raises(ValueError, match=r"rc_augment='yes' is invalid: expected True or False"):
        TrainConfig(rc_augment="yes")


def test_rc_augmented_training_reads_both_strands(tmp_path):
    from titans_lnn.training.trainer import Trainer

    rng = np.random.default_rng(0)
    fasta = tmp_path / "g.fa"
    fasta.write_text(">g\n" + "".join(rng.choice(list("ACGT"), size=3000)) + "\n")
    cfg = TrainConfig(model_preset="debug", data=str(fasta), rc_augment=True, steps=1, batch_size=2, seq_len=32,
                      out=str(tmp_path / "run"), progress=False, tensorboard=False, val_fraction=0.1)
    trainer = Trainer(cfg)
    train = trainer.sampler.tokens
    n = (len(train) - 1) // 2
    assert len(train) == 2 * n + 1 and np.array_equal(train[n + 1:], TOK.reverse_complement(train[:n]))


# ----------------------------------------------------------------------------- embeddings


def test_hidden_states_are_what_the_lm_head_reads(dna_model):
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 6, size=(2, 70)))
    with torch.no_grad():
        h, state = hidden_states(dna_model, ids)
        out = dna_model(ids)
    torch.testing.assert_close(F.linear(h, dna_model.embed.weight), out.logits)
    assert state.pos == 70
    pieces = torch.cat([p for _, p in hidden_pieces(dna_model, ids, chunk_len=17)], dim=1)  # 17 does not divide 70
    torch.testing.assert_close(pieces, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 7], ids=["per-base", "window7"])
def test_rc_averaged_embedding_is_strand_symmetric(dna_model, window):
    """emb_rc(rc(x)) == emb_rc(x) reversed: per base, and per window when the windows tile the sequence."""
    ids = np.random.default_rng(2).integers(0, 5, size=63).astype(np.uint8)
    fwd = embed_array(dna_model, ids, window=window, rc_complement=TOK.complement_ids, chunk_len=16)
    rev = embed_array(dna_model, TOK.reverse_complement(ids), window=window, rc_complement=TOK.complement_ids,
                      chunk_len=10)
    np.testing.assert_allclose(fwd, rev[::-1], rtol=1e-5, atol=1e-6)
    plain = embed_array(dna_model, ids, window=window)
    assert not np.allclose(plain, embed_array(dna_model, TOK.reverse_complement(ids), window=window)[::-1],
                           atol=1e-3)  # without conjoining the strands differ: the test above can fail


def test_window_embedding_is_the_mean_of_its_bases(dna_model):
    ids = np.random.default_rng(3).integers(0, 4, size=50).astype(np.uint8)
    per_base = embed_array(dna_model, ids, chunk_len=9)
    pooled = embed_array(dna_model, ids, window=8, chunk_len=9)
    assert pooled.shape == (7, dna_model.config.d_model)
    np.testing.assert_allclose(pooled[2], per_base[16:24].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[6], per_base[48:].mean(0), rtol=1e-5, atol=1e-6)  # the short last window


def _write_fasta(path, records):
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_embed_command_end_to_end(tmp_path, checkpoint, dna_model, suffix, capsys):
    rng = np.random.default_rng(4)
    seqs = ["".join(rng.choice(list("ACGT"), size=n)) for n in (45, 30)]
    fasta = _write_fasta(tmp_path / "x.fa", [("one", seqs[0].lower()), ("two", seqs[1][:10] + "RYN" + seqs[1][13:])])
    out = tmp_path / f"emb{suffix}"
    assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(fasta), "--out", str(out),
                 "--chunk-len", "16", "--no-progress"]) == 0
    assert "75 x 32 (per base)" in capsys.readouterr().out
    if suffix == ".npy":
        emb, meta = np.load(out), json.loads((tmp_path / "emb.npy.json").read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(out), framework="np") as f:
            emb, meta = f.get_tensor("embeddings"), json.loads(f.metadata()["titans_lnn"])
    assert emb.shape == (75, 32) and [r["rows"] for r in meta["records"]] == [45, 30]
    second = TOK.encode(seqs[1][:10] + "NNN" + seqs[1][13:])  # each record read from a fresh state
    with torch.no_grad():
        h, _ = hidden_states(dna_model, torch.from_numpy(second)[None])
    np.testing.assert_allclose(emb[45:], h[0].numpy(), rtol=1e-5, atol=1e-5)

    pooled = tmp_path / f"pooled{suffix}"
    assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(fasta), "--out", str(pooled),
                 "--window", "10", "--rc", "--dtype", "float16", "--no-progress"]) == 0
    assert "8 x 32 (10-base windows, RC-averaged)" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("ACGT\n", "sequence data before the first '>' header"),
    (">a\nACGT\n>b\n", "FASTA record 'b' has no sequence"),
    (">a\nACGT\nAC-GT\n", r"x.fa:3: invalid character '-' \(column 3\)"),
    ("", "empty file"),
    ("just some text\n", "sequence data before the first '>' header"),
], ids=["no-header", "empty-record", "gap", "empty-file", "text"])
def test_embed_bad_fasta_is_a_clear_error(tmp_path, checkpoint, content, message, capsys):
    fasta = tmp_path / "x.fa"
    fasta.write_text(content)
    assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(fasta), "--out",
                 str(tmp_path / "e.npy"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("titans-lnn embed: error:") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_embed_bad_flags(tmp_path, checkpoint, capsys):
    fasta = _write_fasta(tmp_path / "x.fa", [("a", "ACGT")])
    assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(fasta), "--out",
                 str(tmp_path / "e.txt")]) == 2
    assert "expected a file name ending in .safetensors or .npy" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "nope"), "--data", str(fasta), "--out",
                 str(tmp_path / "e.npy")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "missing.fa"), "--out",
                 str(tmp_path / "e.npy")]) == 2
    assert "missing.fa" in capsys.readouterr().err
