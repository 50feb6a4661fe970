"""The main job: needle-in-a-haystack (passkey retrieval) far beyond the attention window, on a CPU.

    titans-lnn niah                                   # train both models, evaluate 1K..1M, report
    titans-lnn niah --lengths 1k,4k,16k --steps 100   # a quicker run
    titans-lnn niah --reuse                           # evaluate models an earlier run saved in --out

It trains (or, with ``--reuse``, loads) two models of the same size on passkey retrieval at short
lengths, always longer than the attention window (260-450 bytes, then 1-2K for the last 30% of the
steps): a Titans hybrid (``--variant``, MAL by default: the neural memory feeds the residual stream
ahead of sliding-window attention, with the liquid core) and the sliding-window-only baseline, in
two processes at once. The loss is on the answer digits only: they are random, so the only way to
predict them is to retrieve them. Both models then read passkey prompts of every requested length,
streamed through their fixed-size state, and answer greedily. Outputs, in ``--out``: per model
``results.json`` / ``results.md`` / ``heatmap.png`` (depth x length) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

# The model both sides use: attention window 64 (<= 256), ~177K parameters, fast enough on 2 cores. What
# makes retrieval learnable in a few hundred CPU steps (each found by ablation on this task):
# init_std 0.1 (~1/sqrt(d_model); at 0.02 no variant left the uniform-digit plateau in 1000 steps) with an
# untied head; a linear memory (depth 1) with inner learning rates up to 1 and no forgetting (with
# alpha > 0 a needle fades as (1 - alpha)^distance: gone long before 1M tokens); q/k/v convolutions of
# width 8, so a key can tell "pass key is " from "sky is ".
NIAH_MODEL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, window=64, n_persistent=4, liquid_state=4,
                  mem_heads=2, mem_depth=1, mem_chunk=16, mlp_mult=2.0, mem_max_lr=1.0, mem_max_forget=0.0,
                  conv_kernel=8, init_std=0.1, tie_embeddings=False)


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


def train_passkey(model: TitansLNN, steps: int, *, batch_size: int = 16, min_len: int = 260, max_len: int = 450,
                  long_frac: float = 0.3, long_len: tuple[int, int] = (1024, 2048), lr: float = 3e-3, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Train on passkey retrieval; returns the loss per step. The last ``long_frac`` of the steps use
    prompts of ``long_len`` tokens (with a batch cut to keep the tokens per step), so that the memory
    learns to keep a key through more filler than it was first trained on."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(20, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"train {model.config.variant}", disable=not progress)
    long_from = steps - int(round(long_frac * steps))
    long_batch = max(1, batch_size * max_len // long_len[1])
    for step in bar:
        if step < long_from:
            x, y = passkey_batch(batch_size, min_len, max_len, rng)
        else:
            x, y = passkey_batch(long_batch, *long_len, rng)
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


def niah_config(variant: str, match: str = "mal") -> TitansLNNConfig:
    """The main job's model of ``variant``. Attention-only variants get a wider MLP so that their
    parameter count matches the ``match`` hybrid's (within one MLP step): the same size, no memory."""
    config = TitansLNNConfig(variant=variant, **NIAH_MODEL)
    if "memory" in config.parts:
        return config
    target = TitansLNN(TitansLNNConfig(variant=match, **NIAH_MODEL)).num_parameters()

    def size(mult: float) -> int:
        return TitansLNN(TitansLNNConfig(variant=variant, **{**NIAH_MODEL, "mlp_mult": mult})).num_parameters()

    mult, n = NIAH_MODEL["mlp_mult"], size(NIAH_MODEL["mlp_mult"])
    while abs((wider := size(mult + 0.25)) - target) < abs(n - target):  # sizes grow with mult
        mult, n = mult + 0.25, wider
    return TitansLNNConfig(variant=variant, **{**NIAH_MODEL, "mlp_mult": mult})


