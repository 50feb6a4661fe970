"""Peak memory while streaming: a model reads a long random sequence in pieces, carrying its state,
and the process's peak RSS is sampled after each piece (it should stay flat).

    python benchmarks/stream_memory.py --preset tiny --variant mac --tokens 16384 --piece 2048
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from titans_lnn import TitansLNN, TitansLNNConfig


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="config preset")
    p.add_argument("--variant", default="mac", help="model variant")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to stream")
    p.add_argument("--piece", type=int, default=2048, help="tokens per piece")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset(args.preset, variant=args.variant)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    t0 = time.perf_counter()
    print("| tokens read | peak RSS (MiB) | state (MiB) |\n|---|---|---|")
    for piece in model.stream_pieces(ids, chunk_len=args.piece):
        print(f"| {piece.state.pos} | {peak_rss_mib():.0f} | {piece.state.nbytes() / 2**20:.2f} |", flush=True)
    wall = time.perf_counter() - t0
    print(f"\n{args.preset}/{args.variant}: {args.tokens} tokens in {wall:.1f} s ({args.tokens / wall:.0f} tokens/s)")


if __name__ == "__main__":
    main()
