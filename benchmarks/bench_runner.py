"""The runner's side of a job: start ``bench_jobs.py`` in a fresh process, watch its memory and time,
collect its results. Plus the sizes of each suite and the context every section receives.

A job is stopped (and its unfinished sizes recorded as such) when its resident memory passes the
budget or when it runs past its time limit, so that no size can push the machine into the OOM killer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_common import GIB, MIB, rss_bytes

HERE = Path(__file__).resolve().parent
JOBS_PY = HERE / "bench_jobs.py"

K, M = 1024, 1024 * 1024
# Sizes per suite. liquid/memory/model/full: sequence lengths T; fit_min: the smallest T of the scaling fits.
SIZES = {
    ("cpu", False): dict(liquid=[1 * K, 4 * K, 16 * K, 64 * K], memory=[4 * K, 16 * K, 64 * K],
                         model=[1 * K, 4 * K, 16 * K, 64 * K, 256 * K, 1 * M],
                         full=[1 * K, 2 * K, 4 * K, 8 * K, 16 * K],
                         full_fit_min=4 * K, target_T=16 * K, model_piece=16 * K,
                         stream_tokens=1 * M, genome_bases=0, stream_piece=4 * K, stream_fit_min=16 * K,
                         max_run_s=60.0, budget_s=12.0, long_T=64 * K, long_segment=2 * K, long_budget_gib=4.0),
    ("cpu", True): dict(liquid=[1 * K, 2 * K], memory=[512, 1 * K], model=[512, 1 * K], full=[256, 512, 1 * K],
                        full_fit_min=256, target_T=1 * K, model_piece=512,
                        stream_tokens=8 * K, genome_bases=8 * K, stream_piece=1 * K, stream_fit_min=2 * K,
                        max_run_s=10.0, budget_s=2.0, long_T=4 * K, long_segment=1 * K, long_budget_gib=4.0),
    ("gpu", False): dict(liquid=[1 * K, 4 * K, 16 * K, 64 * K], memory=[4 * K, 16 * K, 64 * K, 256 * K],
                         model=[4 * K, 16 * K, 64 * K, 256 * K, 1 * M, 4 * M], full=[4 * K, 16 * K, 64 * K, 256 * K],
                         full_fit_min=16 * K, target_T=16 * K, model_piece=64 * K,
                         stream_tokens=1 * M, genome_bases=0, stream_piece=64 * K, stream_fit_min=16 * K,
                         max_run_s=60.0, budget_s=10.0, long_T=256 * K, long_segment=8 * K, long_budget_gib=4.0),
    ("gpu", True): dict(liquid=[1 * K, 4 * K], memory=[4 * K, 16 * K], model=[4 * K, 16 * K], full=[4 * K, 16 * K],
                        full_fit_min=4 * K, target_T=16 * K, model_piece=16 * K,
                        stream_tokens=64 * K, genome_bases=64 * K, stream_piece=16 * K, stream_fit_min=4 * K,
                        max_run_s=10.0, budget_s=3.0, long_T=16 * K, long_segment=4 * K, long_budget_gib=4.0),
}


@dataclass
class Ctx:
    """What every section needs: the suite, its sizes, the limits and where to write."""

    suite: str  # "cpu" | "gpu"
    quick: bool
    threads: int  # torch threads of each job
    repeats: int  # timed calls per measurement (median), fewer when they pass budget_s
    mem_budget: int  # bytes: a job whose RSS passes this is stopped
    out: Path  # directory of RESULTS.md, results.json, plots/
    sizes: dict
    log: Callable[[str], None] = print
    stream_timeout_s: float = 3 * 3600.0
    profile: bool = True  # profile our side of a comparison whose target is not met

    @property
    def device(self) -> str:
        return "cuda" if self.suite == "gpu" else "cpu"

    def spec(self, **fields) -> dict:
        """A job spec with this context's defaults."""
        base = dict(device=self.device, threads=self.threads, repeats=self.repeats, budget_s=self.sizes["budget_s"],
                    max_run_s=self.sizes["max_run_s"], amp=self.suite == "gpu")
        return {**base, **fields}


@dataclass
class Outcome:
    results: list[dict]  # the RESULT records, in order
    status: str  # "ok" | "stopped: ..." | "failed: ..."
    wall_s: float
    max_rss_mib: float  # the largest RSS the runner saw while polling
    stderr_tail: str = ""


def _reader(stream, sink: list, results: list | None):
    for line in stream:
        if results is not None and line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
        elif results is not None and line.startswith("DONE"):
            sink.append("DONE")
        elif results is None:
            sink.append(line)
            del sink[:-40]


def launch(ctx: Ctx, spec: dict, *, timeout_s: float | None = None, poll_s: float = 0.1) -> Outcome:
    """Runs one job in a fresh process; stops it when its RSS passes ``ctx.mem_budget`` or after
    ``timeout_s`` (default: the job's cap times its sizes, plus start-up)."""
    threads = str(spec.get("threads", ctx.threads))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    n_runs = max(1, len(spec.get("Ts", [1])) * max(1, len(spec.get("modes", spec.get("passes", ["fwd"])))))
    if timeout_s is None:
        timeout_s = 120.0 + n_runs * (spec["max_run_s"] * 2.5 + spec["budget_s"])
    proc = subprocess.Popen([sys.executable, str(JOBS_PY), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE))
    results: list[dict] = []
    done: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_reader, args=(proc.stdout, done, results), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, err, None), daemon=True)]
    for r in readers:
        r.start()
    start, peak, status = time.perf_counter(), 0, None
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        peak = max(peak, rss)
        if rss > ctx.mem_budget:
            status = f"stopped: RSS {rss / GIB:.1f} GiB passed the {ctx.mem_budget / GIB:.1f} GiB budget"
        elif time.perf_counter() - start > timeout_s:
            status = f"stopped: ran past its {timeout_s:.0f} s time limit"
        if status:
            proc.kill()
            proc.wait()
            break
        time.sleep(poll_s)
    for r in readers:
        r.join(timeout=5)
    wall = time.perf_counter() - start
    tail = "".join(err)[-2000:]
    if status is None:
        status = "ok" if proc.returncode == 0 and done else f"failed: exit code {proc.returncode}"
    if status != "ok":
        ctx.log(f"  job {spec.get('kind')}/{spec.get('impl', spec.get('corpus'))}: {status}"
                + (f"\n{tail}" if status.startswith("failed") else ""))
    return Outcome(results, status, wall, peak / MIB, tail)


def run_with_status(ctx: Ctx, spec: dict, expected: list[tuple[int, str]], **kw) -> tuple[list[dict], Outcome]:
    """``launch`` and one record per expected (T, pass): the job's own, or one saying why it is missing."""
    out = launch(ctx, spec, **kw)
    got = {(r.get("T"), r.get("pass")): r for r in out.results if "T" in r}
    skipped = [r for r in out.results if "T" not in r and r.get("status", "").startswith("skipped")]
    records = []
    for T, p in expected:
        if (T, p) in got:
            records.append(got[(T, p)])
        else:
            why = skipped[0]["status"] if skipped else (out.status if out.status != "ok" else "not run")
            records.append({"T": T, "pass": p, "status": why})
    return records, out
