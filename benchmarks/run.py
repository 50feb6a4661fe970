"""The benchmark suite: our model and its parts side by side with the reference packages, in one run.

    python benchmarks/run.py --suite cpu                      # the CPU suite (~30 min on 2 cores)
    python benchmarks/run.py --suite cpu --quick              # smallest sizes: a smoke test (~4 min)
    python benchmarks/run.py --suite cpu --sections 1,4 --out /tmp/bench
    python benchmarks/run.py --suite gpu                      # the same comparisons on CUDA

Sections: 0 the kernel suite (kernels.py); 1 liquid core vs ncps CfC; 2 neural memory vs titans-pytorch;
3 whole model vs titans-pytorch's MemoryAsContextTransformer; 4 full attention vs the hybrid, scaling
exponents; 5 streaming 1M tokens of text and the E. coli genome in fixed memory; 6 generation, ms per
new token after a 1K and a 1M-token prompt (bench_decode.py); 7 one training pass over 64K tokens with
activation checkpointing, peak RSS and gradients vs the plain pass. Writes RESULTS.md,
results.json and plots/*.png into --out (default: benchmarks/). The competitors come with the
``bench`` extra (pip install -e '.[bench]'); a section whose competitor is missing is skipped and
recorded as such.

Each measurement runs in a fresh process (bench_jobs.py): warm, the median of --repeats calls, its
peak RSS its own; the runner stops any job whose RSS passes --mem-budget-gb. On CPU the genome
pass of section 5 (the longest job) runs on the second core while the other sections run on the
first, every job single-threaded (--threads 1), which fits the suite in ~30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_decode
import bench_report
import bench_sections
import bench_streaming
from bench_common import GIB, available_memory_bytes, total_memory_bytes
from bench_runner import HERE, SIZES, Ctx

from titans_lnn.cli import plain

ALL_SECTIONS = (0, 1, 2, 3, 4, 5, 6, 7)
QUICK_OUT = Path(tempfile.gettempdir()) / "titans-lnn-bench-quick"


def say(msg: str) -> None:
    """One line to stdout in a single write (the genome pass logs from a second thread)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args, ctx: Ctx) -> dict:
    import torch

    total = total_memory_bytes()
    h = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical cores, "
                   + (f"{total / GIB:.0f} GiB RAM" if total else "RAM unknown") + f", {platform.platform()}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ncps {_version('ncps')}, "
                    f"titans-pytorch {_version('titans-pytorch')}, titans-lnn {_version('titans-lnn')}",
        "threads": f"{ctx.threads} torch thread(s) per job (OMP_NUM_THREADS={ctx.threads})",
        "suite": f"{args.suite}{' (quick sizes)' if args.quick else ''}, sections "
                 + ",".join(str(s) for s in args.sections),
    }
    if ctx.suite == "gpu":
        h["device"] = (f"{torch.cuda.get_device_name(0)}, flash-attn {_version('flash-attn')}, "
                       f"triton {_version('triton')}; models in bf16 autocast")
    else:
        h["device"] = "CPU, fp32"
    return h


