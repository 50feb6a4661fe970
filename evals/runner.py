"""Run a model over long inputs in fixed memory: streamed prompts, greedy answers, task sweeps.

Every long input is read in pieces of ``chunk_len`` tokens with the model state carried between
them (the streaming contract in DESIGN.md), under ``torch.no_grad``, keeping only what each caller
needs (the last logits, or per-token losses), never the logits of the whole input. So a 1M-token
prompt costs the memory of one chunk plus the fixed-size state.

    from titans_lnn.evals.runner import load_model, evaluate_task
    model, tok = load_model("runs/tiny/model")          # or load_model(preset="debug")
    records = evaluate_task(model, tok, "passkey", lengths=[1024, 4096], depths=[0, 0.5, 1])
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from titans_lnn.evals.scoring import score
from titans_lnn.evals.tasks import TASKS, make_sample
from titans_lnn.io import read_json
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import Tokenizer, get_tokenizer, tokenizer_from_dict

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "answer", "evaluate_mqar", "evaluate_task", "greedy_continue", "load_model",
           "evaluate_samples", "max_new_tokens_for", "stream_nll", "stream_prompt"]

# Greedy tokens to generate per task (byte tokens; a subword tokenizer needs fewer): the answer
# with its leading space and trailing period, and some slack.
DEFAULT_MAX_NEW_TOKENS = {
    "passkey": 8,  # " 12345."
    "niah_single_1": 10, "niah_single_2": 10, "niah_multikey_1": 10, "niah_multikey_2": 10,  # 7 digits
    "niah_single_3": 40, "niah_multikey_3": 40,  # a 36-character UUID
    "niah_multivalue": 48, "niah_multiquery": 48,  # four 7-digit numbers, comma-separated
    "vt": 40,  # five 5-letter variable names
}
_BABILONG_MAX_NEW_TOKENS = 12  # one word


def max_new_tokens_for(task: str) -> int:
    """The default generation budget of ``task`` (one of ``TASKS``)."""
    if task.startswith("babilong_"):
        return _BABILONG_MAX_NEW_TOKENS
    if task not in DEFAULT_MAX_NEW_TOKENS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return DEFAULT_MAX_NEW_TOKENS[task]


# ----------------------------------------------------------------------------- loading


def load_model(checkpoint: str | os.PathLike | None = None, *, preset: str | None = None, variant: str = "mac",
               tokenizer: str | Tokenizer | None = None, device: str | torch.device = "cpu",
               seed: int = 0) -> tuple[TitansLNN, Tokenizer]:
    """A model in eval mode and its tokenizer.

    ``checkpoint``: a ``save_pretrained`` directory; its tokenizer is ``tokenizer.json`` beside the
    weights (written by training), else the nucleotide tokenizer for a 6-token vocabulary and bytes
    otherwise (a Hugging Face ``tokenizer.json`` there is loaded as one). ``preset`` instead: random
    weights (``torch.manual_seed(seed)``) for smoke tests, with the vocabulary of ``tokenizer`` (bytes
    by default). ``tokenizer`` overrides the checkpoint's.
    """
    if (checkpoint is None) == (preset is None):
        raise ValueError("give exactly one of checkpoint (a save_pretrained directory) or preset")
    if checkpoint is not None:
        model = TitansLNN.from_pretrained(checkpoint, map_location=device)
        if tokenizer is None:
            tok_file = os.path.join(checkpoint, "tokenizer.json")
            if os.path.isfile(tok_file):
                saved = read_json(tok_file, "tokenizer object")
                # Training writes Tokenizer.to_dict(); a Hugging Face tokenizers file has no "type".
                try:
                    tokenizer = tokenizer_from_dict(saved) if "type" in saved else tok_file
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{tok_file}: not a tokenizer ({e})") from None
            else:
                tokenizer = "nucleotide" if model.config.vocab_size == 6 else "byte"
        tok = get_tokenizer(tokenizer)
    else:
        from titans_lnn.config import TitansLNNConfig

        tok = get_tokenizer(tokenizer or "byte")
        torch.manual_seed(seed)
        config = TitansLNNConfig.from_preset(preset, variant=variant, vocab_size=tok.vocab_size)
        model = TitansLNN(config).to(device)
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"the model's vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                         f"({tok.vocab_size}, {tok.name}): pass the tokenizer the model was trained with")
    return model.eval(), tok


# ----------------------------------------------------------------------------- streaming


def _as_ids(ids, device) -> torch.Tensor:
    """ids (list, numpy array or tensor; (T,) or (B, T)) -> (B, T) int64 tensor on ``device``."""
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids.astype(np.int64, copy=False))
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]  # (1, T)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty (T,) or (B, T) sequence; got shape {tuple(ids.shape)}")
    return ids


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def stream_prompt(model: TitansLNN, ids, chunk_len: int = 2048, state=None, progress: bool = False):
    """Read ``ids`` ((T,) or (B, T)) in pieces of ``chunk_len`` tokens, carrying the state.

    Returns ``(last_logits, state)``: the logits (B, V) after the last token (they predict the next
    one) and the state after it. Only one chunk's logits exist at a time.
    """
    out = model.stream(_as_ids(ids, _device(model)), chunk_len=chunk_len, state=state, progress=progress)
    return out.logits, out.state


@torch.no_grad()
def stream_nll(model: TitansLNN, ids, chunk_len: int = 2048, state=None, prev_logits: torch.Tensor | None = None,
               progress: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per-token negative log-likelihood (nats) of ``ids`` ((T,) or (B, T)), read in chunks.

    Yields ``(start, nll, greedy)`` per chunk: ``nll[b, i]`` is ``-log p(ids[b, start + i] | all before)``
    (at least float32, (B, L)) and ``greedy[b, i]`` whether that token is the argmax. Token 0 has no prediction
    unless ``prev_logits`` (B, V) (the logits after a context streamed before) is given, so by default
    the first chunk starts at 1. The generator returns the final state (``StopIteration.value``).
    """
    ids = _as_ids(ids, _device(model))
    for s, logits, after in model.stream_pieces(ids, chunk_len=chunk_len, state=state, progress=progress):
        state = after
        piece = ids[:, s:s + logits.shape[1]]  # (B, L); logits (B, L, V): position i predicts piece[:, i + 1]
        if prev_logits is not None:
            pred, target, start = torch.cat([prev_logits[:, None], logits[:, :-1]], 1), piece, s
        else:
            pred, target, start = logits[:, :-1], piece[:, 1:], s + 1
        prev_logits = logits[:, -1]
        if target.shape[1] == 0:
            continue
        logp = F.log_softmax(pred.to(torch.promote_types(pred.dtype, torch.float32)), dim=-1)  # (B, L, V)
        nll = -logp.gather(-1, target[..., None]).squeeze(-1)  # (B, L)
        yield start, nll, pred.argmax(-1) == target
    return state


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def greedy_continue(model: TitansLNN, tokenizer: Tokenizer, last_logits: torch.Tensor, state, max_new_tokens: int,
                    stop: Sequence[str] = ()) -> str:
    """Greedy decoding of one sequence from ``last_logits`` (1, V) and ``state`` (after a streamed prompt):
    up to ``max_new_tokens`` tokens, cut before the first ``stop`` string. Returns the decoded text."""
    new: list[int] = []
    text = ""
    for i in range(max_new_tokens):
        nxt = last_logits.argmax(-1, keepdim=True)  # (1, 1)
        new.append(int(nxt))
        if stop:
            text = tokenizer.decode(new)
            cut = [text.find(s) for s in stop if s and s in text]
            if cut:
                return text[:min(cut)]
        if i + 1 < max_new_tokens:  # the last token needs no forward pass
            out = model(nxt, state=state)
            last_logits, state = out.logits[:, -1], out.state
    return tokenizer.decode(new) if new else ""


