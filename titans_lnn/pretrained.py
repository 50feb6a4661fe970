"""Saved models: ``model.safetensors`` + ``config.json`` in one directory, no pickle.

    save_pretrained(model, "ckpt")          # or model.save_pretrained("ckpt")
    model = load_pretrained("ckpt")         # or TitansLNN.from_pretrained("ckpt")
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from titans_lnn.config import TitansLNNConfig

if TYPE_CHECKING:
    from titans_lnn.model import TitansLNN

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: TitansLNN, directory: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (atomic renames)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file(weights, tmp, metadata={"format": "pt", "fingerprint": model.fingerprint})
    _fsync_replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(model.config.to_json())
    _fsync_replace(tmp, os.path.join(directory, CONFIG_NAME))


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TitansLNN:
    """The model saved in ``directory`` by :func:`save_pretrained`, on ``map_location``."""
    from safetensors.torch import load_file

    from titans_lnn.model import TitansLNN

    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: expected a directory written by save_pretrained")
    with open(cfg_path) as f:
        config = TitansLNNConfig.from_dict(json.load(f))
    model = TitansLNN(config)
    model.load_state_dict(load_file(w_path, device=str(map_location)))
    return model.to(map_location)


def _fsync_replace(tmp: str, path: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
