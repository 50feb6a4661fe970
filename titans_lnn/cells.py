"""Exact, state-dependent liquid cells (sequential, one step at a time): CfC and LTC.

These are the reference liquid recurrences. Unlike the parallel liquid core (DESIGN.md, "Liquid
core"), whose decay depends on the input only, both cells here feed the previous state back into
their gates, so they must run step by step. They are numerically equal to the cells of the
reference package ``ncps`` 1.0.1 on the same weights (``from_ncps`` copies them), which the tests
check; the package itself never imports ``ncps``.

- ``CfCCell``: closed-form continuous-time cell (Hasani et al. 2022, "Closed-form continuous-time
  neural networks", Nature Machine Intelligence), eqs. (9)-(10) and the "pure" direct solution.
- ``LTCCell``: liquid time-constant cell (Hasani et al. 2021, "Liquid time-constant networks",
  AAAI), its ODE integrated by ``ode_unfolds`` semi-implicit (fused) Euler steps per input step.
- ``run_cell``: runs either cell over a whole sequence, with optional per-token elapsed times.

Shapes: B batch, T time, I input width, H hidden width (state), O motor (output) width of the LTC.
Every step takes ``dt``, the elapsed time since the previous step: a float or a (B,) tensor
(irregularly sampled series). ``dt`` must be > 0; it is not checked, to keep ``forward`` free of
host syncs.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CfCCell", "LTCCell", "run_cell"]

CFC_MODES = ("default", "pure", "no_gate")
MAPPINGS = ("affine", "linear", None)


def lecun_tanh(x: torch.Tensor) -> torch.Tensor:
    """LeCun's scaled tanh, 1.7159 tanh(0.666 x), the CfC paper's default backbone activation."""
    return 1.7159 * torch.tanh(0.666 * x)


ACTIVATIONS = {"lecun_tanh": lecun_tanh, "silu": F.silu, "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}
# ncps builds its backbone from activation modules; from_ncps maps their class names back.
_NCPS_ACTIVATIONS = {"LeCun": "lecun_tanh", "SiLU": "silu", "Tanh": "tanh", "ReLU": "relu", "GELU": "gelu"}
# Uniform init ranges of the LTC's raw parameters, as ncps.
LTC_INIT_RANGES = {
    "gleak": (0.001, 1.0), "vleak": (-0.2, 0.2), "cm": (0.4, 0.6),
    "w": (0.001, 1.0), "sigma": (3.0, 8.0), "mu": (0.3, 0.8),
    "sensory_w": (0.001, 1.0), "sensory_sigma": (3.0, 8.0), "sensory_mu": (0.3, 0.8),
}  # fmt: skip


def _check_step(cell: nn.Module, x: torch.Tensor, h: torch.Tensor, dt) -> float | torch.Tensor:
    """Validates one step's shapes; returns dt as a float or a (B, 1) tensor that broadcasts over H."""
    if x.dim() != 2 or x.shape[1] != cell.input_size:
        raise ValueError(f"x must have shape (B, input_size) = (B, {cell.input_size}), got {tuple(x.shape)}")
    B = x.shape[0]
    if h.dim() != 2 or h.shape != (B, cell.hidden_size):
        raise ValueError(
            f"h must have shape (B, hidden_size) = ({B}, {cell.hidden_size}), got {tuple(h.shape)}"
        )
    if isinstance(dt, torch.Tensor):
        if dt.dim() == 0:
            return dt
        if dt.shape != (B,):
            raise ValueError(f"dt must be a float or a tensor of shape (B,) = ({B},), got {tuple(dt.shape)}")
        return dt.unsqueeze(-1)  # (B, 1)
    return float(dt)


