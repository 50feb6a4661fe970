"""One ablation of the main job's hybrid: train it with changed settings, report filler writes and accuracy.

    python benchmarks/niah_ablation.py                                        # the main job's recipe
    python benchmarks/niah_ablation.py --set mem_write_threshold=0 --train threshold_from=0.5
    python benchmarks/niah_ablation.py --train penalize=written --train write_penalty=0.3 --save /tmp/old
    python benchmarks/niah_ablation.py --load /tmp/old --lengths 4096 --readout 16k,256k,1m --silence 0 --silence 1
    python benchmarks/niah_ablation.py --load /tmp/old --lengths 4096 --readout 4k,256k --eval-threshold 0.2
    python benchmarks/niah_ablation.py --train penalty_margin=0.05 --lengths 1024,4096 --samples 30 --json /tmp/m.json
    python benchmarks/niah_ablation.py --task niah_single_2 --init /tmp/niah-h1/hybrid/model --steps 400
    python benchmarks/niah_ablation.py --task babilong_qa1 --steps 700 --lengths 1024,16384 --samples 20 \
        --set conv_kernel=8 --train 'fillers=[["none", 0.25], ["noise", 0.55]]'
    python benchmarks/niah_ablation.py --task babilong_qa1 --load niah-results/hybrid/model --lengths 1024 --binding

It trains the MAL hybrid of ``titans-lnn niah`` (``NIAH_MODEL``, the task recipe's ``model`` fields, then the
``--set`` overrides) for
``--steps`` steps on ``--task`` with ``train_passkey`` (``NIAH_TRAIN``, then the task's recipe
``TASK_RECIPES``, then the ``--train`` overrides), on one thread, from scratch or from the weights
of ``--init`` (a warm start), or loads a saved one with ``--load``; then prints the training loss,
the fraction of haystack tokens each memory layer writes (theta > 1e-6, over 3,000 tokens of the
task's haystack), and the task's accuracy on ``--samples`` fresh prompts per length (depths 5%..95%,
evaluation seeds of the main job: every run scores the same prompts) with a 95% Wilson interval and
its misses by kind (one wrong digit, the key's digits in another order, other; ``--json`` keeps every
answer). ``--binding`` (qa1) adds, per memory, how well its read query picks the asked person's facts
(:func:`~titans_lnn.evals.niah_tasks.qa1_binding`). ``--readout`` adds the needle's -log p(answer) after
that much haystack (``needle_readout`` for the pass key, ``task_readout`` for the others),
once as trained and once per ``--silence`` layer (that memory writes nothing on the filler: the
layer whose silence keeps the key is the one that stores it). ``--eval-threshold`` sets every
memory's write threshold for the evaluation only (above or below the trained one). The closing
notes of the capability issue list the runs made with it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.cli import plain
from titans_lnn.evals.niah import _parse_lengths, eval_seed, needle_readout, spread_depths
from titans_lnn.evals.niah_tasks import TASK_RECIPES, qa1_binding, recipe_for, task_readout
from titans_lnn.evals.niah_train import NIAH_MODEL, NIAH_TRAIN, memory_modules, train_passkey
from titans_lnn.evals.runner import evaluate_samples
from titans_lnn.evals.scoring import wilson_interval
from titans_lnn.evals.tasks import TASKS, make_sample
from titans_lnn.tokenizers import ByteTokenizer


def _pair(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def miss_kind(expected: str, got: str) -> str:
    """How a greedy answer ``got`` misses the key ``expected``: "none" (it starts with the key), "one
    digit" (its first len(key) characters are digits and differ from the key in one place), "order" (the
    key's digits in another order), "other"."""
    head = got.strip()[:len(expected)]
    if head == expected:
        return "none"
    if not (len(head) == len(expected) and head.isdigit()):
        return "other"
    if sum(a != b for a, b in zip(head, expected)) == 1:
        return "one digit"
    if sorted(head) == sorted(expected):
        return "order"
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", type=_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the main job's model config (repeatable)")
    p.add_argument("--train", type=_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="override a keyword of train_passkey, e.g. write_penalty=0.1 (repeatable)")
    p.add_argument("--task", default="passkey", choices=sorted(TASKS), help="the task trained and scored (default "
                   "passkey; the others train with their recipe's lengths, TASK_RECIPES in evals/niah_tasks.py)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start training from this saved model's weights (a warm start; --set is then ignored)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--lengths", default="4096,16384,65536", help="comma-separated prompt lengths (default 4K,16K,64K)")
    p.add_argument("--samples", type=int, default=8, help="prompts per length (default 8)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--load", default=None, metavar="DIR", help="evaluate this saved model instead of training one")
    p.add_argument("--readout", type=_parse_lengths, default=[], metavar="N,N,...",
                   help="filler lengths after the needle for needle_readout, e.g. 16k,256k,1m (default: none)")
    p.add_argument("--silence", type=int, action="append", default=[], metavar="LAYER",
                   help="also read out with this memory layer (0-based) writing nothing on the filler (repeatable)")
    p.add_argument("--eval-threshold", type=float, default=None, metavar="X",
                   help="every memory's write threshold during the evaluation (fraction of max_lr, in [0, 1))")
    p.add_argument("--binding", action="store_true",
                   help="babilong_qa1: per memory, the read query's cosine with the asked person's fact keys vs the "
                        "others' (qa1_binding, 40 stories without KJV)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write every evaluated sample (expected, got, miss kind) and the loss curve there")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="save the trained model there (for titans-lnn niah --reuse or evaluation-time ablations)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.binding and args.task != "babilong_qa1":
        p.error(f"argument --binding: measures babilong_qa1's binding, not {args.task!r}'s: use --task babilong_qa1")
    if args.eval_threshold is not None and not 0 <= args.eval_threshold < 1:
        p.error(f"argument --eval-threshold: {args.eval_threshold} is outside [0, 1): expected a fraction of max_lr")
    losses = []
    if args.load:
        model = TitansLNN.from_pretrained(args.load)
        print(f"loaded {args.load}")
    else:
        torch.manual_seed(args.seed)
        if args.init:
            model = TitansLNN.from_pretrained(args.init)
            print(f"warm start from {args.init}")
        else:
            model = TitansLNN(TitansLNNConfig(variant="mal", **{**NIAH_MODEL, **recipe_for(args.task).model,
                                                                **dict(args.set)}))
        t0 = time.perf_counter()
        recipe = TASK_RECIPES[args.task].train if args.task in TASK_RECIPES else {}
        train = {**NIAH_TRAIN, **recipe, **dict(args.train)}
        losses = train_passkey(model, args.steps, task=args.task, seed=args.seed, progress=False, **train)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s: loss {losses[0]:.2f} -> "
              f"{sum(losses[-20:]) / 20:.3f} (mean of the last 20)")
        if args.save:
            model.save_pretrained(args.save)
    if args.eval_threshold is not None:
        for m in memory_modules(model):
            m.write_threshold = args.eval_threshold
    model.eval()
    tok = ByteTokenizer()
    sample = make_sample(args.task, 8192, None if args.task.startswith("babilong_") else 0.99, seed=1)
    filler = sample.prompt.encode()[slice(*sample.meta["haystack_span"])][:3000]
    with torch.no_grad():
        model(torch.tensor([list(filler)], dtype=torch.long))
    written = [f"{(m.last_theta > 1e-6).float().mean().item():.3f}" for m in memory_modules(model)]
    print(f"filler tokens written per memory layer (the task's haystack): {written}")
    budget = recipe_for(args.task).max_new_tokens
    report = {"losses": losses, "records": []}
    for j, n in enumerate(int(x) for x in args.lengths.split(",")):
        depths = spread_depths(args.samples)
        if args.task.startswith("babilong_"):
            depths = [None] * len(depths)
        samples = [make_sample(args.task, n, d, eval_seed(0, j, i)) for i, d in enumerate(depths)]
        records = evaluate_samples(model, tok, samples, max_new_tokens=budget)
        for r in records:
            r["miss"] = miss_kind(r["expected"], r["got"])
        kinds = Counter(r["miss"] for r in records if not r["correct"])
        lo, hi = wilson_interval(sum(r["correct"] for r in records), len(records))
        print(f"{n} tokens: {sum(r['correct'] for r in records)}/{len(records)} correct [{lo:.2f}, {hi:.2f}]; "
              f"misses: {dict(kinds) or 'none'}", flush=True)
        report["records"].extend(records)
    if args.binding:
        report["binding"] = qa1_binding(model)
        print("binding, cos(query, key) asked person / others per memory layer: " + "; ".join(
            f"{d['same']:.2f} / {d['other']:.2f}" for d in report["binding"]["layers"]))
    silences = [()] + [(i,) for i in args.silence]  # as trained, then each layer silent on the filler
    if args.readout and args.task != "passkey":
        d = task_readout(model, args.task, args.readout)
        nats = ", ".join(f"{n}: {-x:.2f}" for n, x in zip(d["distances"], d["logp_answer"]))
        print(f"-log p(answer) after haystack (chance {d['chance_nats']}): {nats}; written {d['filler_written']}")
        silences = []
    for silence in silences if args.readout else []:
        d = needle_readout(model, args.readout, silence=silence)
        nats = ", ".join(f"{n}: {-x:.2f}" for n, x in zip(d["distances"], d["logp_key"]))
        print(f"-log p(key) after filler ({'as trained' if not silence else f'layer {silence[0]} silent'}): {nats}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
