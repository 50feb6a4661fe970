"""Evaluation reports: every record as JSON, a Markdown accuracy table, and PNG figures.

- :func:`write_report`: ``results.json`` (``{"meta": ..., "records": [...]}``, one record per sample),
  ``results.md`` (mean score by length x depth, or by length x key-value pairs for MQAR) and, for the
  needle tasks and MQAR, ``heatmap.png``: the standard needle-in-a-haystack picture (Kamradt's
  layout: context length across, needle depth down from 0% at the top; green = 1, red = 0).
- :func:`write_bits_report`: the same for bits per token against the position read (perplexity,
  genomics): ``results.json``, ``results.md`` and ``bits.png``.

matplotlib is imported only when a figure is drawn (Agg backend, no display needed).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from titans_lnn.evals.scoring import accuracy_table

__all__ = ["format_length", "heatmap", "markdown_table", "write_bits_report", "write_json", "write_report"]

# Kamradt's needle-in-a-haystack colours: red (0) -> yellow -> green (1).
_NIAH_COLOURS = ("#F0496E", "#EBB839", "#0CD79F")


def format_length(n: int) -> str:
    """1024 -> "1K", 1048576 -> "1M", 1536 -> "1.5K", 1000 -> "1000" (K = 1024, M = 1024**2)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and (n * 10) % size == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def _column_key(records: Sequence[dict]) -> str:
    return "num_kv_pairs" if records and "num_kv_pairs" in records[0] else "depth"


def write_json(path: str | os.PathLike, records: Sequence[dict], meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta or {}, "records": list(records)}, indent=1, default=str) + "\n")
    return path


def markdown_table(records: Sequence[dict], title: str | None = None) -> str:
    """Mean score per (length, depth) as a Markdown table, with a mean per length and overall."""
    col = _column_key(records)
    table = accuracy_table((r["length"], r[col], r["score"]) for r in records)
    if col == "depth":
        heads = ["random depth" if d is None else f"{100 * d:g}%" for d in table.depths]
    else:
        heads = [f"{d:g} pairs" for d in table.depths]
    lines = [f"### {title}", ""] if title else []
    lines.append("| length | " + " | ".join(heads) + " | mean |")
    lines.append("|---:|" + "---:|" * (len(heads) + 1))
    for n, row, counts in zip(table.lengths, table.accuracy, table.counts):
        cells = ["" if math.isnan(a) else f"{a:.2f}" for a in row]
        total = sum(a * c for a, c in zip(row, counts) if c)
        lines.append(f"| {format_length(n)} | " + " | ".join(cells) + f" | {total / max(sum(counts), 1):.2f} |")
    n_samples = {c for row in table.counts for c in row if c}
    overall = sum(r["score"] for r in records) / max(len(records), 1)
    lines += ["", f"{len(records)} samples ({', '.join(map(str, sorted(n_samples)))} per cell), "
              f"mean score {overall:.3f}"]
    return "\n".join(lines) + "\n"


def _lay_out(fig, ax, title: str) -> None:
    """Title the axes and size the figure so that the title, ticks and labels all lie inside it."""
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    fig.tight_layout()
    # tight_layout moves the axes but never resizes the figure, and a small grid's figure (one depth,
    # two lengths) is narrower than a wrapped title: grow the figure by what sticks out, on both sides
    # because the title is centred over the axes, and lay it out again. A large figure is left as is.
    pad = 0.08  # inches kept clear at the edges, as tight_layout keeps for the labels
    for _ in range(4):
        fig.draw_without_rendering()  # places the title; get_tightbbox measures the drawn texts
        box, (w, h) = fig.get_tightbbox(), fig.get_size_inches()  # inches
        dx = max(0.0, pad - box.x0, box.x1 - (w - pad))
        dy = max(0.0, pad - box.y0, box.y1 - (h - pad))
        if dx < 0.01 and dy < 0.01:
            return
        fig.set_size_inches(w + 2 * dx, h + 2 * dy)
        fig.tight_layout()


