"""The model zoo: every mechanism at the same size, trained on the same recipes, on the same evals.

    titans-lnn zoo                                  # all ten mechanisms (~20 min on 2 CPU cores)
    titans-lnn zoo --only mal,mamba2,gdn --mqar-steps 50 --lm-steps 50   # a quick look

Mechanisms: the Titans variants (MAC, MAG, MAL, each with the liquid core), the liquid core alone,
the four seed architectures (``titans_lnn.mixers``: Mamba-2, BASED, LFM2, Gated DeltaNet, without
the liquid core), sliding-window attention alone and full causal attention. Every model is the main
job's size (config preset "niah": d_model 64, 2 blocks, window 64); those without the neural memory
get the MLP width that brings them closest to the MAL hybrid's parameter count (as ``niah_config``).

Each mechanism trains twice from the same seed, with AdamW and a cosine schedule:
  - MQAR (Zoology's multi-query associative recall; ``--mqar-vocab`` ids, keys in the lower half,
    values in the upper), sequences of ``--mqar-train-len`` tokens with 2..16 key-value pairs, loss
    on the answers only; evaluated by accuracy per number of pairs at ``--mqar-len`` tokens (longer
    than the attention window, so that the window alone cannot see every pair);
  - the King James Bible as bytes (``load_corpus("kjv")``, the last 5% held out), windows of
    ``--lm-len``; evaluated in bits per byte on held-out text streamed through the state.
Then tokens/s (batch 1, streamed in pieces of 2048, no gradient) and the state's bytes after
reading 1024 tokens (``ModelState.nbytes``: fixed from the first token for every mechanism but full
attention, whose cache grows with the text).

Outputs in ``--out`` (default ``zoo-results/``): ``zoo.md`` (the table), ``zoo.json`` (every number
and the settings), ``zoo.png`` (MQAR accuracy by pairs; bits/byte against state size); ``--render``
rewrites the table and plot from ``zoo.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

MECHANISMS = {  # label -> variant
    "Titans MAC": "mac", "Titans MAG": "mag", "Titans MAL": "mal", "liquid only": "liquid",
    "Mamba-2": "mamba2", "BASED": "based", "LFM2": "lfm2", "Gated DeltaNet": "gdn",
    "SWA only": "swa", "full attention": "full",
}
MQAR_TRAIN_PAIRS = (2, 4, 8, 16)
MQAR_EVAL_PAIRS = (2, 4, 8, 16, 24)
TRAIN_SEED = 10_000  # MQAR training batches draw seeds above this; evaluation uses seed 0


def zoo_config(variant: str, match: str = "mal"):
    """The preset "niah" model of ``variant``; without the neural memory, the MLP width (in steps of 0.25
    d_model) whose parameter count is closest to the ``match`` hybrid's."""
    from titans_lnn.config import PRESETS, TitansLNNConfig
    from titans_lnn.layers import SwiGLU

    base = PRESETS["niah"]
    config = TitansLNNConfig(variant=variant, **base)
    if "memory" in config.parts:
        return config

    def mlp(mult: float) -> int:  # the blocks' MLPs are all that the width changes
        with torch.device("meta"):
            return config.n_layers * sum(p.numel() for p in SwiGLU(config.d_model, mult).parameters())

    n0, target = size_of(variant), size_of(match)

    def size(mult: float) -> int:
        return n0 - mlp(base["mlp_mult"]) + mlp(mult)

    mult = base["mlp_mult"]
    step = 0.25 if size(mult) < target else -0.25
    while mult + step >= 0.25 and abs(size(mult + step) - target) < abs(size(mult) - target):
        mult += step
    return config.replace(mlp_mult=mult)


def size_of(variant: str) -> int:
    """Parameters of the preset "niah" model of ``variant`` (built on the meta device: no memory)."""
    from titans_lnn.config import TitansLNNConfig
    from titans_lnn.model import TitansLNN

    with torch.device("meta"):
        return TitansLNN(TitansLNNConfig.from_preset("niah", variant=variant)).num_parameters()


