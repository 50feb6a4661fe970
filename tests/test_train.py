"""Training: a run learns, resumes bit for bit, stops cleanly on signals, and rejects bad input clearly."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.cli import main
from titans_lnn.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from titans_lnn.training.cli import parse_set
from titans_lnn.training.trainer import TrainConfig, Trainer, lr_factor, train

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into deep green woods".split()


@pytest.fixture
def corpus(tmp_path):
    """About 8 KB of text from a 17-word vocabulary: easy to learn, cheap to read."""
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (10,), generator=g).tolist()) for _ in range(150)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(corpus, out, **kw) -> TrainConfig:
    base = dict(model_preset="debug", data=str(corpus), out=str(out), batch_size=2, seq_len=16, steps=8,
                lr=3e-3, val_fraction=0.1, eval_batches=2, eval_every=4, save_every=100, log_every=1,
                progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(directory) -> dict:
    return TitansLNN.from_pretrained(directory).state_dict()


# ----------------------------------------------------------------------------- learning


def test_short_run_overfits_and_saves_a_loadable_model(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "run", steps=40, batch_size=4, seq_len=32, eval_every=20, lr=5e-3)
    result = train(cfg)
    assert result.stopped is None and result.step == 40
    first, last = result.losses[1], sum(result.losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.5, (first, last)
    evals = result.evals
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[0]["val_bpb"] == pytest.approx(evals[0]["val_loss"] / math.log(2))
    assert evals[0]["val_bpb"] == pytest.approx(8.0, abs=0.1)  # untrained: uniform over 256 bytes
    # The final model directory loads and computes what the trainer's model computed.
    model = TitansLNN.from_pretrained(result.model_dir)
    assert json.loads((result.model_dir / "tokenizer.json").read_text()) == {"type": "byte"}
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert ckpt.step == 40 and ckpt.meta["model_config"] == model.config.to_dict()
    assert ckpt.meta["tokenizer"] == {"type": "byte"} and ckpt.meta["train_config"]["steps"] == 40
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt.tensors[f"model.{k}"]), k
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)


def test_nucleotide_corpus_reports_bits_per_base(tmp_path):
    g = torch.Generator().manual_seed(1)
    seq = "".join("ACGT"[i] for i in torch.randint(4, (3000,), generator=g).tolist())
    fasta = tmp_path / "g.fa"
    fasta.write_text(">chr1\n" + "\n".join(seq[i:i + 60] for i in range(0, 3000, 60)) + "\n")
    result = train(config(fasta, tmp_path / "run", steps=2, segments=2))
    assert result.evals[0]["val_bits_per_base"] == pytest.approx(result.evals[0]["val_loss"] / math.log(2))
    assert TitansLNN.from_pretrained(result.model_dir).config.vocab_size == 6


def test_lr_schedule_warms_up_then_decays_by_cosine():
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10, 0.0) == 1.0


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kw", [dict(segments=1, accum=2), dict(segments=4), dict(segments=0, bptt=2)],
                         ids=["windows-accum2", "carried-4-segments", "streams-bptt2"])
def test_resume_after_stop_equals_uninterrupted_run(corpus, tmp_path, kw):
    whole = train(config(corpus, tmp_path / "whole", **kw))
    part = train(config(corpus, tmp_path / "part", stop_at=3, **kw))
    assert part.stopped == "stop_at" and part.step == 3 and part.model_dir is None
    assert part.checkpoint.name == "step-00000003"
    # stop_at is not a data setting: the resumed run may drop it.
    rest = train(config(corpus, tmp_path / "part", resume="auto", **kw))
    assert sorted(rest.losses) == list(range(4, 9))
    for s in range(1, 4):
        assert part.losses[s] == whole.losses[s]
    for s in range(4, 9):
        assert rest.losses[s] == whole.losses[s], (s, rest.losses[s], whole.losses[s])
    a, b = weights(whole.model_dir), weights(rest.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl of the resumed run reads like the uninterrupted one's.
    def lines(run):
        return [json.loads(x)["step"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert lines("part") == lines("whole")


def test_sigint_saves_a_checkpoint_and_stops(corpus, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under a background launch
    trainer = Trainer(config(corpus, tmp_path / "run", steps=50))
    step = trainer.train_step

    def step_then_signal():
        out = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    result = trainer.fit()
    assert result.stopped == "SIGINT" and result.step == 2 and result.model_dir is None
    assert load_checkpoint(result.checkpoint).step == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler was restored


def test_sigterm_to_cli_process_checkpoints_then_resume_continues(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "titans_lnn.cli", "train", "--preset", "debug", "--data", str(corpus),
           "--out", str(out), "--steps", "100000", "--batch-size", "2", "--seq-len", "16", "--val-fraction",
           "0.1", "--eval-every", "100000", "--eval-batches", "1", "--save-every", "100000", "--log-every", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"loss"' in metrics.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "stopped (SIGTERM)" in stdout + stderr
    ckpt = latest_checkpoint(out / "checkpoints")
    step = load_checkpoint(ckpt).step
    assert step >= 1
    # --resume alone takes every setting from the checkpoint; --stop-at ends it two steps later.
    proc = subprocess.run([sys.executable, "-m", "titans_lnn.cli", "train", "--out", str(out), "--resume",
                           "--stop-at", str(step + 2), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {ckpt}" in proc.stdout
    assert load_checkpoint(latest_checkpoint(out / "checkpoints")).step == step + 2


def test_corrupt_latest_checkpoint_falls_back_to_previous(corpus, tmp_path):
    run = tmp_path / "run"
    train(config(corpus, run, save_every=2, stop_at=4, keep=5))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]
    tensors = run / "checkpoints" / "step-00000004" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="step-00000004.*truncated"):
        result = train(config(corpus, run, resume="auto", save_every=2, keep=5))
    assert min(result.losses) == 3 and result.step == 8


# ----------------------------------------------------------------------------- bad input


def test_resume_with_another_model_config_is_refused(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", stop_at=1))
    cfg = config(corpus, tmp_path / "run", resume="auto", model_overrides={"d_model": 64})
    with pytest.raises(ValueError, match=r"model config differs.*d_model: checkpoint 32 vs now 64"):
        train(cfg)
    with pytest.raises(ValueError, match=r"data setup differs.*seq_len: checkpoint 16 vs now 8"):
        train(config(corpus, tmp_path / "run", resume="auto", seq_len=8))


def test_resume_with_another_tokenizer_is_refused(tmp_path):
    dna = tmp_path / "dna.txt"
    dna.write_text("ACGTTGCA" * 200)
    train(config(dna, tmp_path / "run", stop_at=1, tokenizer="byte"))
    with pytest.raises(ValueError, match=r"model config differs.*vocab_size: checkpoint 256 vs now 6"):
        train(config(dna, tmp_path / "run", resume="auto", tokenizer="nucleotide"))
    with pytest.raises(ValueError, match=r"tokenizer ByteTokenizer\(\).*NucleotideTokenizer\(\)"):
        train(config(dna, tmp_path / "run", resume="auto", tokenizer="nucleotide",
                      model_overrides={"vocab_size": 256}))


def test_existing_checkpoints_need_resume(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", stop_at=1))
    with pytest.raises(FileExistsError, match="already holds checkpoints: pass --resume"):
        train(config(corpus, tmp_path / "run"))


def test_cli_missing_and_empty_data_files(tmp_path, capsys):
    args = ["train", "--preset", "debug", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt' is neither a built-in corpus" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(args + ["--data", str(tmp_path / "empty.txt")]) == 2
    assert "empty.txt: empty file" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("too short")
    assert main(args + ["--data", str(tmp_path / "short.txt")]) == 2
    assert "too small for batch_size=8, seq_len=256" in capsys.readouterr().err


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), r"TrainConfig.batch_size=0 is invalid: expected an integer >= 1"),
    (dict(segments=2, bptt=3), r"TrainConfig.bptt=3 is invalid: expected at most segments=2"),
    (dict(lr=0.0), r"TrainConfig.lr=0.0 is invalid: expected a number in \(0, inf\)"),
    (dict(min_lr_ratio=2), r"TrainConfig.min_lr_ratio=2 is invalid: expected a number in \[0, 1\]"),
    (dict(variant="gpt"), r"TrainConfig.variant='gpt' is invalid: expected None or one of mac"),
    (dict(model_preset="huge"), r"TrainConfig.model_preset='huge' is invalid: expected one of debug"),
    (dict(model_overrides={"d_modle": 3}), r"model_overrides=.* unknown: d_modle"),
    (dict(model_overrides={"window": 0}), r"model_overrides=.*TitansLNNConfig.window=0 is invalid"),
    (dict(dtype="fp16"), r"TrainConfig.dtype='fp16' is invalid: expected auto, fp32 or bf16"),
    (dict(val_fraction=1.5), r"TrainConfig.val_fraction=1.5 is invalid"),
    (dict(warmup=-1), r"TrainConfig.warmup=-1 is invalid"),
], ids=["batch", "bptt", "lr", "min-lr", "variant", "preset", "unknown-field", "bad-field", "dtype", "val",
        "warmup"])
def test_config_validation_names_field_value_and_expectation(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_cli_config_file_set_and_flags_precedence(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 7\nlr = 0.01\nseq_len = 64\n[model_overrides]\nd_model = 64\nmem_chunk = 8\n')
    assert main(["train", "--config", str(toml), "--lr", "0.02", "--set", "mem_chunk=4", "--set", "variant=x",
                 "--print-config"]) == 2
    assert "model_overrides" in capsys.readouterr().err  # variant goes through --variant
    assert main(["train", "--config", str(toml), "--lr", "0.02", "--set", "mem_chunk=4", "--variant", "mag",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["steps"], cfg["lr"], cfg["seq_len"], cfg["variant"]) == (7, 0.02, 64, "mag")
    assert cfg["model_overrides"] == {"d_model": 64, "mem_chunk": 4}
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 5\nbogus: 1\n")
    assert main(["train", "--config", str(yaml_file), "--print-config"]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err
    assert parse_set(["a=1", "b=true", "c=mag", "d=1e-3"]) == {"a": 1, "b": True, "c": "mag", "d": 1e-3}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_set(["d_model"])


def test_cli_train_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model-preset", "--variant", "--set", "--data", "--tokenizer", "--steps", "--batch-size",
                 "--seq-len", "--segments", "--bptt", "--lr", "--warmup", "--grad-clip", "--accum",
                 "--eval-every", "--save-every", "--keep", "--out", "--resume", "--seed", "--distributed"):
        assert flag in text


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_activation_checkpointing_gives_the_plain_gradients_in_float64(variant):
    """forward(..., checkpoint_len=n) == the plain pass: the loss and every parameter's gradient, in float64."""
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant)).double()
    ids, labels = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))

    def grads(**kw):
        model.zero_grad()
        loss = model(ids, labels=labels, **kw).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, plain), (loss_ck, ckpt) = grads(), grads(checkpoint_len=7)
    assert loss_ck == pytest.approx(loss, rel=1e-13, abs=0) and plain.keys() == ckpt.keys()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_activation_checkpointing_trains_the_same_model(corpus, tmp_path):
    """--checkpoint-len recomputes activations in the backward pass: the same gradients, so the same weights."""
    plain = train(config(corpus, tmp_path / "plain", steps=3, seq_len=24, eval_every=3))
    ckpt = train(config(corpus, tmp_path / "ckpt", steps=3, seq_len=24, eval_every=3, checkpoint_len=7))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = weights(plain.model_dir), weights(ckpt.model_dir)
    for name in a:  # fp32: pieces of 7 tokens sum in another order (measured: 1.5e-5 at most after 3 Adam steps)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="checkpoint_len"):
        config(corpus, tmp_path / "bad", checkpoint_len=0)
