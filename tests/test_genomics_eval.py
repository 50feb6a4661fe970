"""``titans-lnn eval genomics`` on any FASTA (multi-record, gzipped, lower case, N and IUPAC codes, bad files),
the Markov models' per-position predictions, the online mixer, and the network-vs-Markov comparison."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_lnn.cli import main
from titans_lnn.evals.genomics import GenomeReading, base_ids, evaluate_genomics
from titans_lnn.evals.genomics import main as genomics_main
from titans_lnn.evals.genomics_markov import markov_comparison
from titans_lnn.evals.markov import MarkovModel, OnlineMixer, count_selector, mix_bits
from titans_lnn.evals.runner import load_model
from titans_lnn.tokenizers import NucleotideTokenizer

TOK = NucleotideTokenizer()
pytestmark = pytest.mark.filterwarnings("ignore:.*bases scored:UserWarning")  # the tiny files here, on purpose
# Three records over awkward lines: lower case, U, IUPAC codes (R, y, K) and N, a blank line, CRLF endings.
FASTA = ">chr1 first\r\nACGTACGTTGCAacgtnNNACG\r\nTTGACRGGCA\r\n\r\n>chr2\nuuagcyAAAT\n>plasmid p1\nGGGCCCATAKTAGC\n"
RECORDS = ["ACGTACGTTGCAACGTNNNACGTTGACNGGCA", "TTAGCNAAAT", "GGGCCCATANTAGC"]  # as read


@pytest.fixture(scope="module")
def dna_model():
    model, tok = load_model(preset="debug", tokenizer="nucleotide")
    return model, tok


def _one_pass_bits(model, tokens: np.ndarray) -> np.ndarray:
    """(N,) bits of each token from one whole forward pass (NaN at position 0)."""
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    with torch.no_grad():
        nll = F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")  # (N - 1,)
    return np.concatenate([[np.nan], nll.double().numpy() / math.log(2)])


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_multi_record_fasta_per_record_figures(tmp_path, dna_model, compress):
    model, tok = dna_model
    path = tmp_path / ("g.fa.gz" if compress else "g.fa")
    path.write_bytes(gzip.compress(FASTA.encode()) if compress else FASTA.encode())
    res = evaluate_genomics(model, tok, path, chunk_len=7, progress=False)  # 7 divides no record
    joined = "\n".join(RECORDS)
    tokens = TOK.encode(joined)
    bits = _one_pass_bits(model, tokens)
    scored = np.array([i > 0 and c in "ACGT" for i, c in enumerate(joined)])
    assert res["tokens"] == scored.sum() and res["ambiguous"] == joined.count("N") == 6
    assert res["bits"] == pytest.approx(bits[scored].mean(), rel=1e-5)
    assert [r["name"].rsplit(":", 1)[1] for r in res["per_record"]] == ["chr1 first", "chr2", "plasmid p1"]
    starts = np.cumsum([0] + [len(r) + 1 for r in RECORDS])
    for r, seq, a in zip(res["per_record"], RECORDS, starts):
        mine = scored[a:a + len(seq)]
        assert (r["bases"], r["scored"], r["ambiguous"]) == (len(seq), mine.sum(), seq.count("N"))
        assert r["bits"] == pytest.approx(bits[a:a + len(seq)][mine].mean(), rel=1e-5)


def test_lower_case_and_iupac_read_as_upper_case_and_n(tmp_path, dna_model):
    model, tok = dna_model
    (tmp_path / "lower.fa").write_text(">r\nacgtrykmacgtswbdhvacgtnacgt\n")
    (tmp_path / "upper.fa").write_text(">r\nACGTNNNNACGTNNNNNNACGTNACGT\n")
    lower = evaluate_genomics(model, tok, tmp_path / "lower.fa", chunk_len=5, progress=False)
    upper = evaluate_genomics(model, tok, tmp_path / "upper.fa", chunk_len=64, progress=False)
    assert lower["bits"] == pytest.approx(upper["bits"], rel=1e-6) and lower["tokens"] == upper["tokens"] == 15
    assert lower["ambiguous"] == 11


def test_byte_tokenizer_model_scores_the_same_bases(tmp_path):
    model, tok = load_model(preset="debug", tokenizer="byte")
    (tmp_path / "g.fa").write_text(FASTA)
    res = evaluate_genomics(model, tok, tmp_path / "g.fa", chunk_len=9, progress=False)
    joined = "\n".join(RECORDS)
    bits = _one_pass_bits(model, tok.encode(joined))
    scored = np.array([i > 0 and c in "ACGT" for i, c in enumerate(joined)])
    assert res["bits"] == pytest.approx(bits[scored].mean(), rel=1e-5) and res["tokenizer"] == "byte"


def test_a_tokenizer_without_one_token_per_base_is_an_error():
    class Pairs:
        name = "pairs"

        def encode(self, text):
            return np.zeros(2, dtype=np.int64)

    with pytest.raises(ValueError, match=r"encodes the base 'A' as \[0, 0\]: genomics needs one token per base"):
        base_ids(Pairs())


@pytest.mark.parametrize("text, message", [
    (">r\nACGTXACGT\n", r"bad.fa:2: invalid character 'X' \(column 5\) in FASTA record 'r'"),
    ("ACGT\n>r\nACGT\n", r"bad.fa:1: sequence data before the first '>' header"),
    (">r\nACGT\n>empty\n>s\nACGT\n", r"bad.fa:3: FASTA record 'empty' has no sequence"),
    (">r\nAC GT\n", r"bad.fa:2: invalid character ' ' \(column 3\)"),
    ("", r"bad.fa: empty file"),
    ("just some text\n", r"bad.fa:1: sequence data before the first '>' header"),
], ids=["protein-letter", "no-header", "empty-record", "space", "empty-file", "not-fasta"])
def test_bad_fasta_is_one_clear_error(tmp_path, capsys, text, message):
    (tmp_path / "bad.fa").write_text(text)
    argv = ["eval", "genomics", "--preset", "debug", "--data", str(tmp_path / "bad.fa"), "--no-progress",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titans-lnn eval: error: ")
    assert __import__("re").search(message, err[0]), err[0]


def test_corrupt_gzip_is_a_clear_error(tmp_path, capsys):
    seq = "".join(np.random.default_rng(0).choice(list("ACGT"), 5000))
    whole = gzip.compress(f">r\n{seq}\n".encode())
    (tmp_path / "bad.fa.gz").write_bytes(whole[:len(whole) // 2])  # the stream ends before its end marker
    assert main(["eval", "genomics", "--preset", "debug", "--data", str(tmp_path / "bad.fa.gz"), "--no-progress",
                 "--out", str(tmp_path / "out")]) == 2
    assert "bad.fa.gz: corrupt gzip data" in capsys.readouterr().err


def test_cli_writes_the_per_record_table(tmp_path, capsys):
    (tmp_path / "g.fa").write_text(FASTA)
    out = tmp_path / "out"
    assert main(["eval", "genomics", "--preset", "debug", "--data", str(tmp_path / "g.fa"), "--no-progress",
                 "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| record | bases | scored | N (read, not scored) | bits per base |" in table
    assert "g.fa:chr2 | 10 | 9 | 1 |" in table and "g.fa:plasmid p1 | 14 | 13 | 1 |" in table
    saved = json.loads((out / "results.json").read_text())
    assert [r["scored"] for r in saved["per_record"]] == [27, 9, 13]


# ----------------------------------------------------------------------------- Markov predictions and mixing


@pytest.mark.parametrize("k", [0, 1, 3])
def test_markov_logprobs_agree_with_bits(k):
    rng = np.random.default_rng(k)
    train = [rng.integers(0, 4, 3000).astype(np.uint8)]
    test = rng.integers(0, 4, 500).astype(np.uint8)
    test[[40, 41, 300]] = 4  # N: its row exists, the contexts through it do not
    model = MarkovModel(k).fit(train)
    logp, count = model.logprobs(test)
    assert logp.shape == (500, 4) and np.allclose(np.exp(logp).sum(1), 1, atol=1e-6)
    code_ok = np.array([i >= k and (test[i - k:i] < 4).all() for i in range(500)])
    assert ((count >= 0) == code_ok).all()
    scored = code_ok & (test < 4)
    np.testing.assert_allclose(-logp[scored, test[scored]] / math.log(2), model.bits(test), rtol=1e-5)
    assert (logp[~code_ok] == np.float32(-math.log(4))).all()


def test_count_selector_buckets():
    assert count_selector(np.array([-1, 0, 1, 2, 3, 4, 7, 8, 31, 32, 10**6])).tolist() == [0, 1, 2, 3, 3, 4, 4, 5,
                                                                                          5, 6, 6]


def test_mixer_is_causal_and_learns_to_trust_the_right_expert():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 4000)
    oracle = np.full((4000, 4), math.log(0.02 / 3), dtype=np.float32)
    oracle[np.arange(4000), target] = math.log(0.98)  # right 98% of the time
    noise = np.log(rng.dirichlet(np.ones(4), size=4000)).astype(np.float32)  # confident and useless
    logp = np.stack([noise, oracle], axis=1)  # (N, 2, 4)
    mixer = OnlineMixer(2, lr=0.01, block=64)
    nll = mixer(logp, target)
    assert nll[-1000:].mean() < 0.01 < 0.2 < nll[:64].mean()  # the oracle alone: 0.02 nats
    assert mixer.weights[0, 1] > 1.0 > 0.5 > mixer.weights[0, 0]
    later = target.copy()
    later[2048:] = (later[2048:] + 1) % 4  # the future changes: the past's predictions do not
    np.testing.assert_array_equal(OnlineMixer(2, lr=0.01, block=64)(logp, later)[:2048], nll[:2048])
    assert np.isnan(OnlineMixer(2)(logp[:3], np.array([0, 4, 5]))[1:]).all()


def test_mixer_with_lr_zero_is_the_geometric_mean():
    rng = np.random.default_rng(1)
    logp = np.log(rng.dirichlet(np.ones(4), size=(50, 3))).astype(np.float32)  # (N, 3, 4)
    target = rng.integers(0, 4, 50)
    mean = logp.astype(np.float64).mean(axis=1)
    expected = -(mean[np.arange(50), target] - np.log(np.exp(mean).sum(1)))
    np.testing.assert_allclose(OnlineMixer(3, lr=0.0)(logp, target), expected, rtol=1e-9)


def test_mixer_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"logp has shape \(5, 3, 4\): expected \(N, 2, 4\)"):
        OnlineMixer(2)(np.zeros((5, 3, 4)), np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match=r"selector must be \(N,\) = \(5,\) ids in \[0, 2\)"):
        OnlineMixer(2, 2)(np.zeros((5, 2, 4)), np.zeros(5, dtype=np.int64), np.full(5, 2))
    with pytest.raises(ValueError, match=r"lr=-1 is invalid"):
        OnlineMixer(2, lr=-1)


def test_mix_bits_any_slab_gives_the_same_answer():
    rng = np.random.default_rng(2)
    genome = rng.integers(0, 4, 3000).astype(np.uint8)
    models = [MarkovModel(k).fit([genome[:2000]]) for k in (1, 2, 5)]
    extra = np.log(rng.dirichlet(np.ones(4), size=(1000, 1))).astype(np.float32)
    whole = mix_bits(models, genome[2000:], extra, block=16, slab=1 << 12)
    np.testing.assert_allclose(mix_bits(models, genome[2000:], extra, block=16, slab=48), whole, rtol=1e-12)


def _reading(genome: np.ndarray, logp: np.ndarray) -> GenomeReading:
    return GenomeReading("test", ["r"], np.array([0]), np.array([len(genome)]), genome, logp)


def test_markov_comparison_scores_every_row_on_the_same_bases():
    rng = np.random.default_rng(3)
    motif = rng.integers(0, 4, 40)
    genome = np.tile(motif, 50).astype(np.uint8)  # a repeat: order 12 predicts it, once learnt
    genome[[100, 700]] = 4
    uniform = np.full((len(genome), 4), -math.log(4), dtype=np.float32)
    cmp = markov_comparison(_reading(genome, uniform), [genome], kmax=4, progress=False)
    names = [r["name"] for r in cmp["rows"]]
    assert names[:4] == [f"Markov k = {k}" for k in range(1, 5)] and names[4] == "network alone (ours)"
    assert cmp["tokens"] == len(genome) - 4 - 2 * 5  # no full 4-base context: the first 4, and 4 after each N
    assert all(sum(b["tokens"] for b in r["bins"]) == cmp["tokens"] for r in cmp["rows"])
    rows = {r["name"]: r["bits"] for r in cmp["rows"]}
    assert rows["network alone (ours)"] == pytest.approx(2.0)
    assert rows["network + Markov 1-4, mixed online"] < rows["network alone (ours)"]
    assert cmp["best_markov"] == min((r for r in cmp["rows"] if "k" in r), key=lambda r: r["bits"])["name"]
    assert [g["group"] for g in cmp["seen"]] == ["never", "once", "2-9 times", "10+ times"]
    assert sum(g["share"] for g in cmp["seen"]) == pytest.approx(1) and cmp["seen"][3]["share"] > 0.9
    assert cmp["rows"][4]["seen"][3] == pytest.approx(2.0)  # the uniform network, on the often-seen contexts


def test_genomics_command_table_plot_and_cache(tmp_path, capsys):
    rng = np.random.default_rng(4)
    train = "".join(rng.choice(list("ACGT"), 3000))
    (tmp_path / "train.fa").write_text(f">t\n{train}\n")
    (tmp_path / "test.fa").write_text(f">a\n{train[:700]}\n>b\n{train[1500:2000].lower()}\n")
    model, tok = load_model(preset="debug", tokenizer="nucleotide")
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(tok.to_dict()))
    argv = ["--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "test.fa"), "--train",
            str(tmp_path / "train.fa"), "--kmax", "6", "--out", str(tmp_path / "out"), "--plot",
            str(tmp_path / "plots" / "dna.png"), "--cache", str(tmp_path / "logp.npy"), "--no-progress"]
    assert genomics_main(argv) == 0
    first = (tmp_path / "out" / "results.md").read_text()
    assert "| Markov k = 6 |" in first and "| network + Markov 1-6, mixed online |" in first
    assert "| context seen in training | share of bases |" in first
    assert (tmp_path / "plots" / "dna.png").read_bytes()[:4] == b"\x89PNG"
    assert np.load(tmp_path / "logp.npy").shape == (1201, 4)
    assert genomics_main(argv) == 0  # from the cache: the same table
    assert (tmp_path / "out" / "results.md").read_text() == first
    capsys.readouterr()
    assert genomics_main(argv[:-3] + ["--cache", str(tmp_path / "logp.npy"), "--max-tokens", "600"]) == 2
    assert "log-probabilities of shape (1201, 4), but" in capsys.readouterr().err
