"""The main job: needle-in-a-haystack (passkey retrieval) far beyond the attention window, on a CPU.

    titans-lnn niah                                   # train both models, evaluate 1K..1M, report
    titans-lnn niah --lengths 1k,4k,16k --steps 100   # a quicker run
    titans-lnn niah --reuse                           # evaluate models an earlier run saved in --out

It trains (or, with ``--reuse``, loads) two models of the same size on passkey retrieval at short
lengths (a few hundred bytes, always longer than the window): a Titans hybrid (``--variant``, MAG by
default: sliding-window attention gated by the neural memory, with the liquid core) and the
sliding-window-only baseline. The loss is on the answer digits only: they are random, so the only
way to predict them is to retrieve them. Both models then read passkey prompts of every requested
length, streamed through their fixed-size state, and answer greedily. Outputs, in ``--out``: per
model ``results.json`` / ``results.md`` / ``heatmap.png`` (depth x length) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from titans_lnn.evals.report import format_length, write_report
from titans_lnn.evals.runner import evaluate_task
from titans_lnn.evals.tasks import make_sample

from titans_lnn.config import TitansLNNConfig
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import ByteTokenizer

# The model both sides use: attention window 64 (<= 256), ~180K parameters, fast enough on 2 cores.
NIAH_MODEL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, window=64, n_persistent=4, liquid_state=4,
                  mem_heads=2, mem_depth=2, mem_chunk=16, mlp_mult=2.0)


def _parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(part[-1:], 1)
        value = int(float(part[:-1] if mult > 1 else part) * mult)
        if value < 64:
            raise argparse.ArgumentTypeError(f"length {part!r} is too short: expected >= 64 tokens")
        out.append(value)
    return out


def passkey_batch(batch_size: int, min_len: int, max_len: int, rng: random.Random):
    """Passkey prompts followed by their answer, as byte ids; labels only on the answer (B, T)."""
    length = rng.randint(min_len, max_len)
    xs, ys = [], []
    for _ in range(batch_size):
        sample = make_sample("passkey", length, rng.random(), seed=rng.randrange(2**31))
        full = torch.tensor(list((sample.prompt + " " + sample.answer + ".").encode()))
        labels = torch.full_like(full, -100)
        first = len(full) - len(sample.answer) - 2  # the space before the key
        labels[first - 1:-1] = full[first:]  # aligned: position t predicts token t + 1
        xs.append(full[:-1])
        ys.append(labels[:-1])
    n = min(len(x) for x in xs)
    return torch.stack([x[-n:] for x in xs]), torch.stack([y[-n:] for y in ys])


def train_passkey(model: TitansLNN, steps: int, *, batch_size: int = 8, min_len: int = 300, max_len: int = 600,
                  lr: float = 3e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Train on passkey retrieval; returns the loss per step."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"train {model.config.variant}", disable=not progress)
    for _ in bar:
        x, y = passkey_batch(batch_size, min_len, max_len, rng)
        loss = model(x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


def _summary(results: dict[str, list[dict]], window: int) -> str:
    lengths = sorted({r["length"] for recs in results.values() for r in recs})
    lines = [f"Passkey retrieval accuracy by length (attention window {window}; chance for a 5-digit key ~0)", "",
             "| model | " + " | ".join(format_length(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, recs in results.items():
        cells = []
        for n in lengths:
            hit = [r["score"] for r in recs if r["length"] == n]
            cells.append(f"{sum(hit) / len(hit):.2f}" if hit else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    results, meta = {}, {}
    for name, variant in (("hybrid", args.variant), ("baseline", "swa")):
        model_dir = out / name / "model"
        if args.reuse and (model_dir / "config.json").exists():
            model = TitansLNN.from_pretrained(model_dir)
            print(f"{name}: loaded {model_dir}")
            losses = []
        else:
            torch.manual_seed(args.seed)
            model = TitansLNN(TitansLNNConfig(variant=variant, **NIAH_MODEL))
            print(f"{name}: {variant}, {model.num_parameters():,} parameters, training {args.steps} steps")
            losses = train_passkey(model, args.steps, seed=args.seed, progress=not args.no_progress)
            model.save_pretrained(model_dir)
        model.eval()
        records = evaluate_task(model, tok, "passkey", args.lengths, args.depths, samples=args.samples,
                                seed=args.seed + 1000, chunk_len=args.chunk_len, progress=not args.no_progress)
        write_report(records, out / name, title=f"passkey, {name} ({variant})")
        results[f"{name} ({variant})"] = records
        meta[name] = {"variant": variant, "parameters": model.num_parameters(),
                      "train_loss_first": losses[0] if losses else None,
                      "train_loss_last20": sum(losses[-20:]) / 20 if len(losses) >= 20 else None}
    summary = _summary(results, NIAH_MODEL["window"])
    wall = time.perf_counter() - t0
    summary += f"\nWall time {wall / 60:.1f} min; samples per cell: {args.samples}; depths: {args.depths}.\n"
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "wall_s": wall}, indent=2))
    print(summary)
    print(f"outputs: {out.resolve()} (summary.md, hybrid/ and baseline/ with results.json, results.md, heatmap.png)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("niah", help="the main job: train a hybrid and a window-only baseline on passkey "
                                           "retrieval, evaluate both up to 1M tokens", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mag", choices=("mac", "mag", "mal", "lmm"),
                   help="the hybrid's variant (default mag)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default 300)")
    p.add_argument("--lengths", type=_parse_lengths, default=_parse_lengths("1k,4k,16k,64k,256k,1m"),
                   help="comma-separated prompt lengths in bytes, k = 1024, m = 1024^2 (default 1k,...,1m)")
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9],
                   help="comma-separated needle depths in [0, 1] (default 0.1,0.5,0.9)")
    p.add_argument("--samples", type=int, default=1, help="samples per (length, depth) (default 1)")
    p.add_argument("--chunk-len", type=int, default=4096, help="tokens per streamed piece (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="niah-results", help="output folder (default niah-results)")
    p.add_argument("--reuse", action="store_true", help="load the models an earlier run saved in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p
