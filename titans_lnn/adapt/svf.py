"""Singular Value Fine-tuning (SVF, Transformer², Sun et al. 2025, arXiv 2501.06252, section 3.1).

Each chosen weight matrix is decomposed once, W = U diag(s) V^T (rank R = min(out, in)), and an
*expert* is one vector z per matrix, (R,), that rescales the singular values:

    W' = U diag(s * z) V^T

computed as ``W + U diag(s * (z - 1)) V^T``: the same matrix in exact arithmetic, and at z = 1 the
added term is exactly zero, so z = 1 reproduces the base model bit for bit (a product of the
factors would differ from W by rounding).

    svf = SVF(model)                          # default targets: every block's MLP, mlp.w13 and mlp.w2
    expert = svf.expert(z, "dna", task="dna")  # z: {layer name: (R,)}, e.g. from train_svf
    expert.save("dna.safetensors"); expert = Expert.load("dna.safetensors")
    svf.apply(expert)                         # writes W' into the model's weights (no re-decomposition)
    svf.remove()                              # restores the decomposed weights exactly
    with svf.applied(expert): ...             # the same, scoped
    torch.func.functional_call(model, svf.weights(z), (ids,))   # differentiable in z (training)

An expert file is safetensors: one tensor ``z.<layer name>`` per layer, and metadata naming the
format, the model's config fingerprint (``model.fingerprint``), a digest of the decomposed weights
(an expert rescales *these* singular directions: another model of the same config has others), the
targets, and free-form ``meta`` (task, steps, objective). Loading it into another model raises.

Streaming: a ``ModelState`` holds what the model has read (attention keys/values, liquid vectors,
memory weights), never the adapted matrices, so applying or switching an expert between two calls
keeps the state valid; each token is read with the weights in force when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from titans_lnn.io import atomic_write_bytes

DEFAULT_TARGETS = ("mlp.w13", "mlp.w2")  # the SwiGLU MLP of every block (layers.SwiGLU), as in the paper
FORMAT = "titans-lnn-svf-expert"
FORMAT_VERSION = "1"


def target_layers(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """{module name: linear layer} of every ``nn.Linear`` in ``model`` whose name is a target or ends
    with ``"." + target`` (so "mlp.w2" selects blocks.0.mlp.w2, blocks.1.mlp.w2, ...), in model order.
    Raises ValueError naming a target that selects nothing, or selects a module that is not linear."""
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets={targets!r} is invalid: expected a non-empty tuple of module names "
                         f"(or name suffixes such as 'mlp.w2')")
    layers: dict[str, nn.Linear] = {}
    for target in targets:
        hits = [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        if not hits:
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"target {target!r} matches no module of the model: expected a name or suffix of its "
                             f"linear layers, e.g. {', '.join(linear[:4])}")
        for name, module in hits:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target {target!r} selects {name}, a {type(module).__name__}: expected nn.Linear")
            layers[name] = module
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(layers.items(), key=lambda kv: order[kv[0]]))


def weights_digest(layers: Mapping[str, nn.Linear]) -> str:
    """16 hex digits of SHA-256 over the layers' names, shapes, dtypes and weight bytes."""
    h = hashlib.sha256()
    for name, layer in layers.items():
        w = layer.weight.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype};".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Expert:
    """One SVF expert: a vector z (R,) per decomposed layer, and what it was made for."""

    name: str
    z: dict[str, torch.Tensor]  # layer name -> (R,) singular-value scales
    fingerprint: str  # the model config's fingerprint (model.fingerprint)
    weights_digest: str  # weights_digest of the decomposed layers
    targets: tuple[str, ...]
    meta: dict[str, str] = field(default_factory=dict)  # task, steps, objective, ...

    def num_parameters(self) -> int:
        return sum(z.numel() for z in self.z.values())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the expert as one safetensors file (atomically: the old file or the new one, never a part)."""
        from safetensors.torch import save

        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.meta.items()):
            raise TypeError(f"Expert.meta must map strings to strings (safetensors metadata); got {self.meta!r:.120}")
        tensors = {f"z.{name}": z.detach().float().contiguous().cpu() for name, z in self.z.items()}
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "fingerprint": self.fingerprint,
                    "weights_digest": self.weights_digest, "targets": json.dumps(list(self.targets)),
                    "layers": json.dumps(list(self.z)), "meta": json.dumps(self.meta, sort_keys=True)}
        path = Path(path)
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Expert:
        """Read an expert written by ``save``. Raises FileNotFoundError, or ValueError naming the file when
        it is not an SVF expert file, is of another format version, or its tensors do not match its list."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such expert file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: metadata format={metadata.get('format')!r}: expected {FORMAT!r} (an SVF expert "
                             f"written by Expert.save)")
        if metadata.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: expert format version {metadata.get('version')!r}: this code reads "
                             f"version {FORMAT_VERSION!r}")
        try:
            layers, targets = json.loads(metadata["layers"]), tuple(json.loads(metadata["targets"]))
            meta = json.loads(metadata["meta"])
            name, fingerprint, digest = metadata["name"], metadata["fingerprint"], metadata["weights_digest"]
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: damaged expert metadata ({type(e).__name__}: {e})") from None
        if sorted(tensors) != sorted(f"z.{n}" for n in layers):
            raise ValueError(f"{path}: tensors {sorted(tensors)} do not match the layers listed in its metadata "
                             f"{layers}")
        return cls(name, {n: tensors[f"z.{n}"] for n in layers}, fingerprint, digest, targets, meta)


