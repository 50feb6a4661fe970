"""Persistent memory (Titans section 3.3): N_p learned, input-independent tokens that every
attention context sees as a prefix. They hold task knowledge rather than context."""

from __future__ import annotations

import torch
import torch.nn as nn


class PersistentMemory(nn.Module):
    """tokens: (N_p, dim), learned; ``memory(batch_size)`` -> (B, N_p, dim), the prefix every context sees."""

    def __init__(self, n_tokens: int, dim: int, init_std: float = 0.02):
        super().__init__()
        if n_tokens < 1 or dim < 1:
            raise ValueError(f"PersistentMemory(n_tokens={n_tokens}, dim={dim}): both must be >= 1")
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * init_std)

    def forward(self, batch_size: int) -> torch.Tensor:
        """The tokens for a batch: (B, N_p, dim)."""
        return self.tokens[None].expand(batch_size, -1, -1)
