"""Training the main job's models: the model both sides use, task batches, the training loop.

The loss is on the answer only: a random key can be predicted only by retrieving it. Training
prompts draw their seeds from [TRAIN_SEED_BASE, 2 TRAIN_SEED_BASE) and evaluation prompts from
below TRAIN_SEED_BASE, so no evaluated prompt (and no needle placement) was seen in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator

import torch

from titans_lnn.config import PRESETS, TitansLNNConfig
from titans_lnn.evals.babilong import make_babilong, qa1_asked, qa1_locations
from titans_lnn.evals.tasks import make_sample
from titans_lnn.model import TitansLNN

TRAIN_SEED_BASE = 2**31

# The model both sides use: attention window 64 (<= 256), ~180K parameters, fast enough on 2 cores. What
# makes retrieval learnable in a few hundred CPU steps (each found by ablation on this task):
# init_std 0.1 (~1/sqrt(d_model); at 0.02 no variant left the uniform-digit plateau in 1000 steps) with an
# untied head; a linear memory (depth 1) with inner learning rates up to 1 and no forgetting (with
# alpha > 0 a needle fades as (1 - alpha)^distance: gone long before 1M tokens); q/k/v convolutions of
# width 8, so a key can tell "pass key is " from "sky is "; writes below 0.15 max_lr skipped exactly,
# and gates that read the key's context, so that the filler's spaces need not be written with the
# needle's (with the penalty below, layer 2 writes 4% of filler tokens instead of 49%); one memory head
# of width 64 (two of 32 split the gates' capacity: 19% of the key's digit writes fell below the
# threshold and the answer loss ended at 0.17, every miss one wrong digit; one head: 6%, loss 0.001).
# The fields are the config preset "niah" (titans_lnn/config.py); NIAH_MODEL is that dict.
NIAH_MODEL = PRESETS["niah"]
# How both models train (``train_passkey``'s keywords): over the second half, after retrieval is
# learned, the write threshold is raised and a penalty on the filler's write gate (before the
# threshold: penalize="gate") pushes it below, with a margin. The first memory stores the needle
# (blocking its filler writes alone keeps the key at 256K; the second's do not matter); with the
# penalty on the thresholded writes (0.3) its gates sat just at the threshold on needle and filler
# alike, it wrote 15% of the filler, and the key faded past 64K; with this one, 2% and 0.00 nats at 1M.
# A margin (penalty_margin=0.05: filler gates below 0.05 not penalised) did not lift the needle's gates (mean
# 0.167 vs 0.173, ~20% of digit writes still under the threshold), doubled the filler written (3.3% vs 1.7%)
# and lost precision (1K 17/30, 4K 18/30 vs 29/30, 29/30 on the same prompts): the penalty stays unmargined.
NIAH_TRAIN = dict(threshold_from=0.5, write_penalty=1.0, penalty_from=0.5, penalize="gate")
NIAH_STEPS = 1000  # training steps of each model


def answer_text(sample) -> str:
    """What follows the prompt in training: the answer (values joined by ", ")."""
    return sample.answer if isinstance(sample.answer, str) else ", ".join(sample.answer)


def filler_mask(sample, n_chars: int) -> torch.Tensor:
    """(n_chars,) bool: the haystack's characters outside every needle (byte tokens: one per char)."""
    mask = torch.zeros(n_chars, dtype=torch.bool)
    lo, hi = sample.meta["haystack_span"]
    mask[lo:hi] = True
    needles = sample.meta.get("needles") or sample.meta.get("facts") or []
    for offset, text in zip(sample.meta.get("needle_offsets", []), needles):
        mask[offset:offset + len(text)] = False
    return mask


def _make(task: str, length: int, depth: float | None, seed: int, num_facts: int | None, filler: str = "kjv"):
    """``make_sample``, or for a BABILong task with ``num_facts`` or ``filler`` a story of that many facts
    (the task's own number by default) in that filler (``make_babilong``)."""
    if num_facts is None and filler == "kjv":
        return make_sample(task, length, depth, seed=seed)
    return make_babilong(task.removeprefix("babilong_"), length, depth, seed, num_facts=num_facts, filler=filler)


