"""TitansLNN: token embedding -> blocks -> RMSNorm -> LM head, with a carried streaming state.

    out = model(input_ids, labels=None, state=None, dt=None)
    out.logits (B, T, V); out.loss (next-token cross-entropy; ``labels[b, t]`` is the target of the
    prediction at position t, -100 ignored); out.state (pass it to the next call to continue).

Feeding a sequence in pieces with the state gives the logits of one pass over the whole; ``stream``
does it for inputs of any length in fixed memory:

    out = model.stream(ids, chunk_len=4096)                 # the last logits (B, V) and the state
    for piece in model.stream_pieces(ids, chunk_len=4096):  # or every piece's logits, as they come
        piece.start, piece.logits, piece.state
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.blocks import Block
from titans_lnn.config import TitansLNNConfig
from titans_lnn.layers import OwnInit, RMSNorm
from titans_lnn.state import ModelState, check_like


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V) (None from a checkpointed pass, forward(..., checkpoint_len=))
    loss: torch.Tensor | None  # scalar, when labels were given
    state: ModelState  # the state after the last token


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies over the labelled positions, their number); -100 is ignored."""
    labels = labels.reshape(-1).long()
    total = F.cross_entropy(logits.float().reshape(labels.shape[0], -1), labels, ignore_index=-100, reduction="sum")
    return total, (labels != -100).sum()


class StreamPiece(NamedTuple):
    start: int  # the position of the piece's first token
    logits: torch.Tensor  # (B, L, V): the piece's logits
    state: ModelState  # the state after the piece


