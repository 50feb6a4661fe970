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


# ----------------------------------------------------------------------------- the gene probe


def _planted_genome(seed: int, n_genes: int = 40) -> tuple[str, list[tuple[int, int]]]:
    """AT-rich random intergenic DNA with planted ORFs (ATG, GC-rich sense codons without stops, TAA), every
    other one on the reverse strand; returns the genome and each ORF's [start, end)."""
    rng = np.random.default_rng(seed)
    codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]
    p = np.array([3.0 if sum(ch in "GC" for ch in c) >= 2 else 1.0 for c in codons])
    parts, genes, pos = [], [], 0
    for i in range(n_genes):
        spacer = "".join(rng.choice(list("ACGT"), p=[0.35, 0.15, 0.15, 0.35], size=int(rng.integers(150, 400))))
        orf = "ATG" + "".join(rng.choice(codons, p=p / p.sum(), size=int(rng.integers(150, 300)))) + "TAA"
        orf = reverse_complement(orf) if i % 2 else orf
        parts += [spacer, orf]
        genes.append((pos + len(spacer), pos + len(spacer) + len(orf)))
        pos += len(spacer) + len(orf)
    return "".join(parts), genes


def test_window_labels_and_kmer_features():
    from titans_lnn.evals.gene_probe import kmer_features, window_labels

    mask = np.zeros(45, dtype=bool)
    mask[:10] = True
    mask[10:19] = True  # window 1: 9/10 coding -> gene
    mask[25:30] = True  # window 2: half -> left out; window 3 none -> intergenic; the last 5 bases: no window
    assert window_labels(mask, 10).tolist() == [1, 1, -1, 0]
    ids = TOK.encode("AACGN" + "TTTTT")  # windows of 5: "AACGN" (N not counted), "TTTTT"
    feats = kmer_features(ids, 5, 2)  # (2, 4 + 16)
    np.testing.assert_allclose(feats[0, :4], [0.5, 0.25, 0.25, 0])
    assert feats[0, 4 + 0 * 4 + 0] == feats[0, 4 + 0 * 4 + 1] == feats[0, 4 + 1 * 4 + 2] == pytest.approx(1 / 3)
    np.testing.assert_allclose(feats[1], [0, 0, 0, 1] + [0] * 15 + [1])


def test_streamed_window_embeddings_read_each_part_from_its_start(dna_model):
    from titans_lnn.evals.gene_probe import window_embeddings

    ids = np.random.default_rng(5).integers(0, 5, size=130).astype(np.uint8)  # 13 windows of 10; 3 streams of 5
    parts = window_embeddings(dna_model, ids, 10, "stream", streams=3, chunk_len=16)
    assert parts.shape == (13, 32)
    for lo, hi in ((0, 5), (5, 10), (10, 13)):  # the last part is 3 windows (padded after them)
        np.testing.assert_allclose(parts[lo:hi], embed_array(dna_model, ids[lo * 10:hi * 10], window=10),
                                   rtol=1e-5, atol=1e-5)
    alone = window_embeddings(dna_model, ids, 10, "window", rc_complement=TOK.complement_ids)
    rc_alone = window_embeddings(dna_model, TOK.reverse_complement(ids), 10, "window", rc_complement=TOK.complement_ids)
    np.testing.assert_allclose(alone, rc_alone[::-1], rtol=1e-5, atol=1e-6)


def test_auroc_and_f1():
    from titans_lnn.evals.gene_probe import auroc, f1

    y = np.array([0, 0, 1, 1, 1, 0])
    assert auroc(y, np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])) == pytest.approx(8 / 9)
    assert auroc(y, np.array([0.5] * 6)) == 0.5  # ties count half
    assert f1(y, np.array([0.1, 0.6, 0.7, 0.8, 0.2, 0.1])) == pytest.approx(2 * 2 / (3 + 3))


def test_gene_probe_on_planted_genes(tmp_path, dna_model):
    pytest.importorskip("pyrodigal")
    from titans_lnn.evals.gene_probe import gene_mask, gene_probe, markdown_table

    seq, genes = _planted_genome(0, n_genes=24)
    truth = np.zeros(len(seq), dtype=bool)
    for start, end in genes:
        truth[start:end] = True
    found = gene_mask(seq)
    assert (found == truth).mean() > 0.95  # Prodigal finds the planted ORFs
    fa, other = _write_fasta(tmp_path / "g.fa", [("g", seq)]), _write_fasta(tmp_path / "h.fa",
                                                                           [("h", _planted_genome(1, n_genes=12)[0])])
    rows = gene_probe(dna_model, TOK, str(fa), str(other), bases=None, other_bases=None, window=50, kmax=3,
                      streams=16, chunk_len=512, log=lambda s: None)
    assert [r.features for r in rows] == ["k-mer frequencies, k <= 3"] * 2 + \
        ["embedding (streamed genome)"] * 2 + ["embedding (window alone)"] * 2
    kmer = rows[0]
    assert kmer.auroc > 0.95 and kmer.f1 > 0.9 and 0.3 < kmer.genes < 0.8  # planted genes differ in composition
    assert all(0 <= r.auroc <= 1 and 0 <= r.f1 <= 1 and r.windows > 100 for r in rows)
    table = markdown_table(rows)
    assert table.count("\n") == 8 and "| k-mer frequencies, k <= 3 | " in table


def test_gene_probe_command_errors(tmp_path, capsys):
    from titans_lnn.evals.gene_probe import main as probe_main

    fa = _write_fasta(tmp_path / "bad.fa", [("x", "ACGT*")])
    assert probe_main(["--genome", str(fa), "--other", "none"]) == 2
    assert "invalid character '*'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe_main(["--contexts", "stream,everything"])
    assert "'everything' is not a context" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Markov baselines


def test_markov_counts_by_hand():
    from titans_lnn.evals.markov import MarkovModel

    train = [TOK.encode("ACACACAG")]  # order 1: after A: C C C G; after C: A A A
    model = MarkovModel(1, alpha=0.5).fit(train)
    bits = model.bits(TOK.encode("ACNAG"))  # scored: C after A; G after A (the N breaks two contexts)
    np.testing.assert_allclose(bits, -np.log2([(3 + 0.5) / (4 + 2), (1 + 0.5) / (4 + 2)]))
    assert MarkovModel(0).fit(train).bits(TOK.encode("T"))[0] == pytest.approx(-np.log2(0.5 / (8 + 2)))


def test_markov_learns_a_periodic_sequence_and_its_table():
    from titans_lnn.evals.markov import markov_table

    rng = np.random.default_rng(6)
    motif = [0, 1, 2, 0, 1, 3, 2]  # "01" is followed by 2 and by 3: order 2 cannot tell; order 6 can
    periodic = np.tile(motif, 300).astype(np.uint8)
    rows = markov_table([periodic], {"same": [periodic], "random": [rng.integers(0, 4, 2000).astype(np.uint8)]},
                        [0, 2, 6])
    assert rows[0]["random"] == pytest.approx(2, abs=0.2)
    assert rows[2]["same"] < 0.01 < rows[1]["same"]
    assert rows[2]["random"] > 1.9  # nothing to learn there
