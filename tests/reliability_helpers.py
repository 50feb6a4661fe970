"""Shared by the reliability tests (test_reliability_files.py, test_reliability_inputs.py): a small
model, model equality, and the edits a forger or a disk makes to saved files."""

import json
from pathlib import Path

import torch

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.io import file_digest

__all__ = ["debug_model", "flip_bytes", "rehash", "same_model"]


def debug_model(**overrides) -> TitansLNN:
    """The ``debug`` preset with ``overrides``, seeded, in eval mode."""
    torch.manual_seed(0)
    return TitansLNN(TitansLNNConfig.from_preset("debug", **overrides)).eval()


def same_model(a: TitansLNN, b: TitansLNN) -> bool:
    """Same config, same state_dict keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return a.config == b.config and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def rehash(folder: Path, manifest_name: str = "manifest.json") -> None:
    """What a careful forger does after editing a file: recompute the manifest's size and hash."""
    manifest = json.loads((folder / manifest_name).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = file_digest(folder / name)
    (folder / manifest_name).write_text(json.dumps(manifest))


def flip_bytes(path: Path, count: int = 1000, seed: int = 0) -> None:
    """Invert ``count`` bytes of ``path`` at seeded random offsets (a damaged disk)."""
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randint(len(data), (count,), generator=g).tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
