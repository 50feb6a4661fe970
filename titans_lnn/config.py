"""The one model config: every field commented, validated in ``__post_init__``, named presets.

A config fully determines the function a model computes (chunk size included: Titans' mini-batch
chunk changes the memory's updates, not only their speed), so it travels with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

VARIANTS = ("mac", "mag", "mal", "swa", "full", "liquid", "lmm", "mamba2", "based", "lfm2", "gdn")
# What each variant contains. mac/mag/mal are the Titans variants (paper section 4) with the liquid
# core in every block; the rest are the ablations the evaluations compare against.
_PARTS = {
    "mac": ("attention", "memory", "liquid"),
    "mag": ("attention", "memory", "liquid"),
    "mal": ("attention", "memory", "liquid"),
    "swa": ("attention",),
    "full": ("attention",),
    "liquid": ("liquid",),
    "lmm": ("memory",),
    # The seed architectures (titans_lnn.mixers), without the liquid core so that each is itself.
    "mamba2": ("ssm",),
    "based": ("conv", "linear_attention", "attention"),
    "lfm2": ("conv", "attention"),
    "gdn": ("delta_memory",),
}
# Upper bounds on sizes that are allocated whole however few tokens are read (a typo such as
# mem_chunk=10**9 otherwise allocates a chunk buffer of that many positions for a 12-token input).
MAX_MEM_CHUNK = 4096  # the papers use 8..64; a chunk this long already means a few memory updates per window
MAX_WINDOW = 1 << 20  # the attention cache preallocates window - 1 keys and values per layer
MAX_VOCAB = 1 << 24
MAX_FEATURE_DIM = 64  # BASED's state holds 1 + F + F^2 rows per head


@dataclass(frozen=True)
class TitansLNNConfig:
    # one of VARIANTS: mac | mag | mal (Titans), swa | full | liquid | lmm (ablations), mamba2 | based | lfm2 | gdn
    # (the seed architectures, titans_lnn.mixers)
    variant: str = "mac"
    vocab_size: int = 256  # byte-level tokenizer by default
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # number of blocks
    n_heads: int = 4  # attention query heads
    n_kv_heads: int = 2  # attention key/value heads (grouped-query); must divide n_heads
    window: int = 128  # attention span W in tokens, self included (MAC: the segment length)
    n_persistent: int = 4  # persistent memory tokens N_p, an always-visible attention prefix
    rope_theta: float = 10000.0  # RoPE base
    mlp_mult: float = 4.0  # hidden width of the feed-forward sub-layer, as a multiple of d_model
    liquid_expand: int = 1  # liquid core width, as a multiple of d_model
    liquid_state: int = 8  # state entries per liquid channel (like Mamba's d_state)
    liquid_tau_min: float = 1.0  # smallest initial time constant of the liquid core (tokens)
    liquid_tau_max: float = 1000.0  # largest initial time constant of the liquid core (tokens)
    mem_heads: int = 4  # heads of the neural memory (one independent memory each)
    mem_depth: int = 2  # L_M: 1 = linear matrix memory, >=2 = MLP with residual
    mem_hidden_mult: float = 2.0  # hidden width of the MLP memory, as a multiple of its head width
    mem_chunk: int = 16  # C: tokens per mini-batch of memory gradient steps (part of the function)
    mem_max_lr: float = 0.2  # upper bound of the data-dependent inner learning rate theta
    mem_max_forget: float = 1.0  # upper bound of the forgetting gate alpha (0: the memory never decays)
    mem_max_grad_norm: float | None = 2.0  # clip each token's inner gradient to this norm (None: off)
    mem_write_gate: str = "sigmoid"  # theta's gate: sigmoid (the paper) | relu (clamp(s, 0, 1): 0 where it skips)
    mem_write_threshold: float = 0.0  # skip writes whose theta < this * mem_max_lr (0: every token writes)
    mem_gate_context: bool = False  # gates read the key's convolution (local context), not the token alone
    mem_stable_step: bool = True  # bound the inner step by the curvature (False: the paper's update, can be chaotic)
    conv_kernel: int = 4  # depthwise causal convolution width after the memory's q/k/v projections
    ssm_state: int = 16  # mamba2: state entries N per channel (d_state)
    ssm_expand: int = 2  # mamba2: inner width as a multiple of d_model
    ssm_head_dim: int = 16  # mamba2: head width P (must divide d_model * ssm_expand)
    short_conv: int = 3  # lfm2, based: width of the gated short convolution (LFM2's L_cache)
    feature_dim: int = 16  # based: q/k width per head before the Taylor map (state rows 1 + F + F^2 per head)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the input embedding and the LM head
    init_std: float = 0.02  # std of the normal init of linear and embedding weights

    def __post_init__(self) -> None:
        def bad(field: str, value, allowed: str) -> ValueError:
            return ValueError(f"TitansLNNConfig.{field}={value!r} is invalid: expected {allowed}")

        # Types first (JSON and --set give any type): bools are not ints, ints are accepted for floats
        # and stored as floats (so 2 and 2.0 make the same config and fingerprint), floats are finite.
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _KINDS[f.name]
            if kind == "float | None" and value is None:
                continue
            if kind in ("float", "float | None"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise bad(f.name, value, "a finite number" + (" or None" if kind == "float | None" else ""))
                object.__setattr__(self, f.name, float(value))
            elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f.name, value, "an integer")
            elif kind == "bool" and not isinstance(value, bool):
                raise bad(f.name, value, "true or false")
            elif kind == "str" and not isinstance(value, str):
                raise bad(f.name, value, "a string")
        if self.variant not in VARIANTS:
            raise bad("variant", self.variant, f"one of {', '.join(VARIANTS)}")
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "window",
                    "liquid_expand", "liquid_state", "mem_heads", "mem_depth", "mem_chunk", "conv_kernel",
                    "ssm_state", "ssm_expand", "ssm_head_dim", "short_conv", "feature_dim")
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise bad(name, value, "a positive integer")
        if self.n_persistent < 0:
            raise bad("n_persistent", self.n_persistent, "an integer >= 0")
        for name, limit in (("mem_chunk", MAX_MEM_CHUNK), ("window", MAX_WINDOW), ("vocab_size", MAX_VOCAB)):
            if getattr(self, name) > limit:
                raise bad(name, getattr(self, name), f"at most {limit}")
        if self.feature_dim > MAX_FEATURE_DIM:
            raise bad("feature_dim", self.feature_dim, f"at most {MAX_FEATURE_DIM} (the state grows as its square)")
        if (self.d_model * self.ssm_expand) % self.ssm_head_dim:
            raise bad("ssm_head_dim", self.ssm_head_dim, f"a divisor of d_model * ssm_expand = "
                                                         f"{self.d_model * self.ssm_expand}")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise bad("n_heads", self.n_heads, f"a divisor of d_model={self.d_model} giving an even head width")
        if self.d_model % self.mem_heads:
            raise bad("mem_heads", self.mem_heads, f"a divisor of d_model={self.d_model}")
        for name in ("rope_theta", "mlp_mult", "mem_hidden_mult", "mem_max_lr", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not value > 0:
                raise bad(name, value, "a number > 0")
        if int(self.d_model * self.mlp_mult * 2 / 3 + 7) // 8 * 8 < 8:  # SwiGLU's hidden width (layers.py)
            raise bad("mlp_mult", self.mlp_mult, f"a multiple of d_model={self.d_model} giving a feed-forward width "
                                                 f">= 8 (at least {1.5 / self.d_model:.3g})")
        if int(self.mem_head_dim * self.mem_hidden_mult) < 1 and self.mem_depth > 1:
            raise bad("mem_hidden_mult", self.mem_hidden_mult, f"a multiple of the memory head width "
                                                               f"{self.mem_head_dim} giving a hidden width >= 1")
        if self.mem_write_gate not in ("sigmoid", "relu"):
            raise bad("mem_write_gate", self.mem_write_gate, "'sigmoid' or 'relu'")
        if not 0 <= self.mem_write_threshold < 1:
            raise bad("mem_write_threshold", self.mem_write_threshold, "a number in [0, 1)")
        if not 0 <= self.mem_max_forget <= 1:
            raise bad("mem_max_forget", self.mem_max_forget, "a number in [0, 1]")
        if self.mem_max_grad_norm is not None and not self.mem_max_grad_norm > 0:
            raise bad("mem_max_grad_norm", self.mem_max_grad_norm, "a number > 0 or None")
        if not 0 < self.liquid_tau_min <= self.liquid_tau_max:
            raise bad("liquid_tau_min", self.liquid_tau_min,
                      f"a number in (0, liquid_tau_max={self.liquid_tau_max}]")

    # Derived sizes.
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mem_head_dim(self) -> int:
        return self.d_model // self.mem_heads

    @property
    def parts(self) -> tuple[str, ...]:
        """Which components the blocks contain: a subset of ("attention", "memory", "liquid") for the Titans
        variants and ablations; the seeds name theirs ("ssm", "conv", "linear_attention", "delta_memory")."""
        return _PARTS[self.variant]

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the function this config computes (states and saved weights carry it)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @property
    def full_attention(self) -> bool:
        """The quadratic baseline: causal attention over everything read so far (no window)."""
        return self.variant == "full"

    # Presets and (de)serialisation.
    @classmethod
    def from_preset(cls, name: str, **overrides) -> TitansLNNConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TitansLNNConfig fields {unknown}: expected names of its fields, e.g. "
                             f"d_model, window, mem_chunk")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> TitansLNNConfig:
        """The config of ``to_dict()`` output: every field present (a missing one is an error, never a
        default that may differ from the one the model was built with), none unknown, each well-typed."""
        if not isinstance(data, dict):
            raise TypeError(f"TitansLNNConfig.from_dict: got {type(data).__name__}, expected a dict of its fields")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known), key=str)
        missing = [name for name in known if name not in data]
        if unknown:
            raise ValueError(f"unknown TitansLNNConfig fields {unknown}: expected a subset of {sorted(known)}")
        if missing:
            raise ValueError(f"TitansLNNConfig fields {missing} are missing: a saved config lists every field")
        return cls(**data)

    def replace(self, **changes) -> TitansLNNConfig:
        return dataclasses.replace(self, **changes)


# The declared type of each field, which __post_init__ enforces (a new field needs a type it knows).
_KINDS = {f.name: f.type for f in dataclasses.fields(TitansLNNConfig)}
_unchecked = {name: kind for name, kind in _KINDS.items()
              if kind not in ("str", "int", "float", "bool", "float | None")}
if _unchecked:
    raise TypeError(f"TitansLNNConfig fields {_unchecked} have types __post_init__ does not check: expected str, int, "
                    f"float, bool or float | None")

PRESETS: dict[str, dict] = {
    # Unit tests: a few thousand parameters, every code path exercised.
    "debug": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8, n_persistent=2,
                  liquid_state=4, mem_heads=2, mem_depth=2, mem_chunk=4, conv_kernel=3, mlp_mult=2.0),
    # CPU demos, the quick tour, benchmarks (~1.6M parameters). The main job's model is "niah" below.
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, window=128, n_persistent=4,
                 liquid_state=8, mem_heads=2, mem_depth=2, mem_chunk=16),
    # GPU runs (about 100M parameters).
    "small": dict(d_model=640, n_layers=12, n_heads=10, n_kv_heads=2, window=512, n_persistent=16,
                  liquid_state=16, mem_heads=10, mem_depth=2, mem_chunk=64, vocab_size=256),
    # The main job's model (`titans-lnn niah`, ~180K parameters, window 64, one memory head; variant by the caller):
    # why each setting, in titans_lnn/evals/niah_train.py (NIAH_MODEL is this dict).
    "niah": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, window=64, n_persistent=4, liquid_state=4,
                 mem_heads=1, mem_depth=1, mem_chunk=16, mlp_mult=2.0, mem_max_lr=1.0, mem_max_forget=0.0,
                 conv_kernel=8, init_std=0.1, tie_embeddings=False, mem_write_threshold=0.15, mem_gate_context=True),
    # DNA on a CPU (`titans-lnn train --data ecoli-k12 --preset dna --tokenizer kmer4`; the recipe and its measurements
    # in titans_lnn/evals/genomics.py). Attention alone by default: per CPU-second it sees ~2.5x the bases of a
    # hybrid, and bases seen limit it. Untied head: with k-mer tokens the input table (k-mers) and the output
    # (the next k-mer, 5 of which can follow) differ. --variant mag adds the liquid core and a one-head linear memory.
    "dna": dict(variant="swa", d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, window=128, n_persistent=4,
                mlp_mult=4.0, tie_embeddings=False, liquid_state=4, mem_heads=1, mem_depth=1, mem_chunk=64),
}
