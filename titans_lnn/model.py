"""TitansLNN: token embedding -> blocks -> RMSNorm -> LM head, with a carried streaming state.

    out = model(input_ids, labels=None, state=None, dt=None)
    out.logits (B, T, V); out.loss (next-token cross-entropy; ``labels[b, t]`` is the target of the
    prediction at position t, -100 ignored); out.state (pass it to the next call to continue).

Feeding a sequence in pieces with the state gives the logits of one pass over the whole.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.blocks import Block
from titans_lnn.config import TitansLNNConfig
from titans_lnn.layers import RMSNorm
from titans_lnn.state import ModelState


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # scalar, when labels were given
    state: ModelState  # the state after the last token


class TitansLNN(nn.Module):
    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.fingerprint = hashlib.sha256(config.to_json().encode()).hexdigest()[:16]
        self._warned_state_graph = False  # the graph-carrying state warning is given once per model
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) for linear and embedding weights, zero biases; projections that write
        into the residual stream are scaled by 1/sqrt(2 n_layers) (GPT-2); then the memory and the
        liquid core set their own parameters (initial memory, gate biases, time constants)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo", "w2", "w_out", "proj")) else 1
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            for reset in ("reset_memory_parameters", "reset_liquid_parameters", "reset_conv_parameters"):
                if hasattr(module, reset):
                    getattr(module, reset)()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # State.
    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """A fresh state for ``batch_size`` sequences, on the model's device, in the parameters'
        dtype but never below fp32 (the memory's weights accumulate many small updates)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else torch.promote_types(self.embed.weight.dtype, torch.float32)
        layers = [block.init_state(batch_size, device, dtype) for block in self.blocks]
        return ModelState(0, batch_size, self.fingerprint, layers)

    def _check_inputs(self, input_ids, labels, state, dt) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int16,
                                                                               torch.uint8, torch.int64):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer tensor (torch.long); got {got}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, time); got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is an empty sequence (time dimension 0): expected at least one token")
        if not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, "
                                 f"{self.config.vocab_size})")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if dt is not None and dt.shape != input_ids.shape:
            raise ValueError(f"dt shape {tuple(dt.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if state is not None:
            if not isinstance(state, ModelState):
                raise TypeError(f"state must be a ModelState from model.init_state(); got {type(state).__name__}")
            if state.fingerprint != self.fingerprint:
                raise ValueError(f"state was made by a model with another config (fingerprint {state.fingerprint}, "
                                 f"this model's is {self.fingerprint})")
            if state.batch_size != input_ids.shape[0]:
                raise ValueError(f"state holds batch_size={state.batch_size} sequences but input_ids has batch "
                                 f"{input_ids.shape[0]}")

    def _warn_if_state_carries_graph(self, state: ModelState | None) -> None:
        """Streaming in eval mode with grad enabled chains every piece's autograd graph through the
        state, so memory grows with the tokens read instead of staying flat. In training that chain
        may be wanted (backpropagation through pieces), and with grad disabled nothing new is kept,
        so only the eval-mode, grad-enabled case is flagged."""
        if (state is None or self.training or self._warned_state_graph or not torch.is_grad_enabled()
                or torch.compiler.is_compiling() or not state.requires_grad):
            return
        self._warned_state_graph = True
        warnings.warn(
            "TitansLNN.forward was given a state whose tensors require grad while the model is in eval mode: "
            "each call extends the autograd graph of every piece streamed so far, so memory grows without "
            "bound. For inference, stream under `with torch.no_grad():` (or torch.inference_mode()); to keep "
            "gradients but cut the history, pass `state.detach()`. (Warned once per model.)",
            UserWarning, stacklevel=2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: ModelState | None = None, dt: torch.Tensor | None = None) -> ModelOutput:
        self._check_inputs(input_ids, labels, state, dt)
        self._warn_if_state_carries_graph(state)
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B)
        x = self.embed(input_ids.long())  # (B, T, d)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, new = block(x, layer_state, state.pos, dt)
            layers.append(new)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), labels.reshape(B * T).long(), ignore_index=-100)
        return ModelOutput(logits, loss, ModelState(state.pos + T, B, self.fingerprint, layers))

    # Generation and saving live in titans_lnn.generation / titans_lnn.pretrained; these delegate.
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, state: ModelState | None = None,
                 generator: torch.Generator | None = None, return_state: bool = False):
        """See :func:`titans_lnn.generation.generate`."""
        from titans_lnn.generation import generate
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        state=state, generator=generator, return_state=return_state)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """See :func:`titans_lnn.pretrained.save_pretrained`."""
        from titans_lnn.pretrained import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TitansLNN:
        """See :func:`titans_lnn.pretrained.load_pretrained`."""
        from titans_lnn.pretrained import load_pretrained
        return load_pretrained(directory, map_location)
