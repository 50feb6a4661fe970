"""The main job on the long-document tasks (``titans-lnn niah --task niah_single_2 | babilong_qa1``):
their training batches, seeds, recipes, read-out diagnostics and the command at toy size."""

import json
import math
import random
import re

import pytest
import torch

from titans_lnn import TitansLNN
from titans_lnn.cli import main
from titans_lnn.evals import niah_train
from titans_lnn.evals.niah import NIAH_STEPS, niah_config
from titans_lnn.evals.niah_tasks import TASK_RECIPES, recipe_for, task_overhead, task_readout, train_task
from titans_lnn.evals.niah_train import TRAIN_SEED_BASE, memory_modules, task_batch

TASKS = ("niah_single_2", "babilong_qa1")


def _spy(monkeypatch) -> list:
    """Record every sample task_batch makes, with its seed: [(sample, seed)]."""
    made = []
    real = niah_train.make_sample

    def spy(task, length, depth, seed):
        made.append((real(task, length, depth, seed=seed), seed))
        return made[-1][0]

    monkeypatch.setattr(niah_train, "make_sample", spy)
    return made


@pytest.mark.parametrize("task", TASKS)
def test_training_batch_labels_only_the_answer(monkeypatch, task):
    """At the recipe's shortest training length: labels on " answer." alone (aligned: the label at t is
    the input at t + 1), and filler between the needle(s) and the question in every row."""
    made = _spy(monkeypatch)
    train = recipe_for(task).train
    x, y, filler = task_batch(task, 4, train["min_len"], train["min_len"], random.Random(1), with_filler=True)
    assert x.shape == y.shape == filler.shape and x.shape[0] == 4
    assert len(made) == 4
    for row_x, row_y, row_f, (sample, _) in zip(x, y, filler, made):
        mask = row_y >= 0
        assert bytes(row_y[mask].tolist()).decode() == " " + sample.answer + "."
        assert mask.nonzero()[0, 0] == len(row_y) - int(mask.sum())  # one run, at the end
        idx = mask.nonzero()[:-1, 0]
        assert torch.equal(row_y[idx], row_x[idx + 1])
        assert int(row_f.sum()) >= 40  # a haystack, not only the task's fixed text
        assert not torch.any(row_f & mask)


@pytest.mark.parametrize("task", TASKS)
def test_recipe_training_lengths_fit_the_task(task):
    """Each measured recipe's training prompts hold the task's fixed text plus filler (the pass key's
    260-450 tokens do not: the prompt would be doubled at random), and its answer budget holds " answer."."""
    recipe = TASK_RECIPES[task]
    fixed = task_overhead(task)
    assert fixed + 40 <= recipe.train["min_len"] <= recipe.train["max_len"] <= recipe.train["long_len"][0]
    assert recipe.max_new_tokens >= 9  # " 1234567." or " bathroom."
    assert min(recipe.lengths) >= 1024 and recipe.samples >= 10


def test_passkey_recipe_is_the_main_jobs_default():
    recipe = recipe_for("passkey")
    assert recipe.steps == NIAH_STEPS and recipe.train == {} and recipe.samples == 10
    assert recipe.lengths == (1024, 4096, 16384, 65536, 262144, 1048576)
    untuned = recipe_for("vt")  # derived from its fixed text
    assert untuned.train["min_len"] > task_overhead("vt")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        recipe_for("nope")


def test_task_readout_scores_the_answer_after_the_haystack():
    torch.manual_seed(0)
    model = TitansLNN(niah_config("mal")).eval()
    for m in memory_modules(model):
        m.write_threshold = 0.0  # every haystack token written
    d = task_readout(model, "niah_single_2", [300, 100], chunk_len=128)
    assert d["distances"] == [100, 300] and len(d["logp_answer"]) == 2 and all(x < 0 for x in d["logp_answer"])
    assert d["answer"].isdigit() and len(d["answer"]) == 7 and d["chance_nats"] == pytest.approx(7 * math.log(10))
    assert all(len(w) == 2 and all(0 < x <= 1 for x in w) for w in d["filler_written"])
    qa = task_readout(model, "babilong_qa1", [100], chunk_len=128)
    assert qa["answer"].isalpha() and qa["chance_nats"] == pytest.approx(math.log(6))
    with pytest.raises(ValueError, match="distances=\\[0\\]"):
        task_readout(model, "babilong_qa1", [0])


