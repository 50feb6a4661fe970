"""Dynamic evaluation of a DNA model (Krause et al. 2018): each block scored before the step that learns from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from titans_lnn.evals.dynamic_eval import dynamic_base_logprobs
from titans_lnn.evals.genomics import _nucleotide_bases, candidate_ids, stream_base_logprobs
from titans_lnn.evals.runner import load_model


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
