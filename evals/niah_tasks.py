"""Per-task recipes and diagnostics of the main job (``titans-lnn niah --task ...``) beyond the pass key.

    titans-lnn niah --task niah_single_2 --out /tmp/niah-s2     # RULER S-NIAH-2: KJV haystack, 7-digit value
    titans-lnn niah --task babilong_qa1 --out /tmp/niah-qa1     # BABILong qa1: where is a person, KJV haystack

A task's prompt holds fixed text (header, needles or facts, question) that the pass key's training
lengths (260-450 tokens) do not fit: RULER's S-NIAH needs 352 tokens before any haystack, a
BABILong qa1 story 444. :class:`TaskRecipe` sets, per task, the training lengths (so that every
batch has filler between the needle and the question), the steps, the evaluation lengths, samples per
length and greedy bytes per answer; :func:`recipe_for` gives the pass key's own defaults unchanged
(``NIAH_STEPS``, ``NIAH_TRAIN``) and, for a task without a measured recipe, lengths derived from its
fixed text. :func:`task_readout` is :func:`titans_lnn.evals.niah.needle_readout` for any text task:
the needle (or the story's facts), then the task's own haystack, then the question, scored teacher-forced.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from titans_lnn.evals.babilong import LOCATIONS
from titans_lnn.evals.niah_train import NIAH_STEPS, NIAH_TRAIN, answer_text, memory_modules, train_passkey
from titans_lnn.evals.report import format_length
from titans_lnn.evals.runner import max_new_tokens_for
from titans_lnn.evals.tasks import TASKS, make_sample
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import ByteTokenizer

__all__ = ["TASK_RECIPES", "TaskRecipe", "chance_nats", "finish_steps_for", "qa1_binding", "readout_figure",
           "readout_md", "recipe_for", "task_overhead", "task_readout", "train_task"]

PASSKEY_LENGTHS = (1024, 4096, 16384, 65536, 262144, 1048576)  # the main job's default: 1K .. 1M


@dataclass(frozen=True)
class TaskRecipe:
    """How ``titans-lnn niah`` trains and evaluates one task when its flags are left at their defaults.

    ``train`` holds :func:`~titans_lnn.evals.niah_train.train_passkey` keywords that replace the
    pass key's (``NIAH_TRAIN`` and the function's defaults: ``min_len``, ``max_len``, ``long_len``,
    ``batch_size``, ...); ``note`` says how the recipe was chosen (printed in the summary);
    ``warm_start`` pass-key steps come first (:func:`train_task`); ``model`` holds fields of the
    main job's model config (``NIAH_MODEL``, the preset "niah") that this task's models (both sides)
    replace, e.g. ``dict(conv_kernel=24)`` (a warm start then trains the pass key on that model too);
    ``finish`` is a last stage after the task's steps: its ``steps`` more steps of the task with its
    keywords on top of the task's (e.g. the filler's largest write gate penalised once the facts are
    bound to their names), empty for none.
    """

    steps: int  # training steps of each model on the task
    lengths: tuple[int, ...]  # evaluation prompt lengths (tokens)
    samples: int  # prompts per length
    max_new_tokens: int  # greedy tokens generated per answer
    train: dict = field(default_factory=dict)
    note: str = ""
    warm_start: int = 0  # pass-key steps (its own recipe, NIAH_TRAIN) before the task's: see train_task
    model: dict = field(default_factory=dict)  # NIAH_MODEL fields replaced for this task's models
    finish: dict = field(default_factory=dict)  # a last stage: dict(steps=N, **train_passkey keywords)

    @property
    def finish_steps(self) -> int:
        return self.finish.get("steps", 0)


# Sized by measured cost (CPU seconds per step, see each note): with evaluation, 13.6-18.4 min on 2 cores for qa1 and
# 32.2 for S-NIAH-2 (its pass-key warm start); their accuracy is in the notes where measured. The pass key's
# recipe lives in niah_train.py.
TASK_RECIPES: dict[str, TaskRecipe] = {
    "niah_single_2": TaskRecipe(
        steps=400, lengths=(1024, 4096, 16384, 65536), samples=10, max_new_tokens=10, warm_start=NIAH_STEPS,
        train=dict(min_len=400, max_len=700, long_len=(1024, 2048), threshold_start=1.0, max_penalty=1.0),
        note="the pass key's model (1000 steps of its recipe), then 400 steps of S-NIAH-2 (352 tokens of header, "
             "needle and question: 50-350 tokens of KJV filler, 0.7-1.7K in the long phase) with the write "
             "threshold kept and each row's largest KJV write gate penalised (max_penalty): this default run "
             "(32 min at load 2-8) 10/10 at 1K, 4K, 16K and 64K, baseline 0/10, no KJV token written; 30/30 more "
             "at 64K (--reuse --seed 1). Without the max penalty the digits' "
             "gates (0.18-0.25) sit next to KJV capitals' ('M' of Methuselah 0.16-0.19), 0.07% of the KJV is "
             "written and 64K fell to 3/10; from scratch, 600 steps: 0/10 at every length",
    ),
    "babilong_qa1": TaskRecipe(
        steps=700, lengths=(1024, 4096, 16384, 65536, 131072), samples=10, max_new_tokens=12,
        model=dict(conv_kernel=24),
        train=dict(min_len=600, max_len=900, long_len=(1024, 2048), long_frac=0.2, ask_all=True,
                   fillers=(("none", 0.4),), num_facts=(1, 8), facts_until=0.25, lr=6e-3),
        finish=dict(steps=300, max_penalty=1.0, threshold_start=1.0, fillers=(), num_facts=(8, 8), lr=1e-3),
        note="from scratch, 700 steps at learning rate 6e-3, memory convolutions of width 24 (model: conv_kernel=24, "
             "both sides): the stories' facts back to back without KJV for the first 40% of the steps (1 -> 8 "
             "facts over the first 25%), then 150-450 tokens of KJV between and around the 8 facts, 1-2K tokens "
             "over the last 20%; after each story a question about every person, each answer supervised "
             "(ask_all); then 300 finishing steps on 8-fact KJV stories (lr 1e-3) with the full write threshold "
             "and each row's largest KJV write gate penalised (max_penalty). The default command with --seed 0, "
             "1, 2 (three at once, 39 min each at load 6-7): hybrid 10/10/9/10/10, 8/10/10/9/9 and 10/10/10/10/9 "
             "of 10 at 1K, 4K, 16K, 64K, 128K (loss 0.001, 0.035, 0.011), no KJV token written; baseline 0-3 of "
             "10 (the prior). At lr 3e-3 only seed 0 bound the facts (6 and 3 of 10 at 16K with seeds 1 and 2: "
             "their loss stayed at the answer prior, 0.15-0.17, through the 700 steps; at 6e-3 each seed left it "
             "between steps 375 and 500 in benchmarks/niah_ablation.py). Without the finishing stage (lr 3e-3) "
             "9, 10, 6, 3, 1 (the first memory wrote 7.5-9.1% of KJV: the read-out fell to 13 nats at 64K); the "
             "max penalty over the whole run instead: 7, 8, 7, 6 (facts bound less well); both penalties from "
             "step 525 on: 10, 10, 8, 4. "
             "Width 8 (the preset's): 4, 4, 3, 3, 1 (the query after 'Answer: ' matched every person's facts "
             "alike, cos 0.46 other vs 0.42 same person; width 24: 0.06 vs 0.46)",
    ),
}


def task_overhead(task: str) -> int:
    """Tokens (bytes) of ``task``'s prompt that are not haystack: header, needles or facts, question."""
    sample = make_sample(task, 4096, None, seed=0)
    return sample.meta["n_tokens"] - sample.meta["haystack_chars"]


