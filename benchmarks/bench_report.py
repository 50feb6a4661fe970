"""Writes what the sections measured: ``RESULTS.md`` (generated in full), ``results.json`` and the PNG
plots under ``plots/`` (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench_common import markdown_table

STATUS_MARK = {"MET": "**MET**", "NOT MET": "**NOT MET**", "PARTLY MET": "**PARTLY MET**", "INFO": "info",
               "SKIPPED": "skipped", "INCOMPLETE": "incomplete"}


def plot(spec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = spec["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for s in panel["series"]:
            ax.plot(s["x"], s["y"], marker="o" if len(s["x"]) < 40 else None, ms=4, label=s["label"])
        for label, f in (panel.get("fits") or {}).items():
            if f:
                xs = [min(f["Ts"]), max(f["Ts"])]
                ax.plot(xs, [f["coefficient"] * x ** f["exponent"] for x in xs], "--", lw=1,
                        label=f"fit: {label} ~ T^{f['exponent']:.2f}")
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("ymin") is not None:
            ax.set_ylim(bottom=panel["ymin"])
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(True, which="both", alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clean(x):
    """JSON-safe: inf/nan become None, tuples lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def markdown(meta: dict, sections: list[dict]) -> str:
    lines = ["# Benchmark results", "",
             "Generated in full by `benchmarks/run.py`; do not edit by hand (rerun the command below).", "",
             f"`{meta['command']}`", ""]
    lines += [f"- {key}: {value}" for key, value in meta["header"].items()]
    lines += ["", "How: every measurement is warm (a warm-up call first) and the median of up to "
              f"{meta['repeats']} timed calls (fewer when one call is long: the `runs` column); each model runs in "
              "a fresh process, so its peak RSS (Linux `VmHWM`) is its own, and a runner stops any process whose RSS "
              f"passes {meta['mem_budget_gib']:.1f} GiB. Ratios compare runs of the same command, side by side.", ""]
    if meta.get("quick"):
        lines += ["**Quick run**: the smallest sizes only, a smoke test; its verdicts say nothing about the targets.",
                  ""]
    lines += ["## Summary", ""]
    rows = [[f"{s['id']}. {s['title']}", s["target"] or "-", STATUS_MARK[s["status"]], s["measured"],
             f"{s['wall_s']:.0f}"] for s in sections]
    lines += [markdown_table(["section", "target", "status", "measured", "wall (s)"], rows), ""]
    lines += [f"Suite wall time: {meta['wall_s'] / 60:.1f} min.", ""]
    for s in sections:
        lines += [f"## {s['id']}. {s['title']}", ""]
        if s["target"]:
            lines += [f"Target: {s['target']}. Status: {STATUS_MARK[s['status']]}"
                      + (f" ({s['measured']})." if s["measured"] else "."), ""]
        elif s["status"] == "SKIPPED":
            lines += [f"Skipped: {s['measured']}.", ""]
        for t in s["tables"]:
            if t.get("caption"):
                lines += [t["caption"], ""]
            lines += [markdown_table(t["header"], t["rows"]), ""]
        for p in s["plots"]:
            lines += [f"![{s['key']}](plots/{p['file']})", ""]
        for n in s["notes"]:
            lines += [f"- {n}"]
        if s["notes"]:
            lines += [""]
        if s.get("profile"):
            lines += ["Where our time goes (torch.profiler, one call, top ops by self time; share of the time "
                      "inside top-level ops):", "", "```",
                      s["profile"].rstrip(), "```", ""]
    return "\n".join(lines)


def write(out: Path, meta: dict, sections: list[dict]) -> list[Path]:
    """RESULTS.md, results.json and the plots, under ``out``. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s in sections:
        for p in s["plots"]:
            if any(panel["series"] for panel in p["panels"]):
                plot(p, out / "plots" / p["file"])
                written.append(out / "plots" / p["file"])
        s["plots"] = [p for p in s["plots"] if (out / "plots" / p["file"]) in written]
    (out / "RESULTS.md").write_text(markdown(meta, sections))
    payload = {"meta": meta, "sections": {f"{s['id']}-{s['key']}": s for s in sections}}
    (out / "results.json").write_text(json.dumps(_clean(payload), indent=1))
    return [out / "RESULTS.md", out / "results.json", *written]
