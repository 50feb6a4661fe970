"""The self-adaptation demonstration: a base byte LM, one SVF expert per task, dispatch, a LoRA baseline.

    titans-lnn adapt demo --out adapt-demo        # ~15 min on 2 CPU cores; writes adapt-demo/table.md

1. A base model (config preset "niah", variant mac: ~185K parameters) learns the King James Bible
   (byte level) for ``base_steps`` steps, or is loaded with ``--base DIR``.
2. One SVF expert per task (passkey retrieval, E. coli DNA, bAbI-style QA "babilong_qa1") is trained
   with cross-entropy for ``expert_steps`` steps; a rank-1 LoRA on the same layers likewise (the
   smallest LoRA there is, still ~3x the parameters of an SVF expert).
3. Dispatch on a held-out mix of the three tasks' prompts: prompt-based (the base model names the
   task), a classifier expert over the first pass's hidden states (fitted on training prompts), and
   the few-shot CEM mixture (fitted on a few held-out examples of each task).
4. Each task's score on held-out rows: base, its own expert (oracle), the expert the classifier
   picked per prompt, the CEM mixture, and the LoRA.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from titans_lnn.adapt.dispatch import (
    Classifier,
    cem_mixture,
    few_shot_score,
    label_scores,
    prompt_features,
    prompt_scores,
)
from titans_lnn.adapt.lora import LoRA
from titans_lnn.adapt.svf import SVF, Expert
from titans_lnn.adapt.tasks import HIGHER_IS_BETTER, TASKS, Task, make_task, row_scores, score_rows
from titans_lnn.adapt.train import train_lora, train_svf
from titans_lnn.config import TitansLNNConfig
from titans_lnn.model import TitansLNN

DEMO_PRESET, DEMO_VARIANT = "niah", "mac"
# What the prompt-based strategy asks the model to continue "<prompt>\n\nThe task above is: " with.
PROMPT_LABELS = {"passkey": "finding the pass key", "dna": "a DNA sequence", "babilong_qa1": "answering a question"}
EXPERT_LR = {"svf": 5e-2, "lora": 1e-2}  # each between the two rates tried per method (2e-2/1e-1, 5e-3/2e-2)


def train_base(model: TitansLNN, steps: int, *, batch_size: int = 8, length: int = 256, lr: float = 3e-3,
               seed: int = 0, log: Callable[[str], None] = print) -> list[float]:
    """Next-byte prediction on random windows of the King James Bible (AdamW, cosine schedule)."""
    from titans_lnn.training.data import load_corpus

    text = torch.from_numpy(load_corpus("kjv", "byte").split(0.01).train.astype("int64"))  # (N,)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        starts = torch.randint(0, len(text) - length - 1, (batch_size,), generator=g)
        w = torch.stack([text[s:s + length + 1] for s in starts.tolist()])  # (B, length + 1)
        loss = model(w[:, :-1], labels=w[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"  base step {step}: loss {loss.item():.3f} nats/byte")
    model.eval()
    return losses


def dispatched_score(svf: SVF, task: Task, experts: list[Expert], choice: list[int]) -> dict[str, float]:
    """{metric: the task's mean score} when each held-out row is answered with the expert chosen for its prompt."""
    scores = {metric: [0.0] * len(task.eval_rows) for metric in task.metrics}
    for k, expert in enumerate(experts):
        idx = [i for i, c in enumerate(choice) if c == k]
        if idx:
            with svf.applied(expert):
                got = row_scores(svf.model, [task.eval_rows[i] for i in idx], task.metrics)
            for metric, values in got.items():
                for i, v in zip(idx, values):
                    scores[metric][i] = v
    return {metric: sum(v) / len(v) for metric, v in scores.items()}


def _fmt(value: float, metric: str) -> str:
    return f"{100 * value:.1f}%" if metric == "exact match" else f"{value:.3f}"


def run_demo(out: str | Path, *, base: str | None = None, base_steps: int = 300, expert_steps: int = 60,
             n_eval: int = 64, batch_size: int = 8, seed: int = 0, command: str | None = None,
             log: Callable[[str], None] = print) -> str:
    """Run the demonstration (module docstring), save the base model, the experts and ``table.md`` under
    ``out``; return the markdown (headed by ``command``, the command line that reproduces it, when given)."""
    t_start = time.perf_counter()
    out = Path(out)
    (out / "experts").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    random.seed(seed)
    if base:
        model = TitansLNN.from_pretrained(base).eval()
        log(f"base model: {base} ({model.num_parameters():,} parameters)")
    else:
        model = TitansLNN(TitansLNNConfig.from_preset(DEMO_PRESET, variant=DEMO_VARIANT))
        log(f"base model: preset {DEMO_PRESET}/{DEMO_VARIANT}, {model.num_parameters():,} parameters; "
            f"{base_steps} steps on the King James Bible")
        train_base(model, base_steps, batch_size=batch_size, seed=seed, log=log)
        model.save_pretrained(out / "base")
    t_base = time.perf_counter() - t_start

    tasks = {name: make_task(name, batch_size=batch_size, n_eval=n_eval, seed=seed) for name in TASKS}
    svf = SVF(model)
    experts, loras = [], {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        expert = train_svf(svf, task.batch, expert_steps, name=name, lr=EXPERT_LR["svf"], seed=seed, task=name)
        expert.save(out / "experts" / f"{name}.safetensors")
        experts.append(expert)
        lora = LoRA(model, rank=1, seed=seed)
        train_lora(lora, task.batch, expert_steps, lr=EXPERT_LR["lora"], seed=seed)
        loras[name] = lora
        log(f"  {name}: SVF expert ({expert.num_parameters()} parameters, final loss "
            f"{expert.meta['final_loss']}) and LoRA r=1 ({lora.num_parameters()}) in {time.perf_counter() - t0:.0f} s")

    # Dispatch on the held-out mix: every task's evaluation prompts.
    t0 = time.perf_counter()
    names = list(tasks)
    train_prompts, train_targets = [], []
    for k, task in enumerate(tasks.values()):
        for step in range(2):  # two training batches of prompts per task (seeds disjoint from evaluation)
            ids, labels = task.batch(10_000 + step)
            train_prompts += [Task.prompt(x, y) for x, y in zip(ids, labels)]
            train_targets += [k] * len(ids)
    classifier = Classifier.fit(prompt_features(model, train_prompts), torch.tensor(train_targets), names,
                                fingerprint=model.fingerprint, seed=seed)
    classifier.save(out / "experts" / "classifier.safetensors")
    choices, prompt_choices, calibrated_choices = {}, {}, {}
    for name, task in tasks.items():
        prompts = [Task.prompt(x, y) for x, y in task.eval_rows]
        choices[name] = classifier.predict(prompt_features(model, prompts))
        scores = prompt_scores(model, prompts, [PROMPT_LABELS[n] for n in names])  # (N, K)
        prior = label_scores(model, torch.tensor(list(b"N/A")), [PROMPT_LABELS[n] for n in names])  # (K,)
        prompt_choices[name] = scores.argmax(-1).tolist()
        calibrated_choices[name] = (scores - prior).argmax(-1).tolist()  # prompt_scores(..., calibrate=True)
    cem = {name: cem_mixture(svf, experts, few_shot_score(svf, *_shots(task)), seed=seed)
           for name, task in tasks.items()}
    t_dispatch = time.perf_counter() - t0

    rows = []
    for k, (name, task) in enumerate(tasks.items()):
        with svf.applied(None):
            base_score = score_rows(model, task.eval_rows, task.metrics)
        with svf.applied(experts[k]):
            oracle = score_rows(model, task.eval_rows, task.metrics)
        with svf.applied(svf.mix(experts, cem[name].alphas)):
            mixture = score_rows(model, task.eval_rows, task.metrics)
        lora = score_rows(model, task.eval_rows, task.metrics, weights=loras[name].weights())
        chosen = dispatched_score(svf, task, experts, choices[name])
        alphas = " / ".join(f"{a:.2f}" for a in cem[name].alphas)
        for m in task.metrics:
            arrow = "higher" if HIGHER_IS_BETTER[m] else "lower"
            rows.append(f"| {name} | {m} ({arrow} is better) | {_fmt(base_score[m], m)} | {_fmt(oracle[m], m)} | "
                        f"{_fmt(chosen[m], m)} | {_fmt(mixture[m], m)} ({alphas}) | {_fmt(lora[m], m)} |")
    dispatch_rows = []
    for name in names:
        k = names.index(name)
        acc_c = sum(c == k for c in choices[name]) / len(choices[name])
        acc_p = sum(c == k for c in prompt_choices[name]) / len(prompt_choices[name])
        acc_q = sum(c == k for c in calibrated_choices[name]) / len(calibrated_choices[name])
        top = names[max(range(len(names)), key=lambda j: cem[name].alphas[j])]
        dispatch_rows.append(f"| {name} | {100 * acc_p:.0f}% | {100 * acc_q:.0f}% | {100 * acc_c:.0f}% | {top} |")
    total = time.perf_counter() - t_start
    n_lora = next(iter(loras.values())).num_parameters()
    made = f"loaded from {base}" if base else f"preset {DEMO_PRESET}/{DEMO_VARIANT}, {base_steps} steps of KJV bytes"
    table = "\n".join([
        f"`{command}`" if command else "",
        "",
        f"Base: {made}, {model.num_parameters():,} parameters; each expert and LoRA: {expert_steps} steps of batch "
        f"{batch_size}; {n_eval} held-out rows per task.",
        "",
        f"| task | metric | base | SVF expert, oracle ({experts[0].num_parameters()} params) | SVF expert, "
        f"dispatched (classifier) | SVF CEM mixture (alphas {' / '.join(names)}) | LoRA r=1 ({n_lora} params) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| held-out prompts of | prompt-based dispatch | prompt-based, calibrated | classifier expert | "
        "CEM mixture's largest alpha |",
        "|---|---|---|---|---|",
        *dispatch_rows,
        "",
        f"Time: base {t_base:.0f} s, experts and LoRAs {total - t_base - t_dispatch:.0f} s (with scoring), dispatch "
        f"{t_dispatch:.0f} s; total {total:.0f} s, {torch.get_num_threads()} threads.",
    ])
    (out / "table.md").write_text(table + "\n")
    return table


def _shots(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    from titans_lnn.adapt.tasks import stack

    return stack(task.shot_rows)
