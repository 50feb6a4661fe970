"""Checkpoints: atomic writes that survive a kill, corruption detection, pickle-free nested state."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import titans_lnn.training.checkpoint as ck
from titans_lnn.training.checkpoint import (
    CheckpointError,
    atomic_write,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)

DEAD_PID = 99_999_999  # above any pid_max: no such process


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 7, generator=g), "b16": torch.randn(3, generator=g).bfloat16(),
            "i": torch.arange(4), "mask": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3)}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- atomic_write


def test_atomic_write_replaces(tmp_path):
    f = tmp_path / "x.json"
    atomic_write(f, "old")
    atomic_write(f, b"new")
    assert f.read_text() == "new" and os.listdir(tmp_path) == ["x.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    f = tmp_path / "x.json"
    atomic_write(f, "old")

    def crash(fd):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(ck.os, "fsync", crash)
    with pytest.raises(OSError, match="mid-write"):
        atomic_write(f, "new" * 1000)
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


# ----------------------------------------------------------------------------- save / load


def test_round_trip_and_layout(tmp_path):
    tensors = _tensors()
    path = save_checkpoint(tmp_path, 12, tensors, {"loss": 1.5, "config": {"d_model": 32}})
    assert path.name == "step-00000012"
    assert sorted(os.listdir(path)) == ["manifest.json", "meta.json", "tensors.safetensors"]
    ckpt = load_checkpoint(path)
    assert ckpt.step == 12 and ckpt.meta == {"loss": 1.5, "config": {"d_model": 32}}
    _assert_same(ckpt.tensors, tensors)
    assert latest_checkpoint(tmp_path) == path


def test_tied_and_non_contiguous_tensors(tmp_path):
    emb = torch.randn(6, 4, requires_grad=True)
    tensors = {"embed.weight": emb, "head.weight": emb, "view": emb.detach().t(), "row": emb.detach()[2]}
    loaded = load_checkpoint(save_checkpoint(tmp_path, 0, tensors)).tensors
    assert torch.equal(loaded["head.weight"], emb.detach()) and torch.equal(loaded["view"], emb.detach().t())
    assert torch.equal(loaded["row"], emb.detach()[2])


def test_bad_meta_and_step(tmp_path):
    with pytest.raises(TypeError, match="flatten_state"):
        save_checkpoint(tmp_path, 1, {}, {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {})
    assert list_checkpoints(tmp_path) == []


def test_keep_last_and_overwrite(tmp_path):
    for step in [1, 2, 3, 10, 100_000_000]:
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000010", "step-100000000"]
    save_checkpoint(tmp_path, 10, {"x": torch.tensor([-1])})
    assert load_checkpoint(tmp_path / "step-00000010").tensors["x"].item() == -1
    assert latest_checkpoint(tmp_path).name == "step-100000000"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_missing_dir_has_no_latest(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize("damage,match", [
    ("flip", "SHA-256"), ("truncate", "truncated"), ("no-manifest", "incomplete"),
    ("bad-manifest", "unreadable"), ("no-meta", "meta.json is missing")])
def test_corruption_detected_and_skipped(tmp_path, damage, match):
    good = save_checkpoint(tmp_path, 1, _tensors(1))
    bad = save_checkpoint(tmp_path, 2, _tensors(2))
    target = bad / "tensors.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "no-manifest":
        (bad / "manifest.json").unlink()
    elif damage == "bad-manifest":
        (bad / "manifest.json").write_text("{trunc")
    else:
        (bad / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint .*step-00000002.*{match}"):
        assert latest_checkpoint(tmp_path) == good
    _assert_same(load_checkpoint(good).tensors, _tensors(1))


def test_exception_during_save_leaves_previous_intact(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 1, _tensors(1))

    def half_write(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.safetensors.torch, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _tensors(2))
    assert os.listdir(tmp_path) == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == good


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    import titans_lnn.training.checkpoint as ck
    real_fsync = os.fsync
    def fsync_then_hang(fd):
        real_fsync(fd)
        print("WRITING", flush=True)
        time.sleep(60)
    ck.os.fsync = fsync_then_hang
    ck.save_checkpoint(sys.argv[1], 2, {"big": torch.ones(1 << 21)})
""")


