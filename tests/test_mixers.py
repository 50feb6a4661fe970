"""The seed mixers (titans_lnn.mixers): oracle parity forward and backward, chunked == per-token
reference, streamed == one pass at awkward splits, the new variants as models, clear errors.

Oracles (test-only, skipped when not installed): HF transformers' ``Mamba2Mixer`` and ``Lfm2ShortConv``
on the same weights; flash-linear-attention's (``fla-core``) naive gated delta rule and naive BASED.
"""

import dataclasses

import pytest
import torch
import torch.nn as nn

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.mixers import Based, GatedDeltaNet, GatedShortConv, Lfm2, Mamba2, TaylorLinearAttention
from titans_lnn.mixers.based import taylor_chunked, taylor_features, taylor_reference
from titans_lnn.mixers.gated_delta import gated_delta_chunked, gated_delta_reference
from titans_lnn.mixers.mamba2 import ssd_chunked, ssd_reference

SEEDS = ("mamba2", "based", "lfm2", "gdn")
DIM = 32
F64 = torch.float64


def _randomise(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Every parameter random (the default init leaves some at 1 or 0, which would hide layout errors)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(sum(out * w))/d(x and every parameter), by name."""
    names = ["x", *(n for n, _ in module.named_parameters())]
    tensors = [x, *(p for _, p in module.named_parameters())]
    return dict(zip(names, torch.autograd.grad((out * w).sum(), tensors)))


# ----------------------------------------------------------------------------- oracles


def test_mamba2_equals_hf_mamba2_mixer(close):
    """The same weights in HF's Mamba2Mixer (its torch path: chunked SSD, float32 A and norm inside)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    ours = Mamba2(DIM, state_size=8, expand=2, head_dim=8, n_groups=2, conv_kernel=4, chunk_size=16)
    ours = _randomise(ours).double()
    cfg = transformers.Mamba2Config(hidden_size=DIM, state_size=8, expand=2, head_dim=8, num_heads=8, n_groups=2,
                                    conv_kernel=4, chunk_size=16, use_bias=False, use_conv_bias=True,
                                    layer_norm_epsilon=1e-5, num_hidden_layers=1)
    hf = Mamba2Mixer(cfg, 0).double().eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 45, DIM, dtype=F64, requires_grad=True)
    y, _ = ours(x)
    y_hf = hf(x)
    close(y_hf, y, 1e-5, "mamba2 forward")
    w = torch.randn_like(y)
    g, g_hf = _grads(ours, x, y, w), _grads(hf, x, y_hf, w)
    for name in g:
        close(g_hf[name], g[name], 1e-5, f"mamba2 grad {name}")


def test_short_conv_equals_hf_lfm2_short_conv(close):
    pytest.importorskip("transformers")
    lfm2 = pytest.importorskip("transformers.models.lfm2.modeling_lfm2")
    from transformers import Lfm2Config

    cfg = Lfm2Config(hidden_size=DIM, conv_L_cache=3, conv_bias=True, num_hidden_layers=1, layer_types=["conv"],
                     num_attention_heads=4, num_key_value_heads=2)
    ours = _randomise(GatedShortConv(DIM, kernel=3, bias=True)).double()
    hf = lfm2.Lfm2ShortConv(cfg, 0).double()
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 37, DIM, dtype=F64, requires_grad=True)
    y, _ = ours(x)
    y_hf = hf(x)
    close(y_hf, y, 1e-12, "short conv forward")
    w = torch.randn_like(y)
    g, g_hf = _grads(ours, x, y, w), _grads(hf, x, y_hf, w)
    for name in g:
        close(g_hf[name], g[name], 1e-12, f"short conv grad {name}")


def _delta_inputs(B=2, T=45, H=3, K=8, V=6, dtype=F64):
    torch.manual_seed(0)
    q = nn.functional.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    k = nn.functional.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype)
    beta, g = torch.rand(B, T, H, dtype=dtype), -torch.rand(B, T, H, dtype=dtype)
    S0 = torch.randn(B, H, K, V, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, beta, g, S0)]


