"""Peak memory of training on one long sequence, with and without activation checkpointing.

Each configuration runs in a fresh process (peak RSS is per process): one forward + backward of a random
sequence of ``--tokens`` tokens through the preset's model, either plain (``model(ids, labels)``) or with
``model(ids, labels=labels, checkpoint_len=...)``; the row reports the peak RSS, the wall time and
the gradient norm (equal between the rows up to rounding: the same gradients).

    python benchmarks/train_memory.py --preset tiny --variant mac --tokens 65536 --segment 2048
    python benchmarks/train_memory.py --tokens 8192 --segment 0        # the plain run, for comparison
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(preset: str, variant: str, tokens: int, segment: int, threads: int) -> dict:
    import torch

    from titans_lnn import TitansLNN, TitansLNNConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset(preset, variant=variant))
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    labels = ids.roll(-1, 1)
    t0 = time.perf_counter()
    if segment:
        loss = model(ids, labels=labels, checkpoint_len=segment).loss
    else:
        loss = model(ids, labels=labels).loss
    loss.backward()
    wall = time.perf_counter() - t0
    grad = sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt().item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB
    return {"preset": preset, "variant": variant, "tokens": tokens, "segment": segment, "peak_rss_gib": round(peak, 3),
            "seconds": round(wall, 1), "loss": round(loss.item(), 6), "grad_norm": grad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--variant", default="mac")
    p.add_argument("--tokens", type=int, default=65536, help="sequence length")
    p.add_argument("--segment", type=int, nargs="+", default=[2048],
                   help="checkpoint segment lengths to run (0 = no checkpointing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.preset, args.variant, args.tokens, args.segment[0], args.threads)))
        return
    print("| preset/variant | tokens | checkpoint segment | peak RSS (GiB) | fwd+bwd (s) | grad norm |")
    print("|---|---|---|---|---|---|")
    for segment in args.segment:
        cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--variant", args.variant,
               "--tokens", str(args.tokens), "--segment", str(segment), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"| {args.preset}/{args.variant} | {args.tokens} | {segment or 'none'} | failed (exit "
                  f"{done.returncode}): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {args.preset}/{args.variant} | {r['tokens']} | {segment or 'none'} | {r['peak_rss_gib']:.2f} | "
              f"{r['seconds']:.0f} | {r['grad_norm']:.6g} |", flush=True)


if __name__ == "__main__":
    main()
