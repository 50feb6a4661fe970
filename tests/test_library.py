"""The library as researchers import it: blocks from keyword arguments, typed states, model.stream."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from titans_lnn import (
    MIXERS,
    VARIANTS,
    LiquidCore,
    MemoryAsContext,
    MemoryAsGate,
    ModelState,
    SlidingWindowAttention,
    TitansLNN,
    TitansLNNConfig,
)
from titans_lnn.memory import NeuralMemory
from titans_lnn.state import AttentionState, LiquidState, MACState, MemoryState, PairState

DIM = 32


def _blocks():
    return {
        "attention": SlidingWindowAttention(DIM, heads=4, kv_heads=2, window=8, n_persistent=2),
        "full attention": SlidingWindowAttention(DIM, heads=2, window=None),
        "liquid": LiquidCore(DIM, n_state=4),
        "memory": NeuralMemory(DIM, heads=2, depth=2, chunk_size=4),
        "linear memory": NeuralMemory(DIM, heads=2, depth=1, chunk_size=3, write_gate="relu", write_threshold=0.1),
        "mac": MemoryAsContext(DIM, window=8, heads=4, n_persistent=2, memory=NeuralMemory(DIM, heads=2, chunk_size=4)),
        "mag": MemoryAsGate(DIM, window=8, heads=4, memory=NeuralMemory(DIM, heads=2, chunk_size=4)),
    }


@pytest.mark.parametrize("name", list(_blocks()))
def test_block_from_kwargs_streams_like_one_pass(name):
    torch.manual_seed(0)
    block = _blocks()[name].double()
    x = torch.randn(2, 29, DIM, dtype=torch.float64)
    whole, state = block(x)
    assert whole.shape == x.shape
    pieces, s = [], None
    for part in x.split([5, 1, 11, 12], dim=1):
        y, s = block(part, s)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    for (key, a), b in zip(state.named_tensors().items(), s.named_tensors().values()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("name", list(_blocks()))
def test_block_trains_inside_a_user_model(name):
    """A model a user writes around one block: every parameter of the block gets a gradient."""
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.embed, self.block, self.head = nn.Embedding(16, DIM), block, nn.Linear(DIM, 16)

        def forward(self, ids):
            y, _ = self.block(self.embed(ids))
            return self.head(y)

    model = Tiny(_blocks()[name])
    ids = torch.randint(0, 16, (2, 24))
    loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    missing = [n for n, p in model.block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_from_config_matches_the_model_blocks():
    config = TitansLNNConfig.from_preset("debug", variant="mag")
    attn = SlidingWindowAttention.from_config(config)
    assert (attn.n_heads, attn.n_kv, attn.window) == (config.n_heads, config.n_kv_heads, config.window)
    core = LiquidCore.from_config(config)
    assert core.n_state == config.liquid_state
    mem = NeuralMemory.from_config(config)
    assert (mem.heads, mem.depth, mem.chunk_size) == (config.mem_heads, config.mem_depth, config.mem_chunk)
    full = SlidingWindowAttention.from_config(config.replace(variant="full"))
    assert full.window is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=3), "heads=3"),
    (dict(heads=4, kv_heads=3), "kv_heads=3"),
    (dict(window=0), "window=0"),
    (dict(window=None, segment=True), "segment"),
])
def test_attention_kwargs_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlidingWindowAttention(DIM, **kwargs)


def test_liquid_kwargs_are_checked():
    with pytest.raises(ValueError, match="n_state=0"):
        LiquidCore(DIM, n_state=0)
    with pytest.raises(ValueError, match="tau_max=inf"):
        LiquidCore(DIM, tau_max=float("inf"))
    with pytest.raises(ValueError, match="NeuralMemory of width dim=32"):
        MemoryAsContext(DIM, memory=NeuralMemory(16, heads=2))


def test_states_are_typed_and_fixed_size():
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mac"))
    state = model.init_state(1)
    mixer = state.layers[0].mixer
    assert isinstance(mixer, MACState) and isinstance(mixer.attn, AttentionState)
    assert isinstance(mixer.mem, MemoryState) and isinstance(state.layers[0].liquid, LiquidState)
    # the attention cache is preallocated: the state has its final size before the first token
    size = state.nbytes()
    with torch.no_grad():
        after = model.stream(torch.randint(0, 256, (1, 50)), chunk_len=7).state
    assert after.nbytes() == size and after.pos == 50
    # MAC's segment snapshot lives in MAC's state; the other memories carry no copy of it
    mag = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mag")).init_state(1)
    assert isinstance(mag.layers[0].mixer, PairState)
    mem_bytes = mixer.mem.nbytes()
    assert mag.layers[0].mixer.mem.nbytes() == mem_bytes
    assert sum(w.numel() * w.element_size() for w in mixer.segment_weights) > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_stream_equals_one_pass(variant):
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant)).double().eval()
    ids = torch.randint(0, 256, (2, 41))
    with torch.no_grad():
        whole = model(ids)
    out = model.stream(ids, chunk_len=6, logits="all")
    torch.testing.assert_close(out.logits, whole.logits)
    last = model.stream(ids, chunk_len=9)
    torch.testing.assert_close(last.logits, whole.logits[:, -1])
    assert model.stream(ids, chunk_len=100, logits="none").logits is None
    starts = [p.start for p in model.stream_pieces(ids, chunk_len=16)]
    assert starts == [0, 16, 32]
    # continuing from a carried state
    first = model.stream(ids[:, :20], chunk_len=7)
    rest = model.stream(ids[:, 20:], chunk_len=7, state=first.state, logits="all")
    torch.testing.assert_close(rest.logits, whole.logits[:, 20:])


def test_stream_rejects_bad_arguments():
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="swa"))
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="chunk_len=0"):
        model.stream(ids, chunk_len=0)
    with pytest.raises(ValueError, match="logits='every'"):
        model.stream(ids, logits="every")
    with pytest.raises(ValueError, match="batch, time"):
        model.stream(ids[0])


def test_new_mixers_register():
    """A mixer registered in MIXERS is what Block builds (how new mechanisms plug in)."""
    assert set(MIXERS) == set(VARIANTS)


def test_residual_outputs_are_marked():
    """The GPT-2 scaled init reaches exactly the projections that write into the residual stream."""
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mac"))
    marked = sorted(n.split(".", 2)[-1] for n, m in model.named_modules() if getattr(m, "residual_output", False)
                    and n.startswith("blocks.0."))
    assert marked == ["liquid.layer.w_out", "mixer.layer.attn.wo", "mixer.layer.gate.proj", "mixer.layer.mem.wo",
                      "mlp.w2"]


# ----------------------------------------------------------------------------- states: checked, saved, loaded


def _mac():
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mac")).eval()
    with torch.no_grad():
        state = model(torch.randint(0, 256, (2, 13))).state
    return model, state


def test_state_save_load_round_trip(tmp_path):
    model, state = _mac()
    state.save(tmp_path / "s.state")
    loaded = ModelState.load(tmp_path / "s.state", model)
    assert loaded.pos == 13 and type(loaded.layers[0].mixer) is MACState
    for (k, a), b in zip(state.tensors().items(), loaded.tensors().values()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, state=loaded).logits, model(ids, state=state).logits)


def _edit(state, **changes):
    return dataclasses.replace(state, **changes)


@pytest.mark.parametrize("edit, match", [
    (lambda s: _edit(s, layers=s.layers[:1]), "1 layers; this model has 2"),
    (lambda s: _edit(s, pos=-3), "pos=-3"),
    (lambda s: _edit(s, pos=999), "pos=999 but"),
    (lambda s: _edit(s, pos=True), "pos=True"),
    (lambda s: _edit(s, fingerprint="0" * 16), "another config"),
    (lambda s: s.map(lambda t: t[..., :1] if t.dim() == 4 else t), "has shape"),
    (lambda s: s.map(lambda t: t.long() if t.dim() == 2 else t), "dtype"),
])
def test_edited_states_are_refused(edit, match):
    model, state = _mac()
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.zeros(2, 1, dtype=torch.long), state=edit(state))


def test_saved_state_checks(tmp_path):
    model, state = _mac()
    path = tmp_path / "s.state"
    state.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last tensor
    (tmp_path / "bad.state").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        ModelState.load(tmp_path / "bad.state", model)
    other = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mag"))
    with pytest.raises(ValueError, match="another config"):
        ModelState.load(path, other)
    (tmp_path / "junk.state").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="junk.state"):
        ModelState.load(tmp_path / "junk.state", model)


def test_labels_and_dt_are_checked():
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mac"))
    ids = torch.randint(0, 256, (1, 6))
    with pytest.raises(TypeError, match="labels must be an integer"):
        model(ids, labels=ids.float())
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0  # nothing labelled: 0, not NaN
    for bad in (-1.0, float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="dt contains"):
            model(ids, dt=torch.full((1, 6), bad))
    with pytest.raises(TypeError, match="dt must be a floating-point"):
        model(ids, dt=torch.ones(1, 6, dtype=torch.long))
    swa = TitansLNN(TitansLNNConfig.from_preset("debug", variant="swa"))
    with pytest.raises(ValueError, match="dt is read only by the liquid core"):
        swa(ids, dt=torch.ones(1, 6))


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("variant", ["mac", "mal", "liquid"])
def test_checkpointed_pass_has_the_plain_gradients(variant):
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant)).double()
    ids = torch.randint(0, 256, (2, 37))
    labels = ids.roll(-1, 1)
    labels[:, :5] = -100
    model(ids, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = model(ids, labels=labels, checkpoint_len=6)
    out.loss.backward()
    assert out.logits is None and out.state.pos == 37
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    with pytest.raises(ValueError, match="checkpoint_len=0"):
        model(ids, labels=labels, checkpoint_len=0)