@dataclass
class _Factors:
    base: torch.Tensor  # (O, I) the decomposed weight, kept to restore it exactly
    u: torch.Tensor  # (O, R)
    s: torch.Tensor  # (R,)
    vh: torch.Tensor  # (R, I)


class SVF:
    """The singular value decomposition of ``model``'s target layers, computed once at construction,
    and the experts over it (see the module docstring). Factors are computed in float64 and kept in the
    weights' dtype promoted to at least float32, on the weights' device; the base weights are kept too
    (to restore them exactly), so the memory is about three times the targets' weights."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS):
        self.model = model
        self.targets = tuple(targets)
        self.layers = target_layers(model, self.targets)
        self.fingerprint = getattr(model, "fingerprint", None) or type(model).__name__
        self.weights_digest = weights_digest(self.layers)
        self._param_names = {name: f"{name}.weight" for name in self.layers}
        self.factors: dict[str, _Factors] = {}
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)  # (O, R), (R,), (R, I)
            dtype = torch.promote_types(w.dtype, torch.float32)
            self.factors[name] = _Factors(w.clone(), u.to(dtype), s.to(dtype), vh.to(dtype))
        self.active: Expert | None = None

    # Sizes and vectors.
    def sizes(self) -> dict[str, int]:
        """{layer name: R}, the length of that layer's z."""
        return {name: f.s.numel() for name, f in self.factors.items()}

    def num_parameters(self) -> int:
        """Parameters of one expert: the total number of singular values."""
        return sum(self.sizes().values())

    def ones(self, requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """z = 1 for every layer (the base model), as fresh tensors on the factors' device."""
        return {name: torch.ones_like(f.s).requires_grad_(requires_grad) for name, f in self.factors.items()}

    def check_z(self, z: Mapping[str, torch.Tensor], what: str = "z") -> None:
        """Raise ValueError/TypeError unless ``z`` holds one finite (R,) tensor for exactly this SVF's layers."""
        if not isinstance(z, Mapping):
            raise TypeError(f"{what} must map layer names to (R,) tensors; got {type(z).__name__}")
        missing, extra = [n for n in self.factors if n not in z], [n for n in z if n not in self.factors]
        if missing or extra:
            raise ValueError(f"{what} covers other layers than this SVF's: missing {missing[:3]}"
                             f"{'...' * (len(missing) > 3)}, unexpected {extra[:3]}{'...' * (len(extra) > 3)} "
                             f"(expected {len(self.factors)} layers of targets {self.targets})")
        for name, R in self.sizes().items():
            v = z[name]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                got = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
                raise TypeError(f"{what}[{name!r}] must be a floating-point tensor; got {got}")
            if tuple(v.shape) != (R,):
                raise ValueError(f"{what}[{name!r}] has shape {tuple(v.shape)}: expected ({R},), one scale per "
                                 f"singular value of that layer")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{what}[{name!r}] contains non-finite values: expected finite scales")

    def check_expert(self, expert: Expert) -> None:
        """Raise ValueError unless ``expert`` was made for this model (config and decomposed weights) and
        its z fit the layers."""
        if not isinstance(expert, Expert):
            raise TypeError(f"expected an Expert; got {type(expert).__name__}")
        if expert.fingerprint != self.fingerprint:
            raise ValueError(f"expert {expert.name!r} was made for a model with config fingerprint "
                             f"{expert.fingerprint}; this model's is {self.fingerprint}")
        if expert.weights_digest != self.weights_digest:
            raise ValueError(f"expert {expert.name!r} was made for other weights (digest {expert.weights_digest}) of "
                             f"this config; this model's decomposed weights have digest {self.weights_digest}")
        self.check_z(expert.z, what=f"expert {expert.name!r} z")

    # Experts.
    def expert(self, z: Mapping[str, torch.Tensor], name: str, **meta: str) -> Expert:
        """An ``Expert`` of this model holding (detached copies of) ``z``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} is invalid: expected a non-empty string")
        self.check_z(z)
        z = {n: z[n].detach().clone() for n in self.factors}
        meta = {k: str(v) for k, v in meta.items()}
        return Expert(name, z, self.fingerprint, self.weights_digest, self.targets, meta)

    def mix(self, experts: list[Expert], alphas, name: str | None = None) -> Expert:
        """The paper's mixture z' = sum_k alpha_k z_k (alphas need not sum to 1), an ``Expert``."""
        alphas = [float(a) for a in alphas]
        if not experts or len(alphas) != len(experts):
            raise ValueError(f"mix needs one alpha per expert: got {len(alphas)} alphas for {len(experts)} experts")
        for e in experts:
            self.check_expert(e)
        z = {n: sum(a * e.z[n].to(f.s) for a, e in zip(alphas, experts)) for n, f in self.factors.items()}
        label = name or "mix(" + ", ".join(f"{a:.2f} {e.name}" for a, e in zip(alphas, experts)) + ")"
        return self.expert(z, label, alphas=json.dumps(alphas), experts=json.dumps([e.name for e in experts]))

    # The adapted weights.
    def weight(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """W' = W + U diag(s (z - 1)) V^T of layer ``name`` (O, I), differentiable in ``z`` (R,)."""
        f = self.factors[name]
        delta = (f.u * (f.s * (z.to(f.s) - 1))) @ f.vh  # (O, R) * (R,) @ (R, I) -> (O, I)
        return f.base + delta.to(f.base.dtype)

    def weights(self, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{parameter name: W'} for ``torch.func.functional_call(model, svf.weights(z), args)``."""
        self.check_z(z)
        return {self._param_names[name]: self.weight(name, z[name]) for name in self.factors}

    def _check_untouched(self) -> None:
        if self.active is None:
            for name, layer in self.layers.items():
                if not torch.equal(layer.weight.detach(), self.factors[name].base):
                    raise RuntimeError(f"{name}.weight changed since the decomposition (the model was trained or "
                                       f"edited): build a new SVF(model) for the new weights")

    @torch.no_grad()
    def apply(self, expert: Expert) -> None:
        """Write ``expert``'s W' into the model's target weights (replacing any expert applied before)."""
        self.check_expert(expert)
        self._check_untouched()
        for name, layer in self.layers.items():
            layer.weight.copy_(self.weight(name, expert.z[name]))
        self.active = expert

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the decomposed (base) weights exactly; a no-op when no expert is applied."""
        if self.active is None:
            return
        for name, layer in self.layers.items():
            layer.weight.copy_(self.factors[name].base)
        self.active = None

    @contextmanager
    def applied(self, expert: Expert | None) -> Iterator[None]:
        """Apply ``expert`` (None: the base weights) inside the block; restore what was applied before."""
        before = self.active
        if expert is None:
            self.remove()
        else:
            self.apply(expert)
        try:
            yield
        finally:
            if before is None:
                self.remove()
            else:
                self.apply(before)
