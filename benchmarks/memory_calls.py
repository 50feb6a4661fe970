"""What one call of the neural memory costs with a gradient, by call length: the fixed part per call and the
part per token. MAC writes its memory once per segment (128 tokens in the tiny preset) because each segment's
read depends on the previous segment's write, so in training it pays the fixed part once per segment and
layer; a single call over the whole sequence pays it once.

    python benchmarks/memory_calls.py                     # lengths 128 .. 4096, the memory of section 2
    python benchmarks/memory_calls.py --lengths 128,256,512 --repeats 20

Prints, per length T: the forward and the backward time (median of ``--repeats`` calls, one torch thread),
the time per 128 tokens; then a line fitted through the two shortest lengths, t(T) = fixed + T x per token,
for the forward and the backward, and the fixed part's share of a 128-token call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_models
import torch


def timed(m: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward with a gradient and of its backward."""
    xr = x.detach().requires_grad_()
    t0 = time.perf_counter()
    y = m(xr)[0]
    t1 = time.perf_counter()
    y.backward(grad)
    t2 = time.perf_counter()
    m.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,256,512,1024,4096", help="call lengths T, comma separated")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per length (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    lengths = sorted(int(t) for t in args.lengths.split(","))
    if len(lengths) < 2 or lengths[0] < 1:
        raise SystemExit(f"--lengths {args.lengths!r}: expected two or more positive lengths")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = bench_models.memory("ours", "cpu")
    dim = bench_models.MEMORY["dim"]
    rows = {}
    print(f"neural memory of section 2 ({bench_models.MEMORY}), B = 1, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| T | forward (ms) | backward (ms) | fwd+bwd per 128 tokens (ms) |\n|---|---|---|---|")
    for T in lengths:
        x, grad = torch.randn(1, T, dim), torch.randn(1, T, dim)
        timed(m, x, grad)  # warm
        runs = [timed(m, x, grad) for _ in range(args.repeats)]
        f, b = (statistics.median(r[i] for r in runs) for i in (0, 1))
        rows[T] = (f, b)
        print(f"| {T} | {f * 1e3:.2f} | {b * 1e3:.2f} | {(f + b) * 128 / T * 1e3:.2f} |", flush=True)
    t0, t1 = lengths[:2]
    print(f"\nfitted through T = {t0} and {t1}:")
    fixed = {}
    for i, name in enumerate(("forward", "backward")):
        per = (rows[t1][i] - rows[t0][i]) / (t1 - t0)
        fixed[name] = rows[t0][i] - per * t0
        print(f"- {name}: {fixed[name] * 1e3:.2f} ms per call + {per * 1e6:.1f} us per token")
    call = rows[t0][0] + rows[t0][1]
    print(f"- the fixed part: {(fixed['forward'] + fixed['backward']) / call:.0%} of a {t0}-token call "
          f"({call * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
