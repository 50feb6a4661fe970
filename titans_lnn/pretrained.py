"""Saved models: one folder holding ``model.safetensors``, ``config.json`` and ``manifest.json``, no pickle.

    save_pretrained(model, "ckpt")          # or model.save_pretrained("ckpt")
    model = load_pretrained("ckpt")         # or TitansLNN.from_pretrained("ckpt")

A save fills a temporary sibling folder, fsyncs it and renames it into place once (titans_lnn.io), so
after a kill the folder holds the old model or the new one, never new weights with an old config.
``manifest.json`` records each file's size and SHA-256; the weights' metadata records the fingerprint
of the config they were trained with. A load checks the manifest, the config (every field present and
well-typed), and that fingerprint, so a damaged or edited folder fails with an error naming the file
instead of loading a different model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from titans_lnn.config import TitansLNNConfig
from titans_lnn.io import IntegrityError, atomic_replace_dir, make_manifest, read_json, verify_manifest, write_synced

if TYPE_CHECKING:
    from titans_lnn.model import TitansLNN

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
FORMAT = "titans-lnn-pretrained"
MODEL_TYPE = "titans_lnn"  # config.json's "model_type", which transformers' AutoConfig reads (titans_lnn.hf)
_OWN = (WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME)


def save_pretrained(model: TitansLNN, directory: str | os.PathLike,
                    extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write ``model`` into ``directory`` atomically: weights, config, ``extra_files`` (name -> contents,
    e.g. ``{"tokenizer.json": ...}``, covered by the manifest too) and the manifest. Other files already
    in ``directory`` are carried over into the new folder. Returns the folder."""
    from safetensors.torch import save_file

    extra = dict(extra_files or {})
    for name, data in extra.items():
        if not isinstance(name, str) or name in _OWN or Path(name).name != name or name.startswith("."):
            raise ValueError(f"save_pretrained: extra file name {name!r} is invalid: expected a plain file name "
                             f"other than {', '.join(_OWN)}")
        if not isinstance(data, (bytes, str)):
            raise TypeError(f"save_pretrained: extra file {name!r} holds a {type(data).__name__}: expected bytes "
                            f"or str")
    directory = Path(directory)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def fill(tmp: Path) -> None:
        if directory.is_dir():  # keep what else the user keeps here
            for entry in directory.iterdir():
                if entry.name not in _OWN and entry.name not in extra:
                    _copy(entry, tmp / entry.name)
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "fingerprint": model.fingerprint})
        config_json = json.dumps({**model.config.to_dict(), "model_type": MODEL_TYPE}, indent=2, sort_keys=True)
        write_synced(tmp / CONFIG_NAME, config_json.encode("utf-8"))
        for name, data in extra.items():
            write_synced(tmp / name, data.encode("utf-8") if isinstance(data, str) else data)
        manifest = make_manifest(tmp, [WEIGHTS_NAME, CONFIG_NAME, *extra], format=FORMAT)
        write_synced(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"))

    return atomic_replace_dir(directory, fill)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    verify: bool = True) -> TitansLNN:
    """The model saved in ``directory`` by :func:`save_pretrained`, on ``map_location``.

    With ``verify`` (default) the manifest must list the config and the weights and every listed file
    must match its size and SHA-256; ``verify=False`` skips only that (for folders written before
    manifests existed). Either way the config must be complete and valid and its fingerprint must be
    the one stored with the weights. Errors name the file: FileNotFoundError, IntegrityError (a
    ValueError) for damaged or mismatched files, ValueError for an invalid config."""
    from safetensors import SafetensorError, safe_open

    from titans_lnn.model import TitansLNN

    directory = Path(directory)
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"map_location={map_location!r} is invalid: expected a device such as 'cpu' or "
                         f"'cuda:0' ({e})") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"map_location={map_location!r} is not available: this machine has "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s)")
    cfg_path, w_path, manifest_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME, directory / MANIFEST_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a folder; expected one written by "
                                f"save_pretrained{_interrupted_hint(directory)}")
    for path in (cfg_path, w_path) + ((manifest_path,) if verify else ()):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a folder written by save_pretrained"
                                    + (" (folders saved before manifests existed load with verify=False)"
                                       if path == manifest_path else ""))
    if verify:
        manifest = read_json(manifest_path, "save_pretrained manifest")
        names = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        verify_manifest(directory, manifest, format=FORMAT, required={CONFIG_NAME, WEIGHTS_NAME},
                        optional=set(names) - set(_OWN), label=f"saved model {directory}")
    config = load_config(cfg_path)
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            stored = (f.metadata() or {}).get("fingerprint")
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise IntegrityError(f"{w_path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if stored != config.fingerprint:
        raise IntegrityError(f"{cfg_path} does not describe the weights in {w_path}: the config's fingerprint is "
                             f"{config.fingerprint}, the weights were saved with {stored!r} (an edited or "
                             f"mismatched config)")
    model = TitansLNN(config)
    _check_weights(model, weights, w_path)
    model.load_state_dict(weights)
    return model.to(device)


def load_config(path: str | os.PathLike) -> TitansLNNConfig:
    """The TitansLNNConfig in a ``config.json`` (its optional ``"model_type"`` must be ours); errors name
    the file."""
    data = read_json(path, "TitansLNNConfig object")
    model_type = data.pop("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ValueError(f"{path}: model_type={model_type!r}, expected {MODEL_TYPE!r} (not a titans-lnn config)")
    try:
        return TitansLNNConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _check_weights(model: TitansLNN, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Every parameter and buffer present, with its shape and kind of dtype (a float tensor may have been
    saved in another float precision), and nothing else."""
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unknown:
        raise IntegrityError(f"{path}: its tensors do not fit the config (missing {missing[:5]}, unexpected "
                             f"{unknown[:5]})")
    for name, t in expected.items():
        w = weights[name]
        if w.shape != t.shape or (w.dtype != t.dtype and not (w.is_floating_point() and t.is_floating_point())):
            raise IntegrityError(f"{path}: tensor {name} is {w.dtype} {tuple(w.shape)}, the config needs "
                                 f"{t.dtype} {tuple(t.shape)}")


def _interrupted_hint(directory: Path) -> str:
    parent = directory.parent
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(f".old-{directory.name}-"):
                return (f"; a save into it was interrupted and the previous copy is in {p} (the next save_pretrained "
                        f"into {directory} restores it first)")
    return ""
