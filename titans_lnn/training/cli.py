"""``titans-lnn train``: the command line of ``titans_lnn.training.trainer``.

    titans-lnn train --model-preset tiny --data kjv --steps 200 --out /tmp/run_kjv
    titans-lnn train --data genome.fa.gz --segments 8 --bptt 2 --set mem_chunk=32 --out runs/dna
    titans-lnn train --config run.toml --out runs/big --resume          # continue after a stop
    torchrun --nproc_per_node 4 -m titans_lnn.cli train --distributed fsdp --config run.toml

A run's settings, later ones winning: the TrainConfig defaults; with ``--resume``, the settings saved in
the checkpoint (so ``--out DIR --resume`` alone continues a run); a TOML/YAML file (``--config``, keys
are TrainConfig fields, ``model_overrides`` a table); the flags. ``--set key=value`` overrides a model
config field (value parsed as JSON, else a string). Exit status: 0 when done (or stopped by
``--stop-at``), 2 on bad input, 128 + the signal number after SIGINT/SIGTERM (a checkpoint was saved).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
from pathlib import Path

from titans_lnn.cli import integer, number
from titans_lnn.config import PRESETS, VARIANTS

_DEFAULTS = None


def _default(name: str):
    global _DEFAULTS
    if _DEFAULTS is None:
        from titans_lnn.training.trainer import TrainConfig

        _DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                     for f in dataclasses.fields(TrainConfig)}
    return _DEFAULTS[name]


def _optional_int(lo: int):
    """An argparse type: none/auto (the default rule), or a whole number >= ``lo``."""
    whole = integer(lo)

    def parse(text: str) -> int | None:
        try:
            return None if text.lower() in ("none", "auto") else whole(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}, or auto") from None

    parse.__name__ = "integer"
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model on text or DNA (checkpoints, resume, DDP/FSDP)",
        description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", "--preset", dest="model_preset", choices=list(PRESETS),
                   help=f"model config preset (default: {_default('model_preset')})")
    g.add_argument("--variant", choices=list(VARIANTS), help="model variant (default: the preset's, mac)")
    g.add_argument("--set", dest="set", action="append", metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set d_model=192 --set mem_chunk=32 (repeatable)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"'kjv', 'ecoli-k12', 'ecoli-ec590', or a text/FASTA file or folder "
                                  f"(default: {_default('data')})")
    g.add_argument("--data-format", choices=["auto", "text", "fasta"],
                   help="how to read files: by their name (auto), as text or as FASTA (default: auto)")
    g.add_argument("--tokenizer", help="byte, nucleotide, or a Hugging Face tokenizers JSON file "
                                       "(default: the corpus' own: nucleotide for DNA, byte otherwise)")
    g.add_argument("--val-fraction", type=number(0, 1, open_lo=True, open_hi=True),
                   help=f"share of the corpus held out for evaluation (default: {_default('val_fraction')})")
    g.add_argument("--split-by", choices=["tail", "document"],
                   help="hold out the corpus' last tokens or whole documents (default: tail)")
    g.add_argument("--rc-augment", action="store_true", help="DNA: also train on the reverse complement of the "
                   "training split (both strands)")
    g = p.add_argument_group("batches and long context")
    g.add_argument("--batch-size", type=integer(1), help=f"sequences per micro-batch over all processes together "
                                                  f"(default: {_default('batch_size')})")
    g.add_argument("--seq-len", type=integer(1), help=f"tokens per segment (default: {_default('seq_len')})")
    g.add_argument("--segments", type=integer(0),
                   help="consecutive segments per document, the model state carried across them (long "
                        "context); 0: each batch row reads the corpus as one unbroken stream (default: 1)")
    g.add_argument("--bptt", type=integer(1), help="segments per backward pass: truncated backpropagation through "
                                            "the carried state, detached in between (default: 1)")
    g.add_argument("--accum", type=integer(1), help="backward passes accumulated per optimizer step (default: 1)")
    g.add_argument("--checkpoint-len", type=integer(1), help="activation checkpointing: recompute the activations "
                   "per piece of this many tokens in the backward pass (long --seq-len in bounded memory; same "
                   "gradients; default: off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=integer(1), help=f"optimizer steps in the run (default: {_default('steps')})")
    g.add_argument("--lr", type=number(0, math.inf, open_lo=True, open_hi=True),
                   help=f"peak AdamW learning rate (default: {_default('lr')})")
    g.add_argument("--min-lr-ratio", type=number(0, 1), help=f"the cosine ends at lr times this "
                                                      f"(default: {_default('min_lr_ratio')})")
    g.add_argument("--warmup", type=_optional_int(0), help="linear warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=number(0, math.inf, open_hi=True), help=f"AdamW weight decay on matrices "
                                                      f"(default: {_default('weight_decay')})")
    g.add_argument("--beta1", type=number(0, 1, open_hi=True), help=f"AdamW beta1 (default: {_default('beta1')})")
    g.add_argument("--beta2", type=number(0, 1, open_hi=True), help=f"AdamW beta2 (default: {_default('beta2')})")
    g.add_argument("--grad-clip", type=number(0, math.inf, open_hi=True),
                   help=f"clip the gradient norm to this, 0 = off (default: {_default('grad_clip')})")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=_optional_int(1),
                   help="steps between held-out evaluations, also run at the start and the end "
                        "(default: --steps / 10)")
    g.add_argument("--eval-batches", type=integer(1), help=f"consecutive held-out segments per evaluation "
                                                    f"(default: {_default('eval_batches')})")
    g.add_argument("--log-every", type=integer(1), help=f"steps between lines in metrics.jsonl "
                                                 f"(default: {_default('log_every')})")
    g.add_argument("--save-every", type=_optional_int(1),
                   help="steps between checkpoints, also saved at the end (default: --steps / 4, at most 1000)")
    g.add_argument("--keep", type=integer(1), help=f"checkpoints kept, the newest (default: {_default('keep')})")
    g.add_argument("--out", help=f"output folder for checkpoints/, metrics.jsonl and model/ "
                                 f"(default: {_default('out')})")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from the newest valid checkpoint in --out (a new run if there is none), "
                        "or from the checkpoint (folder) PATH")
    g.add_argument("--stop-at", type=integer(1), help="stop after this step with a checkpoint, as if interrupted")
    g = p.add_argument_group("runtime")
    g.add_argument("--config", dest="config_file", metavar="FILE",
                   help="a TOML or YAML file of TrainConfig fields (flags override it)")
    g.add_argument("--seed", type=integer(0), help="seed of the model init and the data order (default: 0)")
    g.add_argument("--device", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda or cuda:N "
                                    "(default: auto)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (default: auto)")
    g.add_argument("--distributed", choices=["auto", "ddp", "fsdp"],
                   help="under torchrun with several processes: DDP (auto) or FSDP2 fully_shard (default: auto)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard logs even when tensorboard is installed")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run)
    return p


def parse_set(items: list[str]) -> dict:
    """``["d_model=64", "variant=mag"]`` -> ``{"d_model": 64, "variant": "mag"}`` (JSON values, else strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set d_model=64")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def read_config_file(path: str) -> dict:
    """TrainConfig fields from a TOML (.toml) or YAML (.yaml, .yml) file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = file.read_text("utf-8")
    if file.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: invalid TOML: {e}") from None
    elif file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"--config {path}: YAML files need PyYAML: pip install pyyaml") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: invalid YAML: {e}") from None
    else:
        raise ValueError(f"--config {path}: expected a .toml, .yaml or .yml file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of TrainConfig fields, got {type(data).__name__}")
    from titans_lnn.training.trainer import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}; expected TrainConfig fields: {sorted(known)}")
    return data


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of a command line (see the module docstring for the order of precedence)."""
    from titans_lnn.training.trainer import RUN_FIELDS, TrainConfig, resolve_resume, saved_train_config

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in known}
    file = read_config_file(args.config_file) if getattr(args, "config_file", None) else {}
    base = {}
    resume = flags.get("resume", file.get("resume"))
    if resume is not None:
        out = flags.get("out", file.get("out", _default("out")))
        ckpt = resolve_resume(TrainConfig(out=out, resume=resume))
        if ckpt is not None:
            base = {k: v for k, v in saved_train_config(ckpt).items() if k not in RUN_FIELDS}
    merged = {**base, **file, **flags}
    merged["model_overrides"] = {**base.get("model_overrides", {}), **file.get("model_overrides", {}),
                                 **parse_set(getattr(args, "set", None))}
    return TrainConfig.from_dict(merged)


def run(args: argparse.Namespace) -> int:
    from titans_lnn.training.checkpoint import CheckpointError
    from titans_lnn.training.trainer import train

    try:
        cfg = config_from_args(args)
        if getattr(args, "print_config", False):
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        result = train(cfg)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, ImportError, FloatingPointError) as e:
        print(f"titans-lnn train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("titans-lnn train: interrupted twice; stopped without a checkpoint of the current step",
              file=sys.stderr)
        return 128 + signal.SIGINT
    if result.stopped in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[result.stopped].value
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result.evals:
        last = result.evals[-1]
        name = next((k for k in ("val_bpb", "val_bits_per_base") if k in last), "val_bits_per_token")
        print(f"titans-lnn train: step {result.step}; held-out loss {last['val_loss']:.4f}, {name[4:]} "
              f"{last[name]:.4f}; {result.tokens_per_s:,.0f} tokens/s")
    if result.model_dir is not None:
        print(f"titans-lnn train: model saved to {result.model_dir} (TitansLNN.from_pretrained)")
    return 0