@pytest.mark.parametrize(("task", "lengths"), [("niah_single_2", "420,520"), ("babilong_qa1", "500,600")])
def test_niah_command_runs_each_task(tmp_path, monkeypatch, task, lengths):
    """End to end at toy size; the evaluated prompts' seeds are below TRAIN_SEED_BASE and none is a
    seed training drew (the training draws replayed here with the run's --seed)."""
    out = tmp_path / task
    finish = ["--finish-steps", "1"] if recipe_for(task).finish else []
    assert main(["niah", "--task", task, "--steps", "2", "--lengths", lengths, "--samples", "2", "--out", str(out),
                 "--no-progress", "--chunk-len", "128", "--workers", "1", "--threads", "1", "--warm-start", "1",
                 *finish]) == 0
    summary = (out / "summary.md").read_text()
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["hybrid"]["warm_start_steps"] == meta["baseline"]["warm_start_steps"] == 1
    assert meta["hybrid"]["finish_steps"] == meta["baseline"]["finish_steps"] == len(finish) // 2
    assert "after 1 steps of the pass key's recipe" in summary
    assert ("then a finishing stage" in summary) == bool(finish)
    assert f"{task} accuracy" in summary and "Wilson" in summary and summary.count("n=2") == 4
    assert f"Recipe of {task}" in summary and "haystack tokens written" in summary
    assert (out / "hybrid" / "readout.png").stat().st_size > 0
    eval_seeds = set()
    for name in ("hybrid", "baseline"):
        records = json.loads((out / name / "results.json").read_text())["records"]
        assert len(records) == 4 and all(r["expected"] for r in records)
        assert all((r["depth"] is None) == task.startswith("babilong_") for r in records)
        eval_seeds |= {r["seed"] for r in records}
    assert len(eval_seeds) == 4 and max(eval_seeds) < TRAIN_SEED_BASE
    made = _spy(monkeypatch)
    rng, train = random.Random(0), recipe_for(task).train
    for _ in range(2):
        task_batch(task, 16, train["min_len"], train["max_len"], rng)
    train_seeds = {seed for _, seed in made}
    assert len(train_seeds) == 32 and min(train_seeds) >= TRAIN_SEED_BASE and not eval_seeds & train_seeds


def test_finish_steps_without_a_finishing_stage_is_refused(tmp_path, capsys):
    """--finish-steps on a task whose recipe has no finishing stage: a clear error before any training."""
    assert main(["niah", "--task", "niah_single_2", "--finish-steps", "5", "--out", str(tmp_path / "n")]) == 2
    assert "--finish-steps 5" in capsys.readouterr().err and not (tmp_path / "n" / "hybrid").exists()
    with pytest.raises(ValueError, match="finish_steps=5"):  # before the warm start's 1,000 steps
        train_task(TitansLNN(niah_config("mal")), "niah_single_2", 1, finish_steps=5)


def test_niah_command_rejects_an_unknown_task(tmp_path, capsys):
    out = tmp_path / "niah"
    with pytest.raises(SystemExit) as exc:
        main(["niah", "--task", "babilong_qa9", "--out", str(out)])
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--task" in error and "'babilong_qa9'" in error and "niah_single_2" in error, error
    assert not out.exists()


def test_one_word_answers_end_at_punctuation():
    """A model trained on " kitchen." runs on after the full stop without a space (" bathroom.rd" in the
    first qa1 run, then scored 0 for a right answer)."""
    from titans_lnn.evals.scoring import exact_match

    assert exact_match(" bathroom.rd", "bathroom", first_word=True) == 1.0
    assert exact_match(" bathroomrd.", "bathroom", first_word=True) == 0.0
    assert exact_match(" be", "bedroom", first_word=True) == 0.0