def recipe_for(task: str) -> TaskRecipe:
    """The recipe of ``task``: the measured one, the pass key's defaults, or lengths derived from the
    task's fixed text (as much filler as the pass key's training prompts, ~200 tokens, on top of it)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if task in TASK_RECIPES:
        return TASK_RECIPES[task]
    if task == "passkey":
        return TaskRecipe(steps=NIAH_STEPS, lengths=PASSKEY_LENGTHS, samples=10,
                          max_new_tokens=max_new_tokens_for(task),
                          note="the main job's pass-key recipe (NIAH_TRAIN in niah_train.py)")
    fixed = task_overhead(task)
    return TaskRecipe(steps=NIAH_STEPS, lengths=PASSKEY_LENGTHS[:4], samples=10,
                      max_new_tokens=max_new_tokens_for(task),
                      train=dict(min_len=fixed + 16, max_len=fixed + 200, long_len=(fixed + 1024, fixed + 2048)),
                      note=f"not tuned: {fixed} tokens of fixed text, training lengths derived from it")


def finish_steps_for(task: str, finish_steps: int | None = None) -> int:
    """The steps of ``task``'s finishing stage: ``finish_steps``, or the recipe's when None. A ValueError
    when steps are asked of a task whose recipe has no finishing stage."""
    recipe = recipe_for(task)
    finish_steps = recipe.finish_steps if finish_steps is None else finish_steps
    if finish_steps and not recipe.finish:
        raise ValueError(f"finish_steps={finish_steps!r} for task {task!r}, whose recipe has no finishing stage "
                         "(TASK_RECIPES in evals/niah_tasks.py): expected 0 or None")
    return finish_steps


def train_task(model: TitansLNN, task: str, steps: int, *, warm_start: int | None = None,
               finish_steps: int | None = None, seed: int = 0, progress: bool = False,
               on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` on ``task`` by its recipe; returns the loss per step (the warm start's first).

    With a warm start (``warm_start`` steps, by default the recipe's) the model first learns the pass
    key with the main job's own recipe (``NIAH_TRAIN``: the memory learns to write a number and read it
    after "is"), then ``steps`` steps of the task (``NIAH_TRAIN``, then ``recipe.train``), each stage
    seeded with ``seed``; then the recipe's ``finish`` stage, if any (``finish_steps`` steps, by default
    the recipe's; its keywords over the task's, seeded with ``seed`` too).
    ``on_step(step)`` counts the steps of every stage."""
    recipe = recipe_for(task)
    warm_start = recipe.warm_start if warm_start is None else warm_start
    if not isinstance(warm_start, int) or warm_start < 0:
        raise ValueError(f"train_task: warm_start={warm_start!r} is invalid: expected a number of steps >= 0")
    finish_steps = finish_steps_for(task, finish_steps)
    losses: list[float] = []

    def after(done: int):  # on_step, counted on from the steps already done
        return (lambda step: on_step(done + step)) if on_step is not None else None

    if warm_start:
        losses += train_passkey(model, warm_start, seed=seed, progress=progress, on_step=on_step, **NIAH_TRAIN)
    losses += train_passkey(model, steps, task=task, seed=seed, progress=progress, on_step=after(len(losses)),
                            **{**NIAH_TRAIN, **recipe.train})
    if finish_steps:
        finish = {key: value for key, value in recipe.finish.items() if key != "steps"}
        losses += train_passkey(model, finish_steps, task=task, seed=seed, progress=progress,
                                on_step=after(len(losses)), **{**NIAH_TRAIN, **recipe.train, **finish})
    return losses


