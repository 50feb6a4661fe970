"""Checkpoints without pickle: safetensors for tensors, JSON for the rest, written atomically, verified on load.

A checkpoint is a folder ``<dir>/step-00001000/`` holding ``tensors.safetensors``, ``meta.json`` and,
written last, ``manifest.json`` (byte size and SHA-256 of the other two). A save fills a hidden
temporary folder in ``<dir>``, fsyncs every file and the folder, and renames it into place, so a step
folder is either absent or complete; a missing manifest or a checksum mismatch means it was truncated
or damaged afterwards, and ``latest_checkpoint`` skips it with a warning.

Nested Python state (optimizer ``state_dict()``s, RNG states) goes through ``flatten_state`` -> (tensors,
JSON-able skeleton) and back through ``unflatten_state``: nothing is ever pickled (no ``torch.save``).

    tensors, skeleton = flatten_state({"model": model.state_dict(), "optim": opt.state_dict()})
    save_checkpoint("ckpt", step, tensors, {"state": skeleton, "config": config.to_dict()}, keep_last=3)
    ckpt = load_checkpoint(latest_checkpoint("ckpt"))
    state = unflatten_state(ckpt.tensors, ckpt.meta["state"])
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.torch
import torch

from titans_lnn.io import (
    IntegrityError,
    _alive,
    atomic_replace_dir,
    atomic_write_bytes,
    fsync_dir,
    make_manifest,
    read_json,
    verify_manifest,
    write_synced,
)

FORMAT = "titans-lnn-checkpoint"
VERSION = 1
TENSORS_FILE, META_FILE, MANIFEST_FILE = "tensors.safetensors", "meta.json", "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_DIR = re.compile(r"\.(?:tmp|old)-step-\d+-(\d+)-[0-9a-f]+")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or not a checkpoint."""


class Checkpoint(NamedTuple):
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


# ----------------------------------------------------------------------------- atomic files

atomic_write = atomic_write_bytes  # the name this module exported before titans_lnn.io held the helper