def test_task_batch_num_facts_sets_the_story_length(monkeypatch):
    """A curriculum's easier BABILong stories: ``num_facts`` facts in every row (the task's own 8 without it),
    each fact in the prompt and labels still only on the answer; rejected for a task without stories."""
    made = []
    real = niah_train.make_babilong

    def spy(qa, length, depth, seed, **kw):
        made.append(real(qa, length, depth, seed, **kw))
        return made[-1]

    monkeypatch.setattr(niah_train, "make_babilong", spy)
    x, y = task_batch("babilong_qa1", 3, 400, 400, random.Random(0), num_facts=2)
    assert [len(s.meta["facts"]) for s in made] == [2, 2, 2]
    for row_x, row_y, sample in zip(x, y, made):
        text = bytes(row_x.tolist()).decode()
        assert all(fact in text for fact in sample.meta["facts"])
        assert bytes(row_y[row_y >= 0].tolist()).decode() == " " + sample.answer + "."
    made.clear()
    task_batch("babilong_qa1", 2, 700, 700, random.Random(0))
    assert made == []  # the task's own stories come through make_sample
    with pytest.raises(ValueError, match="num_facts=2, filler='kjv' given for task 'passkey'"):
        task_batch("passkey", 2, 300, 300, random.Random(0), num_facts=2)


def _tasks_trained(monkeypatch, steps: int, drawn_fillers: list | None = None, **kw) -> list[tuple[str, int]]:
    """(task, facts per story) of every row train_passkey drew, on a toy model for ``steps`` steps; each
    row's filler ("kjv", "none" or "noise") appended to ``drawn_fillers`` if given."""
    drawn = []
    real = niah_train._make

    def spy(task, length, depth, seed, num_facts, filler="kjv"):
        drawn.append((task, num_facts))
        if drawn_fillers is not None:
            drawn_fillers.append(filler)
        return real(task, length, depth, seed, num_facts, filler)

    monkeypatch.setattr(niah_train, "_make", spy)
    torch.manual_seed(0)
    model = TitansLNN(niah_config("mal"))
    niah_train.train_passkey(model, steps, batch_size=1, long_frac=0.0, progress=False, **kw)
    return drawn


def test_train_passkey_mixes_in_a_second_task(monkeypatch):
    """mix_frac (1, 1): every step on the mixed-in task; (0, 0): none; (1, 0) over 3 steps: the first
    step on the mixed-in task (p = 1), the last on the task (p = 0)."""
    s2 = dict(task="niah_single_2", min_len=400, max_len=420, mix_task="passkey", mix_len=(300, 320))
    assert {t for t, _ in _tasks_trained(monkeypatch, 2, mix_frac=(1.0, 1.0), **s2)} == {"passkey"}
    assert {t for t, _ in _tasks_trained(monkeypatch, 2, mix_frac=(0.0, 0.0), **s2)} == {"niah_single_2"}
    ramp = _tasks_trained(monkeypatch, 3, mix_frac=(1.0, 0.0), **s2)
    assert ramp[0][0] == "passkey" and ramp[-1][0] == "niah_single_2"
    with pytest.raises(ValueError, match="mix_frac=\\(1.5, 0.0\\)"):
        _tasks_trained(monkeypatch, 1, mix_frac=(1.5, 0.0), **s2)


def test_train_passkey_ramps_the_facts_per_story(monkeypatch):
    """num_facts (1, 7) with facts_until 0.5 over 4 steps: 1 fact at step 0, 4 at step 1, 7 from step 2 on."""
    drawn = _tasks_trained(monkeypatch, 4, task="babilong_qa1", min_len=500, max_len=520, num_facts=(1, 7),
                           facts_until=0.5)
    assert drawn == [("babilong_qa1", 1), ("babilong_qa1", 4), ("babilong_qa1", 7), ("babilong_qa1", 7)]
    with pytest.raises(ValueError, match="num_facts=\\(2, 4\\) given for task 'passkey'"):
        _tasks_trained(monkeypatch, 1, num_facts=(2, 4))