# ----------------------------------------------------------------------------- read-out diagnostics


def chance_nats(task: str) -> float | None:
    """-log p of the answer under a uniform guess among the possible answers (None where no such count
    is simple): 5 or 7 uniform digits for the number tasks, one of the 6 locations for BABILong qa1."""
    if task == "passkey":
        return 5 * math.log(10)
    if task in ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2"):
        return 7 * math.log(10)
    if task == "babilong_qa1":
        return math.log(len(LOCATIONS))
    return None


def _parts(task: str, seed: int) -> tuple[str, list[str], str, str]:
    """(header with its newline, needles or facts, newline + question, answer) of one sample of ``task``."""
    depth = None if task.startswith("babilong_") else 0.0
    sample = make_sample(task, task_overhead(task) + 64, depth, seed=seed)
    lo, hi = sample.meta["haystack_span"]
    needles = sample.meta.get("facts") or sample.meta["needles"]
    return sample.prompt[:lo], list(needles), sample.prompt[hi:], answer_text(sample)


def _filler(task: str, n_chars: int, seed: int, needles: list[str]) -> str:
    """``n_chars`` characters of ``task``'s own haystack (its needles taken out), from a longer sample."""
    depth = None if task.startswith("babilong_") else 1.0
    sample = make_sample(task, task_overhead(task) + n_chars + 4096, depth, seed=seed)
    lo, hi = sample.meta["haystack_span"]
    hay = sample.prompt[lo:hi]
    for text in sample.meta.get("facts") or sample.meta["needles"]:
        hay = hay.replace(text, "")
    return " " + " ".join(hay.split())[:n_chars]


