"""Lyapunov check: does the model's streaming state amplify a tiny perturbation?

The streaming contract (any split gives the logits of one pass) only holds when the state's
recurrence is stable: a map that amplifies perturbations turns rounding into output after a few
thousand tokens. This streams one sequence twice, side by side as a batch of two, the second copy
with its first token's embedding moved by ``eps`` (a random direction of norm ``eps``), and reports
per block of ``block`` tokens the largest logit difference between the two copies and the largest
difference of the floating-point state. ``growth`` is the last block's logit difference over the
first block's: <= 1 is stable (the perturbation fades or persists), > 1 means it was amplified.

    titans-lnn stability --preset tiny --variant mac --tokens 16k
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from titans_lnn.model import TitansLNN


@dataclass
class StabilityReport:
    block: int  # tokens per block
    logit_diff: list[float] = field(default_factory=list)  # max |logit difference| in each block
    state_diff: list[float] = field(default_factory=list)  # max |state difference| after each block

    @property
    def growth(self) -> float:
        """Last block's logit difference over the first block's (<= 1: stable)."""
        first = max(self.logit_diff[0], torch.finfo(torch.float64).tiny)
        return self.logit_diff[-1] / first

    def table(self) -> str:
        lines = ["| tokens | max |logit diff| | max |state diff| |", "|---|---|---|"]
        for i, (a, b) in enumerate(zip(self.logit_diff, self.state_diff)):
            lines.append(f"| {i * self.block}-{(i + 1) * self.block} | {a:.2e} | {b:.2e} |")
        return "\n".join(lines)


def _state_diff(state) -> float:
    diff = 0.0
    for tensor in state.tensors().values():
        if tensor.is_floating_point() and tensor.dim() and tensor.shape[0] == 2 and tensor.numel():
            diff = max(diff, (tensor[0] - tensor[1]).abs().max().item())
    return diff


@torch.no_grad()
def perturbation_growth(model: TitansLNN, ids: torch.Tensor, *, eps: float = 1e-8, block: int = 1024,
                        seed: int = 0) -> StabilityReport:
    """Stream ``ids`` (T,) twice in blocks of ``block`` tokens, the second copy with its first
    token's embedding moved by ``eps``; returns the per-block differences (see the module doc)."""
    if ids.dim() != 1 or ids.numel() < block:
        raise ValueError(f"ids must be a 1-D sequence of at least block={block} tokens; got shape {tuple(ids.shape)}")
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(model.config.d_model, generator=gen, dtype=torch.float64)
    direction = eps * direction / direction.norm()
    first = [True]

    def perturb(module, inputs, output):
        if first[0]:
            output = output.clone()
            output[1, 0] += direction.to(output)
            first[0] = False
        return output

    handle = model.embed.register_forward_hook(perturb)
    report = StabilityReport(block)
    try:
        state = model.init_state(2)
        for piece in ids[None].expand(2, -1).split(block, dim=1):
            out = model(piece, state=state)
            state = out.state
            report.logit_diff.append((out.logits[0] - out.logits[1]).abs().max().item())
            report.state_diff.append(_state_diff(state))
    finally:
        handle.remove()
    return report
