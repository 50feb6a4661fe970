"""Issue 13's reproducers for saved files: nothing is trusted that was not checked.

Each test is one item's reproducer (the issue's numbering in the test name): tampered or half-written
files (checkpoints, saved models, state files) fail with an error naming the file instead of loading
something else, and resumes never discard a run's history. Bad arguments, flags and data files are in
test_reliability_inputs.py.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import debug_model, flip_bytes, rehash, same_model
from safetensors.torch import load_file

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.cli import main
from titans_lnn.io import IntegrityError, atomic_replace_dir, file_digest
from titans_lnn.pretrained import load_pretrained, save_pretrained
from titans_lnn.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from titans_lnn.training.metrics import MetricsLog
from titans_lnn.training.trainer import TrainConfig, train

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into deep green woods".split()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A stopped training run (checkpoints at steps 1 and 2, metrics.jsonl), copied by the tests that edit it."""
    root = tmp_path_factory.mktemp("run")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (10,), generator=g).tolist()) for _ in range(150)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(model_preset="debug", data=str(root / "corpus.txt"), out=str(root / "run"), batch_size=2,
                      seq_len=16, steps=8, val_fraction=0.1, eval_batches=2, eval_every=4, save_every=1,
                      log_every=1, keep=5, stop_at=2, progress=False, tensorboard=False)
    train(cfg)
    return root


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "r")
    run = tmp_path / "r" / "run"
    config = json.loads((run / "train_config.json").read_text())
    config["data"] = str(tmp_path / "r" / "corpus.txt")
    (run / "train_config.json").write_text(json.dumps(config))
    return run


def _resume_args(run: Path) -> list[str]:
    return ["train", "--out", str(run), "--resume", "--data", str(run.parent / "corpus.txt"), "--no-progress",
            "--no-tensorboard"]


# ----------------------------------------------------------------------------- 1. data loss


def test_1_resume_with_every_checkpoint_corrupt_refuses_and_keeps_history(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    ckpts = sorted((run / "checkpoints").iterdir())
    for c in ckpts:
        flip_bytes(c / "tensors.safetensors", 10)
    metrics = (run / "metrics.jsonl").read_text()
    before = {p: p.read_bytes() for c in ckpts for p in c.iterdir()}
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        assert main(_resume_args(run)) == 2
    err = capsys.readouterr().err
    assert "every checkpoint in" in err and "incomplete or corrupt" in err and "step-00000002" in err
    assert (run / "metrics.jsonl").read_text() == metrics  # not truncated
    assert {p: p.read_bytes() for c in ckpts for p in c.iterdir()} == before  # nothing pruned or rewritten
    # Without --resume a new run is refused too: it would prune the damaged run's checkpoints.
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(TrainConfig.from_dict({**json.loads((run / "train_config.json").read_text()), "resume": None,
                                     "stop_at": None}))


def test_1_prune_counts_only_checkpoints_that_verify(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.full((4,), float(step))}, keep_last=3)
    for step in (2, 3):
        flip_bytes(tmp_path / f"step-{step:08d}" / "tensors.safetensors", 5)
    save_checkpoint(tmp_path, 4, {"x": torch.zeros(4)}, keep_last=2)
    # Complete-looking but corrupt 2 and 3 are not "kept": step 1 is one of the two good ones.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    assert torch.equal(load_checkpoint(tmp_path / "step-00000001").tensors["x"], torch.ones(4))


def test_1_new_run_moves_an_earlier_metrics_log_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(13)))
    log = MetricsLog(tmp_path, 0, enabled=True, tensorboard=False)
    log.close()
    aside = list(tmp_path.glob("metrics.before-*.jsonl"))
    assert len(aside) == 1 and len(aside[0].read_text().splitlines()) == 13


# ----------------------------------------------------------------------------- 2. manifests


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["files"].update({"/etc/hostname": file_digest("/etc/hostname")}), r"manifest lists"),
    (lambda m: m["files"].update({"../escape": {"bytes": 1, "sha256": "0" * 64}}), r"manifest lists"),
    (lambda m: m.update(files={}), r"manifest lists \[\], expected"),
    (lambda m: m["files"].pop("meta.json"), r"manifest lists"),
    (lambda m: m["files"].update({"meta.json": "x"}), r"manifest entry for meta.json"),
    (lambda m: m.update(step=7), r"says step 7"),
], ids=["absolute-path", "parent-path", "empty-files", "missing-file", "bad-entry", "wrong-step"])
def test_2_manifest_must_list_exactly_the_checkpoint_files(tmp_path, edit, match):
    path = save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(path)