def _answers(sample, ask_all: bool, seed: int) -> list[tuple[str, str]]:
    """(question text before the answer, answer) pairs that follow the prompt in training: the prompt's
    own answer, then with ``ask_all`` (BABILong qa1) "Where is <person>?" for every other person of the
    story, in an order drawn from ``seed``: each answer supervised, several read-outs of one story."""
    pairs = [("", answer_text(sample))]
    if ask_all:
        where = qa1_locations(sample.meta["facts"])
        asked = qa1_asked(sample.meta["question"])
        others = sorted(p for p in where if p != asked)
        random.Random(seed).shuffle(others)
        pairs += [(f"\nQuestion: Where is {p}?\nAnswer:", where[p]) for p in others]
    return pairs


def task_batch(task: str, batch_size: int, min_len: int, max_len: int, rng: random.Random, *,
               with_filler: bool = False, num_facts: int | None = None, filler: str = "kjv", ask_all: bool = False):
    """Prompts of ``task`` followed by their answer, as byte ids; labels only on the answer (B, T);
    with ``with_filler`` also the filler mask (B, T) of :func:`filler_mask`. Seeds are drawn from
    [TRAIN_SEED_BASE, 2 TRAIN_SEED_BASE): never an evaluation prompt. ``num_facts``: a BABILong
    task's stories get that many facts instead of the task's own number (a curriculum's easier stories);
    ``filler="none"``: its facts back to back, no KJV (``make_babilong``); ``ask_all`` (qa1): after the
    answer, a question about every other person of the story, each answer labelled (``_answers``)."""
    if (num_facts is not None or filler != "kjv") and not task.startswith("babilong_"):
        raise ValueError(f"task_batch: num_facts={num_facts!r}, filler={filler!r} given for task {task!r}: "
                         "expected a babilong_ task")
    if ask_all and task != "babilong_qa1":
        raise ValueError(f"task_batch: ask_all given for task {task!r}: expected babilong_qa1")
    length = rng.randint(min_len, max_len)
    draws = []  # (depth, seed) per row, drawn in the same order as ever
    for _ in range(batch_size):
        depth = None if task.startswith("babilong_") else rng.random()
        draws.append((depth, TRAIN_SEED_BASE + rng.randrange(TRAIN_SEED_BASE)))
    while True:  # a task whose fixed text (header, needles, question) needs more gets a longer batch
        try:
            samples = [_make(task, length, depth, seed, num_facts, filler) for depth, seed in draws]
            break
        except ValueError:
            if length > 64 * max_len:
                raise
            length *= 2
    xs, ys, fs = [], [], []
    for sample, (_, seed) in zip(samples, draws):
        ids, labels = list(sample.prompt.encode()), [-100] * len(sample.prompt)
        for question, answer in _answers(sample, ask_all, seed):
            ids += question.encode()
            labels += [-100] * len(question)
            reply = (" " + answer + ".").encode()
            labels[-1] = reply[0]  # aligned: position t predicts token t + 1
            ids += reply
            labels += list(reply[1:]) + [-100]
        xs.append(torch.tensor(ids[:-1]))
        ys.append(torch.tensor(labels[:-1]))
        fs.append(torch.cat([filler_mask(sample, len(sample.prompt)),
                             torch.zeros(len(ids) - 1 - len(sample.prompt), dtype=torch.bool)]))
    n = min(len(x) for x in xs)
    x, y = torch.stack([x[-n:] for x in xs]), torch.stack([y[-n:] for y in ys])
    return (x, y, torch.stack([f[-n:] for f in fs])) if with_filler else (x, y)


def memory_modules(model: TitansLNN) -> list:
    from titans_lnn.memory import NeuralMemory

    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