def test_train_task_warm_starts_on_the_pass_key(monkeypatch):
    """A recipe's ``warm_start``: that many pass-key steps (the pass key's own recipe), then the task's steps
    with the task's keywords; ``on_step`` counts through both stages."""
    from titans_lnn.evals import niah_tasks

    recipe = niah_tasks.TaskRecipe(steps=2, lengths=(1024,), samples=10, max_new_tokens=10, warm_start=2,
                                   train=dict(min_len=400, max_len=420, batch_size=1, long_frac=0.0))
    monkeypatch.setitem(niah_tasks.TASK_RECIPES, "niah_single_2", recipe)
    calls, steps = [], []
    real = niah_tasks.train_passkey

    def spy(model, n, **kw):  # toy size: one row per batch, no long phase
        calls.append((kw.get("task", "passkey"), n, kw.get("batch_size")))
        return real(model, n, **{**kw, "batch_size": 1, "long_frac": 0.0})

    monkeypatch.setattr(niah_tasks, "train_passkey", spy)
    torch.manual_seed(0)
    losses = niah_tasks.train_task(TitansLNN(niah_config("mal")), "niah_single_2", 3, on_step=steps.append)
    assert calls == [("passkey", 2, None), ("niah_single_2", 3, 1)]
    assert len(losses) == 5 and steps == [1, 2, 3, 4, 5]


def test_train_task_finishing_stage_runs_after_the_task_with_its_keywords(monkeypatch):
    """A recipe's ``finish``: after the task's steps, its ``steps`` more of the task, its keywords over the
    task's (the others kept); ``on_step`` counts on through it; a recipe without one trains no more."""
    from titans_lnn.evals import niah_tasks

    recipe = niah_tasks.TaskRecipe(steps=2, lengths=(1024,), samples=10, max_new_tokens=12,
                                   train=dict(min_len=500, max_len=520, batch_size=1, long_frac=0.0),
                                   finish=dict(steps=2, max_penalty=1.0, lr=1e-3))
    monkeypatch.setitem(niah_tasks.TASK_RECIPES, "babilong_qa1", recipe)
    calls, steps = [], []
    real = niah_tasks.train_passkey

    def spy(model, n, **kw):
        calls.append((kw.get("task"), n, kw.get("max_penalty", 0.0), kw.get("lr"), kw.get("min_len")))
        return real(model, n, **kw)

    monkeypatch.setattr(niah_tasks, "train_passkey", spy)
    torch.manual_seed(0)
    losses = niah_tasks.train_task(TitansLNN(niah_config("mal")), "babilong_qa1", 3, on_step=steps.append)
    assert calls == [("babilong_qa1", 3, 0.0, None, 500), ("babilong_qa1", 2, 1.0, 1e-3, 500)]
    assert len(losses) == 5 and steps == [1, 2, 3, 4, 5]
    assert recipe.finish_steps == 2 and niah_tasks.TaskRecipe(1, (1,), 1, 1).finish_steps == 0


@pytest.mark.parametrize("start", [0.0, 0.5, 1.0])
def test_threshold_start_sets_the_write_threshold_before_its_ramp(start):
    """Before ``threshold_from`` the memories skip writes below ``threshold_start`` x the config's threshold
    (0: every write kept, the old rule; 1: the full threshold from the first step, for a warm start)."""
    torch.manual_seed(0)
    model = TitansLNN(niah_config("mal"))
    niah_train.train_passkey(model, 1, batch_size=1, threshold_from=0.5, threshold_start=start, progress=False)
    threshold = niah_train.NIAH_MODEL["mem_write_threshold"]
    assert [m.write_threshold for m in memory_modules(model)] == [pytest.approx(start * threshold)] * 2
    with pytest.raises(ValueError, match="threshold_start=1.5"):
        niah_train.train_passkey(model, 1, threshold_start=1.5, progress=False)


def test_filler_gate_max_takes_each_rows_largest_filler_gate():
    """Per row the largest gate among its filler tokens (a needle's larger gate is not counted), averaged
    over rows with filler, summed over memories; its gradient reaches only those tokens."""
    g = torch.tensor([[[0.1, 0.9, 0.3, 0.2]], [[0.05, 0.4, 0.6, 0.0]], [[0.7, 0.7, 0.7, 0.7]]],
                     requires_grad=True)  # (B=3, H=1, T=4)
    filler = torch.tensor([[True, False, True, True], [True, True, False, False], [False] * 4])
    value = niah_train.filler_gate_max({"m0": g, "m1": g}, filler)
    assert value.item() == pytest.approx(2 * (0.3 + 0.4) / 2)
    value.backward()
    assert torch.equal(g.grad.ne(0), torch.tensor([[[False, False, True, False]], [[False, True, False, False]],
                                                    [[False] * 4]]))
    assert niah_train.filler_gate_max({"m0": g}, torch.zeros(3, 4, dtype=torch.bool)).item() == 0.0