def test_gated_delta_rule_equals_fla_naive(close):
    """fla's naive recurrent reference computes in float32 whatever the input dtype: tolerance 1e-5."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, v, beta, g, S0 = _delta_inputs()
    o, S = gated_delta_chunked(q, k, v, beta, g, S0, 8 ** -0.5, chunk_size=16)
    o_ref, S_ref = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=S0,
                                                          output_final_state=True)
    close(o_ref, o, 1e-5, "gdn output")
    close(S_ref, S, 1e-5, "gdn state")
    w, ws = torch.randn_like(o), torch.randn_like(S)
    grads = torch.autograd.grad((o * w).sum() + (S * ws).sum(), (q, k, v, beta, g, S0))
    grads_ref = torch.autograd.grad((o_ref * w).sum() + (S_ref * ws).sum(), (q, k, v, beta, g, S0))
    for name, a, b in zip("q k v beta g S0".split(), grads_ref, grads):
        close(a, b, 1e-5, f"gdn grad {name}")


def test_taylor_attention_equals_fla_naive_based(close):
    based = pytest.importorskip("fla.ops.based.naive")
    torch.manual_seed(0)
    B, H, T, Fd, V = 2, 3, 45, 4, 5
    q, k, v = (torch.randn(B, H, T, d, dtype=F64, requires_grad=True) for d in (Fd, Fd, V))
    D = 1 + Fd + Fd * Fd
    o, _, _ = taylor_chunked(q, k, v, torch.zeros(B, H, D, V, dtype=F64), torch.zeros(B, H, D, dtype=F64),
                             chunk_size=16)
    o_ref = based.naive_parallel_based(q, k, v, scale=Fd ** -0.5)
    close(o_ref, o, 1e-12, "based output")
    w = torch.randn_like(o)
    for name, a, b in zip("qkv", torch.autograd.grad((o_ref * w).sum(), (q, k, v)),
                          torch.autograd.grad((o * w).sum(), (q, k, v))):
        close(a, b, 1e-12, f"based grad {name}")


def test_taylor_features_are_the_exp_taylor_kernel():
    """phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(F): the paper's eq. 3, without an oracle."""
    torch.manual_seed(0)
    q, k = torch.randn(7, 16, dtype=F64), torch.randn(7, 16, dtype=F64)
    s = (q * k).sum(-1) / 4
    torch.testing.assert_close((taylor_features(q) * taylor_features(k)).sum(-1), 1 + s + s * s / 2)


# ----------------------------------------------------------------------------- chunked == reference


def _ssd_inputs(T: int):
    torch.manual_seed(T)
    B, H, P, G, N = 2, 4, 3, 2, 5
    x = torch.randn(B, T, H, P, dtype=F64)
    dt = nn.functional.softplus(torch.randn(B, T, H, dtype=F64))
    A = -torch.rand(H, dtype=F64) * 2
    Bm, Cm = torch.randn(B, T, G, N, dtype=F64), torch.randn(B, T, G, N, dtype=F64)
    h0 = torch.randn(B, H, P, N, dtype=F64)
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm, h0)]


def _taylor_inputs(T: int):
    torch.manual_seed(T)
    B, H, Fd, V = 2, 2, 3, 4
    D = 1 + Fd + Fd * Fd
    q, k, v = torch.randn(B, H, T, Fd, dtype=F64), torch.randn(B, H, T, Fd, dtype=F64), torch.randn(B, H, T, V,
                                                                                                    dtype=F64)
    S0, z0 = torch.randn(B, H, D, V, dtype=F64), torch.rand(B, H, D, dtype=F64) + 1
    return [t.requires_grad_() for t in (q, k, v, S0, z0)]


OPS = {
    "ssd": (_ssd_inputs, ssd_reference, lambda *a, chunk: ssd_chunked(*a, chunk_size=chunk)),
    "gated_delta": (lambda T: _delta_inputs(T=T), lambda *a: gated_delta_reference(*a, 0.5),
                    lambda *a, chunk: gated_delta_chunked(*a, 0.5, chunk_size=chunk)),
    "taylor": (_taylor_inputs, taylor_reference, lambda *a, chunk: taylor_chunked(*a, chunk_size=chunk)),
}


@pytest.mark.parametrize("T, chunk", [(1, 16), (63, 16), (65, 16), (40, 7), (16, 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("op", list(OPS))
def test_chunked_equals_reference(close, op, T, chunk):
    make, reference, chunked = OPS[op]
    inputs = make(T)
    ref, got = reference(*inputs), chunked(*inputs, chunk=chunk)
    for i, (a, b) in enumerate(zip(ref, got)):
        close(a, b, 1e-10, f"{op} output {i}")
    ws = [torch.randn_like(t) for t in ref]
    g_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, ws)), inputs)
    g_got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, ws)), inputs)
    for i, (a, b) in enumerate(zip(g_ref, g_got)):
        close(a, b, 1e-9, f"{op} grad of input {i}")


