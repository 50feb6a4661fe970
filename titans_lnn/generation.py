"""Autoregressive generation with the fixed-size streaming state as the cache.

    ids = generate(model, prompt, max_new_tokens=32, temperature=0.8, top_k=50)
    ids = model.generate(prompt, 32)   # the same, as a method

The prompt is read once; each new token is then one forward step of length 1 carrying the state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from titans_lnn.model import TitansLNN
    from titans_lnn.state import ModelState


@torch.no_grad()
def generate(model: TitansLNN, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, state: ModelState | None = None,
             generator: torch.Generator | None = None, return_state: bool = False):
    """Continue ``input_ids`` (B, T) by ``max_new_tokens`` tokens, reading the prompt once and then
    one token per step with the fixed-size state as the cache. temperature=0 is greedy.
    Returns (B, T + max_new_tokens) ids (and the final state when ``return_state``)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    out = model(input_ids, state=state)
    tokens = [input_ids]
    logits, state = out.logits[:, -1], out.state
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
        tokens.append(nxt.to(input_ids.dtype))
        if i + 1 < max_new_tokens:
            out = model(nxt, state=state)
            logits, state = out.logits[:, -1], out.state
        else:
            state = model(nxt, state=state).state if return_state else state
    ids = torch.cat(tokens, dim=1)
    return (ids, state) if return_state else ids


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from logits (B, V): greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k tokens and to the smallest set with probability >= top_p. -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the first token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
