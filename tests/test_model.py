"""The whole model: streaming invariance for every variant, cached generation, saving, bad input,
and that each variant can fit a small batch."""

import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from titans_lnn import VARIANTS, ModelState, TitansLNN, TitansLNNConfig


def _model(variant, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    return TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant, **overrides)).to(dtype)


def _stream(model, ids, cuts, dtype=torch.float64, dt=None):
    state, pieces = model.init_state(ids.shape[0], dtype=dtype), []
    bounds = [0, *cuts, ids.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        out = model(ids[:, a:b], state=state, dt=None if dt is None else dt[:, a:b])
        state = out.state
        pieces.append(out.logits)
    return torch.cat(pieces, 1), state


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_equals_one_pass(variant):
    model = _model(variant)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    whole = model(ids).logits
    for cuts in ([1, 2, 3], [7, 8, 30], [13], [44]):
        streamed, state = _stream(model, ids, cuts)
        torch.testing.assert_close(streamed, whole, rtol=1e-9, atol=1e-9)
        assert state.pos == 45


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
@given(cuts=st.lists(st.integers(1, 39), max_size=4), seed=st.integers(0, 20))
def test_streaming_any_split(variant, cuts, seed):
    model = _model(variant)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(seed))
    streamed, _ = _stream(model, ids, sorted(set(cuts)))
    torch.testing.assert_close(streamed, model(ids).logits, rtol=1e-9, atol=1e-9)


def test_state_size_is_bounded():
    model = _model("mac", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 120))
    sizes = []
    state = model.init_state(1)
    for s in range(0, 120, 15):
        with torch.no_grad():
            state = model(ids[:, s:s + 15], state=state).state
        sizes.append(state.nbytes())
    assert max(sizes) <= sizes[0] * 1.5, sizes  # the MAC cache only holds the current segment


def test_per_token_time_steps_stream():
    model = _model("mag")
    ids = torch.randint(0, 256, (2, 30))
    dt = torch.rand(2, 30, dtype=torch.float64) * 3
    whole = model(ids, dt=dt).logits
    streamed, _ = _stream(model, ids, [11, 12], dt=dt)
    torch.testing.assert_close(streamed, whole)
    assert not torch.allclose(whole, model(ids).logits)  # dt reaches the liquid core


@pytest.mark.parametrize("variant", ["mac", "swa", "lmm"])
def test_greedy_generation_equals_full_recomputation(variant):
    model = _model(variant).eval()
    prompt = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    ids = model.generate(prompt, 15, temperature=0.0)
    assert ids.shape == (2, 26)
    for t in range(11, 26):
        expected = model(ids[:, :t]).logits[:, -1].argmax(-1)
        assert torch.equal(ids[:, t], expected), f"step {t}"


def test_sampling_respects_top_k():
    model = _model("swa", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (1, 5))
    out = model.generate(prompt, 20, temperature=1.0, top_k=1, generator=g)
    torch.testing.assert_close(out, model.generate(prompt, 20, temperature=0.0))
    sampled = model.generate(prompt, 20, temperature=1.0, top_p=0.9, generator=g)
    assert sampled.shape == (1, 25)


def test_save_and_load_round_trip(tmp_path):
    model = _model("mac", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["variant"] == "mac"
    loaded = TitansLNN.from_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 20))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_state_save_and_resume(tmp_path):
    model = _model("mac")
    ids = torch.randint(0, 256, (1, 30))
    first = model(ids[:, :17])
    first.state.save(tmp_path / "doc.state")
    restored = ModelState.load(tmp_path / "doc.state", model)
    assert restored.pos == 17
    resumed = model(ids[:, 17:], state=restored).logits
    torch.testing.assert_close(resumed, model(ids).logits[:, 17:])


def test_bad_inputs_are_named():
    model = _model("mac", dtype=torch.float32)
    with pytest.raises(ValueError, match="token id 256, outside the vocabulary"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, time\); got shape \(3,\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="empty sequence"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size=2 sequences but input_ids has batch 1"):
        model(torch.zeros(1, 3, dtype=torch.long), state=model.init_state(2))
    other = _model("mag", dtype=torch.float32)
    with pytest.raises(ValueError, match="another config"):
        model(torch.zeros(1, 3, dtype=torch.long), state=other.init_state(1))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        TitansLNN.from_pretrained("/nonexistent")


@pytest.mark.parametrize("field,value,message", [
    ("variant", "mamba", "variant='mamba' is invalid: expected one of mac"),
    ("window", 0, "window=0 is invalid: expected a positive integer"),
    ("n_kv_heads", 3, "n_kv_heads=3 is invalid: expected a divisor of n_heads=4"),
    ("mem_heads", 5, "mem_heads=5 is invalid"),
    ("mem_chunk", -1, "mem_chunk=-1"),
    ("mem_max_lr", 0.0, "mem_max_lr=0.0 is invalid: expected a number > 0"),
    ("mem_max_forget", 1.5, "mem_max_forget=1.5 is invalid: expected a number in [0, 1]"),
    ("n_persistent", -2, "n_persistent=-2"),
])
def test_config_validation_names_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TitansLNNConfig.from_preset("debug", **{field: value})


def test_presets_and_unknown_preset():
    assert TitansLNNConfig.from_preset("tiny").d_model == 128
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TitansLNNConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown TitansLNNConfig fields"):
        TitansLNNConfig.from_dict({"dmodel": 3})


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch(variant):
    """A sanity check that every variant trains: the loss on one small batch falls well below its start."""
    model = _model(variant, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (2, 25), generator=g)
    ids, labels = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    first = None
    for _ in range(40):
        loss = model(ids, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.35 * first, (first, loss.item())