def filler_write_rate(model: TitansLNN, filler: torch.Tensor) -> torch.Tensor:
    """Mean theta / max_lr over the last call's filler tokens (``filler``: (B, T) bool) and heads,
    summed over the memories (0 without any)."""
    weight = filler.float() / filler.sum().clamp_min(1)  # (B, T)
    rates = [(m.last_theta.mean(1) * weight).sum() / m.max_lr for m in memory_modules(model)
             if m.last_theta is not None]
    return sum(rates) if rates else torch.zeros(())


@contextlib.contextmanager
def recorded_write_gates(model: TitansLNN) -> Iterator[dict]:
    """While open: ``{memory: gate}`` with each memory's write gate of its last forward before any
    threshold, theta / max_lr in [0, 1] (B, H, T), recorded by a hook on the gate projection (whose
    first ``heads`` outputs are theta's logits). A penalty on it keeps pushing the filler's gates down
    where the threshold already skips them (the skipped ``last_theta`` is 0 and has no gradient), so
    the filler ends far below the threshold rather than just under it: a margin that holds at 1M."""
    gates: dict = {}

    def hook(memory):
        def record(module, inputs, output):
            logits = output[..., :memory.heads].transpose(1, 2).float()  # (B, H, T): theta's logits
            gates[memory] = torch.sigmoid(logits) if memory.write_gate == "sigmoid" else logits.clamp(0, 1)
        return record

    handles = [m.w_gates.register_forward_hook(hook(m)) for m in memory_modules(model)]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def filler_gate_mean(gates: dict, filler: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean write gate (``recorded_write_gates``) above ``margin``, relu(gate - margin), over the filler
    tokens (``filler``: (B, T) bool) and heads, summed over the memories. With a margin the penalty
    stops pushing a filler gate once it is that far down (and so stops pulling the needle's gates,
    which share its weights, down with it)."""
    weight = filler.float() / filler.sum().clamp_min(1)  # (B, T)
    return sum((((g - margin).clamp_min(0).mean(1) * weight).sum() for g in gates.values()), torch.zeros(()))


def filler_gate_max(gates: dict, filler: torch.Tensor) -> torch.Tensor:
    """The largest write gate (``recorded_write_gates``) over each row's filler tokens (``filler``: (B, T)
    bool), averaged over rows and heads, summed over the memories. The mean of :func:`filler_gate_mean`
    is spent on the thousands of filler gates already near 0; this one pushes down the rare filler token
    whose gate still reaches the threshold (in the KJV: capitals such as "M" of "Methuselah", written
    at 0.16-0.19 next to the needle's digits at 0.18-0.25), each of which can overwrite a needle."""
    rows = filler.any(1)  # (B,): rows with filler
    if not rows.any():
        return torch.zeros(())
    total = torch.zeros(())
    for g in gates.values():  # (B, H, T)
        top = g.masked_fill(~filler[:, None, :], 0.0).amax(-1)  # (B, H): each row's largest filler gate
        total = total + top[rows].mean()
    return total


def passkey_batch(batch_size: int, min_len: int, max_len: int, rng: random.Random):
    """``task_batch`` of passkey prompts."""
    return task_batch("passkey", batch_size, min_len, max_len, rng)


def train_passkey(model: TitansLNN, steps: int, *, task: str = "passkey", batch_size: int = 16, min_len: int = 260,
                  max_len: int = 450, long_frac: float = 0.3, long_len: tuple[int, int] = (1024, 2048),
                  lr: float = 3e-3, seed: int = 0, write_penalty: float = 0.0, penalty_from: float = 0.0,
                  threshold_from: float = 0.5, threshold_start: float = 0.0, penalize: str = "written",
                  penalty_margin: float = 0.0, max_penalty: float = 0.0, write_threshold: float | None = None,
                  mix_task: str | None = None,
                  mix_frac: tuple[float, float] = (0.0, 0.0),
                  mix_len: tuple[int, int] = (260, 450), num_facts: tuple[int, int] | None = None,
                  facts_until: float = 0.5, ask_all: bool = False, fillers: tuple = (), progress: bool = True,
                  on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train on ``task`` (passkey by default); returns the loss per step. The last ``long_frac`` of the
    steps use prompts of ``long_len`` tokens (with a batch cut to keep the tokens per step), so that
    the memory learns to keep a key through more filler than it was first trained on.
    ``write_penalty`` adds that weight times the memories' mean write gate (theta / max_lr) over the
    haystack's filler tokens (not the needles, header or question) to the loss, from the fraction
    ``penalty_from`` of the steps on: the memory learns to write nothing on filler, so that what it
    wrote survives any amount of it. ``penalize="written"`` penalises theta after the threshold (0 and
    no gradient where a write is skipped), ``"gate"`` the gate before it (``recorded_write_gates``:
    the filler's gates keep going down below the threshold, a margin), down to ``penalty_margin``
    (a fraction of max_lr: gates below it are not penalised). ``max_penalty`` adds that weight times each
    row's largest filler gate (:func:`filler_gate_max`, from ``penalty_from`` on): the rare filler tokens
    still written, which the mean hardly sees.
    A memory whose config skips small writes (``mem_write_threshold``) trains without the threshold
    until the fraction ``threshold_from`` of the steps, then with it raised linearly to the config's
    value by the last step: retrieval is learned first, then to keep the filler's writes below it.
    ``write_threshold`` replaces the config's threshold (the model's config is changed, so that the saved
    model evaluates with it): a needle's digits must then be written with a larger gate than before, and
    a filler token just above the old threshold is skipped.
    ``threshold_start`` (a fraction of the config's threshold) is where it starts instead of 0: 1 keeps
    the full threshold from the first step (a model warm-started from one trained with it, which would
    otherwise relearn to write above it: the loss of an S-NIAH-2 warm start went 0.001 -> 0.19 on the ramp).
    A task mixture: with ``mix_task``, a step trains on that task instead (prompts of ``mix_len``
    tokens, ``long_len`` in the long phase) with a probability going linearly from ``mix_frac[0]`` at
    the first step to ``mix_frac[1]`` at the last ((1, 0): the pass key first, the task by the end).
    A curriculum on BABILong stories: with ``num_facts=(a, b)`` the stories have ``a`` facts at the
    first step, ``b`` from the fraction ``facts_until`` of the steps on (linear in between); ``fillers``,
    ``((filler, until), ...)`` in order, gives the stories another filler than the KJV until each fraction
    ``until`` of the steps (``make_babilong``'s "none": the facts back to back, the early ones beyond the
    question's attention window all the same; "noise": the pass key's sentences); ``ask_all`` (qa1) asks
    about every person of the story after it, each answer supervised (:func:`task_batch`).
    ``on_step(step)`` is called after each step (progress across processes)."""
    from tqdm import tqdm

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_passkey: steps={steps!r} is invalid: expected a whole number >= 1")
    if max_penalty < 0:
        raise ValueError(f"train_passkey: max_penalty={max_penalty!r} is invalid: expected a weight >= 0")
    if not 0 <= penalty_margin < 1:
        raise ValueError(f"train_passkey: penalty_margin={penalty_margin!r} is invalid: expected a fraction in [0, 1)")
    if penalize not in ("written", "gate"):
        raise ValueError(f"train_passkey: penalize={penalize!r} is invalid: expected 'written' or 'gate'")
    if not 0 <= threshold_start <= 1:
        raise ValueError(f"train_passkey: threshold_start={threshold_start!r} is invalid: expected a fraction in "
                         "[0, 1] of the config's write threshold")
    if mix_task is not None and not all(0 <= f <= 1 for f in mix_frac):
        raise ValueError(f"train_passkey: mix_frac={mix_frac!r} is invalid: expected two probabilities in [0, 1]")
    if num_facts is not None and not (1 <= num_facts[0] and 1 <= num_facts[1] and 0 <= facts_until <= 1):
        raise ValueError(f"train_passkey: num_facts={num_facts!r}, facts_until={facts_until!r} are invalid: "
                         "expected two fact counts >= 1 and a fraction of the steps in [0, 1]")
    if num_facts is not None and not task.startswith("babilong_"):
        raise ValueError(f"train_passkey: num_facts={num_facts!r} given for task {task!r}: expected a babilong_ task")
    if fillers and (not task.startswith("babilong_") or not all(
            f in ("none", "noise", "kjv") and 0 <= until <= 1 for f, until in fillers)):
        raise ValueError(f"train_passkey: fillers={fillers!r} is invalid for task {task!r}: expected "
                         "(filler, until) pairs of 'none', 'noise' or 'kjv' and a fraction of the steps in [0, 1], "
                         "for a babilong_ task")
    if write_threshold is not None:  # the config validates it; states and saved weights carry its fingerprint
        model.config = dataclasses.replace(model.config, mem_write_threshold=write_threshold)
        model.fingerprint = model.config.fingerprint
    torch.manual_seed(seed)
    rng = random.Random(seed)
    mix_rng = random.Random(f"mix/{seed}")  # its own stream: the task's batches stay those of a run without it
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(20, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"train {model.config.variant}", disable=not progress)
    long_from = steps - int(round(long_frac * steps))
    long_batch = max(1, batch_size * max_len // long_len[1])
    memories = memory_modules(model)
    for step in bar:
        ramp = min(1.0, max(0.0, (step - threshold_from * steps) / max(1.0, (1 - threshold_from) * steps - 1)))
        threshold = model.config.mem_write_threshold * (threshold_start + (1 - threshold_start) * ramp)
        for m in memories:
            m.write_threshold = threshold
        at = step / max(1, steps - 1)  # 0 at the first step, 1 at the last
        mixed = mix_task is not None and mix_rng.random() < mix_frac[0] + (mix_frac[1] - mix_frac[0]) * at
        facts = None
        if num_facts is not None and not mixed:
            ramp = min(1.0, step / (facts_until * steps)) if facts_until > 0 else 1.0
            facts = round(num_facts[0] + (num_facts[1] - num_facts[0]) * ramp)
        if mixed:
            x, y, filler = task_batch(mix_task, *((batch_size, *mix_len) if step < long_from
                                                  else (long_batch, *long_len)), mix_rng, with_filler=True)
        else:
            size = (batch_size, min_len, max_len) if step < long_from else (long_batch, *long_len)
            story = next((f for f, until in fillers if step < until * steps), "kjv")
            x, y, filler = task_batch(task, *size, rng, with_filler=True, num_facts=facts, ask_all=ask_all,
                                      filler=story)
        with recorded_write_gates(model) as gates:
            loss = model(x, labels=y).loss
        total = loss
        if write_penalty and step >= penalty_from * steps:
            rate = (filler_write_rate(model, filler) if penalize == "written"
                    else filler_gate_mean(gates, filler, penalty_margin))
            total = total + write_penalty * rate
        if max_penalty and step >= penalty_from * steps:
            total = total + max_penalty * filler_gate_max(gates, filler)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if on_step is not None:
            on_step(step + 1)
    return losses


def niah_config(variant: str, match: str = "mal", overrides: dict | None = None) -> TitansLNNConfig:
    """The main job's model of ``variant`` (``NIAH_MODEL`` with ``overrides``: a task recipe's own model
    fields). Attention-only variants get a wider MLP so that their parameter count matches the ``match``
    hybrid's (within one MLP step): the same size, no memory."""
    fields = {**NIAH_MODEL, **(overrides or {})}
    config = TitansLNNConfig(variant=variant, **fields)
    if "memory" in config.parts:
        return config
    target = TitansLNN(TitansLNNConfig(variant=match, **fields)).num_parameters()

    def size(mult: float) -> int:
        return TitansLNN(TitansLNNConfig(variant=variant, **{**fields, "mlp_mult": mult})).num_parameters()

    mult, n = fields["mlp_mult"], size(fields["mlp_mult"])
    while abs((wider := size(mult + 0.25)) - target) < abs(n - target):  # sizes grow with mult
        mult, n = mult + 0.25, wider
    return TitansLNNConfig(variant=variant, **{**fields, "mlp_mult": mult})
