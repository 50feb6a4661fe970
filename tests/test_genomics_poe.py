"""The trained product of experts (Markov tables and the network, weights fitted once on the training genome,
cross-fitted, then fixed) and its rows in the network-vs-Markov comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from titans_lnn.evals.genomics import GenomeReading
from titans_lnn.evals.genomics_markov import comparison_markdown, markov_comparison, repeat_distance, repeat_group
from titans_lnn.evals.markov import MarkovModel, TrainedMixer, fit_poe, n_poe_selectors, poe_bits, poe_experts

pytestmark = pytest.mark.filterwarnings("ignore:.*bases scored:UserWarning")


def _oracle_and_noise(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An expert that is right 90% of the time and says so (calibrated), and a confident, useless one."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 4, n)
    guess = np.where(rng.random(n) < 0.9, target, (target + rng.integers(1, 4, n)) % 4)
    oracle = np.full((n, 4), math.log(0.1 / 3), dtype=np.float32)
    oracle[np.arange(n), guess] = math.log(0.9)
    noise = np.log(rng.dirichlet(np.ones(4), size=n)).astype(np.float32)
    return np.stack([noise, oracle], axis=1), target  # (N, 2, 4), (N,)


def test_trained_mixer_learns_which_expert_to_trust_per_selector():
    logp, target = _oracle_and_noise(3000, 0)
    selector = np.arange(3000) % 2
    logp[selector == 1] = logp[selector == 1][:, ::-1]  # selector 1: the oracle is the first expert
    mixer = TrainedMixer(2, 2).fit(logp, target, selector)
    assert abs(mixer.weights[0, 1] - 1) < 0.15 and abs(mixer.weights[0, 0]) < 0.1  # calibrated: weight ~1
    assert abs(mixer.weights[1, 0] - 1) < 0.15 and abs(mixer.weights[1, 1]) < 0.1
    nll = mixer(logp, target, selector)
    oracle_alone = -np.where(selector[:, None] == 1, logp[:, 0], logp[:, 1])[np.arange(3000), target]
    assert nll.mean() < oracle_alone.mean() + 0.01 < TrainedMixer(2, 2)(logp, target, selector).mean()
    assert np.isnan(mixer(logp[:2], np.array([4, 0]), selector[:2])[0])


def test_trained_mixer_before_fitting_is_the_geometric_mean_and_rejects_bad_shapes():
    logp, target = _oracle_and_noise(50, 1)
    mean = logp.astype(np.float64).mean(axis=1)
    want = -(mean[np.arange(50), target] - np.log(np.exp(mean).sum(1)))
    np.testing.assert_allclose(TrainedMixer(2)(logp, target, np.zeros(50, dtype=np.int64)), want, rtol=1e-9)
    with pytest.raises(ValueError, match=r"logp has shape \(50, 2, 4\): expected \(N, E, 4\) = \(50, 3, 4\)"):
        TrainedMixer(3)(logp, target, np.zeros(50, dtype=np.int64))
    with pytest.raises(ValueError, match=r"selector must be \(N,\) = \(50,\) ids in \[0, 1\)"):
        TrainedMixer(2).fit(logp, target, np.ones(50, dtype=np.int64))
    with pytest.raises(ValueError, match="n_selectors=0 is invalid"):
        TrainedMixer(2, 0)


def test_poe_selector_counts_the_long_orders_that_have_seen_the_context():
    rng = np.random.default_rng(2)
    genome = rng.integers(0, 4, 4000).astype(np.uint8)
    models = [MarkovModel(k).fit([genome[:3000]]) for k in (1, 3, 8)]
    test = np.concatenate([genome[1000:1200], rng.integers(0, 4, 200).astype(np.uint8)])  # a copy, then new bases
    logp, selector = poe_experts(models, test, 0, len(test), kref=3)
    assert logp.shape == (400, 3, 4) and n_poe_selectors(models, kref=3) == 7 * 2
    seen8 = selector % 2  # the one longer order (8) has seen the context
    assert seen8[8:200].all() and seen8[220:].mean() < 0.15  # random 8-mers in 3,000 bases: rarely seen
    with pytest.raises(ValueError, match=r"kref=5 is not among the models' orders \[1, 3, 8\]"):
        poe_experts(models, test, 0, 10, kref=5)


def test_cross_fitted_poe_trusts_long_matches_and_any_slab_gives_the_same_bits():
    """A genome with a repeated element: the long order, counted apart from the fold, predicts the fold's copy
    and the mixer learns to trust it where its context was seen; scoring is slab-independent."""
    rng = np.random.default_rng(3)
    element = rng.integers(0, 4, 300)
    parts = [rng.integers(0, 4, 700), element, rng.integers(0, 4, 1500), element, rng.integers(0, 4, 1500)]
    genome = np.concatenate(parts).astype(np.uint8)
    fold, apart = genome[:2000], genome[2000:]  # the fold's copy of the element is counted only in its twin
    orders = (1, 2, 4, 12)
    mixer = fit_poe([MarkovModel(k).fit([apart]) for k in orders], fold, kref=4)
    assert mixer.weights.shape == (n_poe_selectors([MarkovModel(k) for k in orders], kref=4), 4)
    full = [MarkovModel(k).fit([genome]) for k in orders]
    other = np.concatenate([rng.integers(0, 4, 500), element, rng.integers(0, 4, 500)]).astype(np.uint8)
    bits = poe_bits(mixer, full, other, kref=4, slab=1 << 12)
    assert np.nanmean(bits[520:800]) < 0.5 < 1.5 < np.nanmean(bits[:500])  # the copy is recalled
    np.testing.assert_allclose(poe_bits(mixer, full, other, kref=4, slab=77), bits, rtol=1e-12)


def test_markov_comparison_adds_the_two_poe_rows_on_the_same_bases():
    rng = np.random.default_rng(4)
    genome = rng.integers(0, 4, 3000).astype(np.uint8)
    test = genome[500:1500].copy()
    uniform = np.full((len(test), 4), -math.log(4), dtype=np.float32)
    reading = GenomeReading("test", ["r"], np.array([0]), np.array([len(test)]), test, uniform)
    fold = GenomeReading("train", ["t"], np.array([0]), np.array([800]), genome[:800],
                         np.full((800, 4), -math.log(4), dtype=np.float32))
    cmp = markov_comparison(reading, [genome], kmax=4, progress=False, poe_fold=fold)
    names = [r["name"] for r in cmp["rows"]]
    assert names[-2:] == ["Markov 1-4, 16, 20, 24: trained product of experts (no network)",
                          "network + Markov 1-4, 16, 20, 24: trained product of experts"]
    assert cmp["poe_fit_bases"] == 800 and "training genome's first 800 bases" in comparison_markdown(cmp, "t")
    assert all(sum(b["tokens"] for b in r["bins"]) == cmp["tokens"] for r in cmp["rows"])
    poe = cmp["rows"][-2]["bits"]
    assert poe < cmp["rows"][0]["bits"] - 0.5  # the test genome is a copy of training bases: the long orders see it
    with pytest.raises(ValueError, match="fold has 3000 bases: expected fewer than"):
        markov_comparison(reading, [genome], kmax=4, progress=False, poe_fold=fold._replace(
            bases=genome, logp=np.zeros((3000, 4), dtype=np.float32)))


def test_repeat_distance_finds_the_latest_earlier_context_and_skips_n():
    b = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 3, 3, 0, 1, 2], dtype=np.uint8)  # ACGT ACGT ACGT TT ACG
    d = repeat_distance(b, 3)
    assert d.tolist() == [-1] * 7 + [4] * 6 + [-1] * 3 + [6]
    assert repeat_group(np.array([-1, 1, 1024, 1025])).tolist() == [0, 1, 1, 2]
    b[5] = 4  # an N: no context holds it, and an earlier context must be whole
    assert repeat_distance(b, 3).tolist() == [-1] * 9 + [4, -1, 8, 8, -1, -1, -1, 6]


def test_comparison_reports_bits_on_within_genome_repeats():
    rng = np.random.default_rng(5)
    element = rng.integers(0, 4, 200)
    genome = np.concatenate([rng.integers(0, 4, 300), element, rng.integers(0, 4, 1500), element]).astype(np.uint8)
    uniform = np.full((len(genome), 4), -math.log(4), dtype=np.float32)
    reading = GenomeReading("test", ["r"], np.array([0]), np.array([len(genome)]), genome, uniform)
    cmp = markov_comparison(reading, [rng.integers(0, 4, 2000).astype(np.uint8)], kmax=4, progress=False)
    shares = [g["share"] for g in cmp["repeat"]]
    assert cmp["repeat_k"] == 20 and shares[1] == 0 and shares[2] == pytest.approx(180 / cmp["tokens"])
    assert cmp["rows"][4]["repeat"][0] == pytest.approx(2.0) and cmp["rows"][4]["repeat"][1] is None
    assert "| earlier, > 1K bases back | 0.0" in comparison_markdown(cmp, "t")
