"""Evaluation tasks: determinism, needle placement, recoverable answers, lengths, MQAR rules, scoring."""

import math
import re

import pytest
import torch

from titans_lnn.evals.babilong import OPPOSITE, make_story
from titans_lnn.evals.haystack import NOISE_SENTENCES, kjv_verses, take_units
from titans_lnn.evals.mqar import make_mqar
from titans_lnn.evals.scoring import (
    accuracy_table,
    aggregate,
    all_values_contained,
    exact_match,
    mqar_accuracy,
    normalize,
    passkey_correct,
    score,
)
from titans_lnn.evals.tasks import TASKS, make_sample

NEEDLE_TASKS = [t for t in TASKS if not t.startswith("babilong")]
BABILONG = [t for t in TASKS if t.startswith("babilong")]
DEPTHS = [0.0, 0.1, 0.5, 0.77, 1.0]


def _depth(task, depth):
    return None if task.startswith("babilong") else depth


# ---------------------------------------------------------------------------------------------
# determinism and lengths


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_under_seed(task):
    a = make_sample(task, 3000, _depth(task, 0.4), seed=7)
    b = make_sample(task, 3000, _depth(task, 0.4), seed=7)
    c = make_sample(task, 3000, _depth(task, 0.4), seed=8)
    assert (a.prompt, a.answer, a.meta) == (b.prompt, b.answer, b.meta)
    assert a.prompt != c.prompt


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_key_and_value_do_not_depend_on_length_or_depth(task):
    a = make_sample(task, 1500, 0.0, seed=3)
    b = make_sample(task, 9000, 0.9, seed=3)
    assert a.answer == b.answer


@pytest.mark.parametrize("length", [1000, 4097, 65_536])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_length_within_tolerance_in_bytes(task, length):
    s = make_sample(task, length, _depth(task, 0.5), seed=1)
    n = len(s.prompt.encode("utf-8"))
    assert n == s.meta["n_tokens"] and s.length == length
    assert length - 48 <= n <= length  # short by less than one word (UUID keys are the longest)


def _word_count(text):
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.mark.parametrize("task", ["passkey", "niah_single_2", "niah_multikey_3", "vt", "babilong_qa2"])
@pytest.mark.parametrize("length", [300, 5000, 60_000])
def test_length_with_a_tokenizer(task, length):
    s = make_sample(task, length, _depth(task, 0.3), seed=0, count_tokens=_word_count)
    n = _word_count(s.prompt)
    assert n == s.meta["n_tokens"]
    assert length - max(8, length // 100) <= n <= length


def test_million_character_haystack_is_fast_and_exact():
    s = make_sample("niah_single_2", 1_000_000, 0.5, seed=0)
    assert 1_000_000 - 48 <= len(s.prompt) <= 1_000_000
    assert s.prompt.count("special magic numbers for") == 1


def test_take_units_cuts_at_a_word_boundary():
    units = take_units(iter(["aaa bbb.", "ccc ddd eee."]), 15, " ")
    assert units == ["aaa bbb.", "ccc"]
    assert take_units(iter(["abcdef"]), 3, " ") == []
    assert take_units(iter(["ab", "cd"]), 0, " ") == []


def test_kjv_verses():
    verses = kjv_verses()
    assert len(verses) == 31_102
    assert verses[0] == "In the beginning God created the heavens and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any(re.search(r"\d", v) for v in verses)  # labels stripped, so digits come from needles


# ---------------------------------------------------------------------------------------------
# needles: placement and recoverable answers


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("length", [700, 20_011])
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needle_sits_at_its_depth(task, length, depth):
    s = make_sample(task, length, depth, seed=2)
    m = s.meta
    off = m["needle_offset"]
    assert s.prompt.startswith(m["needle"], off)
    assert s.prompt[off - 1] in " \n"  # a unit boundary
    start, end = m["haystack_span"]
    assert start <= off < end
    # The nearest boundary to depth * (needle-free haystack length): within half a unit.
    assert abs(m["depth_offset"] - depth * m["haystack_chars"]) <= m["max_unit_chars"] / 2 + 1
    # Every needle is where its offset says, and the haystack stays in order around it.
    for text, o in zip(m["needles"], m["needle_offsets"]):
        assert s.prompt.startswith(text, o)


def _values_for(prompt, key):
    return re.findall(rf"One of the special magic \w+ for {re.escape(key)} is: ([\w-]+)\.", prompt)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task", [t for t in NEEDLE_TASKS if t.startswith("niah")])
def test_niah_answer_recoverable(task, seed):
    s = make_sample(task, 6000, 0.35, seed=seed)
    queries = s.meta["queries"]
    assert all(q in s.prompt.rsplit("\n", 1)[1] for q in queries)  # the question names every key
    found = [v for q in queries for v in _values_for(s.prompt, q)]
    expected = [s.answer] if isinstance(s.answer, str) else s.answer
    assert sorted(found) == sorted(expected)
    if task in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
        assert re.fullmatch(r"\d{7}", s.answer)
    if task.endswith("3"):
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answer)
    if task == "niah_multikey_1":
        assert len(s.meta["needles"]) == 4
    if task in ("niah_multikey_2", "niah_multikey_3"):
        assert s.prompt.count("One of the special magic") > 20  # the haystack is distractors


