"""Tests for titans_lnn.cells: CfCCell and LTCCell equal ncps 1.0.1 on copied weights, in float64.

ncps is only an oracle here (the ``dev`` extra); the comparison tests skip without it. ncps' layers
(``CfC``, ``LTC``) mishandle batched ``timespans`` (ncps issues 81-83), so sequences with elapsed
times are compared against ncps' cells stepped by hand, with a scalar or a (B, 1) elapsed time.
"""

from __future__ import annotations

import pytest
import torch

from titans_lnn.cells import CfCCell, LTCCell, run_cell

B, I, H = 4, 3, 5  # batch, input width, hidden width (B != H so a mis-broadcast dt cannot pass)
ATOL = 1e-12

CFC_CASES = [  # (mode, backbone_layers, backbone_activation)
    pytest.param("default", 1, "lecun_tanh", id="default-1layer-lecun"),
    pytest.param("default", 2, "silu", id="default-2layers-silu"),
    pytest.param("default", 0, "lecun_tanh", id="default-no-backbone"),
    pytest.param("pure", 1, "tanh", id="pure-1layer-tanh"),
    pytest.param("pure", 0, "lecun_tanh", id="pure-no-backbone"),
    pytest.param("no_gate", 1, "relu", id="no_gate-1layer-relu"),
    pytest.param("no_gate", 2, "gelu", id="no_gate-2layers-gelu"),
]
LTC_CASES = [  # implicit_param_constraints
    pytest.param(True, id="softplus"),
    pytest.param(False, id="clamped"),
]
DT_CASES = [
    pytest.param("one", id="dt=1"),
    pytest.param("scalar", id="dt=0.37"),
    pytest.param("per-sample", id="dt-per-sample"),
]


def _ncps():
    return pytest.importorskip("ncps.torch")


def _ncps_cfc(mode, layers, activation):
    nt = _ncps()
    torch.manual_seed(0)
    theirs = nt.CfCCell(I, H, mode, activation, backbone_units=8, backbone_layers=layers).double()
    if mode == "pure":  # move A and w_tau off their init so that the test sees them
        with torch.no_grad():
            theirs.A.normal_()
            theirs.w_tau.normal_()
    return theirs


def _ncps_ltc(implicit, wiring=None):
    _ncps()
    from ncps.torch import LTCCell as NcpsLTCCell
    from ncps.wirings import FullyConnected

    torch.manual_seed(0)
    wiring = FullyConnected(H) if wiring is None else wiring
    theirs = NcpsLTCCell(wiring, in_features=I, implicit_param_constraints=implicit).double()
    with torch.no_grad():  # non-trivial input/output maps
        for name in ("input_w", "input_b", "output_w", "output_b"):
            theirs._params[name].add_(0.3 * torch.randn_like(theirs._params[name]))
    return theirs


def _dt(kind):
    """(ours, theirs) elapsed time for one step: ncps needs (B, 1) where we take (B,)."""
    if kind == "one":
        return 1.0, 1.0
    if kind == "scalar":
        return 0.37, 0.37
    dt = torch.rand(B, dtype=torch.float64) + 0.1
    return dt, dt.unsqueeze(-1)


def _inputs(T=None):
    g = torch.Generator().manual_seed(1)
    shape = (B, I) if T is None else (B, T, I)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        B, H, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("mode,layers,activation", CFC_CASES)
