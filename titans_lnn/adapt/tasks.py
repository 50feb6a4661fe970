"""The demonstration's tasks, byte-level: passkey retrieval, DNA (E. coli K-12) and bAbI-style QA.

Each task gives training batches, held-out evaluation rows and a score:

    task = make_task("passkey", seed=0)
    ids, labels = task.batch(step)           # (B, T) training batch; labels -100 where not scored
    task.eval_rows                           # [(ids (T,), labels (T,))], never seen in training
    task.prompt(ids, labels)                 # what the model reads before answering: the dispatch input
    score_rows(model, rows, metric)          # for each of task.metrics: exact match, bits per byte/base

Passkey and QA prompts come from ``titans_lnn.evals.tasks.make_sample``; training seeds are drawn from
[TRAIN_SEED_BASE, 2 TRAIN_SEED_BASE) (as ``niah_train.task_batch``), evaluation and few-shot seeds below
it. DNA trains on the first 90% of the K-12 genome and is evaluated on windows of the last 10%.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titans_lnn.evals.niah_train import TRAIN_SEED_BASE, answer_text

TASKS = ("passkey", "dna", "babilong_qa1")
# What each task is scored by: answers' exact match and their bits per byte (which moves before exact match
# does); DNA's bits per base (2 = a uniform guess).
METRICS = {"passkey": ("exact match", "answer bits per byte"), "dna": ("bits per base",),
           "babilong_qa1": ("exact match", "answer bits per byte")}
HIGHER_IS_BETTER = {"exact match": True, "answer bits per byte": False, "bits per base": False}
_QA_LENGTH = {"passkey": 300, "babilong_qa1": 600}  # prompt bytes (babilong_qa1 needs >= 443 for its facts)
_DNA_WINDOW = 256

Row = tuple[torch.Tensor, torch.Tensor]  # ids (T,), labels (T,)


@dataclass
class Task:
    name: str
    metrics: tuple[str, ...]
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (ids, labels), (B, T)
    eval_rows: list[Row]
    shot_rows: list[Row]  # a few held-out examples, for the few-shot mixture (disjoint from eval_rows)

    @staticmethod
    def prompt(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the dispatcher reads: the tokens before the first scored prediction; for a row scored at
        every position (DNA: language modelling), its first half."""
        scored = (labels != -100).nonzero()
        if not len(scored):
            return ids
        first = int(scored[0])
        return ids[: max(1, len(ids) // 2)] if first == 0 else ids[: first + 1]


def qa_row(task: str, length: int, seed: int, depth: float | None) -> Row:
    """One prompt + " answer." as byte ids with labels on the answer (``niah_train.task_batch``'s layout)."""
    from titans_lnn.evals.tasks import make_sample

    while True:
        try:
            sample = make_sample(task, length, depth, seed=seed)
            break
        except ValueError:  # the task's fixed text needs more room
            if length > 1 << 16:
                raise
            length *= 2
    answer = answer_text(sample)
    full = torch.tensor(list((sample.prompt + " " + answer + ".").encode()))
    labels = torch.full_like(full, -100)
    first = len(full) - len(answer.encode()) - 2  # the space before the answer
    labels[first - 1:-1] = full[first:]  # position t predicts token t + 1
    return full[:-1], labels[:-1]


def stack(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and labels of rows cut on the left to the shortest (answers sit at the end)."""
    n = min(len(x) for x, _ in rows)
    return torch.stack([x[-n:] for x, _ in rows]), torch.stack([y[-n:] for _, y in rows])


def _qa_task(name: str, batch_size: int, n_eval: int, n_shot: int, seed: int) -> Task:
    length = _QA_LENGTH[name]
    depth = None if name.startswith("babilong_") else 0.0

    def draw(rng: random.Random, seed_base: int) -> Row:
        return qa_row(name, length, seed_base + rng.randrange(TRAIN_SEED_BASE),
                      None if depth is None else rng.random())

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"{name}-train-{seed}-{step}")
        return stack([draw(rng, TRAIN_SEED_BASE) for _ in range(batch_size)])

    rng = random.Random(f"{name}-eval-{seed}")
    rows = [draw(rng, 0) for _ in range(n_eval + n_shot)]
    return Task(name, METRICS[name], batch, rows[:n_eval], rows[n_eval:])


def _dna_task(batch_size: int, n_eval: int, n_shot: int, seed: int) -> Task:
    from titans_lnn.training.data import load_corpus

    genome = torch.from_numpy(load_corpus("ecoli-k12", "byte").tokens.astype("int64"))  # (N,) bytes of A, C, G, T
    cut = int(0.9 * len(genome))
    train, held = genome[:cut], genome[cut:]
    L = _DNA_WINDOW + 1

    def window(source: torch.Tensor, rng: random.Random) -> Row:
        s = rng.randrange(len(source) - L)
        w = source[s:s + L]
        return w[:-1], w[1:]  # every position predicts the next base

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"dna-train-{seed}-{step}")
        return stack([window(train, rng) for _ in range(batch_size)])

    rng = random.Random(f"dna-eval-{seed}")
    rows = [window(held, rng) for _ in range(n_eval + n_shot)]
    return Task("dna", METRICS["dna"], batch, rows[:n_eval], rows[n_eval:])


def make_task(name: str, *, batch_size: int = 8, n_eval: int = 32, n_shot: int = 4, seed: int = 0) -> Task:
    """The task ``name`` (one of ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    if name == "dna":
        return _dna_task(batch_size, n_eval, n_shot, seed)
    return _qa_task(name, batch_size, n_eval, n_shot, seed)


@torch.no_grad()
def row_scores(model: torch.nn.Module, rows: list[Row], metrics: tuple[str, ...], *, weights: dict | None = None,
               batch_size: int = 16) -> dict[str, list[float]]:
    """{metric: each row's score}, from one forward pass per batch. "exact match": 1.0 when the greedy
    (argmax) token is right at every labelled position, else 0.0 (with teacher forcing this equals greedy
    decoding of the answer); the others ("answer bits per byte", "bits per base"): the mean negative
    log2-likelihood of the labelled tokens. ``weights``: overrides for ``torch.func.functional_call``
    (a LoRA), else the model as it is."""
    for metric in metrics:
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"metric={metric!r} is invalid: expected one of {', '.join(HIGHER_IS_BETTER)}")
    device = next(model.parameters()).device
    out: dict[str, list[float]] = {metric: [] for metric in metrics}
    for i in range(0, len(rows), batch_size):
        ids, labels = stack(rows[i:i + batch_size])
        ids, labels = ids.to(device), labels.to(device)
        if weights is None:
            logits = model(ids).logits
        else:
            logits = torch.func.functional_call(model, weights, (ids,)).logits
        mask = labels != -100  # (B, T)
        hit = ((logits.argmax(-1) == labels) | ~mask).all(1).float()  # (B,)
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0), reduction="none")  # (B, T)
        bits = (nll * mask).sum(1) / mask.sum(1) / math.log(2)  # (B,)
        for metric in metrics:
            out[metric] += (hit if metric == "exact match" else bits).tolist()
    return out


def score_rows(model: torch.nn.Module, rows: list[Row], metrics: tuple[str, ...], **kwargs) -> dict[str, float]:
    """{metric: the mean of ``row_scores``}."""
    return {metric: sum(v) / len(v) for metric, v in row_scores(model, rows, metrics, **kwargs).items()}