def test_long_input_decays_without_overflow():
    """Log-decays summed over 4096 tokens stay finite in the chunked forms (no cumulative product)."""
    torch.manual_seed(0)
    mamba, gdn = Mamba2(16, state_size=4, head_dim=8), GatedDeltaNet(16, heads=2)
    with torch.no_grad():
        mamba.A_log.fill_(3.0)  # strong decay: exp(-20 * 4096) underflows unless taken per chunk
        gdn.A_log.fill_(3.0)
        x = torch.randn(1, 4096, 16)
        for m in (mamba, gdn):
            y, state = m(x)
            assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in state.named_tensors().values())


# ----------------------------------------------------------------------------- modules: streaming


def _positions(state) -> set[int]:
    """The ``pos`` (tokens read) of every state nested in ``state``."""
    found = {state.pos} if hasattr(state, "pos") else set()
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if dataclasses.is_dataclass(value):
            found |= _positions(value)
    return found


def _modules():
    return {
        "mamba2": Mamba2(DIM, state_size=8, head_dim=8, n_groups=2, conv_kernel=4, chunk_size=8),
        "gdn": GatedDeltaNet(DIM, heads=4, expand_v=2, conv_kernel=3, chunk_size=8),
        "taylor": TaylorLinearAttention(DIM, heads=4, feature_dim=4, chunk_size=8),
        "short_conv": GatedShortConv(DIM, kernel=3),
        "based": Based(DIM, heads=4, feature_dim=4, window=8, kv_heads=2, n_persistent=2),
        "lfm2": Lfm2(DIM, heads=4, kv_heads=2, window=8),
    }


@pytest.mark.parametrize("name", list(_modules()))
def test_module_streams_like_one_pass(name):
    torch.manual_seed(0)
    module = _randomise(_modules()[name], 0.2).double()
    x = torch.randn(2, 37, DIM, dtype=F64)
    whole, state = module(x)
    pieces, s = [], None
    for part in x.split([1, 7, 9, 3, 17], dim=1):  # splits across chunk boundaries, a lone first token
        y, s = module(part, s)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    assert _positions(s) == {37} and s.nbytes() == module.init_state(2, dtype=F64).nbytes()
    for (key, a), b in zip(state.named_tensors().items(), s.named_tensors().values()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("name", ["mamba2", "gdn", "taylor"])
def test_module_reference_form_equals_chunked(name):
    torch.manual_seed(0)
    module = _randomise(_modules()[name], 0.2).double()
    x = torch.randn(2, 21, DIM, dtype=F64)
    y, s = module(x)
    y_ref, s_ref = module(x, impl="reference")
    torch.testing.assert_close(y_ref, y)
    for (key, a), b in zip(s_ref.named_tensors().items(), s.named_tensors().values()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("name", list(_modules()))
def test_module_trains_inside_a_user_model(name):
    torch.manual_seed(0)
    module = _modules()[name]
    embed, head = nn.Embedding(16, DIM), nn.Linear(DIM, 16)
    ids = torch.randint(0, 16, (2, 20))
    y, _ = module(embed(ids[:, :-1]))
    nn.functional.cross_entropy(head(y).flatten(0, 1), ids[:, 1:].flatten()).backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


# ----------------------------------------------------------------------------- the variants


@pytest.mark.parametrize("variant", SEEDS)
def test_variant_model_streams_like_one_pass(variant):
    torch.manual_seed(0)
    config = TitansLNNConfig.from_preset("debug", variant=variant)
    assert "liquid" not in config.parts  # the seeds are themselves, without the liquid core
    model = TitansLNN(config).double().eval()
    assert model.blocks[0].liquid is None
    ids = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        whole = model(ids)
    out = model.stream(ids, chunk_len=7, logits="all")
    torch.testing.assert_close(out.logits, whole.logits)
    model.check_state(out.state)
    assert out.state.nbytes() == model.init_state(2, dtype=F64).nbytes()


def test_variant_state_saves_and_loads(tmp_path):
    from titans_lnn import ModelState

    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="based")).eval()
    with torch.no_grad():
        state = model(torch.randint(0, 256, (1, 13))).state
    state.save(tmp_path / "s.state")
    loaded = ModelState.load(tmp_path / "s.state", model)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, state=loaded).logits, model(ids, state=state).logits)