@pytest.mark.parametrize("dt_kind", DT_CASES)
def test_cfc_step_matches_ncps(mode, layers, activation, dt_kind):
    theirs = _ncps_cfc(mode, layers, activation)
    ours = CfCCell.from_ncps(theirs)
    x, h = _inputs()
    dt_ours, dt_theirs = _dt(dt_kind)
    expected, _ = theirs(x, h, dt_theirs)
    torch.testing.assert_close(ours(x, h, dt_ours), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode,layers,activation", CFC_CASES)
@pytest.mark.parametrize("T", [1, 7, 63], ids=lambda T: f"T={T}")
def test_cfc_sequence_matches_ncps_layer(mode, layers, activation, T):
    nt = _ncps()
    layer = nt.CfC(I, H, mode=mode, activation=activation, backbone_units=8, backbone_layers=layers)
    layer = layer.double()
    ours = CfCCell.from_ncps(layer.rnn_cell)
    x, h0 = _inputs(T)
    expected, h_expected = layer(x, h0)
    states, h_T = run_cell(ours, x, h0)
    assert states.shape == (B, T, H)
    torch.testing.assert_close(states, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_T, h_expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode,layers,activation", CFC_CASES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["dt-per-step", "dt-per-sample-and-step"])
def test_cfc_irregular_sequence_matches_ncps_steps(mode, layers, activation, per_sample):
    theirs = _ncps_cfc(mode, layers, activation)
    ours = CfCCell.from_ncps(theirs)
    _check_irregular_sequence(ours, lambda x, h, dt: theirs(x, h, dt)[0], per_sample)


def _check_irregular_sequence(ours, their_step, per_sample, T=7):
    x, h = _inputs(T)
    g = torch.Generator().manual_seed(2)
    if per_sample:
        dt = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.05
    else:
        dt = (torch.rand(T, generator=g, dtype=torch.float64) * 2 + 0.05).expand(B, T)
    states, _ = run_cell(ours, x, h, dt)
    for t in range(T):
        dt_t = dt[:, t : t + 1] if per_sample else float(dt[0, t])  # ncps: (B, 1) or a float
        h = their_step(x[:, t], h, dt_t)
        torch.testing.assert_close(states[:, t], h, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implicit", LTC_CASES)
@pytest.mark.parametrize("dt_kind", DT_CASES)
def test_ltc_step_matches_ncps(implicit, dt_kind):
    theirs = _ncps_ltc(implicit)
    ours = LTCCell.from_ncps(theirs)
    x, h = _inputs()
    dt_ours, dt_theirs = _dt(dt_kind)
    out_expected, h_expected = theirs(x, h, dt_theirs)
    h_new = ours(x, h, dt_ours)
    torch.testing.assert_close(h_new, h_expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.readout(h_new), out_expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implicit", LTC_CASES)
@pytest.mark.parametrize("T", [1, 7, 63], ids=lambda T: f"T={T}")
def test_ltc_sequence_matches_ncps_layer(implicit, T):
    nt = _ncps()
    torch.manual_seed(0)
    layer = nt.LTC(I, H, implicit_param_constraints=implicit).double()
    ours = LTCCell.from_ncps(layer.rnn_cell)
    x, h0 = _inputs(T)
    expected, h_expected = layer(x, h0)
    states, h_T = run_cell(ours, x, h0)
    torch.testing.assert_close(ours.readout(states), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_T, h_expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implicit", LTC_CASES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["dt-per-step", "dt-per-sample-and-step"])
def test_ltc_irregular_sequence_matches_ncps_steps(implicit, per_sample):
    theirs = _ncps_ltc(implicit)
    ours = LTCCell.from_ncps(theirs)
    _check_irregular_sequence(ours, lambda x, h, dt: theirs(x, h, dt)[1], per_sample)


@pytest.mark.parametrize("unfolds", [1, 3], ids=lambda k: f"unfolds={k}")
def test_ltc_sparse_wiring_and_motor_outputs_match_ncps(unfolds):
    _ncps()
    from ncps.torch import LTCCell as NcpsLTCCell
    from ncps.wirings import Random

    torch.manual_seed(0)
    wiring = Random(H, output_dim=2, sparsity_level=0.5)
    theirs = NcpsLTCCell(wiring, in_features=I, ode_unfolds=unfolds, implicit_param_constraints=True).double()
    ours = LTCCell.from_ncps(theirs)
    assert ours.output_size == 2 and ours.ode_unfolds == unfolds
    assert 0 < ours.synapse_mask.sum() < H * H
    x, h = _inputs()
    out_expected, h_expected = theirs(x, h, 0.5)
    h_new = ours(x, h, 0.5)
    torch.testing.assert_close(h_new, h_expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.readout(h_new), out_expected, atol=ATOL, rtol=0)


def test_ltc_apply_weight_constraints_matches_ncps():
    theirs = _ncps_ltc(implicit=False)
    with torch.no_grad():
        for name in ("w", "sensory_w", "cm", "gleak"):
            theirs._params[name].sub_(0.5)  # some entries go negative
    ours = LTCCell.from_ncps(theirs)
    theirs.apply_weight_constraints()
    ours.apply_weight_constraints()
    assert float(ours.w.detach().min()) == 0.0
    x, h = _inputs()
    torch.testing.assert_close(ours(x, h), theirs(x, h)[1], atol=ATOL, rtol=0)


def test_cfc_float32_matches_ncps():
    nt = _ncps()
    torch.manual_seed(0)
    theirs = nt.CfCCell(I, H, backbone_units=8)
    ours = CfCCell.from_ncps(theirs)
    assert ours.ff1.weight.dtype == torch.float32
    x, h = (t.float() for t in _inputs())
    torch.testing.assert_close(ours(x, h, 0.5), theirs(x, h, 0.5)[0], atol=1e-6, rtol=1e-6)


def _fresh_cells():
    torch.manual_seed(0)
    return [
        CfCCell(I, H, mode="default", backbone_units=8),
        CfCCell(I, H, mode="pure", backbone_units=8),
        CfCCell(I, H, mode="no_gate", backbone_units=8, backbone_layers=2),
        LTCCell(I, H),
        LTCCell(I, H, output_size=2, implicit_param_constraints=False),
    ]


@pytest.mark.parametrize(
    "index", range(5), ids=["cfc-default", "cfc-pure", "cfc-no_gate", "ltc", "ltc-clamped"]
)
def test_gradients_flow_and_are_finite(index):
    cell = _fresh_cells()[index].double()
    x, h0 = _inputs(T=7)
    x.requires_grad_(True)
    h0.requires_grad_(True)
    dt = (torch.rand(B, 7, dtype=torch.float64) + 0.1).requires_grad_(True)
    states, h_T = run_cell(cell, x, h0, dt)
    out = cell.readout(states) if isinstance(cell, LTCCell) else states
    (out.square().sum() + h_T.sum()).backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for t in (x, h0, dt):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_fresh_cells_run_without_ncps():
    x, h = (t.float() for t in _inputs(T=5))
    for cell in _fresh_cells():
        states, h_T = run_cell(cell, x, h, dt=0.5)
        assert states.shape == (B, 5, H) and torch.isfinite(states).all()
        torch.testing.assert_close(states[:, -1], h_T)
    ltc = _fresh_cells()[4]
    assert ltc.readout(h).shape == (B, 2)


BAD_STEP_INPUTS = [  # (x shape, h shape, dt, expected message)
    pytest.param(
        (I,), (B, H), 1.0, r"x must have shape \(B, input_size\) = \(B, 3\), got \(3,\)", id="x-rank"
    ),
    pytest.param(
        (B, 7), (B, H), 1.0, r"x must have shape \(B, input_size\) = \(B, 3\), got \(4, 7\)", id="x-width"
    ),
    pytest.param(
        (B, I), (H,), 1.0, r"h must have shape \(B, hidden_size\) = \(4, 5\), got \(5,\)", id="h-rank"
    ),
    pytest.param(
        (B, I), (B, 6), 1.0, r"h must have shape \(B, hidden_size\) = \(4, 5\), got \(4, 6\)", id="h-width"
    ),
    pytest.param(
        (B, I), (2, H), 1.0, r"h must have shape \(B, hidden_size\) = \(4, 5\), got \(2, 5\)", id="h-batch"
    ),
    pytest.param(
        (B, I), (B, H), torch.ones(B, 1), r"dt must be a float or .* \(4,\), got \(4, 1\)", id="dt-shape"
    ),
]


@pytest.mark.parametrize("cell_cls", [CfCCell, LTCCell], ids=["cfc", "ltc"])
@pytest.mark.parametrize("x_shape,h_shape,dt,message", BAD_STEP_INPUTS)
def test_bad_step_input_raises_with_shapes_in_message(cell_cls, x_shape, h_shape, dt, message):
    cell = cell_cls(I, H)
    with pytest.raises(ValueError, match=message):
        cell(torch.zeros(x_shape), torch.zeros(h_shape), dt)


@pytest.mark.parametrize(
    "x_shape,dt,message",
    [
        pytest.param(
            (B, I), None, r"x must have shape \(B, T, input_size\) = \(B, T, 3\), got \(4, 3\)", id="x-rank"
        ),
        pytest.param((B, 6, 2), None, r"= \(B, T, 3\), got \(4, 6, 2\)", id="x-width"),
        pytest.param((B, 6, I), torch.ones(B, 5), r"shape \(B, T\) = \(4, 6\), got \(4, 5\)", id="dt-shape"),
    ],
)
def test_run_cell_bad_input_raises_with_shapes_in_message(x_shape, dt, message):
    with pytest.raises(ValueError, match=message):
        run_cell(CfCCell(I, H), torch.zeros(x_shape), dt=dt)


@pytest.mark.parametrize(
    "make,message",
    [
        pytest.param(lambda: CfCCell(I, H, mode="fast"), "unknown CfC mode 'fast'", id="cfc-mode"),
        pytest.param(
            lambda: CfCCell(I, H, backbone_activation="elu"), "unknown backbone_activation", id="cfc-act"
        ),
        pytest.param(
            lambda: LTCCell(I, H, output_size=H + 1),
            r"output_size must be in \[1, hidden_size=5\]",
            id="ltc-out",
        ),
        pytest.param(
            lambda: LTCCell(I, H, synapse_mask=torch.ones(H, 2)),
            r"synapse_mask must have shape \(5, 5\)",
            id="ltc-mask",
        ),
        pytest.param(
            lambda: LTCCell(I, H, input_mapping="tanh"), "input_mapping and output_mapping", id="ltc-map"
        ),
    ],
)
def test_bad_config_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()
