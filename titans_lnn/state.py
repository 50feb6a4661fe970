"""The streaming state of a model: everything it has read, in a fixed size.

Per layer: the attention cache (at most W - 1 rotated keys/values), the liquid vectors, and the
memory's weights, momentum and chunk anchor. ``pos`` counts the tokens read. A state can be saved
and restored (safetensors, no pickle), so a long document's state can be kept and resumed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch


def _map(tree, fn):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def _flatten(tree, prefix: str, out: dict) -> dict:
    for k, v in tree.items():
        if isinstance(v, dict):
            _flatten(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class ModelState:
    """pos: tokens read so far; batch_size; fingerprint: the config's hash (a state only fits the
    model that made it); layers: one nested dict of tensors per block."""

    pos: int
    batch_size: int
    fingerprint: str
    layers: list[dict] = field(default_factory=list)

    def detach(self) -> ModelState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return ModelState(self.pos, self.batch_size, self.fingerprint,
                          [_map(layer, lambda t: t.detach()) for layer in self.layers])

    @property
    def requires_grad(self) -> bool:
        """Whether any tensor carries autograd history: the next call then extends that graph, so
        streaming with grad enabled keeps every piece's activations alive (``detach()`` cuts it)."""
        return any(t.requires_grad for t in self.tensors().values())

    def to(self, *args, **kwargs) -> ModelState:
        return ModelState(self.pos, self.batch_size, self.fingerprint,
                          [_map(layer, lambda t: t.to(*args, **kwargs)) for layer in self.layers])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat view: {"layers.{i}.{path}": tensor}."""
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            _flatten(layer, f"layers.{i}.", out)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to one safetensors file, atomically (temporary file, fsync, rename)."""
        from safetensors.torch import save_file

        meta = {"pos": str(self.pos), "batch_size": str(self.batch_size), "fingerprint": self.fingerprint,
                "n_layers": str(len(self.layers)), "format": "titans-lnn-state-1"}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> ModelState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "titans-lnn-state-1":
                raise ValueError(f"{path} is not a titans-lnn state file (metadata {json.dumps(meta)[:200]})")
            layers: list[dict] = [{} for _ in range(int(meta["n_layers"]))]
            for key in f.keys():
                _, i, *path_ = key.split(".")
                node = layers[int(i)]
                for part in path_[:-1]:
                    node = node.setdefault(part, {})
                t = f.get_tensor(key)
                node[path_[-1]] = t.to(device) if device is not None else t
        return cls(int(meta["pos"]), int(meta["batch_size"]), meta["fingerprint"], layers)
