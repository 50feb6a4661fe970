"""The streaming state of a model: everything it has read, in a fixed size.

Each stateful block has a small typed state (a dataclass of tensors): ``AttentionState`` (the last
W - 1 rotated keys/values, preallocated), ``LiquidState`` (the liquid vectors), ``MemoryState`` (the
memory's weights, momentum and chunk anchor), and the mixers compose them (MAC's ``MACState`` adds
the weights its segment reads from). ``ModelState`` holds one ``BlockState`` per block and ``pos``,
the tokens read. Every state maps (``map``, ``detach``, ``to``), names its tensors (``named_tensors``)
and counts its bytes; a ``ModelState`` is saved and restored with safetensors (no pickle), checked
against the model that loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from titans_lnn.io import atomic_write_bytes


class State:
    """Base of the streaming states: a dataclass whose fields are tensors, tuples of tensors, nested
    states, lists of states, ``None``, or plain values (ints, strings), which ``map`` keeps."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """The same state with ``fn`` applied to every tensor."""
        return dataclasses.replace(self, **{f.name: _map(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def detach(self):
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return self.map(torch.Tensor.detach)

    def to(self, *args, **kwargs):
        return self.map(lambda t: t.to(*args, **kwargs))

    def named_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat view {dotted path: tensor}, e.g. ``mem.weights.0``."""
        out: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(self):
            _collect(getattr(self, f.name), f"{prefix}{f.name}", out)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.named_tensors().values())

    @property
    def requires_grad(self) -> bool:
        """Whether any tensor carries autograd history (the next call then extends that graph)."""
        return any(t.requires_grad for t in self.named_tensors().values())


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, State):
        return value.map(fn)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _collect(value, path: str, out: dict) -> None:
    if isinstance(value, torch.Tensor):
        out[path] = value
    elif isinstance(value, State):
        out.update(value.named_tensors(path + "."))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _collect(v, f"{path}.{i}", out)


def _with_pos(value, pos: int):
    """``value`` with every nested state's ``pos`` field set to ``pos``."""
    if isinstance(value, State):
        changes = {f.name: _with_pos(getattr(value, f.name), pos) for f in dataclasses.fields(value)}
        if "pos" in changes:
            changes["pos"] = pos
        return dataclasses.replace(value, **changes)
    if isinstance(value, (tuple, list)):
        return type(value)(_with_pos(v, pos) for v in value)
    return value


def _positions(value, path: str, out: dict) -> dict:
    """{path: pos} of every nested state that has a ``pos`` field."""
    if isinstance(value, State):
        for f in dataclasses.fields(value):
            if f.name == "pos":
                out[path or "."] = value.pos
            else:
                _positions(getattr(value, f.name), f"{path}.{f.name}" if path else f.name, out)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _positions(v, f"{path}.{i}", out)
    return out


@dataclass
class AttentionState(State):
    """Sliding-window attention's cache: the rotated keys/values of the last ``size`` tokens that later
    queries can still see, (B, G, size, D), preallocated (zeros stand before the first token; the
    attention reads only the ``valid`` most recent). MAC's memory read-outs are a second, aligned
    stream (k2, v2). Full attention (the quadratic ablation) has no window: its cache grows with ``pos``."""

    k: torch.Tensor
    v: torch.Tensor
    k2: torch.Tensor | None = None
    v2: torch.Tensor | None = None
    pos: int = 0  # tokens read


@dataclass
class LiquidState(State):
    """The liquid core's state vector h: (B, D_l * N)."""

    h: torch.Tensor


@dataclass
class MemoryState(State):
    """The neural memory: per memory layer l the weights, the momentum and the current chunk's anchor
    (the weights its gradients are taken at), each (B, heads, out_l, in_l); ``spent`` (B, heads, d, d):
    the steps the chunk has taken along each key (stable step); the q/k/v convolutions' last inputs;
    ``fresh`` (B,): 1 where nothing was written yet (the weights are then the learned initial memory, so
    gradients reach it); ``pos``: the tokens written (fixes where a call starts in its chunk)."""

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]
    anchor: tuple[torch.Tensor, ...]
    spent: torch.Tensor | None
    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    fresh: torch.Tensor
    pos: int = 0


@dataclass
class MACState(State):
    """Memory as context: the attention's and the memory's states, the memory weights the current
    segment reads from (snapshot at its start) and the read's own query convolution."""

    attn: AttentionState
    mem: MemoryState
    segment_weights: tuple[torch.Tensor, ...]
    conv_read: torch.Tensor


@dataclass
class PairState(State):
    """Two sub-layers' states: MAG (attention and memory side by side) and MAL (memory, then attention)."""

    attn: AttentionState
    mem: MemoryState