def test_write_threshold_replaces_the_configs_and_is_saved(tmp_path):
    """train_passkey(write_threshold=) trains with that threshold and leaves it in the model's config, so
    that the saved model evaluates with it."""
    torch.manual_seed(0)
    model = TitansLNN(niah_config("mal"))
    niah_train.train_passkey(model, 1, batch_size=1, threshold_start=1.0, write_threshold=0.3, progress=False)
    assert [m.write_threshold for m in memory_modules(model)] == [pytest.approx(0.3)] * 2
    model.save_pretrained(tmp_path / "m")
    loaded = TitansLNN.from_pretrained(tmp_path / "m")
    assert [m.write_threshold for m in memory_modules(loaded)] == [pytest.approx(0.3)] * 2
    with pytest.raises(ValueError, match="mem_write_threshold"):
        niah_train.train_passkey(model, 1, write_threshold=1.5, progress=False)


def test_ablation_script_trains_a_task_from_a_saved_model(tmp_path):
    """benchmarks/niah_ablation.py --task --init at toy size: a warm start from a saved model's weights, the
    task's prompts scored (7-digit values), the task's read-out."""
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    TitansLNN(niah_config("mal")).save_pretrained(tmp_path / "init")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "niah_ablation.py"
    proc = subprocess.run([sys.executable, str(script), "--task", "niah_single_2", "--init", str(tmp_path / "init"),
                           "--steps", "1", "--lengths", "420", "--samples", "2", "--readout", "100",
                           "--train", "batch_size=1", "--train", "max_penalty=1", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warm start from {tmp_path / 'init'}" in proc.stdout and "trained 1 steps" in proc.stdout
    assert "420 tokens: " in proc.stdout and "-log p(answer) after haystack" in proc.stdout
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert len(records) == 2 and all(len(r["expected"]) == 7 and r["expected"].isdigit() for r in records)


def test_bare_story_has_the_facts_and_question_without_kjv():
    """filler="none": header, the facts back to back and the question (a training variant); "noise": the pass
    key's sentences instead of the KJV; the same story with each; any other filler rejected."""
    from titans_lnn.evals.babilong import HEADERS, make_babilong

    bare = make_babilong("qa1", 2000, None, seed=7, filler="none")
    kjv = make_babilong("qa1", 2000, None, seed=7)
    assert bare.meta["facts"] == kjv.meta["facts"] and bare.answer == kjv.answer
    assert bare.prompt == (HEADERS["qa1"] + "\n" + " ".join(bare.meta["facts"]) + "\nQuestion: "
                           + bare.meta["question"] + "\nAnswer:")
    assert len(kjv.prompt) > 1900 > len(bare.prompt)
    noise = make_babilong("qa1", 2000, None, seed=7, filler="noise")
    assert noise.meta["facts"] == kjv.meta["facts"] and "The grass is green." in noise.prompt
    from titans_lnn.evals.haystack import NOISE

    rest = noise.prompt[slice(*noise.meta["haystack_span"])]
    for fact in noise.meta["facts"]:
        rest = rest.replace(fact, "")
    assert set(rest.split()) == set(NOISE.split()) and len(noise.prompt) > 1900
    with pytest.raises(ValueError, match="filler='pg19'"):
        make_babilong("qa1", 2000, None, seed=7, filler="pg19")


def test_qa1_locations_keeps_each_persons_latest_move():
    """qa1_locations: each person's latest move; qa1_asked: the person a question asks about; other text refused."""
    from titans_lnn.evals.babilong import qa1_asked, qa1_locations

    facts = ["Mary went to the kitchen.", "John moved to the office.", "Mary journeyed to the garden."]
    assert qa1_locations(facts) == {"Mary": "garden", "John": "office"}
    with pytest.raises(ValueError, match="'The kitchen is north of the office.' is not a qa1 fact"):
        qa1_locations(["The kitchen is north of the office."])
    assert qa1_asked("Where is Mary?") == "Mary"
    with pytest.raises(ValueError, match="'Where is the apple\\?'"):
        qa1_asked("Where is the apple?")


def test_task_batch_ask_all_labels_every_persons_location():
    """ask_all: after the prompt's own answer, "Where is <person>?" for every other person of the story, each
    answer labelled (aligned), the story's latest location of that person; without it one answer."""
    from titans_lnn.evals.babilong import qa1_locations

    rng_seed = 3
    x, y = task_batch("babilong_qa1", 3, 500, 500, random.Random(rng_seed), ask_all=True, filler="none")
    one_x, one_y = task_batch("babilong_qa1", 3, 500, 500, random.Random(rng_seed), filler="none")
    for row_x, row_y, one in zip(x, y, one_y):
        text = bytes(row_x.tolist()).decode()
        story = text[text.index("counts.\n") + 8:text.index("\nQuestion:")]
        where = qa1_locations(story.replace(". ", ".\n").splitlines())
        asked = [line.removeprefix("Question: Where is ").removesuffix("?") for line in text.splitlines()
                 if line.startswith("Question:")]
        assert sorted(asked) == sorted(where)
        labelled = bytes(row_y[row_y >= 0].tolist()).decode()
        assert labelled == "".join(f" {where[p]}." for p in asked)
        idx = (row_y >= 0).nonzero()[:, 0]
        idx = idx[idx < len(row_x) - 1]
        assert torch.equal(row_y[idx], row_x[idx + 1])
        assert bytes(one[one >= 0].tolist()).decode() == f" {where[asked[0]]}."
    with pytest.raises(ValueError, match="ask_all given for task 'babilong_qa2'"):
        task_batch("babilong_qa2", 1, 900, 900, random.Random(0), ask_all=True)


def test_train_passkey_fillers_stage_the_haystack(monkeypatch):
    """fillers (("none", 0.25), ("noise", 0.5)) over 4 steps: no KJV at step 0, the noise sentences at step 1,
    the KJV after; none given: KJV always."""
    fillers: list = []
    kw = dict(task="babilong_qa1", min_len=500, max_len=520, num_facts=(2, 2))
    _tasks_trained(monkeypatch, 4, fillers, fillers=(("none", 0.25), ("noise", 0.5)), **kw)
    assert fillers == ["none", "noise", "kjv", "kjv"]
    plain: list = []
    _tasks_trained(monkeypatch, 2, plain, **kw)
    assert plain == ["kjv", "kjv"]
    with pytest.raises(ValueError, match="fillers=\\(\\('none', 0.5\\),\\) is invalid for task 'passkey'"):
        _tasks_trained(monkeypatch, 1, fillers=(("none", 0.5),))


def test_recipe_model_fields_reach_both_models(monkeypatch, tmp_path):
    """TaskRecipe.model replaces fields of the main job's model for that task: the trained hybrid is saved with
    them, and the baseline is sized against the hybrid built with them."""
    from titans_lnn.evals import niah, niah_tasks

    recipe = niah_tasks.TaskRecipe(steps=1, lengths=(1024,), samples=10, max_new_tokens=10,
                                   model=dict(conv_kernel=3, mem_heads=2),
                                   train=dict(min_len=500, max_len=520, batch_size=1, long_frac=0.0))
    monkeypatch.setitem(niah_tasks.TASK_RECIPES, "babilong_qa1", recipe)
    niah._train_job("hybrid", "mal", "babilong_qa1", 1, 0, 0, 1, str(tmp_path / "m"), "mal", None)
    config = TitansLNN.from_pretrained(tmp_path / "m").config
    assert (config.conv_kernel, config.mem_heads) == (3, 2)
    assert niah_config("mal").conv_kernel == niah_train.NIAH_MODEL["conv_kernel"] != 3  # the preset unchanged
    hybrid = TitansLNN(niah_config("mal", overrides=recipe.model)).num_parameters()
    baseline = niah_config("swa", overrides=recipe.model)
    assert baseline.conv_kernel == 3 and abs(TitansLNN(baseline).num_parameters() - hybrid) < 0.05 * hybrid


def _person_keys(model):
    """Replace each memory's q and k by the one-hot of a person (the rest of _project as it is): at a
    fact's tokens the person the fact is about, at the answer the person asked about. A memory with
    these keys binds perfectly: qa1_binding must then measure 1 for the asked person, 0 for the others."""
    from titans_lnn.evals.babilong import PEOPLE

    seen: dict = {}
    model.register_forward_pre_hook(lambda module, args: seen.__setitem__("text", bytes(args[0][0].tolist()).decode()))

    def person_at(text: str, t: int) -> int:
        asked = re.search(r"Where is (\w+)\?", text[:t + 1])
        if asked:
            return PEOPLE.index(asked.group(1))
        start = max(text.rfind(". ", 0, t + 1) + 2, text.rfind("\n", 0, t + 1) + 1)
        word = text[start:].split(" ", 1)[0]
        return PEOPLE.index(word) if word in PEOPLE else len(PEOPLE)

    for m in niah_train.memory_modules(model):
        project = m._project

        def fake(x, state, project=project, m=m):
            q, k, v, convs = project(x, state)
            ids = torch.tensor([person_at(seen["text"], t) for t in range(x.shape[1])])
            onehot = torch.nn.functional.one_hot(ids, q.shape[-1]).to(q.dtype)  # (T, d)
            onehot = onehot[None, None].expand(x.shape[0], m.heads, -1, -1)
            return onehot, onehot, v, convs

        m._project = fake


def test_qa1_binding_measures_a_perfect_binding_and_its_absence():
    """qa1_binding: with keys and queries that name the person, 1 for the asked person's facts and 0 for
    the others', every fact counted once (8 per story, as many "same" as the stories' facts about the
    asked person); the model's mode and hooks as they were; a bad story count refused."""
    from titans_lnn.evals.babilong import make_babilong, qa1_asked
    from titans_lnn.evals.niah_tasks import qa1_binding

    torch.manual_seed(0)
    model = TitansLNN(niah_config("mal")).train()
    plain = qa1_binding(model, 3)
    assert model.training and not model._forward_pre_hooks
    assert all(d["n_same"] + d["n_other"] == 24 and -1 <= d["same"] <= 1 and -1 <= d["other"] <= 1
               for d in plain["layers"]) and len(plain["layers"]) == 2
    _person_keys(model)
    bound = qa1_binding(model, 3)
    assert [(d["same"], d["other"]) for d in bound["layers"]] == [(1.0, 0.0)] * 2
    base = random.Random("binding/0").randrange(2**30)
    asked = 0
    for j in range(3):
        story = make_babilong("qa1", 1024, None, base + j, num_facts=8, filler="none")
        person = qa1_asked(story.meta["question"])
        asked += sum(fact.split()[0] == person for fact in story.meta["facts"])
    assert [d["n_same"] for d in bound["layers"]] == [asked] * 2 and 0 < asked < 24
    with pytest.raises(ValueError, match="stories=0"):
        qa1_binding(model, 0)


def test_ablation_script_reports_the_binding(tmp_path):
    """benchmarks/niah_ablation.py --binding: qa1_binding's two figures per memory printed and kept in --json;
    refused for a task other than babilong_qa1, naming it."""
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    TitansLNN(niah_config("mal")).save_pretrained(tmp_path / "m")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "niah_ablation.py"
    run = [sys.executable, str(script), "--load", str(tmp_path / "m"), "--lengths", "600", "--samples", "1",
           "--binding"]
    proc = subprocess.run(run + ["--task", "babilong_qa1", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    layers = json.loads((tmp_path / "r.json").read_text())["binding"]["layers"]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("binding, cos(query, key)"))
    assert line.endswith("; ".join(f"{d['same']:.2f} / {d['other']:.2f}" for d in layers)) and len(layers) == 2
    proc = subprocess.run(run + ["--task", "passkey"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--binding" in proc.stderr and "'passkey'" in proc.stderr