def parse_sections(text: str) -> list[int]:
    try:
        out = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sections {text!r}: expected numbers like 1,2,5") from None
    bad = [s for s in out if s not in ALL_SECTIONS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--sections {text!r}: expected some of {ALL_SECTIONS}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=plain(__doc__.split("\n\n")[0]),
                                epilog=plain(__doc__.split("\n\n", 2)[2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu", help="cpu (fp32) or gpu (CUDA, bf16 autocast)")
    p.add_argument("--quick", action="store_true", help="smallest sizes only: a smoke test of the whole suite")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for RESULTS.md, results.json and plots/ (default: benchmarks/; with --quick "
                        f"{QUICK_OUT}, so that a smoke test never overwrites the committed results)")
    p.add_argument("--sections", type=parse_sections, default=list(ALL_SECTIONS),
                   help="comma-separated section numbers to run (default: 0,1,2,3,4,5,6,7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, median kept (default 3)")
    p.add_argument("--mem-budget-gb", type=float, default=20.0,
                   help="stop a job whose RSS passes this many GiB (default 20; lowered to 90%% of free memory)")
    p.add_argument("--max-run-s", type=float, default=None,
                   help="skip a size whose one call is predicted to take longer (default 60; quick 10)")
    p.add_argument("--stream-tokens", type=int, default=None, help="tokens of KJV text to stream (default 1M)")
    p.add_argument("--genome-bases", type=int, default=None,
                   help="bases of the E. coli genome to stream (default: all 4.6M; 0 = all)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile our side of each comparison whose target is missed (default: on)")
    p.add_argument("--concurrent-streams", action=argparse.BooleanOptionalAction, default=None,
                   help="run section 5's genome pass on a second core beside the other sections "
                        "(default: on for the cpu suite with --threads 1 and 2+ cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.suite == "gpu":
        import torch

        if not torch.cuda.is_available():
            p.error("--suite gpu needs a CUDA device, and torch.cuda.is_available() is False here "
                    f"(torch {torch.__version__}); run --suite cpu, or install a CUDA build of torch")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else HERE
    sizes = dict(SIZES[(args.suite, args.quick)])
    if args.max_run_s is not None:
        sizes["max_run_s"] = args.max_run_s
    if args.stream_tokens is not None:
        sizes["stream_tokens"] = args.stream_tokens
    budget = int(args.mem_budget_gb * GIB)
    free = available_memory_bytes()
    if free is not None and budget > 0.9 * free:
        say(f"memory budget lowered from {budget / GIB:.1f} GiB to 90% of the free {free / GIB:.1f} GiB")
        budget = int(0.9 * free)
    ctx = Ctx(suite=args.suite, quick=args.quick, threads=args.threads, repeats=args.repeats, mem_budget=budget,
              out=args.out, sizes=sizes, log=say, profile=args.profile)
    concurrent = args.concurrent_streams
    if concurrent is None:
        concurrent = args.suite == "cpu" and args.threads == 1 and (os.cpu_count() or 1) >= 2
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]) \
        if argv is None else "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv)
    meta = dict(command=command, header=header(args, ctx), repeats=args.repeats, mem_budget_gib=budget / GIB,
                quick=args.quick, sizes=sizes, wall_s=0.0)
    if 5 in args.sections:
        meta["header"]["layout"] = ("section 5's genome pass ran on a second core beside the other sections"
                                    if concurrent else "one job at a time")
    start = time.perf_counter()

    # Section 5's genome pass (the longest job) starts at once on the second core when concurrent; the
    # KJV pass runs after the other sections, on the first.
    background: list[dict] = []
    worker = None
    if 5 in args.sections:
        cores = (os.cpu_count() or 1) if args.suite == "cpu" else 1
        kjv_spec, genome_spec, *all_cores = bench_streaming.stream_specs(ctx, args.genome_bases, cores)
        if concurrent:
            worker = threading.Thread(target=lambda: background.extend(bench_streaming.run_streams(ctx, [genome_spec])))
            worker.start()

    runners = {0: bench_sections.kernels_section, 1: bench_sections.liquid_section, 2: bench_sections.memory_section,
               3: bench_sections.model_section, 4: bench_sections.scaling_section,
               6: bench_decode.decode_section, 7: bench_sections.long_training_section}
    sections = []
    for sid in args.sections:
        t0 = time.perf_counter()
        if sid == 5:
            say("section 5")
            streams = bench_streaming.run_streams(ctx, [kjv_spec] if concurrent else [kjv_spec, genome_spec])
            if worker is not None:
                say("section 5: waiting for the genome pass")
                worker.join()
                streams += background
            streams += bench_streaming.run_streams(ctx, all_cores)  # alone, on every core
            sec = bench_streaming.streaming_section(ctx, streams, concurrent)
            sec["wall_s"] = sum(s.get("time_s", 0) + s.get("load_s", 0) for s in streams)
        else:
            say(f"section {sid}")
            sec = runners[sid](ctx)
            sec["wall_s"] = time.perf_counter() - t0
        sections.append(sec)
        say(f"section {sid}: {sec['status']} {sec['measured']} ({sec['wall_s']:.0f} s)")
        meta["wall_s"] = time.perf_counter() - start
        files = bench_report.write(args.out, meta, sections)
    say("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
