"""Transformer²-style self-adaptation: singular-value (SVF) experts chosen at test time.

    titans-lnn adapt demo --out adapt-demo                      base LM + 3 experts + dispatch + LoRA table
    titans-lnn adapt train --model DIR --task dna --out dna.safetensors [--steps 60] [--objective ce|pg]
    titans-lnn adapt show dna.safetensors [--model DIR]          an expert's metadata (and whether it fits DIR)

An expert is one vector z per decomposed layer (default: every block's MLP) rescaling its singular
values, W' = U diag(s z) V^T; see titans_lnn/adapt/svf.py.
"""

from __future__ import annotations

import argparse
import sys

from titans_lnn.cli import integer, number


def _demo(args: argparse.Namespace) -> int:
    import torch

    from titans_lnn.adapt.demo import run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    command = (f"titans-lnn adapt demo --out {args.out}" + (f" --base {args.base}" if args.base else
                                                           f" --base-steps {args.base_steps}") +
               f" --expert-steps {args.expert_steps} --eval-rows {args.eval_rows} --batch-size {args.batch_size} "
               f"--seed {args.seed}" + (f" --threads {args.threads}" if args.threads else ""))
    table = run_demo(args.out, base=args.base, base_steps=args.base_steps, expert_steps=args.expert_steps,
                     n_eval=args.eval_rows, batch_size=args.batch_size, seed=args.seed, command=command)
    print(table)
    print(f"written: {args.out}/table.md, {args.out}/experts/*.safetensors")
    return 0


def _load_model(path: str):
    from titans_lnn.model import TitansLNN

    try:
        return TitansLNN.from_pretrained(path).eval()
    except (FileNotFoundError, ValueError) as e:
        print(f"titans-lnn adapt: cannot load --model {path}: {e}", file=sys.stderr)
        return None


def _train(args: argparse.Namespace) -> int:
    from titans_lnn.adapt.svf import SVF
    from titans_lnn.adapt.tasks import make_task, score_rows
    from titans_lnn.adapt.train import train_svf

    model = _load_model(args.model)
    if model is None:
        return 2
    if model.config.vocab_size < 256:
        print(f"titans-lnn adapt train: --model {args.model} has vocab_size={model.config.vocab_size}: the tasks "
              f"are byte-level, expected a model with vocab_size >= 256", file=sys.stderr)
        return 2
    try:
        svf = SVF(model, tuple(args.targets))
    except ValueError as e:
        print(f"titans-lnn adapt train: --targets: {e}", file=sys.stderr)
        return 2
    task = make_task(args.task, batch_size=args.batch_size, n_eval=args.eval_rows, seed=args.seed)
    before = score_rows(model, task.eval_rows, task.metrics)

    def log(step: int, loss: float) -> None:
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss:.4f}")

    expert = train_svf(svf, task.batch, args.steps, name=args.name or args.task, lr=args.lr,
                       objective=args.objective, kl_coef=args.kl, seed=args.seed, on_step=log, task=args.task)
    with svf.applied(expert):
        after = score_rows(model, task.eval_rows, task.metrics)
    expert.save(args.out)
    for metric in task.metrics:
        print(f"{args.task} {metric}: base {before[metric]:.4f} -> expert {after[metric]:.4f} "
              f"({args.eval_rows} held-out rows)")
    print(f"{expert.num_parameters()} parameters written to {args.out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from titans_lnn.adapt.svf import SVF, Expert

    try:
        expert = Expert.load(args.expert)
    except (FileNotFoundError, ValueError) as e:
        print(f"titans-lnn adapt show: {e}", file=sys.stderr)
        return 2
    print(f"expert {expert.name!r}: {len(expert.z)} layers, {expert.num_parameters()} parameters, targets "
          f"{', '.join(expert.targets)}")
    print(f"made for: config fingerprint {expert.fingerprint}, weights digest {expert.weights_digest}")
    for key, value in sorted(expert.meta.items()):
        print(f"  {key}: {value}")
    for name, z in expert.z.items():
        print(f"  z[{name}]: ({z.numel()},) min {z.min():.3f} mean {z.mean():.3f} max {z.max():.3f}")
    if args.model:
        model = _load_model(args.model)
        if model is None:
            return 2
        try:
            SVF(model, expert.targets).check_expert(expert)
        except ValueError as e:
            print(f"does not fit {args.model}: {e}", file=sys.stderr)
            return 1
        print(f"fits {args.model}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from titans_lnn.adapt.svf import DEFAULT_TARGETS
    from titans_lnn.adapt.tasks import TASKS

    p = subparsers.add_parser("adapt", help="Transformer²-style SVF experts: train, dispatch, demonstration",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="adapt_command", required=True)

    d = sub.add_parser("demo", help="base LM, an SVF expert and a LoRA per task, dispatch, one markdown table")
    d.add_argument("--out", default="adapt-demo", help="folder for the base model, experts and table.md "
                                                       "(default: adapt-demo)")
    d.add_argument("--base", metavar="DIR", help="a save_pretrained byte-level model instead of training one")
    d.add_argument("--base-steps", type=integer(1), default=300, help="base training steps on KJV (default: 300)")
    d.add_argument("--expert-steps", type=integer(1), default=60, help="training steps of each expert and LoRA "
                                                                       "(default: 60)")
    d.add_argument("--eval-rows", type=integer(1), default=64, help="held-out rows per task (default: 64)")
    d.add_argument("--batch-size", type=integer(1), default=8, help="training batch size (default: 8)")
    d.add_argument("--threads", type=integer(1), default=None, help="torch threads (default: torch's choice)")
    d.add_argument("--seed", type=integer(0), default=0, help="random seed (default: 0)")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train one SVF expert on a built-in task and save it as safetensors")
    t.add_argument("--model", required=True, metavar="DIR", help="a save_pretrained folder (byte-level model)")
    t.add_argument("--task", required=True, choices=TASKS, help="the task to specialise on")
    t.add_argument("--out", required=True, help="the expert file to write (.safetensors)")
    t.add_argument("--name", help="the expert's name (default: the task)")
    t.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help=f"linear layers (names or suffixes) to decompose (default: {' '.join(DEFAULT_TARGETS)})")
    t.add_argument("--steps", type=integer(1), default=60, help="training steps (default: 60)")
    t.add_argument("--lr", type=number(0, 10, open_lo=True), default=2e-2, help="Adam learning rate (default: 0.02)")
    t.add_argument("--objective", choices=["ce", "pg"], default="ce",
                   help="ce: cross-entropy; pg: the paper's policy gradient, per token (default: ce)")
    t.add_argument("--kl", type=number(0, 100), default=0.0, help="KL penalty to the base model for pg (default: 0)")
    t.add_argument("--batch-size", type=integer(1), default=8, help="batch size (default: 8)")
    t.add_argument("--eval-rows", type=integer(1), default=32, help="held-out rows scored before/after (default: 32)")
    t.add_argument("--seed", type=integer(0), default=0, help="random seed (default: 0)")
    t.set_defaults(func=_train)

    s = sub.add_parser("show", help="print an expert's metadata; with --model, whether it fits that model")
    s.add_argument("expert", help="an expert file written by Expert.save / adapt train")
    s.add_argument("--model", metavar="DIR", help="a save_pretrained folder to check the expert against")
    s.set_defaults(func=_show)
    return p