def test_2_rehashed_meta_without_scheduler_is_a_clear_error(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    for c in (run / "checkpoints").iterdir():
        meta = json.loads((c / "meta.json").read_text())
        del meta["meta"]["scheduler"]
        (c / "meta.json").write_text(json.dumps(meta))
        rehash(c)
    assert main(_resume_args(run)) == 2
    assert "meta.json lacks ['scheduler']" in capsys.readouterr().err


def test_2_meta_json_must_be_a_checkpoint_object(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})
    for text in ("null", "[1]", '{"format": "titans-lnn-checkpoint", "step": "1", "meta": {}}'):
        (path / "meta.json").write_text(text)
        rehash(path)
        with pytest.raises(CheckpointError, match="meta.json"):
            load_checkpoint(path)


# ----------------------------------------------------------------------------- 3. config.json trusted


@pytest.mark.parametrize("field,value", [("variant", "mag"), ("window", 4), ("mem_chunk", 8)])
def test_3_edited_config_does_not_load_a_different_model(tmp_path, field, value):
    save_pretrained(debug_model(), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    config = json.loads(cfg_path.read_text())
    config[field] = value
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match=r"m/config.json (is corrupt|has \d+ bytes, the manifest says)"):
        load_pretrained(tmp_path / "m")
    rehash(tmp_path / "m")  # the manifest agrees now; the weights' fingerprint still does not
    with pytest.raises(IntegrityError, match=r"config.json does not describe the weights in .*model.safetensors"):
        load_pretrained(tmp_path / "m")