def _train_job(name: str, variant: str, steps: int, seed: int, threads: int, model_dir: str,
               match: str = "mal") -> dict:
    """One model's training, in its own process: returns its metadata (the model goes to ``model_dir``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = TitansLNN(niah_config(variant, match))
    t0 = time.perf_counter()
    losses = train_passkey(model, steps, seed=seed, progress=False)
    model.save_pretrained(model_dir)
    return {"variant": variant, "parameters": model.num_parameters(), "steps": steps,
            "train_seconds": round(time.perf_counter() - t0, 1), "train_loss_first": losses[0],
            "train_loss_last20": sum(losses[-20:]) / len(losses[-20:])}


def _eval_job(model_dir: str, length: int, depth: float, samples: int, seed: int, chunk_len: int,
              threads: int) -> list[dict]:
    """One (model, length, depth) cell, in its own process."""
    torch.set_num_threads(threads)
    model = TitansLNN.from_pretrained(model_dir).eval()
    return evaluate_task(model, ByteTokenizer(), "passkey", [length], [depth], samples=samples, seed=seed,
                         chunk_len=chunk_len, progress=False)


def _pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def run(args: argparse.Namespace) -> int:
    from concurrent.futures import as_completed

    from tqdm import tqdm

    workers = args.workers or min(2, os.cpu_count() or 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = {"hybrid": args.variant, "baseline": "swa"}
    dirs = {name: out / name / "model" for name in models}
    meta = {}
    summary_path = out / "summary.json"
    old_meta = json.loads(summary_path.read_text()).get("meta", {}) if summary_path.exists() else {}
    with _pool(workers) as pool:
        jobs = {}
        for name, variant in models.items():
            if args.reuse and (dirs[name] / "config.json").exists():
                print(f"{name}: loaded {dirs[name]}")
                meta[name] = old_meta.get(name, {"variant": variant})
            else:
                jobs[pool.submit(_train_job, name, variant, args.steps, args.seed, threads, str(dirs[name]),
                                       args.variant)] = name
        if jobs:
            print(f"training {', '.join(f'{n} ({models[n]})' for n in jobs.values())}: {args.steps} steps each, "
                  f"{workers} processes x {threads} threads")
        for fut in tqdm(as_completed(jobs), total=len(jobs), desc="train", unit="model", disable=args.no_progress):
            name = jobs[fut]
            meta[name] = fut.result()
            m = meta[name]
            print(f"{name}: {m['parameters']:,} parameters, loss {m['train_loss_first']:.2f} -> "
                  f"{m['train_loss_last20']:.3f} in {m['train_seconds']:.0f} s")
        # Evaluation: one job per (model, length, depth), the longest first so the two processes stay busy.
        cells = [(name, n, d) for n in sorted(args.lengths, reverse=True) for name in models for d in args.depths]
        jobs = {pool.submit(_eval_job, str(dirs[name]), n, d, args.samples, args.seed + 1000, args.chunk_len,
                            threads): (name, n, d) for name, n, d in cells}
        records = {name: [] for name in models}
        total = sum(n for _, n, _ in cells) * args.samples
        with tqdm(total=total, desc="evaluate", unit="tok", unit_scale=True, disable=args.no_progress) as bar:
            for fut in as_completed(jobs):
                name, n, d = jobs[fut]
                records[name].extend(fut.result())
                bar.update(n * args.samples)
    results = {}
    for name, variant in models.items():
        recs = sorted(records[name], key=lambda r: (r["length"], r["depth"], r["sample"]))
        write_report(recs, out / name, title=f"passkey, {name} ({variant})", meta=meta.get(name))
        results[f"{name} ({variant})"] = recs
    summary = _summary(results, NIAH_MODEL["window"])
    wall = time.perf_counter() - t0
    summary += (f"\nWall time {wall / 60:.1f} min ({workers} processes x {threads} threads); samples per cell: "
                f"{args.samples}; depths: {args.depths}.\n")
    (out / "summary.md").write_text(summary)
    summary_path.write_text(json.dumps({"meta": meta, "wall_s": wall, "model": NIAH_MODEL}, indent=2))
    print(summary)
    print(f"outputs: {out.resolve()} (summary.md, hybrid/ and baseline/ with results.json, results.md, heatmap.png)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("niah", help="the main job: train a hybrid and a window-only baseline on passkey "
                                           "retrieval, evaluate both up to 1M tokens", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mal", choices=("mac", "mag", "mal", "lmm"),
                   help="the hybrid's variant (default mal)")
    p.add_argument("--steps", type=int, default=600, help="training steps per model (default 600)")
    p.add_argument("--lengths", type=_parse_lengths, default=_parse_lengths("1k,4k,16k,64k,256k,1m"),
                   help="comma-separated prompt lengths in bytes, k = 1024, m = 1024^2 (default 1k,...,1m)")
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9],
                   help="comma-separated needle depths in [0, 1] (default 0.1,0.5,0.9)")
    p.add_argument("--samples", type=int, default=1, help="samples per (length, depth) (default 1)")
    p.add_argument("--chunk-len", type=int, default=4096, help="tokens per streamed piece (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: min(2, CPU cores))")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / workers)")
    p.add_argument("--out", default="niah-results", help="output folder (default niah-results)")
    p.add_argument("--reuse", action="store_true", help="load the models an earlier run saved in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p