def test_passkey_answer_recoverable():
    s = make_sample("passkey", 5000, 0.5, seed=11)
    assert re.findall(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", s.prompt) == [
        (s.answer, s.answer)
    ]
    assert s.prompt.endswith("What is the pass key? The pass key is")
    assert NOISE_SENTENCES[0] in s.prompt


@pytest.mark.parametrize("seed", range(4))
def test_vt_chain_resolves_to_the_answer(seed):
    s = make_sample("vt", 4000, 0.2, seed=seed)
    bound = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", s.prompt):
        bound[name] = bound[rhs[4:]] if rhs.startswith("VAR") else rhs
    assert sorted(n for n, v in bound.items() if v == s.meta["value"]) == sorted(s.answer)
    assert f"assigned the value {s.meta['value']}" in s.prompt


# ---------------------------------------------------------------------------------------------
# BABILong: an independent reading of the facts must give the answer


def _solve(facts, question):
    where, holder, lying, trace, gives, rel = {}, {}, {}, {}, [], []

    def place(obj, loc):
        if not trace.get(obj) or trace[obj][-1] != loc:
            trace.setdefault(obj, []).append(loc)

    for f in facts:
        if m := re.fullmatch(r"(\w+) (?:moved|went|journeyed|travelled|went back) to the (\w+)\.", f):
            where[m[1]] = m[2]
            for o, p in holder.items():
                if p == m[1]:
                    place(o, m[2])
        elif m := re.fullmatch(r"(\w+) (?:got|grabbed|picked up|took) the (\w+)\.", f):
            holder[m[2]] = m[1]
            place(m[2], where[m[1]])
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.", f):
            lying[m[2]] = where[holder.pop(m[2])]
        elif m := re.fullmatch(r"(\w+) (?:gave|passed|handed) the (\w+) to (\w+)\.", f):
            holder[m[2]] = m[3]
            gives.append((m[1], m[2], m[3]))
        elif m := re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", f):
            rel += [(m[1], m[2], m[3]), (m[3], OPPOSITE[m[2]], m[1])]
        else:
            raise AssertionError(f"unparsed fact {f!r}")
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return {where[holder[m[1]]] if m[1] in holder else lying[m[1]]}
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return {where[m[1]]}
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        t = trace[m[1]]
        return {t[i - 1] for i in range(1, len(t)) if t[i] == m[2]}
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        return {a for a, r, b in rel if r == m[1] and b == m[2]}
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        return {b for a, r, b in rel if a == m[1] and r == m[2]}
    forms = [
        (r"Who gave the (\w+) to (\w+)\?", lambda e, m: e[1:] == (m[1], m[2]), 0),
        (r"Who did (\w+) give the (\w+) to\?", lambda e, m: e[:2] == (m[1], m[2]), 2),
        (r"What did (\w+) give to (\w+)\?", lambda e, m: (e[0], e[2]) == (m[1], m[2]), 1),
        (r"Who received the (\w+)\?", lambda e, m: e[1] == m[1], 2),
        (r"Who gave the (\w+)\?", lambda e, m: e[1] == m[1], 0),
    ]
    for pattern, match, slot in forms:
        if m := re.fullmatch(pattern, question):
            return {e[slot] for e in gives if match(e, m)}
    raise AssertionError(f"unparsed question {question!r}")


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("qa", ["qa1", "qa2", "qa3", "qa4", "qa5"])
def test_babi_story_answer_is_unique_and_right(qa, seed):
    facts, question, answer = make_story(qa, seed)
    assert _solve(facts, question) == {answer}
    assert re.fullmatch(r"[A-Za-z]+", answer)