def test_3_missing_or_mistyped_config_fields_are_errors(tmp_path):
    save_pretrained(debug_model(mem_chunk=4), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    saved = json.loads(cfg_path.read_text())
    for edit, match in [(lambda c: c.pop("mem_chunk"), r"fields \['mem_chunk'\] are missing"),
                        (lambda c: c.update(tie_embeddings="false"), r"tie_embeddings='false' is invalid"),
                        (lambda c: c.update(n_persistent=True), r"n_persistent=True is invalid"),
                        (lambda c: c.update(model_type="gpt2"), r"model_type='gpt2'")]:
        config = dict(saved)
        edit(config)
        cfg_path.write_text(json.dumps(config))
        rehash(tmp_path / "m")
        with pytest.raises(ValueError, match=match) as info:
            load_pretrained(tmp_path / "m")
        assert str(cfg_path) in str(info.value)


def test_3_config_is_frozen_and_replace_makes_a_new_one():
    config = TitansLNNConfig.from_preset("debug")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.window = 3
    other = config.replace(window=4)
    assert other.window == 4 and config.window == 8 and other.fingerprint != config.fingerprint


def test_3_ints_for_floats_give_the_same_config():
    a = TitansLNNConfig.from_preset("debug", mlp_mult=2)
    assert a == TitansLNNConfig.from_preset("debug") and isinstance(a.mlp_mult, float)


def test_3_configs_saved_by_this_version_load(tmp_path):
    model = debug_model()
    model.save_pretrained(tmp_path / "m")
    assert same_model(TitansLNN.from_pretrained(tmp_path / "m"), model)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "titans_lnn"


# ----------------------------------------------------------------------------- 4. atomic, verified saves


def test_4_flipped_weight_bytes_fail_loading_and_eval(tmp_path, capsys):
    save_pretrained(debug_model(), tmp_path / "m", extra_files={"tokenizer.json": '{"type": "byte"}'})
    flip_bytes(tmp_path / "m" / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"model.safetensors is corrupt"):
        load_pretrained(tmp_path / "m")
    assert main(["eval", "passkey", "--checkpoint", str(tmp_path / "m"), "--lengths", "256", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors is corrupt" in err[0]


def test_4_rehashed_damaged_weights_fail_with_the_file_named(tmp_path):
    save_pretrained(debug_model(), tmp_path / "m")
    flip_bytes(tmp_path / "m" / "model.safetensors", 50)
    rehash(tmp_path / "m")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(tmp_path / "m")


def test_4_a_failed_save_leaves_the_old_model(tmp_path, monkeypatch):
    import titans_lnn.pretrained as pretrained

    old, new = debug_model(), debug_model(mem_chunk=8)
    save_pretrained(old, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")

    def killed(path, data):
        raise KeyboardInterrupt  # the process dies after the weights, before the config

    monkeypatch.setattr(pretrained, "write_synced", killed)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(new, tmp_path / "m")
    monkeypatch.undo()
    assert same_model(load_pretrained(tmp_path / "m"), old)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind
    save_pretrained(new, tmp_path / "m")
    assert same_model(load_pretrained(tmp_path / "m"), new)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"  # the user's own files are kept


def test_4_kill_between_the_renames_is_recovered(tmp_path):
    model = debug_model()
    save_pretrained(model, tmp_path / "m")
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    os.replace(tmp_path / "m", tmp_path / f".old-m-{dead}-abcdef12")  # the old one moved aside, then the kill
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_pretrained(tmp_path / "m")
    atomic_replace_dir(tmp_path / "other", lambda tmp: None)  # another folder's save leaves it alone
    assert (tmp_path / f".old-m-{dead}-abcdef12").is_dir()
    save_pretrained(debug_model(window=4), tmp_path / "m")  # the next save into it puts it back first
    assert sorted(os.listdir(tmp_path)) == ["m", "other"]


def test_4_saving_into_the_working_folder_is_refused_not_moved_away(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is the current working folder"):
        save_pretrained(debug_model(), ".")
    assert Path.cwd() == tmp_path and os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_4_loading_onto_a_missing_device_is_a_clear_error(tmp_path):
    save_pretrained(debug_model(), tmp_path / "m")
    with pytest.raises(ValueError, match="map_location='cuda' is not available"):
        load_pretrained(tmp_path / "m", map_location="cuda")


# ----------------------------------------------------------------------------- 11. load errors name the file


@pytest.mark.parametrize("name,content,match", [
    ("config.json", b"null", r"config.json holds a JSON NoneType"),
    ("config.json", b"{trunc", r"config.json is not valid JSON"),
    ("model.safetensors", b"\x00" * 64, r"model.safetensors: not a readable safetensors file"),
])
def test_11_load_errors_name_the_file(tmp_path, name, content, match):
    save_pretrained(debug_model(), tmp_path / "m")
    (tmp_path / "m" / name).write_bytes(content)
    rehash(tmp_path / "m")
    with pytest.raises(ValueError, match=match) as info:
        load_pretrained(tmp_path / "m")
    assert str(tmp_path / "m" / name) in str(info.value)


def test_11_missing_manifest_is_named_and_verify_false_still_checks_the_fingerprint(tmp_path):
    model = debug_model()
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest.json not found.*verify=False"):
        load_pretrained(tmp_path / "m")
    assert same_model(load_pretrained(tmp_path / "m", verify=False), model)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "window": 4}))
    with pytest.raises(IntegrityError, match="fingerprint"):
        load_pretrained(tmp_path / "m", verify=False)


def test_weights_file_holds_the_config_fingerprint(tmp_path):
    model = debug_model()
    save_pretrained(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["fingerprint"] == model.config.fingerprint == model.fingerprint
    assert set(load_file(tmp_path / "m" / "model.safetensors")) == set(model.state_dict())


# ----------------------------------------------------------------------------- property: random edits

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 40) | st.floats(allow_nan=True)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_CONFIG_KEYS = [f.name for f in dataclasses.fields(TitansLNNConfig)] + ["model_type", "extra"]


@st.composite
def _edits(draw, json_files: dict[str, list[str]], binary_files: list[str]):
    """One random edit: (file, kind, arguments), then whether the manifest is re-hashed afterwards."""
    name = draw(st.sampled_from(sorted(json_files) + binary_files))
    kinds = ["set", "delete", "bytes", "truncate"] if name in json_files else ["bytes", "truncate", "append"]
    kind = draw(st.sampled_from(kinds))
    if kind == "set":
        args = (draw(st.sampled_from(json_files[name])), draw(_JSON))
    elif kind == "delete":
        args = (draw(st.sampled_from(json_files[name])),)
    elif kind == "bytes":
        args = (draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1,
                              max_size=8)),)
    elif kind == "truncate":
        args = (draw(st.floats(0, 1, exclude_max=True)),)
    else:
        args = (draw(st.binary(min_size=1, max_size=16)),)
    return name, kind, args, draw(st.booleans())


