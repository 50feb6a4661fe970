"""The README's quick tour runs as written (on half its tokens), streams in constant memory, and
the model warns when a streamed state carries an autograd graph in eval mode."""

import pathlib
import re
import warnings

import pytest
import torch

from titans_lnn import ModelState, TitansLNN, TitansLNNConfig, generation

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Only the length changes (4096 tokens take ~8 s on two shared cores): still three streamed pieces,
# the last a short one. The debug preset would be no faster, its window of 8 makes many segments.
SHRINK = {"(1, 4096)": "(1, 2048)"}


def tour_code() -> str:
    """The first ```python block after the README's "## A quick tour" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A quick tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in SHRINK.items():
        assert old in code, f"the tour no longer contains {old!r}: update SHRINK"
        code = code.replace(old, new)
    return code


def graph_size(state: ModelState) -> int:
    """Autograd nodes reachable from the state's tensors: what it keeps alive of earlier calls."""
    seen, todo = set(), [t.grad_fn for t in state.tensors().values() if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_quick_tour_runs_and_streams_in_constant_memory(tmp_path, monkeypatch):
    """Runs the tour, recording after every call that carries a state the size of the autograd graph
    the new state holds: flat (zero) under no_grad, where the old tour's grew by one piece's graph per
    piece (2.4 -> 8.5 GB RSS from 4K to 16K tokens of the tiny model)."""
    monkeypatch.chdir(tmp_path)  # the tour writes doc.state and ckpt/
    sizes = []
    forward = TitansLNN._forward  # every piece goes through it (forward checks inputs first)

    def recording_forward(self, input_ids, labels=None, state=None, dt=None):
        out = forward(self, input_ids, labels, state, dt)
        if state is not None:
            sizes.append(graph_size(out.state))
        return out

    monkeypatch.setattr(TitansLNN, "_forward", recording_forward)
    step = generation.decode_step  # generation's new tokens: one-token steps (titans_lnn.decode)

    def recording_step(model, input_ids, state, dt=None):
        logits, new = step(model, input_ids, state, dt)
        sizes.append(graph_size(new))
        return logits, new

    monkeypatch.setattr(generation, "decode_step", recording_step)
    torch.manual_seed(0)
    ns = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tour must not trip the graph-carrying state warning
        exec(compile(tour_code(), "README.md (quick tour)", "exec"), ns)

    assert len(sizes) > 64  # the streamed pieces, then generation's steps
    assert set(sizes) == {0}, f"the carried state holds an autograd graph (nodes per call): {sizes[:6]}"
    state = ns["state"]
    assert state.pos == ns["ids"].shape[1] and not state.requires_grad
    assert ModelState.load("doc.state", ns["model"]).pos == state.pos
    # generate returns the prompt and the new tokens; the tour decodes the new ones.
    assert ns["out_ids"].shape == (1, 32 + 64)
    torch.testing.assert_close(ns["out_ids"][:, :32], ns["ids"][:, :32])
    assert isinstance(ns["text"], str) and ns["text"]
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_graph_size_sees_the_old_tours_growth():
    """The measure above would have failed the old tour: without no_grad it grows per piece."""
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug"))  # training mode: no warning, the graph is wanted
    ids = torch.randint(0, 256, (1, 48))
    state, sizes = model.init_state(1), []
    for piece in ids.split(16, dim=1):
        state = model(piece, state=state).state
        sizes.append(graph_size(state))
    assert sizes[0] > 0 and sizes[0] < sizes[1] < sizes[2]
    assert graph_size(state.detach()) == 0 and not state.detach().requires_grad


def _stream(model, ids, piece=8):
    state = model.init_state(ids.shape[0])
    for part in ids.split(piece, dim=1):
        state = model(part, state=state).state
    return state


def test_eval_mode_warns_once_about_a_state_carrying_a_graph():
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mal")).eval()
    ids = torch.randint(0, 256, (1, 32))
    with pytest.warns(UserWarning, match=r"torch\.no_grad.*state\.detach\(\)") as record:
        state = _stream(model, ids)
        _stream(model, ids)
    assert len([w for w in record if "autograd graph" in str(w.message)]) == 1  # once per model
    assert state.requires_grad


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detach", "train"])
def test_no_warning_when_the_graph_is_cut_or_wanted(mode):
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mal"))
    model.train(mode == "train")
    ids = torch.randint(0, 256, (1, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if mode == "no_grad":
            with torch.no_grad():
                assert not _stream(model, ids).requires_grad
        elif mode == "inference_mode":
            with torch.inference_mode():
                assert not _stream(model, ids).requires_grad
        elif mode == "detach":
            state = model.init_state(1)
            for part in ids.split(8, dim=1):
                state = model(part, state=state).state.detach()
        else:
            assert _stream(model, ids).requires_grad  # backpropagation through pieces, on purpose