@pytest.mark.parametrize("changes, match", [
    (dict(ssm_state=0), "ssm_state=0"),
    (dict(ssm_expand=-1), "ssm_expand=-1"),
    (dict(ssm_head_dim=5), "ssm_head_dim=5 is invalid: expected a divisor of d_model \\* ssm_expand = 64"),
    (dict(short_conv=0), "short_conv=0"),
    (dict(feature_dim=65), "feature_dim=65 is invalid: expected at most 64"),
    (dict(feature_dim=True), "feature_dim=True is invalid: expected an integer"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_config_values_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        TitansLNNConfig.from_preset("debug", variant="mamba2", **changes)


@pytest.mark.parametrize("build, match", [
    (lambda: Mamba2(DIM, head_dim=5), "head_dim=5 must divide the inner width"),
    (lambda: Mamba2(DIM, head_dim=8, n_groups=3), "n_groups=3 must divide the number of heads 8"),
    (lambda: Mamba2(DIM, state_size=0), "state_size=0 is invalid"),
    (lambda: Mamba2(DIM, impl="fast"), "impl='fast' is invalid: expected one of chunked, reference"),
    (lambda: GatedDeltaNet(DIM, heads=0), "heads=0 is invalid"),
    (lambda: GatedDeltaNet(DIM, chunk_size=0), "chunk_size=0 is invalid"),
    (lambda: TaylorLinearAttention(30, heads=4), "heads=4 must divide dim=30"),
    (lambda: GatedShortConv(DIM, kernel=0), "kernel=0 is invalid"),
], ids=["mamba_head_dim", "mamba_groups", "mamba_state", "mamba_impl", "gdn_heads", "gdn_chunk", "taylor_heads",
        "conv_kernel"])
def test_bad_kwargs_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_forward_impl_is_checked():
    with pytest.raises(ValueError, match="impl='triton'"):
        GatedDeltaNet(DIM)(torch.randn(1, 3, DIM), impl="triton")


# ----------------------------------------------------------------------------- the zoo


def test_zoo_models_have_the_hybrids_size():
    from titans_lnn.evals.zoo import MECHANISMS, size_of, zoo_config

    target = size_of("mal")
    for label, variant in MECHANISMS.items():
        config = zoo_config(variant)
        with torch.device("meta"):
            n = TitansLNN(config).num_parameters()
        assert abs(n - target) / target < 0.05, (label, n, target)
        assert "liquid" not in config.parts or variant in ("mac", "mag", "mal", "liquid")


def test_zoo_command_writes_its_table_and_plot(tmp_path, monkeypatch):
    import json

    import numpy as np

    from titans_lnn.cli import main
    from titans_lnn.training import data

    text = np.frombuffer(b"In the beginning God created the heaven and the earth. " * 200, dtype=np.uint8)
    byte = data.get_tokenizer("byte")
    monkeypatch.setattr(data, "load_corpus", lambda name: data.Corpus.from_documents(name, [("gen", text)], byte))

    argv = ["zoo", "--only", "swa,gdn", "--mqar-steps", "2", "--lm-steps", "2", "--mqar-samples", "2",
            "--val-rows", "1", "--val-len", "300", "--workers", "1", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = (tmp_path / "zoo.md").read_text()
    assert "| Gated DeltaNet |" in table and "| SWA only |" in table
    assert (tmp_path / "zoo.png").stat().st_size > 0
    rows = json.loads((tmp_path / "zoo.json").read_text())["rows"]
    for row in rows:  # fixed-size states: after 1024 tokens as at the start
        assert row["state_bytes"] == row["state_bytes_init"] > 0
        assert set(row["mqar"]) == {"2", "4", "8", "16", "24"} and 0 < row["bits_per_byte"] < 16
    (tmp_path / "zoo.md").unlink()
    assert main(["zoo", "--render", "--out", str(tmp_path)]) == 0 and (tmp_path / "zoo.md").read_text() == table


def test_zoo_flags_are_checked(capsys):
    from titans_lnn.cli import main

    with pytest.raises(SystemExit):
        main(["zoo", "--only", "transformer"])
    assert "unknown mechanism 'transformer'" in capsys.readouterr().err