@torch.no_grad()
def task_readout(model: TitansLNN, task: str, distances: list[int], *, seed: int = 0,
                 chunk_len: int = 4096) -> dict:
    """The needle's (or story's) read-out strength against the haystack read after it, for any text task.

    Streams the task's header and its needles (BABILong: the story's facts, one after another), then
    ``max(distances)`` tokens of the task's own haystack (KJV verses or the noise filler); at each
    distance a branch of the state is asked the question and scored: log p(answer | question) summed
    over the answer's bytes (teacher-forced, nats), and whether every byte is the greedy choice. Also
    counts, per memory layer, the fraction of haystack tokens written with theta > 1e-6.
    Returns ``{"task", "answer", "distances", "logp_answer", "correct", "filler_written", "chance_nats"}``.
    """
    if not distances or min(distances) < 1:
        raise ValueError(f"task_readout: distances={distances!r} is invalid: expected positive token counts")
    rng_seed = random.Random(f"readout/{task}/{seed}").randrange(2**30)  # an evaluation-range seed
    header, needles, question, answer = _parts(task, rng_seed)
    filler = _filler(task, max(distances), rng_seed + 1, needles)
    tok = ByteTokenizer()

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([list(tok.encode(text))], dtype=torch.long)  # (1, T)

    state = model(ids(header + " ".join(needles)), state=model.init_state(1)).state
    memories = memory_modules(model)
    written, seen = [0] * len(memories), 0
    out = {"task": task, "answer": answer, "distances": [], "logp_answer": [], "correct": [], "filler_written": [],
           "chance_nats": chance_nats(task)}
    target_ids = ids(" " + answer)[0]  # (k,): the answer with its leading space, as in training
    for target in sorted(distances):
        while seen < target:
            n = min(chunk_len, target - seen)
            state = model(ids(filler[seen:seen + n]), state=state).state
            for i, m in enumerate(memories):
                written[i] += int((m.last_theta > 1e-6).sum()) // m.heads
            seen += n
        asked = torch.cat([ids(question)[0], target_ids])[None]  # (1, L)
        logits = model(asked, state=state).logits[0]  # (L, V)
        k = len(target_ids)
        scores = torch.log_softmax(logits[-k - 1:-1].float(), -1)  # (k, V): the predictions of the answer's bytes
        out["distances"].append(target)
        out["logp_answer"].append(round(scores.gather(-1, target_ids[:, None]).sum().item(), 4))
        out["correct"].append(bool((scores.argmax(-1) == target_ids).all()))
        out["filler_written"].append([round(w / seen, 6) for w in written])
    return out


