"""What a training run reports as it goes: ``<out>/metrics.jsonl`` (and TensorBoard) and the progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from titans_lnn.io import atomic_write_bytes
from titans_lnn.training.config import TrainConfig

__all__ = ["MetricsLog", "progress_bar"]


class MetricsLog:
    """``<out>/metrics.jsonl`` (one JSON object a line) and TensorBoard scalars, on rank 0. A resumed
    run first drops the lines of steps after its checkpoint (a killed run may have logged past it)."""

    def __init__(self, out: Path, step: int, *, enabled: bool, tensorboard: bool):
        self.file, self.tb = None, None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if step == 0 and path.is_file() and path.stat().st_size:
            # A new run in a folder with an earlier run's log: keep that history beside, never truncate it.
            aside = out / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
            os.replace(path, aside)
            print(f"titans-lnn train: a new run in {out}: the earlier metrics.jsonl was moved to {aside.name}")
        kept = []
        if step > 0 and path.exists():
            for line in path.read_text("utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line + "\n")
                except ValueError:  # a line cut by a kill
                    continue
        atomic_write_bytes(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        record = {**record, "time": round(time.time(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def progress_bar(cfg: TrainConfig, step: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=step, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train")
