"""The main job's command at toy sizes: it trains both models, evaluates, and writes its outputs."""

import json

import torch
from titans_lnn.evals.niah import passkey_batch

from titans_lnn.cli import main


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