def qa1_binding(model: TitansLNN, stories: int = 40, *, seed: int = 0) -> dict:
    """Whether each memory binds a place to its person (BABILong qa1): on ``stories`` 8-fact stories
    without KJV (evaluation-range seeds), the cosine between the read query at the answer (after
    "Answer: ") and the key each fact is written with (the fact's token of largest write gate), for
    the asked person's facts (``same``) and the others' (``other``), mean over facts and heads. A
    memory that binds has ``same`` near 1 and ``other`` near 0; one that stores "a place" has both alike.
    Returns ``{"stories", "layers": [{"same", "other", "n_same", "n_other"}, ...]}`` (one per memory)."""
    from titans_lnn.evals.babilong import make_babilong, qa1_asked

    if not isinstance(stories, int) or stories < 1:
        raise ValueError(f"qa1_binding: stories={stories!r} is invalid: expected a whole number >= 1")
    memories = memory_modules(model)
    inputs: dict = {}
    hooks = [m.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
             for i, m in enumerate(memories)]
    base = random.Random(f"binding/{seed}").randrange(2**30)  # an evaluation-range seed
    cosines = [{"same": [], "other": []} for _ in memories]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for j in range(stories):
                sample = make_babilong("qa1", 1024, None, base + j, num_facts=8, filler="none")  # no filler: any length
                prompt = sample.prompt + " "  # the answer's first byte is read here
                model(torch.tensor([list(prompt.encode())]))
                person = qa1_asked(sample.meta["question"])
                for i, m in enumerate(memories):
                    q, k, _, _ = m._project(inputs[i], m.init_state(1, dtype=inputs[i].dtype))  # (1, H, T, d)
                    gate = m.last_theta[0]  # (H, T): the gates this pass wrote with
                    for fact, at in zip(sample.meta["facts"], sample.meta["needle_offsets"]):
                        t = at + gate[:, at:at + len(fact)].argmax(-1)  # (H,): each head's largest write
                        cos = (k[0, torch.arange(m.heads), t] * q[0, :, -1]).sum(-1).mean().item()
                        cosines[i]["same" if fact.split()[0] == person else "other"].append(cos)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    layers = [{"same": round(sum(d["same"]) / max(1, len(d["same"])), 4),
               "other": round(sum(d["other"]) / max(1, len(d["other"])), 4),
               "n_same": len(d["same"]), "n_other": len(d["other"])} for d in cosines]
    return {"stories": stories, "layers": layers}


def readout_job(model_dir: str, task: str, distances: list[int], seed: int, threads: int) -> dict:
    """:func:`task_readout` of a saved model in its own process."""
    torch.set_num_threads(threads)
    return task_readout(TitansLNN.from_pretrained(model_dir).eval(), task, distances, seed=seed)


def readout_md(d: dict) -> str:
    """The summary's diagnostics table of a :func:`task_readout` result."""
    chance = f"; chance {d['chance_nats']:.1f}" if d["chance_nats"] is not None else ""
    lines = ["", f"Hybrid diagnostics (the needle or facts, then the task's haystack; `task_readout`, "
                 f"answer {d['answer']!r}):", "",
             "| haystack after the needle | " + " | ".join(format_length(n) for n in d["distances"]) + " |",
             "|---|" + "---|" * len(d["distances"]),
             f"| -log p(answer) (nats{chance}) | " + " | ".join(f"{-x:.2f}" for x in d["logp_answer"]) + " |",
             "| greedy answer correct | " + " | ".join("yes" if c else "no" for c in d["correct"]) + " |",
             "| haystack tokens written (theta > 1e-6), per memory layer | "
             + " | ".join("/".join(f"{x:.4f}" for x in w) for w in d["filler_written"]) + " |"]
    return "\n".join(lines) + "\n"


def readout_figure(d: dict, path: Path, *, answer: str = "answer", haystack: str = "haystack",
                   chance_label: str = "uniform answer", title: str | None = None) -> None:
    """-log p(answer) against the haystack read after the needle (log x), with the chance line.
    ``d``: ``distances``, ``logp_answer`` (natural log), ``chance_nats`` (None: no line), and ``task``
    (the default title); the keywords name the axes' things (the pass key's plot says key and filler)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(d["distances"], [-x for x in d["logp_answer"]], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel(f"{haystack} tokens read after the needle")
    ax.set_ylabel(f"-log p({answer} | question) (nats)")
    if d["chance_nats"] is not None:
        ax.axhline(d["chance_nats"], color="grey", ls="--", lw=0.8)
        ax.text(d["distances"][0], d["chance_nats"], f" chance ({chance_label})", va="bottom", fontsize=8)
    ax.set_title(title or f"{d['task']}: read-out vs distance (hybrid)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
