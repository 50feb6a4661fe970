"""What a training run is told: ``TrainConfig`` (every field validated), ``TrainResult``, the
learning-rate schedule and how ``--resume`` finds its checkpoint. The loop is in ``titans_lnn.training.trainer``."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from titans_lnn.config import PRESETS, VARIANTS, TitansLNNConfig
from titans_lnn.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint

# Fields whose change makes a checkpoint's data position meaningless: a resume must keep them.
DATA_FIELDS = ("data", "data_format", "val_fraction", "split_by", "batch_size", "seq_len", "segments", "seed")
# Fields a resumed CLI run takes from the invocation, never from the checkpoint.
RUN_FIELDS = ("out", "resume", "stop_at", "progress", "tensorboard", "device", "distributed", "checkpoint_len")


@dataclass
class TrainConfig:
    # The model: a preset, a variant and field overrides (vocab_size defaults to the tokenizer's).
    model_preset: str = "tiny"  # one of titans_lnn.config.PRESETS: debug | tiny | small
    variant: str | None = None  # one of VARIANTS (mac, mag, mal, swa, full, liquid, lmm); None: the preset's
    model_overrides: dict = field(default_factory=dict)  # TitansLNNConfig fields, e.g. {"d_model": 64}
    # Data.
    data: str = "kjv"  # "kjv", "ecoli-k12", "ecoli-ec590", or a text/FASTA file or folder
    data_format: str = "auto"  # how files are read: auto (by name) | text | fasta
    tokenizer: str | None = None  # byte | nucleotide | a tokenizers JSON path; None: the corpus' default
    val_fraction: float = 0.01  # share of the corpus held out for evaluation (never trained on)
    split_by: str = "tail"  # held-out split: "tail" (the last tokens) or "document" (whole documents)
    # DNA: train on both strands (the training split plus its reverse complement). Not in DATA_FIELDS, so
    # older checkpoints still resume; a changed value is refused by the sampler (its token count differs).
    rc_augment: bool = False
    # Batches and long context.
    batch_size: int = 8  # sequences per micro-batch, over all processes together (divisible by their number)
    seq_len: int = 256  # tokens per segment (one forward call)
    segments: int = 1  # consecutive segments per document, state carried; 0: one unbroken stream per row
    bptt: int = 1  # segments per backward pass (truncated BPTT length); the state is detached between
    accum: int = 1  # backward passes accumulated per optimizer step
    checkpoint_len: int | None = None  # activation checkpointing: recompute per piece of this many tokens (None: off)
    # Optimisation.
    steps: int = 1000  # optimizer steps in the whole run
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup: int | None = None  # linear warm-up steps; None: 5% of steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on weights with >= 2 dims only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    # Evaluation, logging and checkpoints.
    eval_every: int | None = None  # steps between held-out evaluations (and at 0 and the end); None: steps / 10
    eval_batches: int = 8  # consecutive held-out segments per evaluation (state carried across them)
    log_every: int = 10  # steps between metric lines in metrics.jsonl
    save_every: int | None = None  # steps between checkpoints (and at the end); None: steps / 4, at most 1000
    keep: int = 3  # checkpoints kept (the newest)
    out: str = "runs/titans-lnn"  # output folder: checkpoints/, metrics.jsonl, model/
    resume: str | None = None  # None: a new run; "auto": the newest valid checkpoint in out (if any); a path
    stop_at: int | None = None  # stop after this step with a checkpoint, as if interrupted (time-boxed jobs)
    # Runtime.
    seed: int = 0  # seeds the model init and the data order
    device: str = "auto"  # auto (cuda:LOCAL_RANK when available, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    distributed: str = "auto"  # with WORLD_SIZE > 1: auto (= ddp) | ddp | fsdp; ignored in one process
    progress: bool = True  # show a tqdm progress bar (rank 0)
    tensorboard: bool = True  # also log to <out>/tensorboard when the tensorboard package is installed

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected {allowed}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.model_preset not in PRESETS:
            raise bad("model_preset", f"one of {', '.join(PRESETS)}")
        if self.variant is not None and self.variant not in VARIANTS:
            raise bad("variant", f"None or one of {', '.join(VARIANTS)}")
        if not isinstance(self.model_overrides, dict):
            raise bad("model_overrides", "a dict of TitansLNNConfig fields")
        known = {f.name for f in dataclasses.fields(TitansLNNConfig)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise bad("model_overrides", f"TitansLNNConfig fields; unknown: {', '.join(unknown)}")
        if "variant" in self.model_overrides:
            raise bad("model_overrides", "no 'variant' entry (use TrainConfig.variant)")
        try:
            self.model_config()
        except (ValueError, TypeError) as e:
            raise ValueError(f"TrainConfig.model_overrides={self.model_overrides!r} is invalid: {e}") from None
        for name in ("data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty string")
        if self.data_format not in ("auto", "text", "fasta"):
            raise bad("data_format", "auto, text or fasta")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise bad("tokenizer", "None, 'byte', 'nucleotide' or a path to a tokenizers JSON file")
        if not is_num(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "a number in (0, 1)")
        if self.split_by not in ("tail", "document"):
            raise bad("split_by", "tail or document")
        if not isinstance(self.rc_augment, bool):
            raise bad("rc_augment", "True or False")
        for name in ("batch_size", "seq_len", "bptt", "accum", "steps", "eval_batches", "log_every", "keep"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.checkpoint_len is not None and (not is_int(self.checkpoint_len) or self.checkpoint_len < 1):
            raise bad("checkpoint_len", "None or an integer >= 1")
        if not is_int(self.segments) or self.segments < 0:
            raise bad("segments", "an integer >= 0 (0: unbroken streams)")
        if self.segments and self.bptt > self.segments:
            raise bad("bptt", f"at most segments={self.segments} (the state is re-initialised every document)")
        for name in ("warmup", "eval_every", "save_every", "stop_at"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < (0 if name == "warmup" else 1)):
                raise bad(name, f"None or an integer >= {0 if name == 'warmup' else 1}")
        # (name, low, high, low end open, high end open); AdamW needs 0 <= beta < 1.
        for name, lo, hi, open_lo, open_hi in (("lr", 0, math.inf, True, True), ("min_lr_ratio", 0, 1, False, False),
                                               ("weight_decay", 0, math.inf, False, True),
                                               ("beta1", 0, 1, False, True), ("beta2", 0, 1, False, True),
                                               ("grad_clip", 0, math.inf, False, True)):
            v = getattr(self, name)
            if not is_num(v) or v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi):
                raise bad(name, f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise bad("resume", "None, 'auto' or a checkpoint path")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise bad("device", "auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise bad("dtype", "auto, fp32 or bf16")
        if self.distributed not in ("auto", "ddp", "fsdp"):
            raise bad("distributed", "auto, ddp or fsdp")

    # Derived values.
    @property
    def warmup_steps(self) -> int:
        return round(0.05 * self.steps) if self.warmup is None else self.warmup

    @property
    def eval_interval(self) -> int:
        return max(1, self.steps // 10) if self.eval_every is None else self.eval_every

    @property
    def save_interval(self) -> int:
        return min(1000, max(1, self.steps // 4)) if self.save_every is None else self.save_every

    def model_config(self, vocab_size: int | None = None) -> TitansLNNConfig:
        """The model config: the preset, the variant, then the overrides; vocab_size from the tokenizer
        unless overridden."""
        fields = dict(self.model_overrides)
        if self.variant is not None:
            fields["variant"] = self.variant
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        return TitansLNNConfig.from_preset(self.model_preset, **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}: expected a subset of {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    step: int  # the last completed optimizer step
    losses: dict[int, float]  # training loss of every step this call ran
    evals: list[dict]  # held-out evaluations this call ran
    stopped: str | None  # None: ran to cfg.steps; "SIGINT" / "SIGTERM"; "stop_at"
    checkpoint: Path | None  # the last checkpoint written
    model_dir: Path | None  # <out>/model when the run finished
    tokens_per_s: float  # training throughput of this call (all processes)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier before optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup`` steps, then a half cosine down to ``min_ratio`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``cfg.resume`` names: None for a new run; "auto": the newest valid one in
    ``<out>/checkpoints`` or None; a checkpoint folder, or a folder of them (its newest valid one)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        directory = Path(cfg.out) / "checkpoints"
        found = latest_checkpoint(directory)
        if found is None and list_checkpoints(directory):
            names = ", ".join(p.name for p in list_checkpoints(directory))
            raise CheckpointError(f"--resume: every checkpoint in {directory} ({names}) is incomplete or corrupt, "
                                  f"so the run cannot continue; starting over would discard its history. "
                                  f"Resume from a copy you trust with --resume PATH, or move {directory} away "
                                  f"to start a new run in {cfg.out}")
        return found
    path = Path(cfg.resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint or folder")
    if list_checkpoints(path):
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {cfg.resume}: no valid checkpoint in this folder "
                                    f"(all are incomplete or corrupt)")
        return found
    return path


def saved_train_config(checkpoint: str | os.PathLike) -> dict:
    """The TrainConfig dict stored in a checkpoint (verified first); CheckpointError when it has none."""
    saved = load_checkpoint(checkpoint).meta.get("train_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {checkpoint} holds no train_config (found {type(saved).__name__}): "
                              f"expected one written by titans-lnn train")
    return saved
