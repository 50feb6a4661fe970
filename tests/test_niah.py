"""The main job's command at toy sizes: it trains both models, evaluates, and writes its outputs."""

import json

import pytest
import torch
from titans_lnn.evals.niah import niah_config, passkey_batch, train_passkey
from titans_lnn.evals.runner import evaluate_task

from titans_lnn import TitansLNN
from titans_lnn.cli import main
from titans_lnn.tokenizers import ByteTokenizer


def test_passkey_batch_labels_only_the_answer():
    import random

    x, y = passkey_batch(3, 300, 300, random.Random(0))
    assert x.shape == y.shape and x.dtype == torch.long
    for row_x, row_y in zip(x, y):
        mask = row_y >= 0
        assert 5 <= int(mask.sum()) <= 7  # the space, five digits, the full stop
        target = bytes(row_y[mask].tolist()).decode()
        assert target.strip(" .").isdigit()
        # aligned labels: the label at t is the input at t + 1
        idx = mask.nonzero()[:-1, 0]
        assert torch.equal(row_y[idx], row_x[idx + 1])


def test_niah_command_writes_outputs(tmp_path, capsys):
    out = tmp_path / "niah"
    assert main(["niah", "--steps", "2", "--lengths", "320,400", "--depths", "0.5", "--out", str(out),
                 "--no-progress", "--chunk-len", "64"]) == 0
    for name in ("hybrid", "baseline"):
        records = json.loads((out / name / "results.json").read_text())["records"]
        assert len(records) == 2 and {r["length"] for r in records} == {320, 400}
        assert (out / name / "heatmap.png").stat().st_size > 0
        assert (out / name / "model" / "config.json").exists()
    assert "Passkey retrieval accuracy" in (out / "summary.md").read_text()
    assert "outputs:" in capsys.readouterr().out
    # --reuse loads what the first run saved instead of training again
    assert main(["niah", "--reuse", "--lengths", "320", "--depths", "0", "--out", str(out), "--no-progress"]) == 0


@pytest.mark.slow
def test_hybrid_learns_to_retrieve_beyond_its_window():
    """The capability the package exists for: the main job's hybrid, trained for a few minutes on a CPU
    at 260-2048 tokens, answers passkeys placed about 2K tokens back, 30x its attention window (chance
    for a 5-digit key: 1e-5), streaming the prompt through its fixed-size state."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = TitansLNN(niah_config("mal"))
    losses = train_passkey(model, 600, seed=0, progress=False)
    assert sum(losses[-20:]) / 20 < 1.0, losses[-20:]  # uniform digits: ~1.7
    model.eval()
    records = evaluate_task(model, ByteTokenizer(), "passkey", [2048], [0.1, 0.3, 0.5, 0.7], samples=3, seed=1000,
                            chunk_len=512, progress=False)
    accuracy = sum(r["correct"] for r in records) / len(records)
    assert accuracy >= 0.5, [(r["depth"], r["expected"], r["got"]) for r in records]


def test_baseline_has_the_hybrids_size():
    hybrid, baseline = (TitansLNN(niah_config(v)).num_parameters() for v in ("mal", "swa"))
    assert abs(baseline - hybrid) / hybrid < 0.02, (hybrid, baseline)
    assert "memory" not in niah_config("swa").parts and niah_config("swa").window == niah_config("mal").window