def test_killed_mid_save_previous_checkpoint_survives(tmp_path):
    good = save_checkpoint(tmp_path, 1, _tensors(1))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "WRITING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-step-00000002")]
    assert len(leftovers) == 1  # the killed save's temporary folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == good
    _assert_same(load_checkpoint(good).tensors, _tensors(1))
    save_checkpoint(tmp_path, 3, {})  # the next save clears the dead process's leftovers
    assert sorted(os.listdir(tmp_path)) == ["step-00000001", "step-00000003"]


def test_checkpoint_moved_aside_before_a_kill_is_restored(tmp_path):
    path = save_checkpoint(tmp_path, 7, _tensors(7))
    os.replace(path, tmp_path / f".old-step-00000007-{DEAD_PID}-abcdef12")
    save_checkpoint(tmp_path, 8, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000007", "step-00000008"]
    _assert_same(load_checkpoint(path).tensors, _tensors(7))


# ----------------------------------------------------------------------------- nested state


def _json_round_trip(tensors, skeleton):
    return unflatten_state(dict(tensors), json.loads(json.dumps(skeleton, allow_nan=False)))


def test_flatten_round_trip_awkward_values():
    t = torch.randn(3)
    obj = {"state": {0: {"exp_avg": t, "step": torch.tensor(3.0)}, 1: {}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "fused": None,
                             "amsgrad": False, "name": "decay"}],
           "floats": [math.inf, -math.inf, 0.1], "__weird__": "key", "nested": [[1, [2, (3,)]], ()],
           "np": np.arange(5, dtype=np.uint32), "np_scalar": np.int64(7), "big": 2**100,
           None: "none key", 2.5: "float key", "": "empty key"}
    tensors, skeleton = flatten_state(obj)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = _json_round_trip(tensors, skeleton)
    assert back["state"][0]["exp_avg"] is t and back["param_groups"] == obj["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["floats"] == obj["floats"] and back["nested"] == [[1, [2, (3,)]], ()]
    assert back["__weird__"] == "key" and back[None] == "none key" and back[2.5] == "float key"
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["np_scalar"] == 7 and back["big"] == 2**100 and back[""] == "empty key"
    nan_back = _json_round_trip(*flatten_state([math.nan]))
    assert math.isnan(nan_back[0])


def test_flatten_names_and_collisions():
    tensors, skeleton = flatten_state({"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}, prefix="opt")
    assert sorted(tensors) == ["opt.a.b", "opt.a.b#1"]
    back = unflatten_state(tensors, skeleton)
    assert back["a.b"].item() == 0 and back["a"]["b"].item() == 1
    assert flatten_state(torch.zeros(2))[0].keys() == {"tensor"}


def test_flatten_errors():
    with pytest.raises(TypeError, match=r"set at x\.0"):
        flatten_state({"x": [{1, 2}]})
    with pytest.raises(TypeError, match="dict key"):
        flatten_state({(1, 2): 3})
    with pytest.raises(KeyError, match="missing"):
        unflatten_state({}, {"__tensor__": "gone"})


def test_optimizer_and_rng_state_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    rng = np.random.default_rng(5)
    state = {"model": model.state_dict(), "optim": opt.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
                     "numpy_legacy": np.random.get_state(), "python": random.getstate()}}
    tensors, skeleton = flatten_state(state)
    path = save_checkpoint(tmp_path, 3, tensors, {"state": skeleton})
    ckpt = load_checkpoint(path)
    back = unflatten_state(ckpt.tensors, ckpt.meta["state"])

    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(back["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(back["optim"])
    torch.set_rng_state(back["rng"]["torch"])
    x2 = torch.randn(8, 4)
    torch.set_rng_state(state["rng"]["torch"])
    x1 = torch.randn(8, 4)
    assert torch.equal(x1, x2)
    for m, o, x in ((model, opt, x1), (model2, opt2, x2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = back["rng"]["numpy"]
    assert rng2.integers(1 << 60) == rng.integers(1 << 60)
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy_legacy"])
