"""Learning while reading a genome: dynamic evaluation of a DNA model (Krause et al. 2018; each block scored before
the step that learns from it) and Markov tables of the genome counted as it is read; their command-line rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from titans_lnn.cli import main as cli_main
from titans_lnn.evals.dynamic_eval import dynamic_base_logprobs
from titans_lnn.evals.genomics import _nucleotide_bases, candidate_ids, stream_base_logprobs
from titans_lnn.evals.genomics import main as genomics_main
from titans_lnn.evals.markov import online_table_logprobs
from titans_lnn.evals.runner import load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*bases scored:UserWarning")  # the tiny genomes here, on purpose


def _genome(tokenizer, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, ids, bases)`` of a random genome of ``n`` bases with an N at position 20."""
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list("ACGT"), n))
    text = text[:20] + "N" + text[21:]
    tokens = np.asarray(tokenizer.encode(text))
    return tokens, candidate_ids(tokenizer, tokens), _nucleotide_bases(tokenizer, tokens)


@pytest.mark.parametrize("variant,tokenizer", [("swa", "nucleotide"), ("mac", "kmer3"), ("mag", "nucleotide")])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_lr_zero_is_the_plain_streamed_pass(variant, tokenizer, optimizer):
    model, tok = load_model(preset="debug", variant=variant, tokenizer=tokenizer)
    tokens, ids, bases = _genome(tok, 101)
    plain = stream_base_logprobs(model, tokens, ids, chunk_len=16, progress=False)
    dyn = dynamic_base_logprobs(model, tokens, ids, bases, lr=0.0, block=16, optimizer=optimizer, progress=False)
    np.testing.assert_allclose(dyn, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", [7, 16])
@pytest.mark.parametrize("cut", [21, 37, 48])
def test_no_base_is_predicted_by_weights_that_learnt_from_it(block, cut):
    """Row t must depend on tokens[:t] only. Changing every token from ``cut`` on leaves rows 0..cut unchanged;
    scoring a block after (instead of before) its step would move the rows of the block that holds ``cut``."""
    model, tok = load_model(preset="debug", variant="swa", tokenizer="nucleotide")
    tokens, ids, bases = _genome(tok, 90)
    other = tokens.copy()
    other[cut:] = (tokens[cut:] + 1) % 4  # A<->C, G<->T and so on: every base from cut on differs
    run = dict(lr=0.05, block=block, optimizer="adam", progress=False)
    a = dynamic_base_logprobs(model, tokens, ids, bases, **run)
    b = dynamic_base_logprobs(model, other, ids, _nucleotide_bases(tok, other), **run)
    np.testing.assert_array_equal(a[:cut + 1], b[:cut + 1])
    assert np.abs(a[cut + 1:] - b[cut + 1:]).max() > 1e-3  # the change is seen once it is in the past
    plain = stream_base_logprobs(model, tokens, ids, chunk_len=block, progress=False)
    np.testing.assert_allclose(a[:block + 1], plain[:block + 1], atol=1e-5)  # the first block: the model's own
    assert np.abs(a[block + 1:] - plain[block + 1:]).max() > 1e-3  # later blocks: adapted weights


def test_it_learns_a_repeat_beyond_the_window_and_leaves_the_model_alone():
    """A 32-base sequence read 30 times: a window of 8 does not copy it, adapted weights learn it (below the
    2 bits of a uniform guess; the untrained model is above them)."""
    torch.manual_seed(0)
    model, tok = load_model(preset="debug", variant="swa", tokenizer="nucleotide")
    rng = np.random.default_rng(1)
    unit = "".join(rng.choice(list("ACGT"), 32))
    tokens = np.asarray(tok.encode(unit * 30))
    ids, bases = candidate_ids(tok, tokens), _nucleotide_bases(tok, tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = stream_base_logprobs(model, tokens, ids, chunk_len=32, progress=False)
    dyn = dynamic_base_logprobs(model, tokens, ids, bases, lr=0.03, block=32, progress=False)
    last = np.arange(29 * 32, 30 * 32)
    nats = lambda logp: -logp[last, bases[last]].mean()  # noqa: E731
    assert nats(plain) > np.log(4) and nats(dyn) < 0.5 * np.log(4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_decay_one_keeps_the_model_s_weights():
    model, tok = load_model(preset="debug", variant="swa", tokenizer="nucleotide")
    tokens, ids, bases = _genome(tok, 70)
    plain = stream_base_logprobs(model, tokens, ids, chunk_len=8, progress=False)
    dyn = dynamic_base_logprobs(model, tokens, ids, bases, lr=0.1, block=8, decay=1.0, optimizer="sgd",
                                progress=False)
    np.testing.assert_allclose(dyn, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1e-3), "lr=-0.001 is invalid"),
    (dict(lr=float("nan")), "lr=nan is invalid"),
    (dict(lr=1e-3, block=1), "block=1 is invalid"),
    (dict(lr=1e-3, optimizer="lbfgs"), "optimizer='lbfgs' is invalid: expected one of adam, sgd"),
    (dict(lr=1e-3, decay=1.5), "decay=1.5 is invalid"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    model, tok = load_model(preset="debug", variant="swa", tokenizer="nucleotide")
    tokens, ids, bases = _genome(tok, 30)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        dynamic_base_logprobs(model, tokens, ids, bases, progress=False, **kwargs)


def test_bases_of_another_length_is_an_error():
    model, tok = load_model(preset="debug", variant="swa", tokenizer="nucleotide")
    tokens, ids, bases = _genome(tok, 30)
    with pytest.raises(ValueError, match=r"bases has shape \(29,\): expected \(30,\)"):
        dynamic_base_logprobs(model, tokens, ids, bases[1:], lr=1e-3, progress=False)


# ----------------------------------------------------------------------------- tables counted as the genome is read


@pytest.mark.parametrize("k", [1, 3, 5])
def test_online_table_counts_only_what_was_read_before(k):
    rng = np.random.default_rng(k)
    ids = rng.integers(0, 4, 300)
    ids[[50, 51, 200]] = 4  # N: no context through it, not counted
    logp, count = online_table_logprobs(ids, k, alpha=0.5)
    for t in range(len(ids)):
        context = ids[t - k:t] if t >= k else None
        if context is None or (context > 3).any():
            assert count[t] == -1 and np.allclose(logp[t], -np.log(4))
            continue
        n = np.zeros(4)
        for u in range(k, t):  # every earlier base with this context, itself A/C/G/T
            if ids[u] < 4 and (ids[u - k:u] == context).all():
                n[ids[u]] += 1
        assert count[t] == n.sum()
        np.testing.assert_allclose(logp[t], np.log((n + 0.5) / (n.sum() + 2)), rtol=1e-6)


def test_online_table_finds_a_repeat_and_is_causal():
    rng = np.random.default_rng(0)
    unit = rng.integers(0, 4, 200)
    ids = np.concatenate([unit, rng.integers(0, 4, 1000), unit])
    logp, _ = online_table_logprobs(ids, 16)
    second = np.arange(1200 + 16, 1400)
    once = np.log((1 + 1 / 16) / (1 + 4 / 16))  # every 16-base context of the copy seen once, alpha 1/16
    np.testing.assert_allclose(logp[second, ids[second]], once, rtol=1e-6)
    assert -logp[16:200, ids[16:200]].mean() > 1.3  # the first copy: nothing seen yet
    changed = ids.copy()
    changed[700:] = (changed[700:] + 1) % 4
    np.testing.assert_array_equal(online_table_logprobs(changed, 16)[0][:701], logp[:701])


@pytest.mark.parametrize("k", [0, 30, 2.0])
def test_online_table_order_out_of_range_is_an_error(k):
    with pytest.raises(ValueError, match=f"k={k!r} is invalid"):
        online_table_logprobs(np.zeros(10, dtype=np.int64), k)


# ----------------------------------------------------------------------------- the command lines


def test_genomics_command_rows_for_dynamic_evaluation_and_tables_read(tmp_path, capsys):
    rng = np.random.default_rng(4)
    train = "".join(rng.choice(list("ACGT"), 3000))
    unit = "".join(rng.choice(list("ACGT"), 150))
    (tmp_path / "train.fa").write_text(f">t\n{train}\n")
    (tmp_path / "test.fa").write_text(f">a\n{unit}{train[:600]}{unit}\n")
    model, tok = load_model(preset="debug", variant="swa", tokenizer="nucleotide")
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(tok.to_dict()))
    argv = ["--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "test.fa"), "--train",
            str(tmp_path / "train.fa"), "--kmax", "6", "--out", str(tmp_path / "out"), "--no-progress",
            "--online-orders", "8,12", "--dynamic-eval", "0.003", "--dynamic-block", "64",
            "--dynamic-cache", str(tmp_path / "dyn.npy"), "--poe-fit-bases", "1000"]
    assert genomics_main(argv) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    dyn = "network, dynamic evaluation (adam lr 0.003 per 64 bases)"
    read = "Markov 1-6 + this genome's orders 8, 12 counted as read"
    assert rows[dyn]["against"] == "network alone (ours)"
    assert rows[f"{read}, mixed online (no network)"]["against"] == "Markov orders 1-6 mixed online (no network)"
    assert f"| {dyn} + {read}, mixed online |" in (tmp_path / "out" / "results.md").read_text()
    poe = "network + Markov 1-6, 16, 20, 24: trained product of experts"
    assert rows["network + Markov 1-6, 16, 20, 24 + this genome's orders 8, 12 counted as read: trained product of "
                "experts"]["against"] == poe
    # the repeat's second copy: the tables of the genome read recall it, the fixed ones cannot
    assert rows[f"{read}, mixed online (no network)"]["bits"] < rows["Markov orders 1-6 mixed online (no network)"][
        "bits"]
    assert np.load(tmp_path / "dyn.npy").shape == (900, 4)
    assert (tmp_path / "out" / "bits.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert genomics_main(argv[:-4] + ["--max-tokens", "500", "--dynamic-cache", str(tmp_path / "dyn.npy")]) == 2
    assert "--dynamic-cache" in capsys.readouterr().err


def test_eval_genomics_dynamic_flag(tmp_path, capsys):
    (tmp_path / "g.fa").write_text(">a\n" + "ACGTTGCAAC" * 30 + "\n")
    out = tmp_path / "out"
    assert cli_main(["eval", "genomics", "--preset", "debug", "--variant", "swa", "--data", str(tmp_path / "g.fa"),
                     "--no-progress", "--out", str(out), "--dynamic-eval", "0.01", "--dynamic-block", "32"]) == 0
    saved = json.loads((out / "results.json").read_text())
    dynamic = saved.get("dynamic") or saved.get("result", {}).get("dynamic")
    assert dynamic == {"lr": 0.01, "block": 32, "optimizer": "adam", "decay": 0.0}
    capsys.readouterr()
    assert cli_main(["eval", "mqar", "--preset", "debug", "--dynamic-eval", "0.01"]) == 2
    assert "only genomics reads with dynamic evaluation, not mqar" in capsys.readouterr().err