def _cosine(step: int, steps: int, lr: float, warmup: int = 20) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model, batches, steps: int, lr: float) -> tuple[float, float]:
    """AdamW (weight decay 0.1 on matrices), cosine schedule, gradients clipped at 1. ``batches(step)`` gives
    (input_ids, labels). Returns (mean loss of the last 10% of steps, training tokens/s)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    losses, tokens, t0 = [], 0, time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, lr)
        ids, labels = batches(step)
        loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        tokens += ids.numel()
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail), tokens / (time.perf_counter() - t0)


def _mqar_batches(batch_size: int, seq_len: int, vocab: int, seed: int):
    from titans_lnn.evals.mqar import make_mqar

    rng = np.random.default_rng(seed)
    choices = [n for n in MQAR_TRAIN_PAIRS if 4 * n <= seq_len and n < vocab // 2]

    def batch(step: int):
        pairs = int(rng.choice(choices))
        return make_mqar(batch_size, seq_len, pairs, vocab_size=vocab, seed=TRAIN_SEED + seed * 100_000 + step)

    return batch


def _mqar_accuracy(model, seq_len: int, vocab: int, samples: int) -> dict[str, float]:
    """{pairs: the fraction of queries answered right (argmax)} on ``samples`` sequences per pair count
    (evaluation seed 0, never a training seed), streamed in pieces of 1024 tokens."""
    from titans_lnn.evals.mqar import make_mqar

    out = {}
    for n in MQAR_EVAL_PAIRS:
        if 4 * n > seq_len or n >= vocab // 2:
            continue
        ids, labels = make_mqar(samples, seq_len, n, vocab_size=vocab, seed=0)  # (S, T) each
        right = 0
        for s, logits, _ in model.stream_pieces(ids, chunk_len=1024):
            lab = labels[:, s:s + logits.shape[1]]
            right += int(((logits.argmax(-1) == lab) & (lab != -100)).sum())
        out[str(n)] = right / (samples * n)
    return out


def _lm_batches(train: np.ndarray, batch_size: int, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(train.astype(np.int64))

    def batch(step: int):
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        rows = torch.stack([data[s:s + seq_len + 1] for s in starts])  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    return batch


def _bits_per_byte(model, val: np.ndarray, rows: int, length: int) -> float:
    """Mean -log2 p(byte | everything before it in its row), ``rows`` held-out rows of ``length`` bytes,
    streamed through the state in pieces of 1024."""
    from titans_lnn.evals.runner import stream_nll

    step = (len(val) - length) // max(1, rows - 1) if rows > 1 else 0
    ids = torch.stack([torch.from_numpy(val[i * step:i * step + length].astype(np.int64)) for i in range(rows)])
    total, count = 0.0, 0
    with torch.no_grad():
        for _, nll, _ in stream_nll(model, ids, chunk_len=1024):
            total, count = total + float(nll.sum()), count + nll.numel()
    return total / count / math.log(2)


def _throughput(model, tokens: int = 8192) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    model.stream(ids[:, :256], chunk_len=2048, logits="none")  # warm-up
    t0 = time.perf_counter()
    model.stream(ids, chunk_len=2048, logits="none")
    return tokens / (time.perf_counter() - t0)


def run_mechanism(label: str, settings: dict, kjv: tuple[np.ndarray, np.ndarray]) -> dict:
    """Train and evaluate one mechanism (in a worker process); ``kjv``: the (train, val) byte arrays.
    Returns its row of numbers."""
    from titans_lnn.model import TitansLNN

    torch.set_num_threads(settings["threads"])
    t0 = time.perf_counter()
    s, variant = settings, MECHANISMS[label]
    config = zoo_config(variant)
    row: dict = {"mechanism": label, "variant": variant, "mlp_mult": config.mlp_mult}

    torch.manual_seed(s["seed"])
    model = TitansLNN(config)
    row["params"] = model.num_parameters()
    row["mqar_loss"], row["train_tok_s"] = _train(
        model, _mqar_batches(s["batch_size"], s["mqar_train_len"], s["mqar_vocab"], s["seed"]), s["mqar_steps"],
        s["mqar_lr"])
    row["mqar"] = _mqar_accuracy(model, s["mqar_len"], s["mqar_vocab"], s["mqar_samples"])

    train, val = kjv
    torch.manual_seed(s["seed"])
    model = TitansLNN(config)
    row["lm_loss"], _ = _train(model, _lm_batches(train, s["batch_size"], s["lm_len"], s["seed"]), s["lm_steps"],
                               s["lr"])
    row["bits_per_byte"] = _bits_per_byte(model, val, s["val_rows"], s["val_len"])
    row["stream_tok_s"] = _throughput(model)
    with torch.no_grad():
        state = model.stream(torch.randint(0, 256, (1, 1024)), chunk_len=1024, logits="none").state
    row["state_bytes"] = state.nbytes()
    row["state_bytes_init"] = model.init_state(1).nbytes()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict], settings: dict) -> str:
    pairs = [str(n) for n in MQAR_EVAL_PAIRS]
    head = ["mechanism", "params", *[f"MQAR {n} kv" for n in pairs], "KJV bits/byte", "stream tok/s",
            "state bytes", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mqar = [f"{r['mqar'][n]:.2f}" if n in r["mqar"] else "-" for n in pairs]
        lines.append("| " + " | ".join([r["mechanism"], f"{r['params'] / 1e3:.0f}K", *mqar, f"{r['bits_per_byte']:.3f}",
                                        f"{r['stream_tok_s']:,.0f}", f"{r['state_bytes']:,}",
                                        f"{r['seconds']:.0f}"]) + " |")
    s = settings
    notes = (f"\nMQAR: vocabulary {s['mqar_vocab']} (chance 2/{s['mqar_vocab']}), trained {s['mqar_steps']} steps x "
             f"{s['batch_size']} sequences of {s['mqar_train_len']} tokens (2..16 pairs, lr {s['mqar_lr']}), "
             f"accuracy on {s['mqar_samples']} sequences of {s['mqar_len']} tokens per number of pairs "
             "(attention window 64). "
             f"KJV: trained {s['lm_steps']} steps x {s['batch_size']} x {s['lm_len']} bytes (lr {s['lr']}), "
             f"bits/byte on {s['val_rows']} held-out rows of {s['val_len']} bytes, streamed. Stream tok/s: batch 1, "
             f"8192 tokens in pieces of 2048, {s['threads']} thread(s) per model, {s['workers']} model(s) at once. "
             "State bytes: after 1024 tokens (full attention's grows with the text; the others' are fixed). "
             f"Every model trains on {s['lm_len']}-byte windows and is scored on {s['val_len']}-byte rows: full "
             "attention then attends across distances it never trained on; the others read through a window or a "
             "fixed-size state.\n")
    return "\n".join(lines) + "\n" + notes


def _plot(rows: list[dict], settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        xs = [int(n) for n in r["mqar"]]
        a.plot(xs, [r["mqar"][str(n)] for n in xs], marker="o", label=r["mechanism"])
        b.scatter(r["state_bytes"], r["bits_per_byte"])
        b.annotate(r["mechanism"], (r["state_bytes"], r["bits_per_byte"]), fontsize=8, xytext=(3, 3),
                   textcoords="offset points")
    a.set(xscale="log", xlabel="key-value pairs", ylabel="MQAR accuracy", ylim=(-0.02, 1.02),
          title="associative recall")
    a.set_xticks([int(n) for n in MQAR_EVAL_PAIRS], [str(n) for n in MQAR_EVAL_PAIRS])
    a.minorticks_off()
    a.axhline(2 / settings["mqar_vocab"], color="gray", linestyle="--", linewidth=1, label="chance")
    a.legend(fontsize=7)
    b.set(xscale="log", xlabel="state bytes (batch 1, after 1024 tokens)", ylabel="KJV held-out bits/byte",
          title="language modelling vs state size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _variants(text: str) -> list[str]:
    known = list(MECHANISMS.values())
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name not in known:
            raise argparse.ArgumentTypeError(f"unknown mechanism {name!r}: expected variants from {', '.join(known)}")
        out.append(name)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one variant")
    return out


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected a whole number >= 1")
    return value


def run(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    if args.render:
        if not (Path(args.out) / "zoo.json").is_file():
            raise SystemExit(f"zoo: --render needs {Path(args.out) / 'zoo.json'} from an earlier run")
        return _render(Path(args.out))

    lengths = (args.mqar_train_len, args.mqar_len)
    if 4 * MQAR_TRAIN_PAIRS[0] > min(lengths) or any(n % 2 for n in lengths):
        raise SystemExit(f"zoo: --mqar-train-len={args.mqar_train_len} and --mqar-len={args.mqar_len} must be even "
                         f"and >= {4 * MQAR_TRAIN_PAIRS[0]}")
    if not 2 * MQAR_TRAIN_PAIRS[0] < args.mqar_vocab <= 256:
        raise SystemExit(f"zoo: --mqar-vocab={args.mqar_vocab} must be in [{2 * MQAR_TRAIN_PAIRS[0] + 1}, 256]")
    workers = args.workers or min(2, os.cpu_count() or 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    settings = {k: getattr(args, k) for k in ("mqar_steps", "lm_steps", "batch_size", "mqar_train_len", "mqar_len",
                                              "mqar_vocab", "mqar_samples", "mqar_lr", "lm_len", "val_rows",
                                              "val_len", "lr", "seed")}
    settings.update(threads=threads, workers=workers)
    labels = [label for label, v in MECHANISMS.items() if args.only is None or v in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from titans_lnn.training.data import load_corpus

    split = load_corpus("kjv").split(0.05, by="tail")  # the last 5% held out
    kjv = (split.train, split.val)
    if len(split.val) < args.val_len or len(split.train) <= args.lm_len + 1:
        raise SystemExit(f"zoo: the held-out text has {len(split.val)} bytes, training text {len(split.train)}: "
                         f"too few for --val-len={args.val_len} and --lm-len={args.lm_len}")
    slow_first = sorted(labels, key=lambda label: MECHANISMS[label] not in ("mac", "mag", "mal", "based"))
    done: dict[str, dict] = {}

    def report(label: str, row: dict) -> None:
        done[label] = row
        print(f"{label:16s} {row['params']:>7,} params  MQAR {row['mqar']}  {row['bits_per_byte']:.3f} bits/byte  "
              f"{row['stream_tok_s']:,.0f} tok/s  {row['state_bytes']:,} state bytes  {row['seconds']:.0f}s",
              flush=True)

    if workers == 1:
        for label in slow_first:
            report(label, run_mechanism(label, settings, kjv))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {label: pool.submit(run_mechanism, label, settings, kjv) for label in slow_first}
            for label in slow_first:
                report(label, futures[label].result())
    rows = [done[label] for label in labels]
    settings["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "zoo.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return _render(out)


def _render(out: Path) -> int:
    """Write ``zoo.md`` and ``zoo.png`` from ``zoo.json`` in ``out``."""
    results = json.loads((out / "zoo.json").read_text())
    rows, settings = results["rows"], results["settings"]
    table = _table(rows, settings)
    (out / "zoo.md").write_text(f"# Model zoo\n\n{table}\nWall time: {settings['wall_seconds']:.0f} s "
                                f"(`titans-lnn zoo`).\n")
    _plot(rows, settings, out / "zoo.png")
    print(table)
    print(f"wrote {out / 'zoo.md'}, {out / 'zoo.json'}, {out / 'zoo.png'} ({settings['wall_seconds']:.0f} s of runs)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("zoo", help="train every mechanism (Titans, liquid, Mamba-2, BASED, LFM2, Gated "
                                          "DeltaNet, attention) at one size; MQAR, KJV bits/byte, speed, state",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=_variants, default=None,
                   help="comma-separated variants to run (default all: " + ",".join(MECHANISMS.values()) + ")")
    p.add_argument("--mqar-steps", type=_positive, default=300, help="MQAR training steps (default 300)")
    p.add_argument("--lm-steps", type=_positive, default=300, help="KJV training steps (default 300)")
    p.add_argument("--batch-size", type=_positive, default=16, help="sequences per training step (default 16)")
    p.add_argument("--mqar-train-len", type=_positive, default=64, help="MQAR training length (default 64)")
    p.add_argument("--mqar-len", type=_positive, default=128, help="MQAR evaluation length (default 128)")
    p.add_argument("--mqar-vocab", type=_positive, default=64,
                   help="MQAR token ids: keys 1..V/2-1, values V/2..V-1 (default 64; at most the model's 256)")
    p.add_argument("--mqar-samples", type=_positive, default=32, help="MQAR sequences per pair count (default 32)")
    p.add_argument("--mqar-lr", type=float, default=1e-2, help="peak learning rate on MQAR (default 1e-2)")
    p.add_argument("--lm-len", type=_positive, default=128, help="KJV training window in bytes (default 128)")
    p.add_argument("--val-rows", type=_positive, default=2, help="held-out KJV rows (default 2)")
    p.add_argument("--val-len", type=_positive, default=4096, help="bytes per held-out row (default 4096)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate on KJV (default 3e-3)")
    p.add_argument("--seed", type=_positive, default=1, help="seed of the weights and training data (default 1)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: min(2, CPU cores))")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / workers)")
    p.add_argument("--out", default="zoo-results", help="output folder (default zoo-results)")
    p.add_argument("--render", action="store_true", help="only rewrite zoo.md and zoo.png from --out's zoo.json")
    p.set_defaults(func=run)
    return p