def _save_figure(fig, ax, title: str, path: str | os.PathLike) -> Path:
    """Title and lay out the figure, write it as a PNG (making its folder) and close it."""
    import matplotlib.pyplot as plt

    _lay_out(fig, ax, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Depth (down) x length (across) mean scores as a PNG, annotated, red = 0 .. green = 1."""
    fig, ax = _heatmap_figure(records)
    return _save_figure(fig, ax, title, path)


def _heatmap_figure(records: Sequence[dict]):
    """The heatmap's (figure, axes), untitled and not yet laid out."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    col = _column_key(records)
    table = accuracy_table((r["length"], r[col], r["score"]) for r in records)
    grid = [[table.accuracy[i][j] for i in range(len(table.lengths))] for j in range(len(table.depths))]
    cmap = LinearSegmentedColormap.from_list("niah", _NIAH_COLOURS).with_extremes(bad="#DDDDDD")
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(table.lengths), 1.2 + 0.45 * len(table.depths)))
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(table.lengths)), [format_length(n) for n in table.lengths])
    if col == "depth":
        ax.set_yticks(range(len(table.depths)), ["random" if d is None else f"{100 * d:g}%" for d in table.depths])
        ax.set_ylabel("needle depth")
    else:
        ax.set_yticks(range(len(table.depths)), [f"{d:g}" for d in table.depths])
        ax.set_ylabel("key-value pairs")
    ax.set_xlabel("context length (tokens)")
    if len(table.lengths) * len(table.depths) <= 200:
        for j, row in enumerate(grid):
            for i, a in enumerate(row):
                if not math.isnan(a):
                    ax.text(i, j, f"{a:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="score")
    return fig, ax


def write_report(records: Sequence[dict], out: str | os.PathLike, *, title: str, meta: dict | None = None,
                 figure: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (``figure``) ``heatmap.png`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "results.json", records, meta)}
    (out / "results.md").write_text(markdown_table(records, title))
    paths["markdown"] = out / "results.md"
    if figure:
        paths["heatmap"] = heatmap(records, out / "heatmap.png", title)
    return paths


# ----------------------------------------------------------------------------- bits vs position


def bits_markdown(result: dict, unit: str, title: str | None = None) -> str:
    """The bins of a :func:`~titans_lnn.evals.perplexity.bits_by_position` result as a Markdown table."""
    lines = [f"### {title}", ""] if title else []
    lines += [f"| position (tokens read) | tokens | {unit} |", "|---|---:|---:|"]
    for b in result["bins"]:
        bits = "" if b["bits"] is None else f"{b['bits']:.4f}"
        lines.append(f"| {format_length(b['start'])} - {format_length(b['end'])} | {b['tokens']} | {bits} |")
    lines += ["", f"overall: {result['bits']:.4f} {unit} over {result['tokens']} tokens"]
    return "\n".join(lines) + "\n"


def bits_curve(result: dict, path: str | os.PathLike, unit: str, title: str = "") -> Path:
    """Bits per token of each position bin against the bin's position (log x axis), as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    bins = [b for b in result["bins"] if b["bits"] is not None]
    xs = [math.sqrt(max(b["start"], 1) * b["end"]) for b in bins]  # geometric middle of the bin
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [b["bits"] for b in bins], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("context read (tokens)")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    return _save_figure(fig, ax, title, path)


def write_bits_report(result: dict, out: str | os.PathLike, *, unit: str, title: str, meta: dict | None = None,
                      figure: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (``figure``) ``bits.png`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps({"meta": meta or {}, **result}, indent=1, default=str) + "\n")
    paths = {"json": path, "markdown": out / "results.md"}
    paths["markdown"].write_text(bits_markdown(result, unit, title))
    if figure:
        paths["curve"] = bits_curve(result, out / "bits.png", unit, title)
    return paths