@dataclass
class EmptyState(State):
    """The state of a mixer that keeps none."""


@dataclass
class BlockState(State):
    """One block: its sequence mixer's state and the liquid core's (None where the variant has none)."""

    mixer: State
    liquid: LiquidState | None = None


STATE_FORMAT = "titans-lnn-state-2"


@dataclass
class ModelState(State):
    """pos: tokens read so far; batch_size; fingerprint: the config's hash (a state only fits the
    model that made it); layers: one ``BlockState`` per block."""

    pos: int
    batch_size: int
    fingerprint: str
    layers: list[BlockState] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat view: {"layers.{i}.{path}": tensor}."""
        return self.named_tensors()

    def check_positions(self) -> None:
        """Every block state has read as many tokens as the model state says."""
        for path, p in _positions(self.layers, "layers", {}).items():
            if p != self.pos:
                raise ValueError(f"state is inconsistent: pos={self.pos} but {path}.pos={p} (an edited or "
                                 "mixed-up state)")

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to one safetensors file, atomically (temporary file, fsync, rename), with a
        checksum of its tensors that ``load`` verifies."""
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta = {"pos": str(self.pos), "batch_size": str(self.batch_size), "fingerprint": self.fingerprint,
                "n_layers": str(len(self.layers)), "format": STATE_FORMAT}
        meta["sha256"] = _digest(tensors, meta)
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, model, device=None) -> ModelState:
        """The state saved at ``path``, for ``model`` (a TitansLNN): its config fingerprint, every tensor
        (names, shapes, float dtypes) and the checksum must match, or a ValueError names what differs."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:  # OSError, or safetensors' own SafetensorError on a malformed file
            raise ValueError(f"{path}: not a readable titans-lnn state file ({type(e).__name__}: {e})") from e
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a titans-lnn state file of format {STATE_FORMAT} "
                             f"(its format: {meta.get('format')!r})")
        if meta.get("sha256") != _digest(tensors, meta):
            raise ValueError(f"{path}: its tensors and header do not match their checksum (the file was modified "
                             "or damaged)")
        if meta.get("fingerprint") != model.fingerprint:
            raise ValueError(f"{path} was saved by a model with another config (fingerprint "
                             f"{meta.get('fingerprint')}, this model's is {model.fingerprint})")
        try:
            pos, batch_size = int(meta["pos"]), int(meta["batch_size"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: bad pos/batch_size in its metadata ({e})") from e
        if pos < 0 or batch_size < 1:
            raise ValueError(f"{path}: pos={pos} must be >= 0 and batch_size={batch_size} >= 1")
        state = ModelState.from_tensors(model.init_state(batch_size, device="cpu"), pos, tensors, what=str(path))
        model.check_state(state)
        return state.to(device) if device is not None else state


    @staticmethod
    def from_tensors(template: ModelState, pos: int, tensors: dict[str, torch.Tensor], what: str = "state"):
        """The state of ``template``'s structure at position ``pos`` whose tensors are ``tensors`` (by the
        names of ``tensors()``); every name must be there, and nothing else."""
        template = ModelState(pos, template.batch_size, template.fingerprint, _with_pos(template.layers, pos))
        expected = template.tensors()
        missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unknown:
            raise ValueError(f"{what}: its tensors do not fit this model (missing {missing[:5]}, unexpected "
                             f"{unknown[:5]})")
        return template.map(_Replace(expected, tensors))


class _Replace:
    """A map function that swaps each template tensor for the loaded tensor of the same name."""

    def __init__(self, expected: dict, loaded: dict):
        self.by_id = {id(t): loaded[name] for name, t in expected.items()}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.by_id[id(t)]


def _digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """sha256 over the header's fields (all but the digest itself) and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256()
    for key in ("format", "pos", "batch_size", "fingerprint", "n_layers"):
        h.update(f"{key}={meta.get(key)}|".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_like(state: State, template: State, what: str = "state") -> None:
    """``state`` has the template's structure: the same tensor names, shapes (a dimension of size 0 in
    the template grows with the tokens read: full attention's cache) and floating-point dtypes."""
    got, want = state.named_tensors(), template.named_tensors()
    if got.keys() != want.keys():
        missing, unknown = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(f"{what} does not fit this model: missing {missing[:5]}, unexpected {unknown[:5]}")
    for name, t in got.items():
        w = want[name]
        if t.dim() != w.dim() or any(a != b and b != 0 for a, b in zip(t.shape, w.shape)):
            raise ValueError(f"{what}.{name} has shape {tuple(t.shape)}; this model expects {tuple(w.shape)}")
        if t.is_floating_point() != w.is_floating_point():
            raise ValueError(f"{what}.{name} has dtype {t.dtype}; this model expects a {w.dtype}-like tensor")
