"""The network against order-k Markov tables on the same bases of a genome (``python -m titans_lnn.evals.genomics``).

Rows: the tables k = 1..kmax fitted on the training genome (:mod:`~titans_lnn.evals.markov`), the network, their
online mixtures (as DNA compressors mix), optionally a trained product of experts (fitted on the training genome,
fixed), and predictors that learn while reading the scored genome: the network under dynamic evaluation
(:mod:`~titans_lnn.evals.dynamic_eval`) and tables of the scored genome counted as it is read. Each row by position
(context read), by how often its context occurs in the training genome, and on within-genome repeats; a table and a
plot.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from titans_lnn.evals.genomics import GenomeReading, scored_bits, summarise
from titans_lnn.evals.perplexity import position_edges

__all__ = ["markov_comparison", "comparison_markdown", "comparison_plot", "repeat_distance", "repeat_group",
           "REPEAT_K", "REPEAT_GROUPS", "SEEN_GROUPS"]


# ----------------------------------------------------------------------------- against Markov models


def markov_comparison(reading: GenomeReading, train: Sequence[np.ndarray], *, kmax: int = 12, lr: float = 0.002,
                      edges: Sequence[int] | None = None, progress: bool = True,
                      poe_fold: GenomeReading | None = None, dynamic: tuple[str, np.ndarray] | None = None,
                      online_orders: Sequence[int] = ()) -> dict:
    """Order-k Markov models k = 1..kmax fitted on ``train`` (nucleotide ids, one array per record), the network
    of ``reading``, and their online mixtures (module docstring), all scored on the same bases of the genome.

    With ``poe_fold`` (the network's reading of the first bases of ``train``'s first record), two more rows: a
    trained product of experts (:func:`~titans_lnn.evals.markov.fit_poe`) of the orders 1..kmax and
    :data:`~titans_lnn.evals.markov.POE_LONG`, without and with the network, its weights fitted on the fold's
    bases with tables counted on the rest of ``train`` (cross-fitted), then fixed; scored with tables counted on
    all of ``train``. Nothing is learnt while reading the scored genome.

    Test-time learning, each as more rows: ``dynamic`` ``(name, logp (N, 4))``, the network's readings under
    dynamic evaluation (:mod:`~titans_lnn.evals.dynamic_eval`), alone and mixed online with the tables;
    ``online_orders`` (e.g. 12, 16, 20, 24): tables of the scored genome counted as it is read
    (:func:`~titans_lnn.evals.markov.online_table_logprobs`), mixed online with the orders 1..kmax, without and
    with the network (and with the dynamic network when given).

    Returns ``{"rows", "tokens", "edges", "best_markov", "kmax", "lr", "seen"}``: ``rows`` one dict per predictor
    (``name``, ``bits``, ``bins`` by position, ``seen``: bits per :data:`SEEN_GROUPS` group), ``seen`` the share of
    the scored bases in each group (how often their kmax-base context occurs in ``train``)."""
    from titans_lnn.evals.markov import MarkovModel, kmer_codes, mix_bits

    if not isinstance(kmax, int) or not 1 <= kmax <= 15:
        raise ValueError(f"kmax={kmax!r} is invalid: expected an order in [1, 15]")
    bases = reading.bases
    n = len(bases)
    edges = list(edges) if edges is not None else position_edges(n)
    _, ok = kmer_codes(bases, kmax + 1)  # windows of kmax context bases and the predicted base, all A/C/G/T
    common = np.zeros(n, dtype=bool)
    common[kmax:] = ok
    models = [MarkovModel(k).fit(train) for k in range(1, kmax + 1)]
    logps = {}
    logps[kmax], count = models[-1].logprobs(bases)
    seen = np.searchsorted(np.asarray(SEEN_EDGES), count, side="right") - 1  # (N,) SEEN_GROUPS index (-1: none)
    repeat = repeat_group(repeat_distance(bases, REPEAT_K))  # (N,) REPEAT_GROUPS index

    def means(bits: np.ndarray, group: np.ndarray, n_groups: int) -> list[float | None]:
        return [float(np.nanmean(bits[group == i])) if (common & (group == i)).any() else None
                for i in range(n_groups)]

    def row(name: str, bits: np.ndarray, **extra) -> dict:
        bits = np.where(common, bits, np.nan)
        out = {"name": name, **extra, **_summary(bits, edges), "seen": means(bits, seen, len(SEEN_GROUPS)),
               "repeat": means(bits, repeat, len(REPEAT_GROUPS))}
        if progress:
            print(f"  {name}: {out['bits']:.4f} bits/base ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return out

    rows = []
    for m in models:
        t0 = time.perf_counter()
        logp = logps.pop(m.k) if m.k in logps else m.logprobs(bases)[0]
        rows.append(row(f"Markov k = {m.k}", scored_bits(reading, logp), k=m.k))
    best = min(rows, key=lambda r: r["bits"])
    t0 = time.perf_counter()
    rows.append(row("network alone (ours)", scored_bits(reading)))
    for name, extra in ((f"Markov orders 1-{kmax} mixed online (no network)", None),
                        (f"network + Markov 1-{kmax}, mixed online", reading.logp[:, None])):
        t0 = time.perf_counter()
        rows.append(row(name, mix_bits(models, bases, extra, lr=lr)))
    if dynamic is not None:
        t0 = time.perf_counter()
        rows.append(row(dynamic[0], scored_bits(reading, dynamic[1]), against="network alone (ours)"))
    if online_orders:
        t0 = time.perf_counter()
        for name, bits, against in _online_rows(reading, models, online_orders, lr, dynamic):
            rows.append(row(name, bits, against=against))
            t0 = time.perf_counter()
    if poe_fold is not None:
        t0 = time.perf_counter()
        for name, bits, against in _poe_rows(reading, train, models, poe_fold, kmax, online_orders):
            rows.append(row(name, bits, **({"against": against} if against else {})))
            t0 = time.perf_counter()
    total = max(int(common.sum()), 1)
    shares = [float((common & (seen == i)).sum() / total) for i in range(len(SEEN_GROUPS))]
    repeats = [float((common & (repeat == i)).sum() / total) for i in range(len(REPEAT_GROUPS))]
    return {"rows": rows, "tokens": int(common.sum()), "edges": edges, "best_markov": best["name"], "kmax": kmax,
            "lr": lr, "seen": [{"group": g, "share": sh} for g, sh in zip(SEEN_GROUPS, shares)],
            "repeat_k": REPEAT_K, "repeat": [{"group": g, "share": sh} for g, sh in zip(REPEAT_GROUPS, repeats)],
            "poe_fit_bases": None if poe_fold is None else len(poe_fold.bases), "online_orders": list(online_orders)}


def _online_rows(reading: GenomeReading, models: list, orders: Sequence[int], lr: float,
                 dynamic: tuple[str, np.ndarray] | None) -> list[tuple[str, np.ndarray, str]]:
    """The rows of :func:`markov_comparison` with tables of the scored genome counted as it is read:
    ``[(name, bits (N,), against), ...]``, mixed online with the fixed tables ``models``; without and with the
    network (and with ``dynamic``'s network when given); ``against`` names the same row without them."""
    from titans_lnn.evals.markov import mix_bits, online_table_logprobs

    bad = [k for k in orders if not isinstance(k, int) or not 1 <= k <= 29]
    if bad:
        raise ValueError(f"online_orders={list(orders)}: {bad} invalid: expected orders in [1, 29]")
    kmax = models[-1].k
    online = np.stack([online_table_logprobs(reading.bases, k)[0] for k in orders], axis=1)  # (N, O, 4)
    tables = f"Markov 1-{kmax} + this genome's orders {', '.join(map(str, orders))} counted as read"
    fixed, with_net = f"Markov orders 1-{kmax} mixed online (no network)", f"network + Markov 1-{kmax}, mixed online"
    out = [(f"{tables}, mixed online (no network)", mix_bits(models, reading.bases, online, lr=lr), fixed),
           (f"network + {tables}, mixed online",
            mix_bits(models, reading.bases, np.concatenate([reading.logp[:, None], online], axis=1), lr=lr),
            with_net)]
    if dynamic is not None:
        extra = np.concatenate([dynamic[1][:, None], online], axis=1)
        out.append((f"{dynamic[0]} + {tables}, mixed online", mix_bits(models, reading.bases, extra, lr=lr),
                    with_net))
    return out


# Within-genome repeats (rRNA operons, IS elements, REP sequences): a base whose REPEAT_K bases before it occurred
# earlier in the genome being read can be recalled from the context, by a model that holds it. Grouped by how far
# back the latest earlier occurrence is: within a sliding window's reach, or only a long-term memory's.
REPEAT_K = 20
REPEAT_EDGES = (0, 1024)
REPEAT_GROUPS = ("not earlier in this genome", "earlier, <= 1K bases back", "earlier, > 1K bases back")


def repeat_distance(bases: np.ndarray, k: int = REPEAT_K) -> np.ndarray:
    """(N,) int64: for each position t of ``bases`` (N,) (0..3 A/C/G/T, others not), how many bases back the
    latest earlier position t' < t whose k bases before it equal the k bases before t is (t - t'); -1 where
    there is none or t has no k A/C/G/T bases before it."""
    from titans_lnn.evals.markov import kmer_codes

    n = len(bases)
    out = np.full(n, -1, dtype=np.int64)
    code, ok = kmer_codes(bases, k)  # window j = the context of position j + k
    code, ok = code[:max(n - k, 0)], ok[:max(n - k, 0)]
    where = np.flatnonzero(ok)  # (M,) windows with a full context, in position order
    order = np.argsort(code[where], kind="stable")  # equal codes stay in position order
    c, w = code[where][order], where[order]
    same = np.zeros(len(c), dtype=bool)
    same[1:] = c[1:] == c[:-1]
    dist = np.full(len(c), -1, dtype=np.int64)
    dist[1:] = np.where(same[1:], w[1:] - w[:-1], -1)
    out[w + k] = dist
    return out


def repeat_group(distance: np.ndarray) -> np.ndarray:
    """(N,) :func:`repeat_distance` -> (N,) index into :data:`REPEAT_GROUPS`."""
    return np.where(distance < 0, 0, np.searchsorted(np.asarray(REPEAT_EDGES), distance, side="left"))


def _poe_rows(reading: GenomeReading, train: Sequence[np.ndarray], models: list, fold: GenomeReading,
              kmax: int, online_orders: Sequence[int] = ()) -> list[tuple[str, np.ndarray, str | None]]:
    """The trained product-of-experts rows of :func:`markov_comparison`: ``[(name, bits (N,), against), ...]``,
    without and with the network; with ``online_orders`` a third: the network and tables of the genome being read
    counted as it is read (on the fold: the fold's bases counted as read, the same procedure), ``against`` the
    second."""
    from titans_lnn.evals.markov import POE_KREF, POE_LONG, MarkovModel, fit_poe, online_table_logprobs, poe_bits

    n = len(fold.bases)
    if not train or n >= len(train[0]):
        raise ValueError(f"the product of experts' fold has {n} bases: expected fewer than the training genome's "
                         f"first record ({len(train[0]) if train else 0} bases), so that tables can be counted on "
                         f"the rest")
    kref = min(POE_KREF, kmax)
    orders = [*range(1, kmax + 1), *(k for k in POE_LONG if k > kmax)]
    apart = [np.asarray(train[0])[n:], *train[1:]]  # every base but the fold's: the tables that predict the fold
    models_apart = [MarkovModel(k).fit(apart) for k in orders]
    full = list(models) + [MarkovModel(k).fit(train) for k in orders if k > kmax]
    tables = f"Markov 1-{kmax}" + "".join(f", {k}" for k in orders[kmax:])
    runs = [(f"{tables}: trained product of experts (no network)", None, None, None),
            (f"network + {tables}: trained product of experts", fold.logp[:, None], reading.logp[:, None], None)]
    if online_orders:
        def read(r: GenomeReading) -> np.ndarray:  # (N, 1 + O, 4) the network, then the tables counted as read
            return np.stack([r.logp, *(online_table_logprobs(r.bases, k)[0] for k in online_orders)], axis=1)

        runs.append((f"network + {tables} + this genome's orders {', '.join(map(str, online_orders))} counted as "
                     f"read: trained product of experts", read(fold), read(reading), runs[1][0]))
    out = []
    for name, fold_extra, extra, against in runs:
        mixer = fit_poe(models_apart, fold.bases, fold_extra, kref=kref)
        out.append((name, poe_bits(mixer, full, reading.bases, extra, kref=kref), against))
    return out


# How often a scored base's kmax-base context occurs in the training genome (never, once, 2-9, 10+ times):
# where two strains share long stretches, a kmax table fitted on one is a lookup of the other.
SEEN_EDGES = (0, 1, 2, 10)
SEEN_GROUPS = ("never", "once", "2-9 times", "10+ times")


def _summary(bits: np.ndarray, edges: Sequence[int]) -> dict:
    out = summarise(bits, edges)
    return {"bits": out["bits"], "bins": out["bins"]}


def comparison_markdown(comparison: dict, title: str) -> str:
    """The table of :func:`markov_comparison`: overall bits per base, then by position for the main rows."""
    from titans_lnn.evals.report import format_length

    rows = comparison["rows"]
    lines = [f"### {' '.join(title.split())}", "",
             f"{comparison['tokens']:,} bases scored (each row on the same ones).", "",
             "| predictor | bits per base |", "|---|---:|"]
    lines += [f"| {r['name']} | {r['bits']:.4f} |" for r in rows]
    if comparison.get("poe_fit_bases"):
        lines += ["", f"Trained product of experts: one weight per table (and the network) for each bucket of the "
                      f"order-{min(12, comparison['kmax'])} context's count and the longest longer order that has "
                      f"seen its context, fitted on the training genome's first {comparison['poe_fit_bases']:,} "
                      f"bases with the tables counted on the rest of it (cross-fitted), then fixed; scored with the "
                      f"tables counted on all of it. Nothing is learnt on the scored genome (the online mixtures "
                      f"above learn while reading it)."]
    main_rows = [r for r in rows if "k" not in r or r["name"] == comparison["best_markov"]]
    lines += ["", "By position (bases read before the predicted one):", "",
              "| position | bases | " + " | ".join(r["name"] for r in main_rows) + " |",
              "|---|---:|" + "---:|" * len(main_rows)]
    for i, b in enumerate(main_rows[0]["bins"]):
        cells = ["" if r["bins"][i]["bits"] is None else f"{r['bins'][i]['bits']:.4f}" for r in main_rows]
        lines.append(f"| {format_length(b['start'])} - {format_length(b['end'])} | {b['tokens']:,} | "
                     + " | ".join(cells) + " |")
    kmax = comparison["kmax"]
    lines += ["", f"By how often the {kmax} bases before the predicted one occur in the training genome:", "",
              "| context seen in training | share of bases | " + " | ".join(r["name"] for r in main_rows) + " |",
              "|---|---:|" + "---:|" * len(main_rows)]
    for i, g in enumerate(comparison["seen"]):
        cells = ["" if r["seen"][i] is None else f"{r['seen'][i]:.4f}" for r in main_rows]
        lines.append(f"| {g['group']} | {g['share']:.3f} | " + " | ".join(cells) + " |")
    if "repeat" in comparison:
        lines += ["", f"By whether the {comparison['repeat_k']} bases before the predicted one occurred earlier in "
                      f"the genome being read (a within-genome repeat: recallable from the context):", "",
                  "| context earlier in this genome | share of bases | " + " | ".join(r["name"] for r in main_rows)
                  + " |", "|---|---:|" + "---:|" * len(main_rows)]
        for i, g in enumerate(comparison["repeat"]):
            cells = ["" if r["repeat"][i] is None else f"{r['repeat'][i]:.4f}" for r in main_rows]
            lines.append(f"| {g['group']} | {g['share']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_plot(comparison: dict, path: str | os.PathLike, title: str) -> Path:
    """Bits per base against the context read (log x), one line per main row of :func:`markov_comparison`:
    the network, the best Markov order (the baseline) and the mixtures; a dotted line at 2 bits. With rows
    that learn while reading (dynamic evaluation, tables counted as read), a second panel: each one's bits
    below the same predictor without that learning, on the same bases, by context read (regions of the genome
    cancel out: what is left is what reading the genome so far bought)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    main_rows = [r for r in comparison["rows"] if "k" not in r or r["name"] == comparison["best_markov"]]
    styles = [dict(color="C3", marker="s", linestyle="--"), dict(color="C0", marker="o", linewidth=2),
              dict(color="C2", marker="^", linestyle="-."), dict(color="C1", marker="."),
              dict(color="C4", marker="v", linestyle=":"), dict(color="C5", marker="x"),
              dict(color="C6", marker="D"), dict(color="C7", marker="P"), dict(color="C8", marker="*"),
              dict(color="C9", marker="h"), dict(color="k", marker="o", linestyle="--"),
              dict(color="C0", marker="s", linestyle=":"), dict(color="C3", marker="^", linestyle=":"),
              dict(color="C2", marker="v", linestyle="--")]  # in main_rows' order
    learners = [r for r in main_rows if r.get("against")]
    fig, axes = plt.subplots(1, 2 if learners else 1, figsize=(15 if learners else 7.5, 8.5), squeeze=False)
    ax = axes[0, 0]
    for r, style in zip(main_rows, styles):
        bins = [b for b in r["bins"] if b["bits"] is not None]
        xs = [math.sqrt(max(b["start"], 1) * b["end"]) for b in bins]  # geometric middle of the bin
        label = r["name"] + (" (the best Markov row, fitted on the training genome)" if "k" in r else "")
        ax.plot(xs, [b["bits"] for b in bins], label=textwrap.fill(label, 90), **style)
    ax.text(0.01, 0.01, f"Markov rows read only the last {comparison['kmax']} bases: their changes from bin to bin "
            "are regions of the genome\n(e.g. stretches shared with the training strain), not context; "
            "only the network reads all that comes before.", transform=ax.transAxes, fontsize=6.5, va="bottom")
    ax.axhline(2.0, color="grey", linestyle=":", linewidth=1, label="uniform (2 bits)")
    ax.set_xscale("log")
    ax.set_xlabel("context read (bases)")
    ax.set_ylabel("bits per base")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: the lines stay visible
    if learners:
        _gain_panel(axes[0, 1], learners, {r["name"]: r for r in main_rows},
                    {r["name"]: st for r, st in zip(main_rows, styles)})
    fig.subplots_adjust(left=0.06 if learners else 0.1, right=0.98, top=0.93, bottom=0.42, wspace=0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _gain_panel(ax, learners: list[dict], by_name: dict, styles: dict) -> None:
    """Bits per base saved by learning while reading: each learner's row against its ``against`` row, by bin."""
    for r in learners:
        base = by_name[r["against"]]
        pairs = [(b, a) for b, a in zip(r["bins"], base["bins"]) if b["bits"] is not None and a["bits"] is not None]
        xs = [math.sqrt(max(b["start"], 1) * b["end"]) for b, _ in pairs]
        label = textwrap.fill(f"{r['name']}, against {r['against']}", 90)
        ax.plot(xs, [a["bits"] - b["bits"] for b, a in pairs], label=label, **styles[r["name"]])
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("context read (bases)")
    ax.set_ylabel("bits per base saved (same bases)")
    ax.set_title("what learning while reading buys, by context read", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.12))