def _apply(folder: Path, edit, manifest_name: str = "manifest.json") -> None:
    name, kind, args, rehash = edit
    path = folder / name
    if kind in ("set", "delete"):
        data = json.loads(path.read_text())
        if kind == "set":
            data[args[0]] = args[1]
        else:
            data.pop(args[0], None)
        path.write_text(json.dumps(data))
    else:
        raw = bytearray(path.read_bytes())
        if kind == "bytes":
            for where, value in args[0]:
                raw[int(where * len(raw))] = value
        elif kind == "truncate":
            raw = raw[:int(args[0] * len(raw))]
        else:
            raw += args[0]
        path.write_bytes(bytes(raw))
    if rehash and name != manifest_name:
        try:
            rehash(folder, manifest_name)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass  # a manifest the edit made unreadable stays as it is


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "m"
    model = debug_model()
    save_pretrained(model, folder, extra_files={"tokenizer.json": '{"type": "byte"}'})
    return folder, model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=_edits({"config.json": _CONFIG_KEYS, "manifest.json": ["files", "format", "version", "x"]},
                   ["model.safetensors", "tokenizer.json"]).filter(lambda e: not e[3] or e[0] != "model.safetensors"))
def test_property_an_edited_saved_model_loads_exactly_or_fails_clearly(saved_model, tmp_path_factory, edit):
    """Any edit of one file, the manifest re-hashed or not, except re-hashed weights: new weight values
    whose manifest was recomputed are a different model by their author's choice (no unkeyed check can
    tell them from a fine-tuned one); a re-hashed config must still match the weights' fingerprint."""
    source, model = saved_model
    folder = tmp_path_factory.mktemp("edit") / "m"
    shutil.copytree(source, folder)
    _apply(folder, edit)
    try:
        loaded = load_pretrained(folder)
    except (ValueError, FileNotFoundError) as e:
        assert str(folder) in str(e), e  # the error names the folder and the file
        return
    assert same_model(loaded, model), edit


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tensors = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "n": torch.arange(5)}
    return save_checkpoint(folder, 3, tensors, {"note": "x", "n": 1}), tensors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=_edits({"manifest.json": ["files", "format", "version", "step", "x"]},
                   ["tensors.safetensors", "meta.json"]).filter(lambda e: not e[3] or e[0] == "manifest.json"))
def test_property_an_edited_checkpoint_loads_exactly_or_fails_clearly(saved_checkpoint, tmp_path_factory, edit):
    """Any edit of the manifest, or of a data file without re-hashing: an error naming the checkpoint, or
    exactly what was saved."""
    source, tensors = saved_checkpoint
    folder = tmp_path_factory.mktemp("edit") / source.name
    shutil.copytree(source, folder)
    _apply(folder, edit)
    try:
        ckpt = load_checkpoint(folder)
    except CheckpointError as e:
        assert str(folder) in str(e), e
        return
    assert ckpt.step == 3 and ckpt.meta == {"note": "x", "n": 1}, edit
    assert ckpt.tensors.keys() == tensors.keys() and all(torch.equal(ckpt.tensors[k], tensors[k]) for k in tensors)


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    model = debug_model()
    with torch.no_grad():
        state = model(torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))).state
    path = tmp_path_factory.mktemp("state") / "s.safetensors"
    state.save(path)
    return path, model, state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["pos", "batch_size", "fingerprint", "n_layers", "format", "sha256", "other"]),
       value=st.one_of(st.integers(-3, 1000).map(str), st.text(max_size=12)))
def test_property_an_edited_state_file_loads_exactly_or_fails_clearly(saved_state, tmp_path_factory, key, value):
    """One metadata entry of the file's header (pos, batch size, fingerprint, checksum, ...) set to a
    random value, the header rewritten well-formed."""
    source, model, state = saved_state
    path = tmp_path_factory.mktemp("edit") / source.name
    raw = source.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"][key] = value
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    try:
        loaded = type(state).load(path, model)
    except ValueError as e:
        assert str(path) in str(e), e
        return
    assert loaded.pos == state.pos and loaded.batch_size == state.batch_size, (key, value)
    a, b = loaded.tensors(), state.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