# ----------------------------------------------------------------------------- save / find / load


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Every ``step-*`` folder in ``directory`` (complete or not), oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses that; tied weights do it)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_checkpoint: tensors must map str to Tensor, got {name!r}: {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def save_checkpoint(directory: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor],
                    meta: dict | None = None, *, keep_last: int | None = None) -> Path:
    """Write ``<directory>/step-<step:08d>/`` atomically; then keep only the ``keep_last`` newest ones.

    ``meta`` must be JSON-serialisable (use ``flatten_state`` for nested state with tensors). Saving a
    step that exists replaces it. Only one process should save into a directory (rank 0).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} must be an integer >= 0")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} must be None or an integer >= 1")
    try:
        meta_bytes = json.dumps({"format": FORMAT, "version": VERSION, "step": step, "meta": meta or {}},
                                indent=1).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: meta is not JSON-serialisable ({e}); "
                        f"store nested state with flatten_state") from e
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    tensors = _storable(tensors)

    def fill(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp / TENSORS_FILE))
        write_synced(tmp / META_FILE, meta_bytes)
        manifest = make_manifest(tmp, [TENSORS_FILE, META_FILE], format=FORMAT, step=step)
        write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))

    final = atomic_replace_dir(directory / f"step-{step:08d}", fill)
    if keep_last is not None:
        _prune(directory, keep_last)
    return final


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary folders left by a save that was killed (its process is gone). A replaced checkpoint
    moved aside just before the kill is put back when nothing took its place."""
    for p in directory.iterdir():
        m = _TMP_DIR.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            original = directory / p.name[len(".old-"):].rsplit("-", 2)[0]
            if p.name.startswith(".old-") and not original.exists():
                os.replace(p, original)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _prune(directory: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints that verify and anything newer; delete everything
    older. A damaged folder never counts as kept, so pruning never leaves fewer good checkpoints than
    ``keep_last`` (with none that verify, nothing is deleted)."""
    good = []
    for p in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(p)
        except CheckpointError:
            continue
        good.append(p)
        if len(good) == keep_last:
            break
    if len(good) < keep_last:
        return
    oldest_kept = checkpoint_step(good[-1])
    for p in list_checkpoints(directory):
        if checkpoint_step(p) < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)
    fsync_dir(directory)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check the manifest (exactly the checkpoint's two files, its step the folder's), sizes and SHA-256
    sums; return the manifest or raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST_FILE} (the save did not finish)")
    try:
        manifest = read_json(manifest_path, "checkpoint manifest")
    except (IntegrityError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST_FILE}: {e}") from None
    try:
        verify_manifest(path, manifest, format=FORMAT, required={TENSORS_FILE, META_FILE},
                        label=f"checkpoint {path}")
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    step = checkpoint_step(path)
    if step is not None and manifest.get("step") != step:
        raise CheckpointError(f"checkpoint {path}: {manifest_path} says step {manifest.get('step')!r}, the folder "
                              f"name says {step}")
    return manifest


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory`` that verifies; incomplete or corrupt ones are skipped with a
    warning naming them. None when there is none."""
    for p in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {p}: {e}", RuntimeWarning, stacklevel=2)
            continue
        return p
    return None


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    verify: bool = True) -> Checkpoint:
    """Read a ``step-*`` folder; with ``verify`` (default) its checksums are checked first."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    meta_path, tensors_path = path / META_FILE, path / TENSORS_FILE
    try:
        meta = read_json(meta_path, "checkpoint meta.json object")
        if meta.get("format") != FORMAT:
            raise IntegrityError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise IntegrityError(f"{meta_path}: step {step!r}, expected an integer >= 0")
        if checkpoint_step(path) not in (None, step):
            raise IntegrityError(f"{meta_path}: step {step}, the folder name says {checkpoint_step(path)}")
        if not isinstance(meta.get("meta"), dict):
            raise IntegrityError(f"{meta_path}: 'meta' is {type(meta.get('meta')).__name__}, expected an object")
    except IntegrityError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    try:
        tensors = safetensors.torch.load_file(str(tensors_path), device=str(device))
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {tensors_path}: {e}") from e
    return Checkpoint(path, step, tensors, meta["meta"])


# ----------------------------------------------------------------------------- nested state <-> flat

# Markers of the JSON skeleton. A dict whose keys are all strings not starting with "__" is stored as a
# JSON object; any other dict goes as {"__dict__": [[key, value], ...]}, so markers are unambiguous.
_TENSOR, _NDARRAY, _TUPLE, _DICT, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__"


def flatten_state(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Nested dicts/lists/tuples of tensors, numpy arrays, ints, floats, bools, strings and None ->
    (tensors named by their path, a JSON-serialisable skeleton). Inverse: ``unflatten_state``."""
    tensors: dict[str, torch.Tensor] = {}

    def name(path: str) -> str:
        key, n = path or "tensor", 1
        while key in tensors:  # e.g. {"a.b": x, "a": {"b": y}}
            key, n = f"{path}#{n}", n + 1
        return key

    def enc(x, path: str):
        if isinstance(x, torch.Tensor):
            key = name(path)
            tensors[key] = x
            return {_TENSOR: key}
        if isinstance(x, np.ndarray):
            key = name(path)
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x))
            return {_NDARRAY: key}
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {_FLOAT: repr(x)}  # JSON has no nan/inf
        if isinstance(x, (list, tuple)):
            items = [enc(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]
            return {_TUPLE: items} if isinstance(x, tuple) else items
        if isinstance(x, dict):
            sub = {k: f"{path}.{k}" if path else str(k) for k in x}
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, sub[k]) for k, v in x.items()}
            for k in x:
                if not (k is None or isinstance(k, (str, int, float))):
                    raise TypeError(f"flatten_state: dict key {k!r} ({type(k).__name__}) at {path or '<root>'} "
                                    f"is not a str, int, float, bool or None")
            return {_DICT: [[k, enc(v, sub[k])] for k, v in x.items()]}
        raise TypeError(f"flatten_state: cannot store a {type(x).__name__} at {path or '<root>'}")

    return tensors, enc(obj, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton):
    """Inverse of ``flatten_state``."""

    def tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise KeyError(f"unflatten_state: tensor {key!r} named in the skeleton is missing")
        return tensors[key]

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if len(x) == 1:
                ((k, v),) = x.items()
                if k == _TENSOR:
                    return tensor(v)
                if k == _NDARRAY:
                    return tensor(v).cpu().numpy()
                if k == _TUPLE:
                    return tuple(dec(i) for i in v)
                if k == _DICT:
                    return {kk: dec(vv) for kk, vv in v}
                if k == _FLOAT:
                    return float(v)
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(skeleton)