class CfCCell(nn.Module):
    """Closed-form continuous-time (CfC) cell, one step: ``forward(x, h, dt) -> h_new``.

    With z = backbone([x, h]) (an MLP of ``backbone_layers`` layers of width ``backbone_units``, or
    z = [x, h] itself when ``backbone_layers == 0``) and four linear heads of z:

        f1 = tanh(ff1(z)),  f2 = tanh(ff2(z)),  s = sigmoid(time_a(z) * dt + time_b(z))
        "default":  h_new = f1 * (1 - s) + s * f2        (gated closed form, CfC eq. (10))
        "no_gate":  h_new = f1 + s * f2
        "pure":     h_new = A - A * exp(-dt * (|w_tau| + |f|)) * f,  f = ff1(z)   (direct solution, eq. (9))

    Shapes: x (B, I), h (B, H), dt float or (B,) -> h_new (B, H). ``pure`` has no ff2/time heads but
    two (H,) parameters, the time constant ``w_tau`` and the reversal level ``A``.
    Dropout (``backbone_dropout``) follows every backbone layer; ncps skips it after the first,
    which only matters in training mode.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        mode: str = "default",
        backbone_activation: str = "lecun_tanh",
        backbone_units: int = 128,
        backbone_layers: int = 1,
        backbone_dropout: float = 0.0,
    ):
        super().__init__()
        if mode not in CFC_MODES:
            raise ValueError(f"unknown CfC mode {mode!r}, expected one of {CFC_MODES}")
        if backbone_activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown backbone_activation {backbone_activation!r}, expected one of {tuple(ACTIVATIONS)}"
            )
        if backbone_layers < 0:
            raise ValueError(f"backbone_layers must be >= 0, got {backbone_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.mode = mode
        self.backbone_activation = backbone_activation
        self.activation = ACTIVATIONS[backbone_activation]
        widths = [input_size + hidden_size] + [backbone_units] * backbone_layers
        self.backbone = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropout = nn.Dropout(backbone_dropout)
        Z = widths[-1]  # width of the backbone's output z
        self.ff1 = nn.Linear(Z, hidden_size)
        if mode == "pure":
            self.w_tau = nn.Parameter(torch.zeros(hidden_size))
            self.A = nn.Parameter(torch.ones(hidden_size))
        else:
            self.ff2 = nn.Linear(Z, hidden_size)
            self.time_a = nn.Linear(Z, hidden_size)
            self.time_b = nn.Linear(Z, hidden_size)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform linear weights (as ncps); biases keep nn.Linear's default; w_tau = 0, A = 1.

        ncps also Xavier-initialises pure mode's w_tau and A (they are stored (1, H), so 2-D); we keep
        their intended neutral values instead.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: float | torch.Tensor = 1.0) -> torch.Tensor:
        dt = _check_step(self, x, h, dt)
        z = torch.cat([x, h], dim=-1)  # (B, I + H)
        for layer in self.backbone:
            z = self.dropout(self.activation(layer(z)))  # (B, backbone_units)
        if self.mode == "pure":
            f = self.ff1(z)  # (B, H)
            return self.A - self.A * torch.exp(-dt * (self.w_tau.abs() + f.abs())) * f
        f1 = torch.tanh(self.ff1(z))
        f2 = torch.tanh(self.ff2(z))
        s = torch.sigmoid(self.time_a(z) * dt + self.time_b(z))  # (B, H) time-dependent gate
        if self.mode == "no_gate":
            return f1 + s * f2
        return f1 * (1.0 - s) + s * f2

    @classmethod
    def from_ncps(cls, ncps_cell: nn.Module) -> CfCCell:
        """Builds a CfCCell equal to an ``ncps.torch.CfCCell`` (same dtype and device, weights copied)."""
        if getattr(ncps_cell, "sparsity_mask", None) is not None:
            raise ValueError("ncps CfCCell with a sparsity_mask (wired CfC) is not supported")
        backbone = list(ncps_cell.backbone) if ncps_cell.backbone is not None else []
        linears = [m for m in backbone if isinstance(m, nn.Linear)]
        acts = [
            _NCPS_ACTIVATIONS[type(m).__name__] for m in backbone if type(m).__name__ in _NCPS_ACTIVATIONS
        ]
        drops = [m.p for m in backbone if isinstance(m, nn.Dropout)]
        ref = ncps_cell.ff1.weight
        cell = cls(
            ncps_cell.input_size,
            ncps_cell.hidden_size,
            mode=ncps_cell.mode,
            backbone_activation=acts[0] if acts else "lecun_tanh",
            backbone_units=linears[0].out_features if linears else 128,
            backbone_layers=len(linears),
            backbone_dropout=drops[0] if drops else 0.0,
        ).to(device=ref.device, dtype=ref.dtype)
        heads = ["ff1"] + (["w_tau", "A"] if cell.mode == "pure" else ["ff2", "time_a", "time_b"])
        with torch.no_grad():
            for ours, theirs in zip(cell.backbone, linears):
                ours.load_state_dict(theirs.state_dict())
            for name in heads:
                src, dst = getattr(ncps_cell, name), getattr(cell, name)
                if isinstance(dst, nn.Parameter):
                    dst.copy_(src.reshape(dst.shape))  # ncps stores w_tau and A as (1, H)
                else:
                    dst.load_state_dict(src.state_dict())
        return cell


class LTCCell(nn.Module):
    """Liquid time-constant (LTC) cell, one step: ``forward(x, h, dt) -> h_new``; ``readout(h)`` -> motor outputs.

    Each neuron j follows the ODE, with synapses i -> j from the H neurons and the I inputs:

        cm_j dv_j/dt = gleak_j (vleak_j - v_j) + sum_i w_ij s_ij(v_i) (erev_ij - v_j),
        s_ij(v) = sigmoid(sigma_ij (v - mu_ij))

    (sensory synapses likewise, with their own w, sigma, mu, erev and the mapped input u = x * input_w
    + input_b in place of v_i). One input step of length dt is ``ode_unfolds`` = K semi-implicit Euler
    steps of length dt / K, each with cm_t = cm K / dt:

        v <- (cm_t v + gleak vleak + sum_i w s (erev)) / (cm_t + gleak + sum_i w s + epsilon)

    where the sensory sums are computed once per step (the input is held constant), the recurrent ones
    once per unfold. w, sensory_w, cm and gleak must stay >= 0: with ``implicit_param_constraints`` they
    pass through softplus at run time; without it they are used raw and ``apply_weight_constraints()``
    must be called after every optimiser step (ncps' ``LTCCell`` defaults to the latter, its ``LTC``
    layer to the former; we default to softplus).

    ``synapse_mask`` (H, H) and ``sensory_mask`` (I, H), source x target, zero out absent synapses
    (default: fully connected, as ``ncps.wirings.FullyConnected``). ``readout`` returns the first O
    neurons, affinely mapped: (..., H) -> (..., O).
    Shapes: x (B, I), h (B, H), dt float or (B,) -> h_new (B, H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int | None = None,
        ode_unfolds: int = 6,
        epsilon: float = 1e-8,
        implicit_param_constraints: bool = True,
        input_mapping: str | None = "affine",
        output_mapping: str | None = "affine",
        synapse_mask: torch.Tensor | None = None,
        sensory_mask: torch.Tensor | None = None,
    ):
        super().__init__()
        output_size = hidden_size if output_size is None else output_size
        if not 1 <= output_size <= hidden_size:
            raise ValueError(f"output_size must be in [1, hidden_size={hidden_size}], got {output_size}")
        if input_mapping not in MAPPINGS or output_mapping not in MAPPINGS:
            raise ValueError(
                f"input_mapping and output_mapping must be one of {MAPPINGS}, "
                f"got {input_mapping!r} and {output_mapping!r}"
            )
        if ode_unfolds < 1:
            raise ValueError(f"ode_unfolds must be >= 1, got {ode_unfolds}")
        I, H = input_size, hidden_size
        self.input_size, self.hidden_size, self.output_size = I, H, output_size
        self.ode_unfolds = ode_unfolds
        self.epsilon = epsilon
        self.implicit_param_constraints = implicit_param_constraints
        self.input_mapping, self.output_mapping = input_mapping, output_mapping
        for name, mask, shape in (
            ("synapse_mask", synapse_mask, (H, H)),
            ("sensory_mask", sensory_mask, (I, H)),
        ):
            if mask is None:
                mask = torch.ones(shape)
            elif tuple(mask.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
            self.register_buffer(name, mask.abs().to(torch.get_default_dtype()))

        self.gleak = nn.Parameter(torch.empty(H))
        self.vleak = nn.Parameter(torch.empty(H))
        self.cm = nn.Parameter(torch.empty(H))
        self.w = nn.Parameter(torch.empty(H, H))  # (source, target)
        self.sigma = nn.Parameter(torch.empty(H, H))
        self.mu = nn.Parameter(torch.empty(H, H))
        self.erev = nn.Parameter(torch.empty(H, H))
        self.sensory_w = nn.Parameter(torch.empty(I, H))
        self.sensory_sigma = nn.Parameter(torch.empty(I, H))
        self.sensory_mu = nn.Parameter(torch.empty(I, H))
        self.sensory_erev = nn.Parameter(torch.empty(I, H))
        with_w, with_b = ("affine", "linear"), ("affine",)
        self.input_w = nn.Parameter(torch.empty(I)) if input_mapping in with_w else None
        self.input_b = nn.Parameter(torch.empty(I)) if input_mapping in with_b else None
        self.output_w = nn.Parameter(torch.empty(output_size)) if output_mapping in with_w else None
        self.output_b = nn.Parameter(torch.empty(output_size)) if output_mapping in with_b else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """ncps' init: raw parameters uniform in ``LTC_INIT_RANGES``; reversal potentials erev = +-1 (an
        excitatory synapse with probability 2/3), zero where masked; identity input/output maps."""
        for name, (lo, hi) in LTC_INIT_RANGES.items():
            getattr(self, name).uniform_(lo, hi)
        for erev, mask in ((self.erev, self.synapse_mask), (self.sensory_erev, self.sensory_mask)):
            polarity = torch.where(torch.rand_like(erev) < 1 / 3, -1.0, 1.0)
            erev.copy_(polarity * mask)
        for p, value in (
            (self.input_w, 1.0),
            (self.input_b, 0.0),
            (self.output_w, 1.0),
            (self.output_b, 0.0),
        ):
            if p is not None:
                p.fill_(value)

    def _positive(self, p: torch.Tensor) -> torch.Tensor:
        return F.softplus(p) if self.implicit_param_constraints else p

    @torch.no_grad()
    def apply_weight_constraints(self) -> None:
        """Clamps w, sensory_w, cm, gleak to >= 0 in place (only needed without implicit constraints)."""
        if not self.implicit_param_constraints:
            for p in (self.w, self.sensory_w, self.cm, self.gleak):
                p.clamp_(min=0.0)

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: float | torch.Tensor = 1.0) -> torch.Tensor:
        dt = _check_step(self, x, h, dt)
        u = x  # (B, I) mapped input
        if self.input_w is not None:
            u = u * self.input_w
        if self.input_b is not None:
            u = u + self.input_b
        # Sensory synapses see the input held constant over the step: their sums are computed once.
        s_act = self._positive(self.sensory_w) * torch.sigmoid(
            self.sensory_sigma * (u.unsqueeze(-1) - self.sensory_mu)
        )  # (B, I, H) source x target
        s_act = s_act * self.sensory_mask
        num_s = (s_act * self.sensory_erev).sum(1)  # (B, H)
        den_s = s_act.sum(1)
        cm_t = self._positive(self.cm) / (dt / self.ode_unfolds)  # (H,) or (B, H)
        w = self._positive(self.w)
        gleak = self._positive(self.gleak)
        v = h
        for _ in range(self.ode_unfolds):
            act = w * torch.sigmoid(self.sigma * (v.unsqueeze(-1) - self.mu))  # (B, H, H) source x target
            act = act * self.synapse_mask
            num = (act * self.erev).sum(1) + num_s  # (B, H)
            den = act.sum(1) + den_s
            v = (cm_t * v + gleak * self.vleak + num) / (cm_t + gleak + den + self.epsilon)
        return v

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Motor outputs, ncps' first return value: the first O neurons, mapped. (..., H) -> (..., O)."""
        y = h[..., : self.output_size]
        if self.output_w is not None:
            y = y * self.output_w
        if self.output_b is not None:
            y = y + self.output_b
        return y

    @classmethod
    def from_ncps(cls, ncps_cell: nn.Module) -> LTCCell:
        """Builds an LTCCell equal to an ``ncps.torch.LTCCell`` (any wiring: its adjacency masks are
        copied), same dtype and device, weights copied."""
        p = dict(ncps_cell.named_parameters())
        mapping = {m: m for m in ("affine", "linear")}
        cell = cls(
            ncps_cell.sensory_size,
            ncps_cell.state_size,
            output_size=ncps_cell.motor_size,
            ode_unfolds=ncps_cell._ode_unfolds,
            epsilon=ncps_cell._epsilon,
            implicit_param_constraints=ncps_cell._implicit_param_constraints,
            input_mapping=mapping.get(ncps_cell._input_mapping),
            output_mapping=mapping.get(ncps_cell._output_mapping),
            synapse_mask=p["sparsity_mask"].detach().cpu(),
            sensory_mask=p["sensory_sparsity_mask"].detach().cpu(),
        ).to(device=p["w"].device, dtype=p["w"].dtype)
        with torch.no_grad():
            for name, dst in cell.named_parameters():
                dst.copy_(p[name])
        return cell


def run_cell(
    cell: CfCCell | LTCCell,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    dt: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a cell over a sequence: x (B, T, I), h0 (B, H) or None (zeros), dt None (1 per step), a
    float, or (B, T) elapsed times -> (states (B, T, H), h_T (B, H)). For an LTC's motor outputs apply
    ``cell.readout`` to the states."""
    if x.dim() != 3 or x.shape[2] != cell.input_size:
        raise ValueError(
            f"x must have shape (B, T, input_size) = (B, T, {cell.input_size}), got {tuple(x.shape)}"
        )
    B, T, _ = x.shape
    if isinstance(dt, torch.Tensor) and dt.shape != (B, T):
        raise ValueError(
            f"dt must be None, a float or a tensor of shape (B, T) = ({B}, {T}), got {tuple(dt.shape)}"
        )
    h = x.new_zeros(B, cell.hidden_size) if h0 is None else h0
    states = []
    for t in range(T):
        dt_t = dt[:, t] if isinstance(dt, torch.Tensor) else (1.0 if dt is None else dt)
        h = cell(x[:, t], h, dt_t)
        states.append(h)
    return torch.stack(states, dim=1), h  # (B, T, H), (B, H)
