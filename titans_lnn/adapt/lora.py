"""LoRA (Hu et al. 2021) over the same layers as SVF: the baseline of the demonstration.

Each target weight W (O, I) becomes W + (alpha / r) B A, with A (r, I) random and B (O, r) zero at the
start (so the adapted model starts as the base). A LoRA of rank r on a layer has r (O + I) parameters,
against R = min(O, I) for SVF: rank 1 is the smallest LoRA, and still several times an SVF expert.

    lora = LoRA(model, rank=1)
    loss = torch.func.functional_call(model, lora.weights(), (ids,), {"labels": labels}).loss
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_lnn.adapt.svf import DEFAULT_TARGETS, target_layers


class LoRA:
    """Low-rank adapters (A, B) for ``model``'s target layers; the model itself is never modified."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS, *, rank: int = 1,
                 alpha: float | None = None, seed: int = 0):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank={rank!r} is invalid: expected a positive integer")
        self.model = model
        self.layers = target_layers(model, tuple(targets))
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        g = torch.Generator().manual_seed(seed)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            O, I = layer.weight.shape
            w = layer.weight
            dtype = torch.promote_types(w.dtype, torch.float32)
            a = torch.randn(rank, I, generator=g, dtype=dtype) / I ** 0.5  # (r, I): Kaiming-like, as the paper
            self.a[name] = a.to(w.device).requires_grad_(True)
            self.b[name] = torch.zeros(O, rank, dtype=dtype, device=w.device, requires_grad=True)  # (O, r)

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in self.layers for t in (self.a[name], self.b[name])]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def weights(self) -> dict[str, torch.Tensor]:
        """{parameter name: W + scale B A} for ``torch.func.functional_call``, differentiable in A and B."""
        out = {}
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            out[f"{name}.weight"] = w + (self.scale * (self.b[name] @ self.a[name])).to(w.dtype)  # (O, I)
        return out
