"""Needle-in-a-haystack tasks: passkey retrieval and the RULER retrieval and tracing tasks.

- Passkey retrieval (Mohtashami & Jaggi 2023, landmark attention): a 5-digit key in the repeated
  "grass is green" filler.
- RULER (Hsieh et al. 2024, ``scripts/data/synthetic/niah.py`` and ``variable_tracking.py``):
  needles "One of the special magic {numbers} for {key} is: {value}." in a noise, English (here the
  King James Bible, where RULER uses Paul Graham's essays) or all-needle haystack; single, multi-key,
  multi-value and multi-query variants; and variable tracking (chains ``VAR X = 12345`` ...).
  Keys are adjective-noun words (RULER draws them from wonderwords; a fixed list here), values
  7-digit numbers, words or UUIDs, all from ``random.Random`` seeded by (task, seed).

The queried needle goes at the requested depth; extra needles (distractor keys, further values or
queried keys, later links of a chain) at seeded random depths, as RULER places all of its needles.
The key and values depend only on (task, seed), not on the length or depth, so a sweep over a
(length, depth) grid with one seed varies only where the needle sits.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable, Iterator

from titans_lnn.evals.haystack import NOISE_SENTENCES, Sample, compose, cycle_units, kjv_verses

ADJECTIVES = (
    "able", "acid", "agile", "alert", "amber", "ample", "angry", "arctic", "awake", "bare", "basic",
    "bitter", "bland", "blue", "bold", "brave", "brief", "bright", "brisk", "broad", "busy", "calm",
    "cheap", "chief", "civil", "clean", "clever", "close", "cold", "cool", "coral", "cosy", "crisp",
    "cruel", "curly", "damp", "dark", "deep", "dense", "dizzy", "dry", "dull", "eager", "early",
    "easy", "empty", "equal", "faint", "fair", "false", "fancy", "fast", "fierce", "firm", "flat",
    "fond", "frank", "fresh", "full", "funny", "gentle", "giant", "glad", "grand", "great", "green",
    "grey", "grim", "happy", "hard", "harsh", "heavy", "hollow", "huge", "humble", "icy", "idle",
    "jolly", "keen", "kind", "large", "late", "lazy", "lean", "light", "little", "lively", "lonely",
    "long", "loud", "lucky", "mad", "merry", "mild", "misty", "modern", "narrow", "neat", "noble",
    "odd", "old", "pale", "plain", "polite", "proud", "quick", "quiet", "rapid", "rare", "raw",
    "rich", "rigid", "rough", "round", "royal", "rural", "rusty", "sad", "safe", "sharp", "shiny",
    "short", "shy", "silent", "silly", "slim", "slow", "small", "smart", "smooth", "soft", "solid",
    "sour", "spare", "steep", "stiff", "still", "strong", "sunny", "super", "sweet", "swift", "tall",
    "tame", "thin", "tidy", "tiny", "tough", "vast", "vivid", "warm", "weak", "wet", "wide", "wild",
    "wise", "young", "zany",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "bakery", "banana", "barrel", "basket", "beacon", "bee",
    "bell", "bicycle", "bird", "blanket", "boat", "bottle", "bridge", "brush", "bucket", "butter",
    "cabin", "cactus", "camel", "candle", "canyon", "carpet", "castle", "cellar", "chair", "cherry",
    "circle", "cloud", "clover", "coast", "comet", "copper", "cotton", "crane", "crater", "crow",
    "desert", "diamond", "dolphin", "donkey", "dragon", "drum", "eagle", "engine", "falcon", "feather",
    "fence", "ferret", "field", "flute", "forest", "fountain", "fox", "garden", "ginger", "glacier",
    "goose", "granite", "guitar", "hammer", "harbor", "helmet", "hill", "honey", "horizon", "island",
    "jacket", "jungle", "kettle", "kitten", "ladder", "lake", "lantern", "lemon", "lizard", "magnet",
    "maple", "marble", "meadow", "mirror", "monkey", "mountain", "needle", "nest", "ocean", "onion",
    "orchard", "otter", "oven", "owl", "paddle", "panther", "parrot", "pebble", "pencil", "pepper",
    "piano", "pillow", "planet", "pocket", "pond", "puzzle", "rabbit", "raven", "ribbon", "river",
    "rocket", "saddle", "salmon", "shovel", "spider", "spoon", "squirrel", "statue", "stream",
    "sugar", "summit", "teapot", "thunder", "tiger", "tomato", "tower", "trumpet", "tulip", "tunnel",
    "turtle", "valley", "violin", "wagon", "walnut", "whale", "willow", "window", "wizard", "wolf",
)
WORDS = tuple(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS)

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. Answer: "
    "According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
    "the value {value}, they are:"
)

HAYSTACKS = ("noise", "kjv", "needles")
KINDS = {"numbers": "number", "words": "word", "uuids": "uuid"}


def _check_depth(depth: float | None, rng: random.Random) -> float:
    if depth is None:
        return rng.random()
    if not 0.0 <= depth <= 1.0:  # also rejects NaN
        raise ValueError(f"depth={depth} is outside [0, 1]")
    return float(depth)


def random_value(kind: str, rng: random.Random) -> str:
    """A RULER needle key or value: ``numbers`` (7 digits), ``words`` (adjective-noun) or ``uuids``."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(WORDS)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; known: {sorted(KINDS)}")