class TitansLNN(nn.Module):
    def __init__(self, config: TitansLNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.fingerprint = config.fingerprint
        self._warned_state_graph = False  # the graph-carrying state warning is given once per model
        self._state_templates: dict[int, ModelState] = {}  # by batch size, on the meta device: check_state
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) for linear and embedding weights, zero biases; projections that write
        into the residual stream (marked by ``layers.residual_output``) are scaled by 1/sqrt(2 n_layers)
        (GPT-2); then the modules that set their own parameters (``layers.OwnInit``: initial memory, gate
        biases, time constants, convolutions) do so."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if getattr(module, "residual_output", False) else 1
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, OwnInit):
                module.reset_own_parameters()

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
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
                got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise TypeError(f"labels must be an integer tensor of token ids (-100 = ignored); got {got}")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
        if dt is not None:
            self._check_dt(dt, input_ids)
        if state is not None:
            self.check_state(state, input_ids.shape[0])

    def _check_dt(self, dt, input_ids) -> None:
        if "liquid" not in self.config.parts:
            raise ValueError(f"dt is read only by the liquid core, and variant {self.config.variant!r} has none: "
                             "pass dt=None (or use a variant with the liquid core: mac, mag, mal, liquid)")
        if not isinstance(dt, torch.Tensor) or not dt.is_floating_point():
            got = dt.dtype if isinstance(dt, torch.Tensor) else type(dt).__name__
            raise TypeError(f"dt must be a floating-point tensor of elapsed times; got {got}")
        if dt.shape != input_ids.shape:
            raise ValueError(f"dt shape {tuple(dt.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if not torch.compiler.is_compiling() and not bool(((dt > 0) & torch.isfinite(dt)).all()):
            bad = dt[~((dt > 0) & torch.isfinite(dt))][0].item()
            raise ValueError(f"dt contains {bad}: expected finite elapsed times > 0")

    def check_state(self, state, batch_size: int | None = None) -> None:
        """Raise a ValueError/TypeError naming what is wrong unless ``state`` is a state of this model:
        its config fingerprint, batch size, number of layers, positions, and every tensor's name, shape
        and kind (a state edited by hand or made by another model must not run silently)."""
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState from model.init_state(); got {type(state).__name__}")
        if state.fingerprint != self.fingerprint:
            raise ValueError(f"state was made by a model with another config (fingerprint {state.fingerprint}, "
                             f"this model's is {self.fingerprint})")
        if batch_size is not None and state.batch_size != batch_size:
            raise ValueError(f"state holds batch_size={state.batch_size} sequences but input_ids has batch "
                             f"{batch_size}")
        if not isinstance(state.pos, int) or isinstance(state.pos, bool) or state.pos < 0:
            raise ValueError(f"state.pos={state.pos!r} is invalid: expected the number of tokens read (an int >= 0)")
        if not isinstance(state.layers, list) or len(state.layers) != len(self.blocks):
            n = len(state.layers) if isinstance(state.layers, (list, tuple)) else type(state.layers).__name__
            raise ValueError(f"state has {n} layers; this model has {len(self.blocks)}")
        state.check_positions()
        key = state.batch_size
        if key not in self._state_templates:
            self._state_templates[key] = self.init_state(state.batch_size, device="meta")
        check_like(state, self._state_templates[key])

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
                state: ModelState | None = None, dt: torch.Tensor | None = None, *,
                checkpoint_len: int | None = None) -> ModelOutput:
        """``checkpoint_len``: with labels, compute the loss in segments of this many tokens whose activations
        are recomputed in the backward pass (activation checkpointing): training memory then grows with one
        segment plus the states at segment boundaries instead of with the sequence, and the gradients equal
        the plain pass's (the same operations, run twice). The output's ``logits`` are then None (the whole
        sequence's logits are what it avoids keeping)."""
        self._check_inputs(input_ids, labels, state, dt)
        self._warn_if_state_carries_graph(state)
        if checkpoint_len is not None:
            return self._checkpointed(input_ids, labels, state, dt, checkpoint_len)
        return self._forward(input_ids, labels, state, dt)

    def _forward(self, input_ids, labels=None, state=None, dt=None) -> ModelOutput:
        """forward without the input checks: for decode steps, whose ids the model itself sampled (checking
        the vocabulary range reads the ids back to the host, a synchronisation per token on a GPU)."""
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B)
        logits, state = self._logits(input_ids, state, dt)
        loss = None
        if labels is not None:  # the mean over the labelled positions; 0 (not NaN) when every label is -100
            total, count = _loss_sum(logits, labels)
            loss = total / count.clamp_min(1)
        return ModelOutput(logits, loss, state)

    def _logits(self, input_ids, state: ModelState, dt=None) -> tuple[torch.Tensor, ModelState]:
        B, T = input_ids.shape
        x = self.embed(input_ids.long())  # (B, T, d)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, new = block(x, layer_state, dt)
            layers.append(new)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return logits, ModelState(state.pos + T, B, self.fingerprint, layers)

    def _checkpointed(self, input_ids, labels, state, dt, segment_len) -> ModelOutput:
        """forward(..., checkpoint_len=segment_len): see ``forward``."""
        from torch.utils.checkpoint import checkpoint

        if not isinstance(segment_len, int) or isinstance(segment_len, bool) or segment_len < 1:
            raise ValueError(f"checkpoint_len={segment_len!r} is invalid: expected a positive integer")
        if labels is None:
            raise ValueError("checkpoint_len needs labels: the checkpointed pass returns the loss, not the logits")
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B)

        # Reentrant checkpointing over the state's tensors, passed flat: the non-reentrant form kept memory
        # growing with the segments read (~90 KB per token of the tiny MAC, measured), this one does not.
        names = list(state.tensors())
        anchor = torch.zeros((), requires_grad=True)  # reentrant checkpointing needs an input that requires grad

        def segment(ids, lab, piece_dt, template, _anchor, *flat):
            seg_state = ModelState.from_tensors(template, template.pos, dict(zip(names, flat)))
            logits, seg_state = self._logits(ids, seg_state, piece_dt)
            total, count = _loss_sum(logits, lab)
            return (total, count, *seg_state.tensors().values())

        total = count = 0
        for s in range(0, T, segment_len):
            piece_dt = None if dt is None else dt[:, s:s + segment_len]
            ids = input_ids[:, s:s + segment_len]
            args = (ids, labels[:, s:s + segment_len], piece_dt, state, anchor, *state.tensors().values())
            if torch.is_grad_enabled():
                t, c, *flat = checkpoint(segment, *args, use_reentrant=True)
            else:
                t, c, *flat = segment(*args)
            state = ModelState.from_tensors(state, state.pos + ids.shape[1], dict(zip(names, flat)))
            total, count = total + t, count + c
        return ModelOutput(None, total / count.clamp_min(1), state)

    # Streaming.
    def stream_pieces(self, input_ids: torch.Tensor, *, chunk_len: int = 4096, state: ModelState | None = None,
                      dt: torch.Tensor | None = None, progress: bool = False) -> Iterator[StreamPiece]:
        """Read ``input_ids`` (B, T) in pieces of ``chunk_len`` tokens, carrying the state, without autograd;
        yield each piece's ``StreamPiece(start, logits, state)``. Only one piece's logits exist at a time
        (unless the caller keeps them), so a million-token input costs one piece plus the fixed-size state.
        ``input_ids`` may stay on the CPU: each piece moves to the model's device. ``dt`` (B, T) as in forward."""
        if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
            raise ValueError(f"chunk_len={chunk_len!r} is invalid: expected a positive integer")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, time) tensor; got {got}")
        device = self.embed.weight.device
        T = input_ids.shape[1]
        from tqdm.auto import tqdm

        with torch.no_grad(), tqdm(total=T, unit="tok", unit_scale=True, desc="stream", disable=not progress,
                                   leave=False) as bar:
            for s in range(0, T, chunk_len):
                piece_dt = None if dt is None else dt[:, s:s + chunk_len].to(device)
                out = self(input_ids[:, s:s + chunk_len].to(device), state=state, dt=piece_dt)
                state = out.state
                bar.update(out.logits.shape[1])
                yield StreamPiece(s, out.logits, state)

    def stream(self, input_ids: torch.Tensor, *, chunk_len: int = 4096, state: ModelState | None = None,
               dt: torch.Tensor | None = None, logits: str = "last", progress: bool = False) -> ModelOutput:
        """Read ``input_ids`` (B, T) in pieces (see ``stream_pieces``) and return a ``ModelOutput`` with the
        final state and, as ``logits`` asks: "last" the logits after the last token (B, V), which predict
        the next one; "all" every position's (B, T, V), one pass's logits; "none" None."""
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits={logits!r} is invalid: expected 'last', 'all' or 'none'")
        kept, last = [], None
        for piece in self.stream_pieces(input_ids, chunk_len=chunk_len, state=state, dt=dt, progress=progress):
            state, last = piece.state, piece.logits[:, -1]
            if logits == "all":
                kept.append(piece.logits)
        out = {"last": last, "all": torch.cat(kept, dim=1) if kept else None, "none": None}[logits]
        return ModelOutput(out, None, state)

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
