"""The main job: needle-in-a-haystack retrieval far beyond the attention window, on a CPU.

    titans-lnn niah                                   # train both models, evaluate 1K..1M, report
    titans-lnn niah --lengths 1k,4k,16k --steps 100   # a quicker run
    titans-lnn niah --task niah_single_2 --lengths 4k,16k,64k   # RULER single needle in the KJV
    titans-lnn niah --task babilong_qa1                         # BABILong qa1 (its recipe: evals/niah_tasks.py)
    titans-lnn niah --reuse                           # evaluate models an earlier run saved in --out

It trains (or, with ``--reuse``, loads) two models of the same size on the task at short lengths,
always longer than the attention window (260-450 tokens, then 1-2K for the last 30% of the steps):
a Titans hybrid (``--variant``, MAL by default: the neural memory feeds the residual stream ahead
of sliding-window attention, with the liquid core) and the sliding-window-only baseline, in two
processes at once; each model is evaluated as soon as it is trained. For every length, ``--samples``
prompts (each its own seed and key, never a training seed; needle depths spread evenly over
5%..95%) are streamed together as one batch through the fixed-size state and answered greedily.
For the hybrid, a diagnostic stream writes how much of the filler the memory wrote and how well the
needle still reads out after 1K..1M tokens of filler. ``--steps``, ``--lengths`` and ``--samples``
default to the task's recipe (``TASK_RECIPES`` in ``niah_tasks.py``; the pass key's: 1000 steps, 1K..1M,
10 samples), which also sets its training lengths, answer budget and warm start: a task whose recipe
has one (``--warm-start``) trains both models on the pass key first, by the pass key's own recipe, and a
task whose recipe has a finishing stage trains both models for its steps after ``--steps``.

Outputs in ``--out`` (default ``niah-results/``): ``summary.md`` (accuracy per length with n and
a 95% Wilson interval, diagnostics, wall time), ``summary.json``, and per model ``model/``,
``results.json`` (every sample), ``results.md``, ``heatmap.png`` (depth x length); the hybrid's
``readout.png`` and ``diagnostics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from titans_lnn.cli import integer
from titans_lnn.evals.niah_tasks import (
    finish_steps_for,
    readout_figure,
    readout_job,
    readout_md,
    recipe_for,
    train_task,
)
from titans_lnn.evals.niah_train import (
    NIAH_MODEL,
    NIAH_STEPS,
    TRAIN_SEED_BASE,
    memory_modules,
    niah_config,
    passkey_batch,
    task_batch,
    train_passkey,
)
from titans_lnn.evals.report import format_length, write_report
from titans_lnn.evals.runner import evaluate_samples
from titans_lnn.evals.scoring import wilson_interval
from titans_lnn.evals.tasks import TASKS, make_sample
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import ByteTokenizer

__all__ = ["NIAH_MODEL", "eval_seed", "needle_readout", "niah_config", "passkey_batch", "run", "task_batch",
           "train_passkey"]


def _parse_lengths(text: str) -> list[int]:
    """``--lengths``: comma-separated token counts, k = 1024, m = 1024^2, each >= 64."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(part[-1:], 1)
        try:
            value = int(float(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"length {part!r} is not a number: expected e.g. 4096, 16k, 1m") from None
        if value < 64:
            raise argparse.ArgumentTypeError(f"length {part!r} is too short: expected >= 64 tokens")
        out.append(value)
    if len(out) > MAX_LENGTHS:
        raise argparse.ArgumentTypeError(f"{len(out)} lengths given: expected at most {MAX_LENGTHS}")
    return out


def _parse_depths(text: str) -> list[float]:
    """``--depths``: comma-separated needle depths, each a number in [0, 1]."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"depth {part.strip()!r} is not a number: expected e.g. 0.1,0.5,0.9") \
                from None
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"depth {part.strip()!r} is outside [0, 1]: expected e.g. 0.1,0.5,0.9")
        out.append(value)
    if len(out) > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"{len(out)} depths given: expected at most {MAX_SAMPLES}")
    return out




# Bounds of the evaluation seeds' layout (eval_seed): below 1000 samples and lengths, seeds up to MAX_SEED.
MAX_SAMPLES = MAX_LENGTHS = 1_000
MAX_SEED = (TRAIN_SEED_BASE - 1_000_000) // 1_000_000


def eval_seed(seed: int, length_index: int, sample: int) -> int:
    """The evaluation prompt's seed: distinct for every (run seed, length, sample), below TRAIN_SEED_BASE."""
    value = seed * 1_000_000 + length_index * 1_000 + sample
    if not 0 <= sample < 1_000 or not 0 <= value < TRAIN_SEED_BASE:
        raise ValueError(f"eval_seed({seed}, {length_index}, {sample}) = {value} is outside [0, {TRAIN_SEED_BASE}): "
                         "use a smaller --seed or fewer than 1000 samples")
    return value


def spread_depths(samples: int) -> list[float]:
    """``samples`` needle depths spread evenly over 5%..95% (0.5 for one sample)."""
    if samples == 1:
        return [0.5]
    return [round(0.05 + 0.9 * i / (samples - 1), 4) for i in range(samples)]


# ----------------------------------------------------------------------------- jobs (one process each)


def _train_job(name: str, variant: str, task: str, steps: int, warm_start: int, seed: int, threads: int,
               model_dir: str, match: str, progress, finish_steps: int | None = None) -> dict:
    """One model's training: returns its metadata (the model goes to ``model_dir``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = TitansLNN(niah_config(variant, match, recipe_for(task).model))
    t0 = time.perf_counter()
    report = (lambda step: progress.__setitem__(name, step)) if progress is not None else None
    finish_steps = finish_steps_for(task, finish_steps)
    losses = train_task(model, task, steps, warm_start=warm_start, finish_steps=finish_steps, seed=seed,
                        on_step=report)
    model.save_pretrained(model_dir)
    return {"variant": variant, "task": task, "parameters": model.num_parameters(), "steps": steps,
            "warm_start_steps": warm_start, "finish_steps": finish_steps,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "train_loss_first": losses[0], "train_loss_last20": sum(losses[-20:]) / len(losses[-20:])}


def _eval_job(model_dir: str, task: str, length: int, length_index: int, depths: list[float | None],
              indices: list[int], seed: int, chunk_len: int, threads: int) -> list[dict]:
    """Samples ``indices`` of one (model, length) cell, streamed together as one batch."""
    torch.set_num_threads(threads)
    model = TitansLNN.from_pretrained(model_dir).eval()
    seeds = [eval_seed(seed, length_index, i) for i in indices]
    samples = [make_sample(task, length, depths[i], s) for i, s in zip(indices, seeds)]
    records = evaluate_samples(model, ByteTokenizer(), samples, chunk_len=chunk_len,
                               max_new_tokens=recipe_for(task).max_new_tokens)
    for rec, i, s in zip(records, indices, seeds):
        rec.update(sample=i, seed=s, depth=depths[i])
    return records


@torch.no_grad()
def needle_readout(model: TitansLNN, distances: list[int], *, seed: int = 0, chunk_len: int = 4096,
                   silence: tuple[int, ...] = ()) -> dict:
    """The passkey needle's read-out strength against the filler read after it, and how much filler
    the memory wrote. Streams header + needle, then the noise filler; at each distance, a branch of
    the state is asked the question and scored: log p(key | question) (teacher-forced, nats) and
    the greedy answer. Also counts, per memory layer, the filler tokens written with theta > 1e-6.
    ``silence``: memory layers (0-based) that write nothing on the filler (an ablation: the layer
    whose silence keeps the key is the one that stores it)."""
    from titans_lnn.evals.haystack import NOISE_SENTENCES
    from titans_lnn.evals.needles import PASSKEY_HEADER, PASSKEY_NEEDLE, PASSKEY_QUESTION

    key = str(random.Random(f"readout/{seed}").randint(10000, 99999))
    tok = ByteTokenizer()
    def ids(text: str) -> torch.Tensor:
        return torch.tensor([list(tok.encode(text))], dtype=torch.long)  # (1, T)

    state = model(ids(PASSKEY_HEADER + "\n" + PASSKEY_NEEDLE.format(key=key)), state=model.init_state(1)).state
    filler = " " + " ".join(NOISE_SENTENCES)
    memories = memory_modules(model)
    if not all(0 <= i < len(memories) for i in silence):
        raise ValueError(f"needle_readout: silence={silence!r} is invalid: expected memory layers in "
                         f"0..{len(memories) - 1}")
    thresholds = [m.write_threshold for m in memories]
    written, seen = [0] * len(memories), 0
    out = {"key": key, "distances": [], "logp_key": [], "correct": [], "filler_written": []}
    for target in sorted(distances):
        while seen < target:
            n = min(chunk_len, target - seen)
            text = (filler * (n // len(filler) + 2))[(seen % len(filler)):(seen % len(filler)) + n]
            for i in silence:
                memories[i].write_threshold = math.inf  # every write skipped
            try:
                state = model(ids(text), state=state).state
            finally:
                for m, threshold in zip(memories, thresholds):
                    m.write_threshold = threshold
            for i, m in enumerate(memories):
                written[i] += int((m.last_theta > 1e-6).sum()) // m.heads
            seen += n
        question = ids("\n" + PASSKEY_QUESTION + " " + key)
        logits = model(question, state=state).logits[0]  # (L, V)
        k = len(key)
        logp = torch.log_softmax(logits[-k - 1:-1].float(), -1).gather(-1, question[0, -k:, None]).sum().item()
        out["distances"].append(target)
        out["logp_key"].append(round(logp, 4))
        out["correct"].append(bool((logits[-k - 1:-1].argmax(-1) == question[0, -k:]).all()))
        out["filler_written"].append([round(w / seen, 6) for w in written])
    return out


def _readout_job(model_dir: str, distances: list[int], seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    return needle_readout(TitansLNN.from_pretrained(model_dir).eval(), distances, seed=seed)


def _readout_figure(result: dict, path: Path) -> None:
    """The pass key's read-out plot (``needle_readout``'s result): -log p(key) against the filler read."""
    readout_figure({"distances": result["distances"], "logp_answer": result["logp_key"],
                    "chance_nats": 5 * math.log(10)}, path, answer="key", haystack="filler",
                   chance_label="uniform digits", title="Needle read-out vs distance (hybrid)")


# ----------------------------------------------------------------------------- report


def summary_table(results: dict[str, list[dict]], window: int, task: str) -> str:
    """Accuracy per (model, length): mean, n and the 95% Wilson interval."""
    lengths = sorted({r["length"] for recs in results.values() for r in recs})
    lines = [f"{task} accuracy by prompt length (attention window {window}); each cell: accuracy, "
             "[95% Wilson interval], n", "",
             "| model | " + " | ".join(format_length(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, recs in results.items():
        cells = []
        for n in lengths:
            hit = [r["score"] for r in recs if r["length"] == n]
            if not hit:
                cells.append("-")
                continue
            lo, hi = wilson_interval(sum(hit), len(hit))
            cells.append(f"{sum(hit) / len(hit):.2f} [{lo:.2f}, {hi:.2f}] n={len(hit)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _diagnostics_md(d: dict) -> str:
    lines = ["", "Hybrid diagnostics (one needle, then the noise filler; `needle_readout`):", "",
             "| filler after the needle | " + " | ".join(format_length(n) for n in d["distances"]) + " |",
             "|---|" + "---|" * len(d["distances"]),
             "| -log p(key) (nats; chance 11.5) | " + " | ".join(f"{-x:.2f}" for x in d["logp_key"]) + " |",
             "| greedy answer correct | " + " | ".join("yes" if c else "no" for c in d["correct"]) + " |",
             "| filler tokens written (theta > 1e-6), per memory layer | "
             + " | ".join("/".join(f"{x:.4f}" for x in w) for w in d["filler_written"]) + " |"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command


def _pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def run(args: argparse.Namespace) -> int:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, wait

    from tqdm import tqdm

    workers = args.workers or min(2, os.cpu_count() or 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    recipe = recipe_for(args.task)  # defaults of the flags left unset
    args.steps = args.steps or recipe.steps
    args.lengths = args.lengths or list(recipe.lengths)
    args.samples = args.samples or recipe.samples
    args.warm_start = recipe.warm_start if args.warm_start is None else args.warm_start
    try:  # fail now, not after training
        args.finish_steps = finish_steps_for(args.task, args.finish_steps)
    except ValueError as e:
        print(f"titans-lnn niah: error: --finish-steps {args.finish_steps}: {e}", file=sys.stderr)
        return 2
    depths = args.depths if args.depths else spread_depths(args.samples)
    if args.task.startswith("babilong_"):
        depths = [None] * len(depths)
    for j in range(len(args.lengths)):  # fail now, not after training
        eval_seed(args.seed, j, len(depths) - 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = {"hybrid": args.variant, "baseline": "swa"}
    dirs = {name: out / name / "model" for name in models}
    summary_path = out / "summary.json"
    old_meta = json.loads(summary_path.read_text()).get("meta", {}) if summary_path.exists() else {}
    meta: dict[str, dict] = {}
    records: dict[str, list[dict]] = {name: [] for name in models}
    diagnostics = None
    by_length = sorted(enumerate(args.lengths), key=lambda jn: -jn[1])  # longest first: the two processes stay busy
    manager = multiprocessing.Manager()
    progress = manager.dict()
    with _pool(workers) as pool:
        jobs = {}

        # A cell's samples in two batches, so that the longest cell does not keep one process busy alone.
        parts = 2 if len(depths) >= 4 else 1
        halves = [list(range(len(depths)))[h::parts] for h in range(parts)]

        def submit_evals(name: str) -> None:
            for j, n in by_length:
                for part in halves:
                    jobs[pool.submit(_eval_job, str(dirs[name]), args.task, n, j, depths, part, args.seed,
                                     args.chunk_len, threads)] = ("eval", name, n * len(part))
            if name == "hybrid" and args.task == "passkey" and not args.no_diagnostics:
                jobs[pool.submit(_readout_job, str(dirs[name]), sorted(args.lengths), args.seed, threads)] = (
                    "readout", name, 0)
            elif name == "hybrid" and not args.no_diagnostics:
                jobs[pool.submit(readout_job, str(dirs[name]), args.task, sorted(args.lengths), args.seed,
                                 threads)] = ("readout", name, 0)

        training = []
        for name, variant in models.items():
            if args.reuse and (dirs[name] / "config.json").exists():
                print(f"{name}: loaded {dirs[name]}")
                meta[name] = old_meta.get(name, {"variant": variant})
                submit_evals(name)
            else:
                jobs[pool.submit(_train_job, name, variant, args.task, args.steps, args.warm_start, args.seed, threads,
                                 str(dirs[name]), args.variant, progress, args.finish_steps)] = ("train", name, 0)
                training.append(name)
        if training:
            warm = f" after {args.warm_start} pass-key steps" if args.warm_start else ""
            finish = f", then {args.finish_steps} finishing steps" if args.finish_steps else ""
            print(f"training {', '.join(f'{n} ({models[n]})' for n in training)} on {args.task}: {args.steps} steps "
                  f"each{warm}{finish}, {workers} processes x {threads} threads; each model is evaluated when it "
                  "is trained")
        train_bar = tqdm(total=(args.warm_start + args.steps + args.finish_steps) * len(training), desc="train",
                         unit="step",
                         disable=args.no_progress or not training)
        eval_total = sum(args.lengths) * len(depths) * len(models)
        eval_bar = tqdm(total=eval_total, desc="evaluate", unit="tok", unit_scale=True, disable=args.no_progress)
        while jobs:
            done, _ = wait(list(jobs), timeout=1.0, return_when=FIRST_COMPLETED)
            train_bar.n = sum(progress.get(name, 0) for name in training)
            train_bar.refresh()
            for fut in done:
                kind, name, n = jobs.pop(fut)
                if kind == "train":
                    meta[name] = m = fut.result()
                    tqdm.write(f"{name}: {m['parameters']:,} parameters, loss {m['train_loss_first']:.2f} -> "
                               f"{m['train_loss_last20']:.3f} in {m['train_seconds']:.0f} s")
                    submit_evals(name)
                elif kind == "eval":
                    records[name].extend(fut.result())
                    eval_bar.update(n)
                else:
                    diagnostics = fut.result()
        train_bar.close()
        eval_bar.close()
    manager.shutdown()
    results = {}
    for name, variant in models.items():
        recs = sorted(records[name], key=lambda r: (r["length"], r["sample"]))
        write_report(recs, out / name, title=f"{args.task}, {name} ({variant})", meta=meta.get(name))
        results[f"{name} ({variant})"] = recs
    summary = summary_table(results, NIAH_MODEL["window"], args.task)
    if diagnostics is not None:
        passkey = args.task == "passkey"
        summary += _diagnostics_md(diagnostics) if passkey else readout_md(diagnostics)
        (out / "hybrid" / "diagnostics.json").write_text(json.dumps(diagnostics, indent=1) + "\n")
        (_readout_figure if passkey else readout_figure)(diagnostics, out / "hybrid" / "readout.png")
    wall = time.perf_counter() - t0
    summary += (f"\nWall time {wall / 60:.1f} min ({workers} processes x {threads} threads, {os.cpu_count()} cores); "
                f"{len(depths)} samples per length, "
                f"{'facts at seeded random depths' if depths[0] is None else f'depths {depths}'}, evaluation seeds "
                f"{args.seed} * 10^6 + 1000 * length index + sample (training seeds >= 2^31).\n")
    if args.task != "passkey":
        warm = f", after {args.warm_start} steps of the pass key's recipe" if args.warm_start else ""
        model = f"; model fields {recipe.model} (replacing the preset's)" if recipe.model else ""
        finish = (f"; then a finishing stage {({**recipe.finish, 'steps': args.finish_steps})}"
                  if args.finish_steps else "")
        summary += (f"\nRecipe of {args.task} (evals/niah_tasks.py): {recipe.note}; training {recipe.train}{warm}"
                    f"{finish}{model}.\n")
    (out / "summary.md").write_text(summary)
    summary_path.write_text(json.dumps({"meta": meta, "wall_s": wall, "model": {**NIAH_MODEL, **recipe.model},
                                        "task": args.task},
                                       indent=2))
    print(summary)
    print(f"outputs: {out.resolve()} (summary.md, hybrid/ and baseline/ with results.json, results.md, heatmap.png)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("niah", help="the main job: train a hybrid and a window-only baseline on needle "
                                           "retrieval, evaluate both up to 1M tokens", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="passkey", choices=sorted(TASKS),
                   help="the needle task to train and evaluate (default passkey)")
    p.add_argument("--variant", default="mal", choices=("mac", "mag", "mal", "lmm"),
                   help="the hybrid's variant (default mal)")
    p.add_argument("--steps", type=integer(1), default=None,
                   help=f"training steps per model (default: the task's recipe; passkey {NIAH_STEPS})")
    p.add_argument("--warm-start", type=integer(0), default=None, metavar="STEPS",
                   help="pass-key steps (its own recipe) before the task's (default: the task's recipe; "
                        "niah_single_2 starts from the pass key)")
    p.add_argument("--finish-steps", type=integer(0), default=None, metavar="STEPS",
                   help="steps of the recipe's finishing stage after the task's (default: the task's recipe; "
                        "babilong_qa1 300; 0 skips it)")
    p.add_argument("--lengths", type=_parse_lengths, default=None,
                   help="comma-separated prompt lengths in tokens (bytes), k = 1024, m = 1024^2 (default: the "
                        "task's recipe; passkey 1k,4k,16k,64k,256k,1m)")
    p.add_argument("--samples", type=integer(1, MAX_SAMPLES), default=None,
                   help="prompts per length, each its own key, depths spread over 5%%..95%% (default: the task's "
                        "recipe, 10)")
    p.add_argument("--depths", type=_parse_depths, default=None,
                   help="comma-separated needle depths in [0, 1], one sample each (default: spread, see --samples)")
    p.add_argument("--chunk-len", type=integer(1), default=4096, help="tokens per streamed piece (default 4096)")
    p.add_argument("--seed", type=integer(0, MAX_SEED, "evaluation seeds stay below 2^31"), default=0,
                   help=f"random seed of training and of the evaluation prompts, 0..{MAX_SEED} (default 0)")
    p.add_argument("--workers", type=integer(0), default=0, help="processes (default: min(2, CPU cores))")
    p.add_argument("--threads", type=integer(0), default=0,
                   help="torch threads per process (default: cores / workers)")
    p.add_argument("--out", default="niah-results", help="output folder (default niah-results)")
    p.add_argument("--reuse", action="store_true", help="load the models an earlier run saved in --out")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the hybrid's read-out-vs-distance stream")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p