def _distinct(kind: str, n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = random_value(kind, rng)
        if v not in exclude and v not in out:
            out.append(v)
    return out


def _result(task, length, depth, answer, metric, composed, needles, primary, **meta) -> Sample:
    meta.update(
        n_tokens=composed.n_tokens,
        needle=needles[primary][1],
        needle_offset=composed.needle_offsets[primary],
        depth_offset=composed.depth_offsets[primary],
        needles=[text for _, text in needles],
        needle_depths=[d for d, _ in needles],
        needle_offsets=composed.needle_offsets,
        haystack_span=(composed.haystack_start, composed.haystack_end),
        haystack_chars=composed.haystack_chars,
        max_unit_chars=composed.max_unit_chars,
    )
    return Sample(task, composed.prompt, answer, length, depth, metric, meta)


def make_passkey(length: int, depth: float | None = None, seed: int = 0, *,
                 count_tokens: Callable[[str], int] | None = None, task: str = "passkey") -> Sample:
    """Passkey retrieval: a 5-digit key at ``depth`` in the repeated noise filler."""
    rng = random.Random(f"{task}/{seed}")
    key = str(rng.randint(10000, 99999))
    depth = _check_depth(depth, rng)
    needles = [(depth, PASSKEY_NEEDLE.format(key=key))]
    c = compose(task, header=PASSKEY_HEADER, question=PASSKEY_QUESTION, needles=needles, length=length,
                make_units=lambda: cycle_units(NOISE_SENTENCES), count_tokens=count_tokens)
    return _result(task, length, depth, key, "passkey", c, needles, 0)


def make_niah(
    length: int,
    depth: float | None = None,
    seed: int = 0,
    *,
    haystack: str = "kjv",
    type_k: str = "words",
    type_v: str = "numbers",
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    count_tokens: Callable[[str], int] | None = None,
    task: str = "niah",
) -> Sample:
    """A RULER needle-in-a-haystack sample (RULER's ``niah.py`` with its parameter names shortened).

    ``haystack``: ``"noise"`` (the repeated grass/sky filler), ``"kjv"`` (English) or ``"needles"``
    (distractor needles with other keys, one per line). ``num_keys`` needles' keys, ``num_values``
    values per key, the first ``num_queries`` keys asked for. The answer is the one value, or the list
    of every value of every queried key (RULER scores it with "all values contained").
    """
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; known: {list(HAYSTACKS)}")
    for name, kind in (("type_k", type_k), ("type_v", type_v)):
        if kind not in KINDS:
            raise ValueError(f"{name}={kind!r} is not a needle type; known: {sorted(KINDS)}")
    for name, n in (("num_keys", num_keys), ("num_values", num_values), ("num_queries", num_queries)):
        if n < 1:
            raise ValueError(f"{name}={n} must be >= 1")
    num_keys = max(num_keys, num_queries)
    rng = random.Random(f"{task}/{seed}")
    keys = _distinct(type_k, num_keys, rng)
    values = [_distinct(type_v, num_values, rng) for _ in keys]
    depth = _check_depth(depth, rng)

    needles = []
    for i, key in enumerate(keys):
        for j, value in enumerate(values[i]):
            at = depth if i == j == 0 else rng.random()
            needles.append((at, NEEDLE.format(type_v=type_v, key=key, value=value)))

    sep = " "
    if haystack == "noise":
        def make_units() -> Iterator[str]:
            return cycle_units(NOISE_SENTENCES)
    elif haystack == "kjv":
        verses = kjv_verses()

        def make_units() -> Iterator[str]:
            return cycle_units(verses)
    else:
        sep = "\n"
        taken = set(keys)

        def make_units() -> Iterator[str]:
            # Distractor keys may repeat one another but never equal a real key.
            hay_rng = random.Random(f"{task}/{seed}/haystack")
            while True:
                key = random_value(type_k, hay_rng)
                if key not in taken:
                    yield NEEDLE.format(type_v=type_v, key=key, value=random_value(type_v, hay_rng))

    queries = keys[:num_queries]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if num_queries * num_values == 1:
        one = KINDS[type_v]
        header = (f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
                  f"I will quiz you about the {one} afterwards.")
        question = (f"What is the special magic {one} for {query} mentioned in the provided text? "
                    f"The special magic {one} for {query} mentioned in the provided text is")
        answer: str | list[str] = values[0][0]
    else:
        header = (f"Some special magic {type_v} are hidden within the following text. Make sure to "
                  f"memorize it. I will quiz you about the {type_v} afterwards.")
        question = (f"What are all the special magic {type_v} for {query} mentioned in the provided "
                    f"text? The special magic {type_v} for {query} mentioned in the provided text are")
        answer = [v for vs in values[:num_queries] for v in vs]
    c = compose(task, header=header, question=question, make_units=make_units, needles=needles,
                length=length, count_tokens=count_tokens, sep=sep)
    return _result(task, length, depth, answer, "contains_all", c, needles, 0, keys=keys, values=values,
                   queries=queries)


def make_vt(length: int, depth: float | None = None, seed: int = 0, *, num_chains: int = 1,
            num_hops: int = 4, count_tokens: Callable[[str], int] | None = None, task: str = "vt") -> Sample:
    """RULER variable tracking: find every variable bound (through a chain) to a value.

    The queried chain starts at ``depth`` and its later links follow at random depths in
    [depth, 1]; ``num_chains - 1`` distractor chains (other values) lie anywhere.
    """
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"num_chains={num_chains} and num_hops={num_hops} must be >= 1")
    rng = random.Random(f"{task}/{seed}")
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    chain_values: list[int] = []
    while len(chain_values) < num_chains:
        v = rng.randint(10000, 99999)
        if v not in chain_values:
            chain_values.append(v)
    depth = _check_depth(depth, rng)

    needles = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        statements = [f"VAR {chain[0]} = {chain_values[c]}."]
        statements += [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(num_hops)]
        if c == 0:
            at = [depth] + sorted(rng.uniform(depth, 1.0) for _ in range(num_hops))
        else:
            at = sorted(rng.random() for _ in statements)
        needles += list(zip(at, statements))
    answer = names[:num_hops + 1]
    question = VT_QUESTION.format(value=chain_values[0], n=num_hops + 1)
    c = compose(task, header=VT_HEADER, question=question, needles=needles, length=length,
                make_units=lambda: cycle_units(NOISE_SENTENCES), count_tokens=count_tokens)
    return _result(task, length, depth, answer, "contains_all", c, needles, 0, value=str(chain_values[0]))
