"""Shared helpers of the benchmark suite: timing, memory readings, the scaling fit, formatting.

Imported by ``run.py`` (the runner), ``bench_jobs.py`` (the measuring worker) and the tests; it needs
only the standard library, NumPy and torch (psutil when installed).
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np

MIB = 2**20
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# timing


def median_time(fn: Callable[[], object], *, repeats: int = 3, budget_s: float = 20.0,
                sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times (s) of warm calls of ``fn``: ``repeats`` of them, or fewer once their sum passes
    ``budget_s`` (always at least one). The caller warms ``fn`` up first; take the median."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def predict_time(points: list[tuple[int, float]], T: int, min_exponent: float = 1.0) -> float:
    """Time a run at T is expected to take, from earlier (T, seconds) points: the last one, scaled by
    the slope of the last two on a log-log scale (at least ``min_exponent``); 0 without points."""
    if not points:
        return 0.0
    (T1, t1) = points[-1]
    p = min_exponent
    if len(points) >= 2:
        (T0, t0) = points[-2]
        if T1 > T0 and t0 > 0 and t1 > 0:
            p = max(p, math.log(t1 / t0) / math.log(T1 / T0))
    return t1 * (T / T1) ** p


# ---------------------------------------------------------------------------------------------------
# memory


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB) since it started.

    Linux's ``VmHWM`` (per address space, so it starts afresh at exec). Not ``ru_maxrss``: Linux carries
    ru_maxrss over fork + exec, so a child would report its parent's peak whenever that is larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MIB if os.uname().sysname == "Darwin" else r / 1024


def rss_bytes(pid: int | None = None) -> int:
    """Current resident set size of a process (this one by default), in bytes; 0 if it is gone."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process ended between two polls
        return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory_bytes() -> int | None:
    """Memory the system can still hand out (MemAvailable), or None when unknown."""
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------
# fits


def fit_exponent(Ts, times) -> tuple[float, float, float]:
    """Least-squares fit of ``t = c * T**p`` on a log-log scale. Returns (p, c, r2)."""
    x, y = np.log(np.asarray(Ts, dtype=float)), np.log(np.asarray(times, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"fit_exponent needs at least two distinct sizes, got {list(Ts)}")
    p, log_c = np.polyfit(x, y, 1)
    resid = y - (p * x + log_c)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return float(p), float(math.exp(log_c)), r2


def fit_linear(xs, ys) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; returns (a, b). One point: b = y / x (growth from zero)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(xs) == 1:
        return 0.0, float(ys[0] / xs[0])
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


# ---------------------------------------------------------------------------------------------------
# formatting


def k(T: int) -> str:
    """1024 -> '1K', 1048576 -> '1M', 1000 -> '1000'."""
    if T >= 2**20 and T % 2**20 == 0:
        return f"{T // 2**20}M"
    if T >= 1024 and T % 1024 == 0:
        return f"{T // 1024}K"
    return str(T)


def fmt_tokens(x: float) -> str:
    """An approximate token count: 151118511 -> '144M', 30912 -> '30K'."""
    if not math.isfinite(x):
        return "unbounded"
    if x >= 2**30:
        return f"{x / 2**30:.1f}G"
    if x >= 2**20:
        return f"{x / 2**20:.0f}M" if x >= 10 * 2**20 else f"{x / 2**20:.1f}M"
    if x >= 1024:
        return f"{x / 1024:.0f}K"
    return f"{x:.0f}"


def fmt_rate(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}K"
    if x >= 1e3:
        return f"{x / 1e3:.1f}K"
    return f"{x:.0f}"


def fmt_ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
