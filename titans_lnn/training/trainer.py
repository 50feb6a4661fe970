"""Training: ``Trainer`` and ``train(cfg)``; the config, ``TrainConfig``, is in ``titans_lnn.training.config``.

    from titans_lnn.training.trainer import TrainConfig, train
    result = train(TrainConfig(model_preset="tiny", data="kjv", steps=200, out="runs/kjv"))

What a run does:
- Long context by truncated backpropagation through the carried state: the batch's B streams read
  documents of ``segments`` consecutive segments of ``seq_len`` tokens (``StreamSampler``); the model
  state is carried from segment to segment, re-initialised where a document starts (``reset``) and
  detached every ``bptt`` segments, so gradients reach ``bptt`` segments back while the memory is read
  across the whole document. ``segments=0`` reads the training split as B unbroken streams.
- AdamW (weight decay on matrices only) with linear warm-up and cosine decay to ``min_lr_ratio * lr``,
  gradient clipping, accumulation over ``accum`` windows of ``bptt`` segments; bf16 autocast on CUDA,
  fp32 on CPU; seeded, and on CPU deterministic (a resumed run repeats an uninterrupted one bit for bit).
- A tqdm bar (loss, tokens/s, ETA); metrics to ``<out>/metrics.jsonl`` (and TensorBoard when installed);
  held-out evaluation every ``eval_every`` steps: loss and bits per token (per byte / per base for the
  byte / nucleotide tokenizers), the state carried across ``eval_batches`` consecutive segments.
- Checkpoints (``titans_lnn.training.checkpoint``: atomic, checksummed, pickle-free) in ``<out>/checkpoints``:
  weights, optimizer and scheduler state, RNG states, sampler position, the carried state, both configs
  and the tokenizer; the last ``keep`` are kept. SIGINT/SIGTERM finish the step, save and stop; a corrupt
  latest checkpoint is skipped for the previous one. At the end ``<out>/model`` holds a
  ``TitansLNN.from_pretrained`` directory (plus ``tokenizer.json``).
- Several processes under ``torchrun``: DDP or FSDP2 (``fully_shard``). ``batch_size`` is global: each
  of the W processes takes B / W rows of the same global batch, so a run gives the same losses whatever
  W is (to float tolerance) and resumes across a change of W.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from titans_lnn.io import atomic_write_bytes
from titans_lnn.model import TitansLNN
from titans_lnn.pretrained import save_pretrained
from titans_lnn.state import ModelState
from titans_lnn.tokenizers import tokenizer_from_dict
from titans_lnn.training.checkpoint import (
    CheckpointError,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from titans_lnn.training.config import (  # noqa: F401  (re-exported: titans_lnn.training.trainer is their public home too)
    DATA_FIELDS,
    RUN_FIELDS,
    TrainConfig,
    TrainResult,
    lr_factor,
    resolve_resume,
    saved_train_config,
)
from titans_lnn.training.data import StreamSampler, load_corpus, with_reverse_complement
from titans_lnn.training.metrics import MetricsLog, progress_bar

# What ``Trainer.save`` stores in a checkpoint's meta (and ``_load`` needs), with its JSON type.
CHECKPOINT_META = {"state": dict, "scheduler": dict, "sampler": dict, "train_config": dict, "model_config": dict,
                   "tokenizer": dict, "tokens_seen": int, "world_size": int}

# ----------------------------------------------------------------------------- state helpers


def _state_map(state: ModelState, fn, batch_size: int | None = None) -> ModelState:
    return dataclasses.replace(state.map(fn), batch_size=batch_size or state.batch_size)


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything a run needs from a TrainConfig (processes, data, model, optimizer, resume) and
    runs it with ``fit()``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.owns_group = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        self._init_distributed()
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        resume_from = resolve_resume(cfg)
        if resume_from is None and list_checkpoints(self.ckpt_dir):
            # A new run here would prune the old run's checkpoints (even damaged ones hold its history).
            raise FileExistsError(f"{self.ckpt_dir} already holds checkpoints: pass --resume to continue that "
                                  f"run, or choose another --out")
        self._init_data()
        self._init_model()
        self.step = 0
        self.tokens_seen = 0
        self.state: ModelState | None = None  # the carried training state (this process' rows)
        self._stop_signal: str | None = None
        if resume_from is not None:
            self._load(resume_from)
        elif self.rank == 0 and cfg.resume == "auto":
            print(f"titans-lnn train: no checkpoint in {self.ckpt_dir}; starting a new run")

    # --- setup

    def _init_distributed(self) -> None:
        cfg = self.cfg
        _check_device_exists(cfg.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            cuda = torch.cuda.is_available() and cfg.device != "cpu"
            dist.init_process_group("nccl" if cuda else "gloo")
            self.owns_group = True
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.mode = "none" if self.world == 1 else ("ddp" if cfg.distributed == "auto" else cfg.distributed)
        if cfg.batch_size % self.world:
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is invalid: expected a multiple of the "
                             f"number of processes ({self.world}); batch_size is the global batch")
        self.local_batch = cfg.batch_size // self.world
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        else:
            device = f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext

    def _init_data(self) -> None:
        cfg = self.cfg
        self.corpus = load_corpus(cfg.data, cfg.tokenizer, format=cfg.data_format)
        self.tokenizer = self.corpus.tokenizer
        train, val = self.corpus.split(cfg.val_fraction, seed=cfg.seed, by=cfg.split_by)
        train = with_reverse_complement(train, self.tokenizer) if cfg.rc_augment else train
        T, B = cfg.seq_len, cfg.batch_size
        try:
            self.sampler = StreamSampler(train, B, T, doc_len=cfg.segments * T or None, seed=cfg.seed)
        except ValueError as e:
            raise ValueError(f"corpus {cfg.data!r}: its training split ({len(train)} tokens) is too small for "
                             f"batch_size={B}, seq_len={T}, segments={cfg.segments}: {e}") from None
        eval_rows = min(B, len(val) // (T + 1))
        if eval_rows < 1:
            raise ValueError(f"corpus {cfg.data!r}: the held-out split has {len(val)} tokens, fewer than "
                             f"seq_len + 1 = {T + 1}: raise val_fraction (now {cfg.val_fraction}) or lower seq_len")
        self.val_sampler = StreamSampler(val, eval_rows, T, seed=cfg.seed)
        self.eval_steps = min(cfg.eval_batches, self.val_sampler.steps_per_epoch)
        self.bits_name = {"byte": "val_bpb", "nucleotide": "val_bits_per_base"}.get(self.tokenizer.name)

    def _init_model(self) -> None:
        cfg = self.cfg
        self.model_config = cfg.model_config(self.tokenizer.vocab_size)
        if self.model_config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model vocab_size={self.model_config.vocab_size} is smaller than the tokenizer's "
                             f"({self.tokenizer.vocab_size}, {self.tokenizer.name})")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.module = TitansLNN(self.model_config).to(self.device)
        self.wrapped = self.module
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.module, device_ids=ids)
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the state's views; never in place
            for block in self.module.blocks:
                fully_shard(block)
            fully_shard(self.module)
        matrices = [p for p in self.module.parameters() if p.dim() >= 2]
        others = [p for p in self.module.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda" or None)
        warmup, total, ratio = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total, ratio))

    def _fresh_state(self, batch_size: int) -> ModelState:
        state = self.module.init_state(batch_size)
        if self.mode == "fsdp":  # the memory's initial weights come from sharded parameters
            from torch.distributed.tensor import DTensor

            state = _state_map(state, lambda t: t.full_tensor() if isinstance(t, DTensor) else t)
        return state

    # --- distributed helpers

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def _gather_rows(self, state: ModelState) -> ModelState:
        """The carried state of every process, rows in rank order (the global batch)."""
        if self.world == 1:
            return state

        def gather(t: torch.Tensor) -> torch.Tensor:
            x = t.detach().to(torch.uint8) if t.dtype == torch.bool else t.detach()  # gloo has no bool
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts).to(t.dtype)

        return _state_map(state, gather, self.cfg.batch_size)

    # --- checkpoints

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.wrapped, options=opts),
                get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts))

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every process takes part; rank 0 writes)."""
        model_sd, optim_sd = self._state_dicts()
        carried = self._gather_rows(self.state) if self.state is not None else None
        if self.rank != 0:
            self._barrier()
            return None
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        tree = {"model": model_sd, "optim": optim_sd, "rng": rng,
                "carried": None if carried is None else {"pos": carried.pos, "tensors": carried.tensors()}}
        tensors, skeleton = flatten_state(tree)
        meta = {"state": skeleton, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "train_config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "tokenizer": self.tokenizer.to_dict(), "tokens_seen": self.tokens_seen, "world_size": self.world}
        path = save_checkpoint(self.ckpt_dir, self.step, tensors, meta, keep_last=self.cfg.keep)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _check_compatible(self, path: Path, meta: dict) -> None:
        saved, now = meta["model_config"], self.model_config.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            raise ValueError(f"cannot resume from {path}: its model config differs from this run's "
                             f"({'; '.join(diff)}); use the same --model-preset/--variant/--set, or a new --out")
        saved_tok = tokenizer_from_dict(meta["tokenizer"])
        if meta["tokenizer"] != self.tokenizer.to_dict():
            raise ValueError(f"cannot resume from {path}: it was trained with the tokenizer {saved_tok!r}, this "
                             f"run uses {self.tokenizer!r}; pass the same --tokenizer, or a new --out")
        tc, mine = meta["train_config"], self.cfg.to_dict()
        diff = [f"{k}: checkpoint {tc.get(k)!r} vs now {mine[k]!r}" for k in DATA_FIELDS if tc.get(k) != mine[k]]
        if diff:
            raise ValueError(f"cannot resume from {path}: the data setup differs ({'; '.join(diff)}), so its "
                             f"data position means nothing here; use the same settings, or a new --out")

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        missing = [k for k in CHECKPOINT_META if k not in ckpt.meta]
        if missing:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: its meta.json lacks {missing} (expected "
                                  f"every one of {list(CHECKPOINT_META)}, as titans-lnn train writes them)")
        for key, kind in CHECKPOINT_META.items():
            if not isinstance(ckpt.meta[key], kind) or isinstance(ckpt.meta[key], bool):
                raise CheckpointError(f"checkpoint {path} cannot be resumed: meta.json's {key!r} is "
                                      f"{type(ckpt.meta[key]).__name__}, expected {kind.__name__}")
        self._check_compatible(path, ckpt.meta)
        try:
            self._restore(ckpt, path)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: its saved state does not fit this run "
                                  f"({type(e).__name__}: {e})") from e
        if self.rank == 0:
            print(f"titans-lnn train: resumed from {path} (step {self.step})")

    def _restore(self, ckpt, path: Path) -> None:
        """Put a verified checkpoint's model, optimizer, scheduler, sampler, RNG and carried state back."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        tree = unflatten_state(ckpt.tensors, ckpt.meta["state"])
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.wrapped, tree["model"], options=opts)
        set_optimizer_state_dict(self.wrapped, self.optimizer, tree["optim"], options=opts)
        self.scheduler.load_state_dict(ckpt.meta["scheduler"])
        self.sampler.load_state_dict(ckpt.meta["sampler"])
        rng = tree["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_tuples(rng["python"]))
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        carried = tree["carried"]
        if carried is not None:
            rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
            tensors = {name: t[rows].to(self.device) for name, t in carried["tensors"].items()}
            template = self.module.init_state(self.local_batch)
            self.state = ModelState.from_tensors(template, int(carried["pos"]), tensors, what=f"{path} (carried state)")
        self.step, self.tokens_seen = ckpt.step, int(ckpt.meta["tokens_seen"])

    # --- training

    def _next_segment(self):
        batch = next(self.sampler)
        rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        x = batch.input_ids[rows].to(self.device, non_blocking=True)  # (b, T)
        y = batch.labels[rows].to(self.device, non_blocking=True)  # (b, T)
        reset = batch.reset[rows]
        if self.state is None or bool(reset.all()):
            self.state = self._fresh_state(self.local_batch)
        elif bool(reset.any()):
            # A row's attention cache cannot be emptied alone (the rows share its length).
            raise RuntimeError("a batch resets some streams but not others; the trainer's samplers never do")
        return x, y

    def _sync(self, final: bool):
        """DDP: all-reduce gradients only in the backward of the step's last forward (no_sync before)."""
        if self.mode == "ddp" and not final:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over accum x bptt segments. Returns (mean loss, gradient norm) on this
        process."""
        cfg = self.cfg
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i in range(cfg.accum):
            last = i == cfg.accum - 1
            window = 0.0
            for j in range(cfg.bptt):
                x, y = self._next_segment()
                with self._sync(last and j == cfg.bptt - 1), self.autocast():
                    out = self.wrapped(x, labels=y, state=self.state, checkpoint_len=cfg.checkpoint_len)
                self.state = out.state
                window = window + out.loss
            if self.mode == "fsdp":
                self.wrapped.set_requires_gradient_sync(last)
            loss = window / (cfg.bptt * cfg.accum)
            loss.backward()
            self.state = self.state.detach()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += cfg.accum * cfg.bptt * cfg.batch_size * cfg.seq_len
        return float(total), float(norm)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss over ``eval_steps`` consecutive segments of the validation streams, the state
        carried across them (rows split over the processes). Deterministic: always the same tokens."""
        self.module.eval()
        rows = self.val_sampler.batch_size
        mine = torch.arange(rows).tensor_split(self.world)[self.rank] if rows >= self.world else torch.arange(rows)
        state, loss_sum, count = None, 0.0, 0
        for k in range(self.eval_steps):
            batch = self.val_sampler.batch_at(k)
            x, y = batch.input_ids[mine].to(self.device), batch.labels[mine].to(self.device)
            state = state if state is not None else self._fresh_state(len(mine))
            with self.autocast():
                out = self.module(x, labels=y, state=state)
            state = out.state
            loss_sum += float(out.loss) * y.numel()
            count += y.numel()
        loss_sum, count = self._all_reduce([loss_sum, float(count)])
        loss = loss_sum / count
        metrics = {"step": self.step, "val_loss": loss, "val_bits_per_token": loss / math.log(2),
                   "val_tokens": int(count) // (1 if rows >= self.world else self.world)}
        if self.bits_name:
            metrics[self.bits_name] = loss / math.log(2)
        return metrics

    def request_stop(self, reason: str) -> None:
        """Stop after the current step with a checkpoint (what SIGINT / SIGTERM call)."""
        self._stop_signal = reason

    @contextlib.contextmanager
    def _signals(self):
        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.request_stop(signal.Signals(signum).name)

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: no handlers
                pass
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def fit(self) -> TrainResult:
        """Train from ``self.step`` to ``cfg.steps`` (or a stop). Returns what happened."""
        cfg = self.cfg
        log = MetricsLog(self.out, self.step, enabled=self.rank == 0, tensorboard=cfg.tensorboard)
        if self.rank == 0:
            atomic_write_bytes(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
        losses, evals, ckpt, stopped = {}, [], None, None
        bar = progress_bar(cfg, self.step, enabled=self.rank == 0 and cfg.progress)
        train_time, train_tokens, window_t, window_tokens = 0.0, 0, 0.0, 0
        step_tokens = cfg.accum * cfg.bptt * cfg.batch_size * cfg.seq_len
        try:
            with self._signals():
                if self.step == 0 and self.step < cfg.steps:
                    evals.append(self._eval_and_log(log, bar))
                while self.step < cfg.steps:
                    t0 = time.perf_counter()
                    loss, norm = self.train_step()
                    loss, stop = self._all_reduce([loss / self.world, float(self._stop_signal is not None)])
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    train_time, train_tokens = train_time + dt, train_tokens + step_tokens
                    window_t, window_tokens = window_t + dt, window_tokens + step_tokens
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"the training loss is {loss} at step {self.step}: lower --lr "
                                                 f"(now {cfg.lr}) or --grad-clip; the last checkpoint is in "
                                                 f"{self.ckpt_dir}")
                    losses[self.step] = loss
                    tok_s = window_tokens / window_t
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        log.write({"step": self.step, "loss": loss, "lr": self.last_lr,
                                   "grad_norm": norm, "tokens": self.tokens_seen, "tokens_per_s": tok_s})
                        window_t, window_tokens = 0.0, 0
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                        evals.append(self._eval_and_log(log, bar))
                    if stop and self._stop_signal is None:
                        self._stop_signal = "signal on another process"
                    if (self._stop_signal is not None or self.step == cfg.stop_at) and self.step < cfg.steps:
                        stopped = self._stop_signal or "stop_at"
                        raise _Stop
                    if self.step % cfg.save_interval == 0 or self.step == cfg.steps:
                        ckpt = self.save() or ckpt
        except _Stop:
            ckpt = self.save() or ckpt
            if self.rank == 0:
                bar.write(f"titans-lnn train: stopped ({stopped}) after step {self.step}; checkpoint "
                          f"{ckpt}; continue with --resume")
        finally:
            bar.close()
            log.close()
        model_dir = None
        if stopped is None and self.step >= cfg.steps:
            model_dir = self.save_model()
        return TrainResult(self.step, losses, evals, stopped, ckpt, model_dir,
                           train_tokens / train_time if train_time else 0.0)

    def _eval_and_log(self, log, bar) -> dict:
        metrics = self.evaluate()
        log.write(metrics)
        if self.rank == 0:
            bits = metrics.get(self.bits_name or "val_bits_per_token")
            bar.write(f"step {self.step}: val_loss {metrics['val_loss']:.4f}  "
                      f"{(self.bits_name or 'val_bits_per_token')[4:]} {bits:.4f}")
        return metrics

    def save_model(self) -> Path | None:
        """``<out>/model``: a ``TitansLNN.from_pretrained`` directory plus ``tokenizer.json``."""
        model_sd, _ = self._state_dicts() if self.mode == "fsdp" else ({}, None)
        if self.rank != 0:
            self._barrier()
            return None
        directory = self.out / "model"
        module = self.module
        if self.mode == "fsdp":
            module = TitansLNN(self.model_config)
            module.load_state_dict(model_sd)
        save_pretrained(module, directory, extra_files={"tokenizer.json": json.dumps(self.tokenizer.to_dict())})
        self._barrier()
        return directory

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_device_exists(device: str) -> None:
    """A ValueError naming TrainConfig.device when it names a CUDA device this machine does not have."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={device!r} is invalid here: CUDA is not available (torch "
                         f"{torch.__version__}, built with cuda={torch.version.cuda}); expected auto or cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"TrainConfig.device={device!r} is invalid here: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def _tuples(x):
    """JSON turned random.getstate()'s tuples into lists; it wants them back."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by ``cfg``; see the module docstring."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "lr_factor", "resolve_resume", "saved_train_config", "train"]
