"""The evaluation tasks by name, and one entry point to make a sample of any of them.

    from titans_lnn.evals.tasks import make_sample
    s = make_sample("niah_single_2", length=16_384, depth=0.5, seed=0)
    s.prompt, s.answer, s.meta["needle_offset"]

Every task is a seeded generator ``(length, depth, seed, *, count_tokens=None) -> Sample``; the
length is in tokens (UTF-8 bytes by default, the package's byte-level tokenizer). Text tasks:

| name | source | haystack | needles |
|---|---|---|---|
| passkey | Mohtashami & Jaggi 2023 | noise | one 5-digit key |
| niah_single_1/2/3 | RULER S-NIAH | noise / KJV / KJV | word key, number / number / UUID value |
| niah_multikey_1 | RULER MK-NIAH | KJV | + 3 distractor keys |
| niah_multikey_2/3 | RULER MK-NIAH | distractor needles only | word keys, numbers / UUID keys, UUIDs |
| niah_multivalue | RULER MV-NIAH | KJV | 4 values for the key, all asked |
| niah_multiquery | RULER MQ-NIAH | KJV | 4 keys, all asked |
| vt | RULER variable tracking | noise | 1 chain of 4 hops |
| babilong_qa1 .. qa5 | BABILong | KJV | a bAbI story (depth must be None) |

MQAR, a token-level task, is :func:`titans_lnn.evals.mqar.make_mqar`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

from titans_lnn.evals.babilong import make_babilong, make_story
from titans_lnn.evals.haystack import Sample, kjv_verses
from titans_lnn.evals.mqar import make_mqar
from titans_lnn.evals.needles import make_niah, make_passkey, make_vt

__all__ = ["TASKS", "Sample", "kjv_verses", "make_babilong", "make_mqar", "make_niah", "make_passkey",
           "make_sample", "make_story", "make_vt"]

_RULER = {  # RULER's synthetic.yaml, NIAH part
    "niah_single_1": {"haystack": "noise", "type_k": "words", "type_v": "numbers"},
    "niah_single_2": {"haystack": "kjv", "type_k": "words", "type_v": "numbers"},
    "niah_single_3": {"haystack": "kjv", "type_k": "words", "type_v": "uuids"},
    "niah_multikey_1": {"haystack": "kjv", "type_k": "words", "type_v": "numbers", "num_keys": 4},
    "niah_multikey_2": {"haystack": "needles", "type_k": "words", "type_v": "numbers"},
    "niah_multikey_3": {"haystack": "needles", "type_k": "uuids", "type_v": "uuids"},
    "niah_multivalue": {"haystack": "kjv", "type_k": "words", "type_v": "numbers", "num_values": 4},
    "niah_multiquery": {"haystack": "kjv", "type_k": "words", "type_v": "numbers", "num_queries": 4},
}

TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": make_passkey,
    **{name: functools.partial(make_niah, task=name, **kw) for name, kw in _RULER.items()},
    "vt": make_vt,
    **{f"babilong_qa{i}": functools.partial(make_babilong, f"qa{i}") for i in range(1, 6)},
}


def make_sample(task: str, length: int, depth: float | None = None, seed: int = 0, *,
                count_tokens: Callable[[str], int] | None = None) -> Sample:
    """A sample of ``task`` with a prompt of about ``length`` tokens (never more).

    ``depth`` in [0, 1] places the queried needle (None: a seeded random depth; BABILong tasks
    require None). ``count_tokens(text) -> int`` counts tokens for another tokenizer than bytes.
    Raises ValueError for an unknown task, a depth outside [0, 1], or a length too short for the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    try:
        n = operator.index(length)
    except TypeError:
        n = 0
    if isinstance(length, bool) or n < 1:
        raise ValueError(f"length={length!r} must be a positive int")
    return TASKS[task](n, depth, seed, count_tokens=count_tokens)