def answer(model: TitansLNN, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 16, chunk_len: int = 2048,
           *, stop: Sequence[str] = (), progress: bool = False) -> str:
    """Greedy answer to ``prompt``: stream it in chunks of ``chunk_len``, then decode one token at a time
    with the fixed-size state as the cache. Returns only the generated text."""
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        raise ValueError("prompt encodes to no tokens")
    last, state = stream_prompt(model, ids, chunk_len, progress=progress)
    return greedy_continue(model, tokenizer, last, state, max_new_tokens, stop)


# ----------------------------------------------------------------------------- task sweeps


def _count_tokens(tokenizer: Tokenizer) -> Callable[[str], int] | None:
    """None for the byte tokenizer (the generators count UTF-8 bytes themselves)."""
    return None if tokenizer.name == "byte" else (lambda text: len(tokenizer.encode(text)))


def evaluate_task(model: TitansLNN, tokenizer: Tokenizer, task: str, lengths: Sequence[int],
                  depths: Sequence[float | None] = (0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 1, seed: int = 0,
                  chunk_len: int = 2048, progress: bool = True, *, max_new_tokens: int | None = None,
                  on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Greedy answers of ``model`` on ``samples`` samples of ``task`` per (length, depth), scored.

    Sample ``i`` uses seed ``seed + i`` (the same key for every length and depth, only its place
    moves); a depth of None draws the needle's depth from the seed. BABILong tasks place their facts
    at random: ``depths`` is ignored for them. Returns one record per sample: task, length (requested
    tokens), n_tokens (actual), depth (as requested), needle_depth (where it went), sample, seed,
    expected, got, score (0..1), correct (score == 1), seconds. ``on_record`` is called with each.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    depths = [None] if task.startswith("babilong_") else list(depths)
    budget = max_new_tokens if max_new_tokens is not None else max_new_tokens_for(task)
    count = _count_tokens(tokenizer)
    records: list[dict] = []
    grid = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    bar = tqdm(grid, desc=task, unit="sample", disable=not progress)
    for n, d, i in bar:
        t0 = time.perf_counter()
        sample = make_sample(task, int(n), d, seed + i, count_tokens=count)
        got = answer(model, tokenizer, sample.prompt, budget, chunk_len, progress=progress and n > 64 * chunk_len)
        value = score(sample, got)
        rec = {"task": task, "length": int(n), "n_tokens": int(sample.meta.get("n_tokens", n)),
               "depth": d, "needle_depth": sample.depth, "sample": i, "seed": seed + i,
               "expected": sample.answer, "got": got, "score": value, "correct": value == 1.0,
               "seconds": round(time.perf_counter() - t0, 4)}
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        bar.set_postfix(acc=f"{sum(r['score'] for r in records) / len(records):.2f}")
    return records


@torch.no_grad()
def evaluate_samples(model: TitansLNN, tokenizer: Tokenizer, samples: Sequence, *, chunk_len: int = 4096,
                     max_new_tokens: int | None = None, pad: str = " ") -> list[dict]:
    """Greedy answers to several prompts at once: one batch streamed through the fixed-size state.

    Prompts of unequal token counts are left-padded with ``pad`` (repeated) to the longest, so that
    they all end together and the answers are decoded in lockstep; the pad is whitespace before the
    task's header, which every task here ignores. Returns one record per sample, as
    :func:`evaluate_task` (``seconds`` is the sample's share of the batch).
    """
    if not samples:
        return []
    t0 = time.perf_counter()
    device = _device(model)
    encoded = [list(tokenizer.encode(s.prompt)) for s in samples]
    width = max(len(e) for e in encoded)
    pad_id = tokenizer.encode(pad)[0]
    ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], dtype=torch.long, device=device)
    budget = max_new_tokens if max_new_tokens is not None else max_new_tokens_for(samples[0].task)
    last, state = stream_prompt(model, ids, chunk_len)
    new = []
    for i in range(budget):
        nxt = last.argmax(-1, keepdim=True)  # (B, 1)
        new.append(nxt)
        if i + 1 < budget:
            out = model(nxt, state=state)
            last, state = out.logits[:, -1], out.state
    tokens = torch.cat(new, 1).tolist()  # (B, budget)
    per = round((time.perf_counter() - t0) / len(samples), 4)
    records = []
    for sample, enc, toks in zip(samples, encoded, tokens):
        got = tokenizer.decode(toks)
        value = score(sample, got)
        records.append({"task": sample.task, "length": int(sample.length), "n_tokens": len(enc),
                        "depth": sample.depth, "needle_depth": sample.depth,
                        "expected": sample.answer, "got": got, "score": value, "correct": value == 1.0,
                        "seconds": per})
    return records


