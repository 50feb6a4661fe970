"""Autoregressive generation with the fixed-size streaming state as the cache.

    ids = generate(model, prompt, max_new_tokens=32, temperature=0.8, top_k=50)
    ids = model.generate(prompt, 32)   # the same, as a method

The prompt is read once (``model.stream``, in pieces); each new token is then one decode step
(``titans_lnn.decode.decode_step``: every layer's one-token form, not the chunked forward) carrying the
fixed-size state, so the time per token does not depend on how much has been read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from titans_lnn.decode import decode_step

if TYPE_CHECKING:
    from titans_lnn.model import TitansLNN
    from titans_lnn.state import ModelState


PREFILL_CHUNK = 4096  # prompt tokens per forward call: a long prompt is read in pieces, in fixed memory


@torch.no_grad()
def generate(model: TitansLNN, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, state: ModelState | None = None,
             generator: torch.Generator | None = None, return_state: bool = False):
    """Continue ``input_ids`` (B, T) by ``max_new_tokens`` tokens, reading the prompt once and then
    one token per step with the fixed-size state as the cache. temperature=0 is greedy.

    Returns (B, T + max_new_tokens) int64 ids (and the final state when ``return_state``). The ids are
    int64 whatever the prompt's integer dtype: a narrower one (uint8, int16) cannot hold every id of a
    larger vocabulary."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
    check_sampling(temperature, top_k, top_p, generator)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state={return_state!r} is invalid: expected True or False")
    out = model.stream(input_ids, chunk_len=PREFILL_CHUNK, state=state)  # the prompt, checked, in fixed memory
    tokens = [input_ids.long()]
    logits, state = out.logits, out.state
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1) int64
        tokens.append(nxt)
        # the model sampled nxt itself: no input checks (their vocabulary check would read the ids back
        # to the host, a synchronisation per token on a GPU)
        if i + 1 < max_new_tokens or return_state:
            logits, state = decode_step(model, nxt, state)
    ids = torch.cat(tokens, dim=1)  # (B, T + max_new_tokens)
    return (ids, state) if return_state else ids


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   generator: torch.Generator | None = None) -> None:
    """Raise a ValueError / TypeError naming the first invalid sampling argument."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: expected None or an integer >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid: expected None or a number in (0, 1]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={generator!r} is invalid: expected None or a torch.Generator")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from logits (B, V): greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k tokens and to the smallest set with probability >= top_p. -> (B, 1) int64."""
    check_sampling(temperature, top_k, top_p, generator)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a float tensor (batch, vocab); got {got}")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.double() / temperature  # float64: a tiny temperature must not overflow to inf
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the first token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    try:  # no finiteness check up front: reading it back would synchronise with the GPU every token
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)
    except RuntimeError as e:
        raise ValueError(f"cannot sample: the logits hold NaN or infinite values (the model produced them): "
                         f"{e}") from None