@pytest.mark.parametrize("task", BABILONG)
def test_babilong_facts_in_order_in_the_prompt(task):
    s = make_sample(task, 8000, None, seed=5)
    offsets = s.meta["needle_offsets"]
    assert offsets == sorted(offsets)
    for fact, off in zip(s.meta["facts"], offsets):
        assert s.prompt.startswith(fact, off)
    assert s.prompt.endswith(f"Question: {s.meta['question']}\nAnswer:")
    assert _solve(s.meta["facts"], s.meta["question"]) == {s.answer}
    assert s.metric == "exact_match" and s.depth is None


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("depth", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("task", ["passkey", "niah_multikey_1", "vt"])
def test_depth_outside_unit_interval_raises(task, depth):
    with pytest.raises(ValueError, match=re.escape(f"depth={depth}")):
        make_sample(task, 2000, depth)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_length_too_short_raises(task):
    with pytest.raises(ValueError, match="length=60 is too short"):
        make_sample(task, 60, _depth(task, 0.5))


def test_bad_task_length_and_babilong_depth_raise():
    with pytest.raises(ValueError, match="'niah_single_9'"):
        make_sample("niah_single_9", 1000, 0.5)
    with pytest.raises(ValueError, match=r"length=0"):
        make_sample("passkey", 0, 0.5)
    with pytest.raises(ValueError, match=r"depth=0.5"):
        make_sample("babilong_qa1", 1000, 0.5)
    with pytest.raises(ValueError, match=r"num_facts=9"):
        make_story("qa4", 0, num_facts=9)


# ---------------------------------------------------------------------------------------------
# MQAR


@pytest.mark.parametrize("seq_len,num_kv", [(64, 4), (128, 32), (500, 16), (4096, 64)])
def test_mqar_rules(seq_len, num_kv):
    vocab = 1024
    x, y = make_mqar(16, seq_len, num_kv, vocab_size=vocab, seed=3)
    assert x.shape == y.shape == (16, seq_len) and x.dtype == y.dtype == torch.int64
    assert 0 <= x.min() and x.max() < vocab
    half = vocab // 2
    for b in range(16):
        keys, values = x[b, 0:2 * num_kv:2], x[b, 1:2 * num_kv:2]
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab)).all()
        assert len(set(keys.tolist())) == num_kv and len(set(values.tolist())) == num_kv
        kv = dict(zip(keys.tolist(), values.tolist()))
        pos = (y[b] != -100).nonzero().flatten()
        assert len(pos) == num_kv
        assert (pos >= 2 * num_kv).all() and ((pos - 2 * num_kv) % 2 == 0).all()
        assert sorted(x[b, pos].tolist()) == sorted(kv)  # every key queried once
        for p in pos.tolist():
            assert y[b, p].item() == kv[x[b, p].item()]  # the label is the queried key's value