@torch.no_grad()
def evaluate_mqar(model: TitansLNN, lengths: Sequence[int], num_kv_pairs: Sequence[int], samples: int = 16,
                  seed: int = 0, chunk_len: int = 2048, progress: bool = True, *,
                  batch_size: int = 16) -> list[dict]:
    """MQAR (Zoology) accuracy: argmax at the query positions, for each (sequence length, pairs).

    The examples use the model's vocabulary (keys in the lower half, values in the upper half);
    combinations that break MQAR's rules (4 * pairs > length) are skipped. One record per example:
    task, length, num_kv_pairs, sample, seed, correct_answers, answers, score (their ratio), correct
    (all right), seconds (the example's share of its batch).
    """
    from titans_lnn.evals.mqar import make_mqar

    vocab = model.config.vocab_size
    grid = [(T, N) for T in lengths for N in num_kv_pairs if 4 * N <= T and N < vocab // 2]
    if not grid:
        raise ValueError(f"no valid (length, num_kv_pairs) in {list(lengths)} x {list(num_kv_pairs)}: MQAR needs "
                         f"4 * pairs <= length and pairs < vocab_size / 2 = {vocab // 2}")
    records: list[dict] = []
    bar = tqdm(total=len(grid) * samples, desc="mqar", unit="example", disable=not progress)
    for T, N in grid:
        inputs, labels = make_mqar(samples, int(T), int(N), vocab_size=vocab, seed=seed)  # (S, T) each
        for b0 in range(0, samples, batch_size):
            t0 = time.perf_counter()
            x, y = inputs[b0:b0 + batch_size], labels[b0:b0 + batch_size]  # (B, T)
            right = torch.zeros(x.shape[0], dtype=torch.long)
            for s, logits, _ in model.stream_pieces(x, chunk_len=chunk_len):
                lab = y[:, s:s + logits.shape[1]]
                hit = (logits.argmax(-1).cpu() == lab) & (lab != -100)  # (B, L)
                right += hit.sum(1)
            per = (time.perf_counter() - t0) / x.shape[0]
            for j in range(x.shape[0]):
                k = int(right[j])
                records.append({"task": "mqar", "length": int(T), "num_kv_pairs": int(N), "sample": b0 + j,
                                "seed": seed, "correct_answers": k, "answers": int(N), "score": k / N,
                                "correct": k == N, "seconds": round(per, 4)})
            bar.update(x.shape[0])
            bar.set_postfix(acc=f"{sum(r['score'] for r in records) / len(records):.2f}")
    bar.close()
    return records
