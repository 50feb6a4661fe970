"""Training adapters (SVF experts, LoRA baselines) with the base model frozen.

The model is called with ``torch.func.functional_call`` and the adapted target weights as overrides,
so gradients reach only the adapter's tensors (z for SVF; A, B for LoRA); every model parameter has
``requires_grad=False`` while training (restored after).

Objectives (``objective=``):
    "ce"  cross-entropy on the labelled positions (labels -100 elsewhere), the model's own loss.
    "pg"  the paper's policy gradient (Transformer² eq. 1) in a per-token, teacher-forced form: at each
          labelled position a token is sampled from the adapted model given the true prefix, reward
          r = 1 when it is the label and 0 otherwise, minus the batch's mean reward (a baseline), and
          loss = -mean((r - mean r) log pi(token)) + kl_coef * KL(pi || pi_base) over those positions.
          One forward pass per step (no autoregressive sampling), so it runs on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from titans_lnn.adapt.lora import LoRA
from titans_lnn.adapt.svf import SVF, Expert

OBJECTIVES = ("ce", "pg")
Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (ids (B, T), labels (B, T), -100 ignored)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` with requires_grad=False inside the block (the flags restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def adapter_loss(model: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor, *,
                 objective: str = "ce", kl_coef: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of the model with its target weights replaced by ``weights`` (see the module
    docstring). ids, labels: (B, T). The "pg" objective reads the base model's logits (the model as it is)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is invalid: expected one of {', '.join(OBJECTIVES)}")
    if objective == "ce":
        return functional_call(model, weights, (ids,), {"labels": labels}).loss
    mask = labels != -100  # (B, T)
    if not bool(mask.any()):
        raise ValueError("labels has no labelled position (all -100): the policy gradient needs targets")
    logits = functional_call(model, weights, (ids,)).logits[mask].float()  # (N, V)
    logp = F.log_softmax(logits, dim=-1)
    with torch.no_grad():
        action = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (N,)
        reward = (action == labels[mask]).float()
        advantage = reward - reward.mean()
    loss = -(advantage * logp.gather(1, action[:, None]).squeeze(1)).mean()
    if kl_coef:
        with torch.no_grad():
            base = F.log_softmax(model(ids).logits[mask].float(), dim=-1)  # (N, V)
        loss = loss + kl_coef * (logp.exp() * (logp - base)).sum(-1).mean()
    return loss


def train_adapter(model: nn.Module, params: list[torch.Tensor], weights: Callable[[], dict[str, torch.Tensor]],
                  batches: Batches, steps: int, *, lr: float, objective: str = "ce", kl_coef: float = 0.0,
                  seed: int = 0, max_grad_norm: float = 1.0,
                  on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Adam on ``params`` for ``steps`` steps of ``adapter_loss``; ``weights()`` builds the overrides from
    them. Returns the loss of every step."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: expected a positive integer")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is invalid: expected a number > 0")
    opt = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)  # multinomial samples on the logits' device
    losses = []
    with frozen(model):
        for step in range(steps):
            ids, labels = batches(step)
            loss = adapter_loss(model, weights(), ids.to(device), labels.to(device), objective=objective,
                                kl_coef=kl_coef, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
    return losses


def train_svf(svf: SVF, batches: Batches, steps: int, *, name: str, lr: float = 1e-2, objective: str = "ce",
              kl_coef: float = 0.0, seed: int = 0, on_step: Callable[[int, float], None] | None = None,
              **meta: str) -> Expert:
    """Train an SVF expert from z = 1 (the base model) and return it, with its task metadata ``meta``.
    Runs on the base weights (an applied expert is removed meanwhile and restored after)."""
    z = svf.ones(requires_grad=True)
    with svf.applied(None):
        losses = train_adapter(svf.model, list(z.values()), lambda: svf.weights(z), batches, steps, lr=lr,
                               objective=objective, kl_coef=kl_coef, seed=seed, on_step=on_step)
    return svf.expert(z, name, objective=objective, steps=str(steps), lr=str(lr), final_loss=f"{losses[-1]:.4f}",
                      **meta)


def train_lora(lora: LoRA, batches: Batches, steps: int, *, lr: float = 1e-2, objective: str = "ce",
               kl_coef: float = 0.0, seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``lora``'s A and B in place; returns the losses."""
    return train_adapter(lora.model, lora.parameters(), lora.weights, batches, steps, lr=lr, objective=objective,
                         kl_coef=kl_coef, seed=seed, on_step=on_step)
