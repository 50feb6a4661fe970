"""Several processes (torchrun, gloo on the CPU): DDP and FSDP2 give the losses of one process with the
same global batch, and a checkpoint from 2 processes resumes in 1."""

import json
import os
import subprocess
import sys

import pytest
import torch

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into deep green woods".split()
# Carried state over 4-segment documents, 2-segment backward passes, 2 accumulated: every sync path.
ARGS = ["--preset", "debug", "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--segments", "4", "--bptt",
        "2", "--accum", "2", "--val-fraction", "0.1", "--eval-every", "2", "--eval-batches", "2", "--log-every", "1",
        "--save-every", "2", "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (10,), generator=g).tolist()) for _ in range(150)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(corpus, out, *extra, nproc=1):
    launcher = [sys.executable, "-m", "titans_lnn.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "titans_lnn.cli"]
    proc = subprocess.run(launcher + ["train", "--data", str(corpus), "--out", str(out), *ARGS, *extra],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], "loss" if "loss" in r else "val_loss"): r.get("loss", r.get("val_loss")) for r in records}


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    return run(corpus, tmp_path_factory.mktemp("single") / "run")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])


def test_ddp_two_processes_match_one_and_resume_in_one(corpus, single, tmp_path):
    out = tmp_path / "ddp"
    # Stop after step 2 under DDP, then finish in a single process from that checkpoint.
    part = run(corpus, out, "--stop-at", "2", nproc=2)
    assert_same(part, {k: v for k, v in single.items() if k[0] <= 2})
    whole = run(corpus, out, "--resume")
    assert_same(whole, single)


def test_fsdp_two_processes_match_one(corpus, single, tmp_path):
    out = tmp_path / "fsdp"
    assert_same(run(corpus, out, "--distributed", "fsdp", nproc=2), single)
    from titans_lnn import TitansLNN

    assert TitansLNN.from_pretrained(out / "model").config.d_model == 32
