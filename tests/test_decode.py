"""The decode step (titans_lnn.decode) equals the chunked forward: per-token logits and states == one
pass, in float64, for every variant and the memory's options; generation goes through it."""

import importlib
from pathlib import Path

import pytest
import torch

from titans_lnn import VARIANTS, TitansLNN, TitansLNNConfig
from titans_lnn.decode import STEPS, decode_step


def _model(variant, **overrides):
    """A debug model in float64 with every parameter perturbed: at initialisation the memory's last layer
    is zero and the convolutions are identities, which would leave much of the step untested."""
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant, **overrides)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _decode(model, ids, state, dt=None):
    logits = []
    for t in range(ids.shape[1]):
        out, state = decode_step(model, ids[:, t:t + 1], state, None if dt is None else dt[:, t:t + 1])
        logits.append(out)
    return torch.stack(logits, dim=1), state


def _assert_states_close(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    assert a.pos == b.pos


CASES = {
    **{v: dict(variant=v) for v in VARIANTS},
    "mac-linear-memory": dict(variant="mac", mem_depth=1),
    "mac-deep-memory": dict(variant="mac", mem_depth=3),
    "mac-clipped-unstable": dict(variant="mac", mem_max_grad_norm=0.05, mem_stable_step=False),
    "mac-no-clip": dict(variant="mac", mem_max_grad_norm=None),
    "mag-relu-threshold-context": dict(variant="mag", mem_write_gate="relu", mem_write_threshold=0.3,
                                       mem_gate_context=True, mem_chunk=5),
    "mal-no-persistent-mha": dict(variant="mal", n_persistent=0, n_kv_heads=4),
    "lmm-chunk-1": dict(variant="lmm", mem_chunk=1),
    "liquid-expand": dict(variant="liquid", liquid_expand=2, liquid_state=3),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_decode_steps_equal_one_pass(case):
    model = _model(**CASES[case])
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(1))
    whole = model(ids)
    stepped, state = _decode(model, ids, model.init_state(2, dtype=torch.float64))
    torch.testing.assert_close(stepped, whole.logits, rtol=1e-9, atol=1e-9)
    _assert_states_close(state, whole.state)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "liquid"])
@pytest.mark.parametrize("prefix", [1, 6, 13])
def test_decode_after_a_chunked_prefix(variant, prefix):
    """Steps continue a state left by a forward call anywhere inside a segment / memory chunk / window."""
    model = _model(variant)
    ids = torch.randint(0, 256, (1, 25), generator=torch.Generator().manual_seed(prefix))
    whole = model(ids)
    first = model(ids[:, :prefix])
    stepped, state = _decode(model, ids[:, prefix:], first.state)
    torch.testing.assert_close(stepped, whole.logits[:, prefix:], rtol=1e-9, atol=1e-9)
    _assert_states_close(state, whole.state)


def test_decode_with_time_steps():
    model = _model("mac")
    ids = torch.randint(0, 256, (2, 17))
    dt = torch.rand(2, 17, dtype=torch.float64) * 3 + 0.1
    stepped, _ = _decode(model, ids, model.init_state(2, dtype=torch.float64), dt)
    torch.testing.assert_close(stepped, model(ids, dt=dt).logits, rtol=1e-9, atol=1e-9)


def test_step_forms_cover_the_titans_variants():
    """Every module of the Titans variants and ablations has a step form (the seed mixers fall back to
    their forward), so that a refactor that renames a module cannot silently drop the fast path."""
    for variant in ("mac", "mag", "mal", "swa", "full", "liquid", "lmm"):
        model = _model(variant)
        missing = {type(m).__name__ for block in model.blocks for m in (block, block.mixer, block.liquid)
                   if m is not None and type(m) not in STEPS}
        assert not missing, (variant, missing)


def test_weights_changed_in_place_are_seen():
    """Values the steps derive from parameters (fused convolution taps, persistent keys) are rebuilt when a
    parameter changes in place, as an optimizer step changes it."""
    model = _model("mac")
    ids = torch.randint(0, 256, (1, 6))
    state = model.init_state(1, dtype=torch.float64)
    _decode(model, ids, state)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    stepped, _ = _decode(model, ids, state)
    torch.testing.assert_close(stepped, model(ids).logits, rtol=1e-9, atol=1e-9)


def test_decode_step_rejects_several_tokens():
    model = _model("swa")
    with pytest.raises(ValueError, match=r"one token per row, input_ids \(B, 1\); got shape \(1, 2\)"):
        decode_step(model, torch.zeros(1, 2, dtype=torch.long), model.init_state(1, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["mac", "lmm", "mamba2"])
def test_generate_uses_decode_steps(variant, monkeypatch):
    """Greedy generation == argmax of the one-pass logits, and no decode step runs the model's forward."""
    model = _model(variant)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    calls = []
    forward = TitansLNN._forward
    monkeypatch.setattr(TitansLNN, "_forward", lambda self, ids, *a, **k: calls.append(ids.shape) or
                        forward(self, ids, *a, **k))
    ids = model.generate(prompt, 9, temperature=0.0)
    assert all(shape[1] > 1 for shape in calls), calls  # only the prompt goes through forward
    logits = model(ids).logits
    assert torch.equal(ids[:, 7:], logits[:, 6:-1].argmax(-1))


def test_decode_benchmark_section_at_tiny_sizes(monkeypatch, tmp_path):
    """Section 6 of benchmarks/run.py end to end (its job in a fresh process) at tiny sizes: every row
    measured, the state's size the same after both prompts, the report written."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    runner, decode, report = (importlib.import_module(n) for n in ("bench_runner", "bench_decode", "bench_report"))
    monkeypatch.setitem(decode.DECODE_SIZES, ("cpu", True), dict(prompts=[64, 300], new_tokens=2, batches=[1, 3],
                                                                   piece=128))
    ctx = runner.Ctx(suite="cpu", quick=True, threads=1, repeats=1, mem_budget=8 * 2**30, out=tmp_path,
                     sizes=dict(max_run_s=20.0, budget_s=0.5), log=lambda msg: None, profile=False)
    sec = decode.decode_section(ctx)
    records = sec["data"]["records"]
    assert len(records) == 8 and all(r["status"] == "ok" for r in records), records
    assert {r["pos"] for r in records} == {64, 300}
    assert len({r["state_bytes_per_row"] for r in records}) == 1  # fixed-size state
    assert sec["status"] in ("MET", "NOT MET") and "B = 3" in sec["measured"]
    report.write(tmp_path, dict(command="test", header={}, repeats=1, mem_budget_gib=8.0, quick=True, wall_s=1.0),
                 [sec])
    assert "| 300 | decode step, B=3 |" in (tmp_path / "RESULTS.md").read_text()
