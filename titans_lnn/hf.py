"""Hugging Face transformers integration: a TitansLNN as a causal LM behind ``AutoModelForCausalLM``.

    import titans_lnn.hf  # registers model_type "titans_lnn" with AutoConfig and AutoModelForCausalLM
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("ckpt")  # a TitansLNN.save_pretrained directory, offline
    ids = model.generate(prompt, max_new_tokens=32, do_sample=False)  # == TitansLNN.generate(..., temperature=0)

The cache that ``generate()`` carries between steps is our fixed-size ``ModelState`` (in a
``TitansLNNCache``): each step reads only the new token, at a cost that does not grow with the length
read; beam search reorders it by row. What this wrapper does not do, and says so when asked: padding
(``attention_mask`` with zeros; the recurrent state reads every token), ``inputs_embeds``, per-token
``dt`` in ``generate()``, attention weights or hidden states as outputs. ``labels`` follow transformers'
convention (``labels = input_ids``, shifted inside), not TitansLNN's (already shifted).

Needs the ``hf`` extra (``pip install 'titans-lnn[hf]'``); importing ``titans_lnn`` alone never imports
transformers. Tested with transformers 4.45.2, 4.57.6 and 5.24.0, whose cache argument is named
``past_key_values`` (4) or ``cache`` (5): ``forward`` accepts either.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.generation import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as err:  # pragma: no cover - the hf extra is part of dev
    raise ImportError("titans_lnn.hf needs Hugging Face transformers: pip install 'titans-lnn[hf]'") from err

from titans_lnn.config import TitansLNNConfig
from titans_lnn.decode import decode_step
from titans_lnn.model import ModelOutput, TitansLNN
from titans_lnn.pretrained import MODEL_TYPE, WEIGHTS_NAME
from titans_lnn.state import ModelState

__all__ = ["TitansLNNCache", "TitansLNNForCausalLM", "TitansLNNHFConfig"]

_FIELDS = tuple(f.name for f in dataclasses.fields(TitansLNNConfig))
# transformers 5 renamed the output's cache field (and the forward argument) from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TitansLNNHFConfig(PretrainedConfig):
    """A ``TitansLNNConfig`` as a transformers config: the same fields as attributes, validated by
    ``TitansLNNConfig`` (so a bad value fails with its message), plus transformers' own keys.

    ``TitansLNNHFConfig(variant="mag", d_model=64)``; ``config.to_titans_config()`` gives ours back.
    """

    model_type = MODEL_TYPE
    # The standard names tools look for (hidden size, depth, heads) read our fields.
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, **kwargs):
        # Our fields are taken out and validated; everything else is transformers' (architectures, dtype,
        # transformers_version, ...), which PretrainedConfig must receive to load its own files.
        ours = TitansLNNConfig(**{name: kwargs.pop(name) for name in _FIELDS if name in kwargs})
        for name, value in ours.to_dict().items():
            setattr(self, name, value)
        # Our tied head is F.linear(x, embed.weight), no second module: nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_titans_config(cls, config: TitansLNNConfig) -> TitansLNNHFConfig:
        return cls(**config.to_dict())

    def to_titans_config(self) -> TitansLNNConfig:
        return TitansLNNConfig(**{name: getattr(self, name) for name in _FIELDS})


class TitansLNNCache(Cache):
    """The fixed-size ``ModelState`` as the cache ``generate()`` carries between steps.

    Unlike a key/value cache it does not grow: ``get_seq_length()`` counts the tokens read, not the
    tokens stored. ``forward`` replaces ``state`` in place, as transformers' caches are updated. It
    has none of transformers' per-layer key/value caches (``layers`` is empty).
    """

    is_compileable = False  # generate() must not compile the forward around it
    is_croppable = False  # a recurrent state cannot forget its last tokens

    def __init__(self, state: ModelState):
        if not isinstance(state, ModelState):
            raise TypeError(f"TitansLNNCache holds a ModelState; got {type(state).__name__}")
        # transformers 5's Cache is a list of per-layer caches and must be given one; 4's takes nothing.
        super().__init__(**({"layers": []} if "layers" in inspect.signature(Cache.__init__).parameters else {}))
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.pos

    @property
    def is_linear(self) -> list[bool]:
        """Every layer is a recurrence (transformers 5 then leaves the slicing of inputs to the model)."""
        return [True] * len(self.state.layers)

    def __len__(self) -> int:
        return len(self.state.layers)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row b takes the state of row ``beam_idx[b]`` (B,) (beam search keeping its best beams): every
        tensor of the state is batch-first, and rows never interact."""
        B = self.state.batch_size
        if beam_idx.shape != (B,):
            raise ValueError(f"beam_idx shape {tuple(beam_idx.shape)} is invalid: expected ({B},), one row each")
        not_batched = [name for name, t in self.state.tensors().items() if t.dim() == 0 or t.shape[0] != B]
        if not_batched:
            raise NotImplementedError(f"cannot reorder the state by beam: {not_batched[:3]} are not batch-first")
        self.state = self.state.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def __repr__(self) -> str:
        return f"TitansLNNCache(pos={self.state.pos}, batch_size={self.state.batch_size})"


class TitansLNNForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``TitansLNN`` (``self.model``) behind transformers' causal-LM interface.

    forward(input_ids (B, T), attention_mask=None, cache=None, labels=None, use_cache=None)
        -> CausalLMOutputWithPast(loss, logits (B, T, V), cache: TitansLNNCache)
    ``save_pretrained`` writes our own format (loadable by ``TitansLNN.from_pretrained`` too).
    """

    config_class = TitansLNNHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # transformers: no assisted decoding, which would need to roll the state back
    _supports_cache_class = True  # transformers 4: a Cache instance may be passed in (TitansLNNCache)

    def __init__(self, config: TitansLNNHFConfig):
        super().__init__(config)
        self.model = TitansLNN(config.to_titans_config())
        self.post_init()

    @classmethod
    def from_model(cls, model: TitansLNN) -> TitansLNNForCausalLM:
        """Wrap an in-memory ``TitansLNN`` (its parameters are shared, not copied)."""
        if not isinstance(model, TitansLNN):
            raise TypeError(f"from_model expects a TitansLNN; got {type(model).__name__}")
        wrapper = cls(TitansLNNHFConfig.from_titans_config(model.config))
        wrapper.model = model
        return wrapper.train(model.training)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: the first forward makes our cache

    @classmethod
    def get_init_context(cls, *args, **kwargs) -> list:
        # transformers 5 builds the model on the meta device before loading; our modules initialise
        # their parameters from tensors made on the CPU (time-constant grids, ...), which cannot mix
        # with meta ones, so the model is built on the CPU as TitansLNN(config) builds it.
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Leaves ``module`` as it is: TitansLNN initialised itself when built (GPT-2 residual scaling,
        memory and liquid parameters), so transformers' generic init must not redo it, and one seed gives
        the weights ``TitansLNN(config)`` has. Weights a checkpoint lacks are an error in
        ``from_pretrained``, never filled in here."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Linear | None:
        return self.model.lm_head  # None when tied: the head is the embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: TitansLNNCache | None = None, past_key_values: TitansLNNCache | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None, return_dict: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                dt: torch.Tensor | None = None) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, V) for ``input_ids`` (B, T) after what ``cache`` has read (which is then updated
        in place and returned; a new one when None). ``labels`` (B, T): transformers' convention, the
        loss predicts ``labels[:, 1:]`` from positions ``:-1``, -100 ignored. ``dt`` (B, T): our per-token
        time steps. ``cache`` and ``past_key_values`` are one argument (transformers 5 and 4 names)."""
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the state as cache= or past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, TitansLNNCache):
            raise TypeError(f"cache must be a TitansLNNCache from this model's outputs; got {type(cache).__name__} "
                            "(do not pass cache_implementation or another model's cache to generate())")
        if output_attentions or output_hidden_states:
            raise ValueError("TitansLNNForCausalLM returns neither attention weights nor hidden states "
                             "(output_attentions / output_hidden_states must be False)")
        _check_attention_mask(attention_mask, input_ids, 0 if cache is None else cache.state.pos)
        if cache is not None and input_ids.shape[1] == 1 and labels is None and not torch.is_grad_enabled():
            # generate()'s decode steps: one token after a cache, no autograd: every layer's one-token form
            # (titans_lnn.decode), equal to the forward of length 1 and without its chunk machinery.
            self.model._check_inputs(input_ids, None, cache.state, dt)
            logits, state = decode_step(self.model, input_ids, cache.state, dt)
            out = ModelOutput(logits[:, None], None, state)
        else:
            out = self.model(input_ids, state=None if cache is None else cache.state, dt=dt)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            V = out.logits.shape[-1]
            loss = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1).long(),
                                   ignore_index=-100)
        use_cache = True if use_cache is None else use_cache
        if use_cache:
            if cache is None:
                cache = TitansLNNCache(out.state)
            else:
                cache.state = out.state
        output = CausalLMOutputWithPast(loss=loss, logits=out.logits, **{_CACHE_FIELD: cache if use_cache else None})
        return output if return_dict is None or return_dict else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      use_cache: bool = True, inputs_embeds: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """The next forward's inputs in ``generate()``: the tokens the cache has not read yet.

        transformers passes the whole sequence so far (B, L) and, besides the cache, bookkeeping
        arguments that differ between its versions (cache_position, next_sequence_length, ...), hence
        ``**kwargs``; only the cache is taken from them. The state's own count of tokens read decides
        the slice, so any version's calling convention gives the same tokens."""
        if inputs_embeds is not None:
            raise ValueError("TitansLNNForCausalLM.generate() takes input_ids, not inputs_embeds")
        if kwargs.get("dt") is not None:
            raise ValueError("generate() cannot take dt (per-token time steps of the prompt only); stream with "
                             "TitansLNN directly for irregular time steps")
        cache = kwargs.get("cache")
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None and use_cache:
            read = cache.get_seq_length()
            if input_ids.shape[1] <= read:
                raise ValueError(f"input_ids has {input_ids.shape[1]} tokens but the cache has read {read}: with a "
                                 "cache, pass the whole sequence (what the cache read, then the new tokens)")
            input_ids = input_ids[:, read:]
        else:
            cache = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, _CACHE_FIELD: cache}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        **kwargs) -> TitansLNNForCausalLM:
        """transformers' loader (``dtype``, ``device_map``, ... pass through), made strict: a weight the
        config expects and the file lacks (which transformers would fill with a fresh init), one left
        over, or a shape that differs is an error, and so are weights saved under another config
        (TitansLNN's fingerprint in the safetensors metadata), as in ``TitansLNN.from_pretrained``."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        bad = {key: sorted(map(str, info.get(key) or ()))[:5]
               for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
        if bad:
            raise ValueError(f"{pretrained_model_name_or_path}: the weights do not fit the config ({bad})")
        weights = Path(pretrained_model_name_or_path) / WEIGHTS_NAME
        if weights.is_file():
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt", device="cpu") as f:
                stored = (f.metadata() or {}).get("fingerprint")
            if stored is not None and stored != model.model.fingerprint:
                raise ValueError(f"{weights} was saved by a model with another config (fingerprint {stored}; the "
                                 f"config.json beside it gives {model.model.fingerprint}): an edited or mismatched "
                                 "config")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        safe_serialization: bool = True) -> None:
        """Write our own format (``model.safetensors`` with TitansLNN's keys, ``config.json`` with
        ``model_type``): one directory that both ``TitansLNN.from_pretrained`` and
        ``AutoModelForCausalLM.from_pretrained`` load."""
        if not safe_serialization:
            raise ValueError("TitansLNNForCausalLM saves safetensors only (safe_serialization must be True)")
        if is_main_process:
            self.model.save_pretrained(save_directory)


def _check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, read: int) -> None:
    """A mask of ones (over the new tokens, or over what was read plus them) is accepted; zeros mean
    padding, which a recurrent state cannot skip."""
    if attention_mask is None:
        return
    B, T = input_ids.shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, read + T):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} is invalid: expected ({B}, {T}) or "
                         f"({B}, {read + T}) for input_ids {tuple(input_ids.shape)} after {read} tokens read")
    if not bool(attention_mask.all()):
        raise ValueError("attention_mask has zeros (padding): TitansLNN reads every token into its recurrent state "
                         "and supports no padding. Generate for sequences of equal length in one batch, or one "
                         "sequence at a time.")


AutoConfig.register(MODEL_TYPE, TitansLNNHFConfig)
AutoModelForCausalLM.register(TitansLNNHFConfig, TitansLNNForCausalLM)