def test_mqar_deterministic_and_power_law():
    a = make_mqar(64, 1024, 8, seed=0)
    b = make_mqar(64, 1024, 8, seed=0)
    c = make_mqar(64, 1024, 8, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
    x, y = make_mqar(64, 1024, 8, seed=0, random_non_queries=False)
    assert (x[y == -100][16 * 64:] == 0).sum() > 0  # filler left as zeros
    space = (1024 - 16) // 2

    def near_fraction(power_a):
        _, y = make_mqar(64, 1024, 8, power_a=power_a, seed=0)
        gaps = ((y != -100).nonzero()[:, 1] - 16) // 2
        return (gaps < space // 10).float().mean().item()

    assert near_fraction(0.01) > 0.4
    assert near_fraction(1.0) < 0.2  # 1.0 is uniform: about 0.1


@pytest.mark.parametrize("kwargs,bad", [
    ({"seq_len": 63, "num_kv_pairs": 4}, "seq_len=63"),
    ({"seq_len": 64, "num_kv_pairs": 17}, "num_kv_pairs=17"),
    ({"seq_len": 64, "num_kv_pairs": 4, "vocab_size": 8}, "vocab_size=8"),
    ({"seq_len": 64, "num_kv_pairs": 4, "power_a": 0.0}, "power_a=0.0"),
])
def test_mqar_bad_input(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        make_mqar(2, **kwargs)


# ---------------------------------------------------------------------------------------------
# scoring


def test_exact_match():
    assert normalize("  Kitchen.\n") == "kitchen"
    assert exact_match("Kitchen.", "kitchen") == 1.0
    assert exact_match(" the kitchen", "kitchen") == 0.0
    assert exact_match("kitchen. Mary went", "kitchen") == 0.0
    assert exact_match("kitchen. Mary went", "kitchen", first_word=True) == 1.0
    assert exact_match("office!", ["garden", "office"]) == 1.0
    assert exact_match("", "kitchen", first_word=True) == 0.0


def test_all_values_contained():
    assert all_values_contained("1234567, 7654321 and 1111111", ["1234567", "7654321", "2222222"]) == 2 / 3
    assert all_values_contained("ABCDE fghij", ["abcde", "FGHIJ"]) == 1.0
    assert all_values_contained("nothing", "1234567") == 0.0
    with pytest.raises(ValueError):
        all_values_contained("x", [])


def test_passkey_correct():
    assert passkey_correct(" 12345. Remember", "12345") == 1.0
    assert passkey_correct("It is 2 then 12345", 12345) == 1.0  # the first *5-digit* number
    assert passkey_correct("54321 or 12345", "12345") == 0.0
    assert passkey_correct("123456", "12345") == 0.0
    assert passkey_correct("no digits", "12345") == 0.0


def test_score_dispatch_on_samples():
    p = make_sample("passkey", 1000, 0.5, seed=0)
    assert score(p, f" {p.answer}.") == 1.0 and score(p, " 00000") == 0.0
    m = make_sample("niah_multivalue", 2000, 0.5, seed=0)
    assert score(m, " " + ", ".join(m.answer[:2])) == 0.5
    q = make_sample("babilong_qa1", 2000, None, seed=0)
    assert score(q, f" {q.answer.capitalize()}.\nQuestion") == 1.0


def test_mqar_accuracy():
    labels = torch.tensor([[-100, 5, -100, 7]])
    assert mqar_accuracy(torch.tensor([[0, 5, 0, 6]]), labels) == 0.5
    logits = torch.zeros(1, 4, 8)
    logits[0, 1, 5] = logits[0, 3, 7] = 1.0
    assert mqar_accuracy(logits, labels) == 1.0


def test_accuracy_table():
    records = [(1000, 0.5, 1.0), (1000, 0.5, 0.0), (1000, 0.0, 1.0), (4000, 0.5, 0.25), (4000, None, 1.0)]
    assert aggregate(records)[(1000, 0.5)] == (0.5, 2)
    t = accuracy_table(records)
    assert t.lengths == [1000, 4000] and t.depths == [None, 0.0, 0.5]
    assert math.isnan(t.accuracy[0][0]) and t.accuracy[0][2] == 0.5 and t.accuracy[1][2] == 0.25
    assert t.counts == [[0, 1, 2], [1, 0, 1]]
    text = t.format()
    assert text.splitlines()[0].split() == ["length", "-", "0", "0.5"] and "0.25" in text
