"""The evaluation runner (streamed prompts, greedy answers, task sweeps), the reports and the
``titans-lnn eval`` command on the debug model at tiny sizes."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.cli import main
from titans_lnn.evals.cli import parse_count, parse_depths, parse_lengths
from titans_lnn.evals.genomics import evaluate_genomics
from titans_lnn.evals.perplexity import bits_by_position, position_edges
from titans_lnn.evals.runner import (
    answer,
    evaluate_mqar,
    evaluate_task,
    greedy_continue,
    load_model,
    max_new_tokens_for,
    stream_nll,
    stream_prompt,
)
from titans_lnn.evals.tasks import TASKS
from titans_lnn.tokenizers import get_tokenizer


def debug_model(variant: str = "mac", vocab_size: int = 256, dtype=torch.float64) -> TitansLNN:
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant, vocab_size=vocab_size))
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return debug_model()


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("variant", ["mac", "mag", "swa"])
@pytest.mark.parametrize("chunk_len", [1, 7, 16, 63, 1000], ids=lambda c: f"chunk{c}")
def test_stream_prompt_equals_one_pass(variant, chunk_len):
    model = debug_model(variant)
    ids = torch.randint(0, 256, (2, 63), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids)
    last, state = stream_prompt(model, ids, chunk_len=chunk_len)
    torch.testing.assert_close(last, whole.logits[:, -1], rtol=1e-9, atol=1e-9)
    assert state.pos == 63
    # The carried state continues exactly as the one-pass state does.
    nxt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        ref = model(nxt, state=whole.state).logits
        got = model(nxt, state=state).logits
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_stream_prompt_accepts_1d_numpy_and_rejects_bad_input(model):
    ids = np.arange(40, dtype=np.uint8)
    last, _ = stream_prompt(model, ids, chunk_len=9)
    assert last.shape == (1, 256)
    with pytest.raises(ValueError, match="chunk_len"):
        stream_prompt(model, ids, chunk_len=0)
    with pytest.raises(ValueError, match="non-empty"):
        stream_prompt(model, np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize("chunk_len", [1, 8, 64, 65, 500])
def test_stream_nll_equals_full_pass_log_probs(model, chunk_len):
    ids = torch.randint(0, 256, (1, 65), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits, -1)  # (1, T, V)
    ref = -logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]  # (T - 1,)
    starts, nlls, greedy = zip(*stream_nll(model, ids, chunk_len))
    got = torch.cat(nlls, 1)[0]
    assert starts[0] == 1 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(greedy, 1)[0], logp[0, :-1].argmax(-1) == ids[0, 1:])


def test_answer_is_greedy_generation(model):
    tok = get_tokenizer("byte")
    prompt = "The grass is green. What is the pass key? The pass key is"
    got = answer(model, tok, prompt, max_new_tokens=6, chunk_len=16)
    assert isinstance(got, str)
    ids = torch.from_numpy(tok.encode(prompt).astype(np.int64))[None]
    ref = model.generate(ids, 6, temperature=0.0)[0, ids.shape[1]:]
    assert got == tok.decode(ref)
    assert answer(model, tok, prompt, max_new_tokens=0) == ""


def test_greedy_continue_cuts_at_the_first_stop_string(counter_model):
    model, tok = counter_model, get_tokenizer("byte")
    last, state = stream_prompt(model, tok.encode("xyza"), chunk_len=3)
    assert greedy_continue(model, tok, last, state, 8) == "bcdefghi"
    assert greedy_continue(model, tok, last, state, 8, stop=["fg", "de", "zz"]) == "bc"
    assert greedy_continue(model, tok, last, state, 8, stop=["never"]) == "bcdefghi"
    assert answer(model, tok, "xyza", 5, chunk_len=2, stop=["e"]) == "bcd"


def test_every_task_has_a_generation_budget():
    for task in TASKS:
        assert max_new_tokens_for(task) >= 8
    with pytest.raises(ValueError, match="unknown task"):
        max_new_tokens_for("nope")


# ----------------------------------------------------------------------------- task sweeps


def test_evaluate_task_records(model):
    tok = get_tokenizer("byte")
    seen = []
    records = evaluate_task(model, tok, "niah_single_1", lengths=[400, 500], depths=[0.0, None], samples=2, seed=5,
                            chunk_len=64, progress=False, on_record=seen.append)
    assert records == seen and len(records) == 2 * 2 * 2
    assert [(r["length"], r["depth"], r["sample"], r["seed"]) for r in records[:4]] == [
        (400, 0.0, 0, 5), (400, 0.0, 1, 6), (400, None, 0, 5), (400, None, 1, 6)]
    for r in records:
        assert r["n_tokens"] <= r["length"] and isinstance(r["got"], str) and 0.0 <= r["score"] <= 1.0
        assert r["correct"] == (r["score"] == 1.0) and r["seconds"] >= 0
        assert r["expected"].isdigit() and len(r["expected"]) == 7
        assert 0.0 <= r["needle_depth"] <= 1.0
    assert records[0]["needle_depth"] == 0.0
    assert records[0]["expected"] == records[4]["expected"]  # one key per seed, across lengths


def test_evaluate_task_babilong_ignores_depths(model):
    records = evaluate_task(model, get_tokenizer("byte"), "babilong_qa1", lengths=[700], depths=[0.0, 1.0],
                            progress=False)
    assert len(records) == 1 and records[0]["depth"] is None


class _OracleMQAR(torch.nn.Module):
    """Remembers the key-value pairs at the start of an MQAR sequence and answers each later key with
    its value: 100% accuracy, whatever the chunking, if the runner reads the positions right."""

    def __init__(self, vocab_size: int, num_kv_pairs: int):
        super().__init__()
        self.config = TitansLNNConfig.from_preset("debug", vocab_size=vocab_size)
        self.n = num_kv_pairs
        self.embed = torch.nn.Embedding(1, 1)  # where stream_pieces finds the device

    stream_pieces = TitansLNN.stream_pieces  # the model's own streaming, over this forward

    def forward(self, input_ids, state=None, dt=None):
        B, T = input_ids.shape
        pos, tables, last = state if state is not None else (0, [{} for _ in range(B)], [None] * B)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                p, x = pos + t, int(input_ids[b, t])
                if p < 2 * self.n and p % 2 == 1:  # a value: its key came just before
                    tables[b][last[b]] = x
                elif p >= 2 * self.n and x in tables[b]:
                    logits[b, t, tables[b][x]] = 1.0
                last[b] = x
        return SimpleNamespace(logits=logits, state=(pos + T, tables, last))


@pytest.mark.parametrize("chunk_len", [7, 64, 4096])
def test_evaluate_mqar_reads_answer_positions(chunk_len):
    oracle = _OracleMQAR(vocab_size=64, num_kv_pairs=8)
    records = evaluate_mqar(oracle, lengths=[64, 96], num_kv_pairs=[8], samples=3, chunk_len=chunk_len,
                            progress=False, batch_size=2)
    assert len(records) == 6
    assert all(r["score"] == 1.0 and r["correct_answers"] == 8 for r in records)


def test_evaluate_mqar_on_the_debug_model(model):
    records = evaluate_mqar(model, lengths=[32, 64], num_kv_pairs=[4, 8, 16], samples=3, chunk_len=16,
                            progress=False)
    # 16 pairs do not fit in 32 or 64 tokens (4 * pairs <= length): skipped.
    assert {(r["length"], r["num_kv_pairs"]) for r in records} == {(32, 4), (32, 8), (64, 4), (64, 8), (64, 16)}
    assert all(0 <= r["correct_answers"] <= r["answers"] == r["num_kv_pairs"] for r in records)
    with pytest.raises(ValueError, match="no valid"):
        evaluate_mqar(model, lengths=[16], num_kv_pairs=[8], progress=False)


# ----------------------------------------------------------------------------- bits vs position


def test_position_edges():
    assert position_edges(100) == [0, 100]
    assert position_edges(5000) == [0, 128, 1024, 5000]
    assert position_edges(1024) == [0, 128, 1024]


def test_bits_by_position_equals_one_pass(model):
    tokens = np.random.default_rng(0).integers(11, 256, 300).astype(np.uint8)
    tokens[[50, 200]] = 10  # two separators, left out below
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    with torch.no_grad():
        nll = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")  # (T - 1,)
    keep = ids[0, 1:] != 10
    res = bits_by_position(model, tokens, chunk_len=37, edges=[0, 100, 300], ignore_ids=[10], progress=False)
    assert res["tokens"] == 297 and [b["tokens"] for b in res["bins"]] == [98, 199]
    assert math.isclose(res["nll_sum"], float(nll[keep].sum()), rel_tol=1e-9)
    first = nll[:99][keep[:99]].mean() / math.log(2)
    assert math.isclose(res["bins"][0]["bits"], float(first), rel_tol=1e-9)


def test_evaluate_genomics_on_a_user_fasta(tmp_path):
    fasta = tmp_path / "two.fa"
    fasta.write_text(">a\nACGTACGTAA\nCCGG\n>b\nTTTTGGGGCA\n")
    model, tok = load_model(preset="debug", tokenizer="nucleotide")
    res = evaluate_genomics(model, tok, fasta, chunk_len=5, progress=False)
    assert res["tokens"] == 14 + 10 - 1  # all bases but the first; the separator is read, not scored
    assert [name.rsplit(":", 1)[1] for name in res["records"]] == ["a", "b"] and 1.0 < res["bits"] < 4.0


# ----------------------------------------------------------------------------- the command line


def test_parse_lengths_and_depths():
    assert parse_lengths("1k,4k,1m,1.5k,300") == [1024, 4096, 1 << 20, 1536, 300]
    assert parse_count("2K") == 2048
    assert parse_depths("0,0.25,50%,random,1") == [0.0, 0.25, 0.5, None, 1.0]
    for bad in ("0", "-1", "1.3", "x", "1.0001k"):
        with pytest.raises(Exception, match="not"):
            parse_count(bad)
    with pytest.raises(Exception, match="outside"):
        parse_depths("1.5")


def test_cli_eval_passkey_writes_report(tmp_path, capsys):
    out = tmp_path / "passkey"
    rc = main(["eval", "passkey", "--preset", "debug", "--lengths", "256,512", "--depths", "0,0.5,1",
               "--samples", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    assert data["meta"]["task"] == "passkey" and data["meta"]["config"]["d_model"] == 32
    assert sorted((r["length"], r["depth"]) for r in records) == [
        (n, d) for n in (256, 512) for d in (0.0, 0.5, 1.0)]
    for r in records:
        assert r["task"] == "passkey" and len(r["expected"]) == 5 and isinstance(r["got"], str)
        assert set(r) >= {"length", "depth", "expected", "got", "correct", "score", "seconds"}
    table = (out / "results.md").read_text()
    assert "| 256 |" in table and "| 512 |" in table and "50%" in table
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert str(out / "results.json") in printed and str(out / "heatmap.png") in printed


def test_cli_eval_checkpoint_and_babilong(tmp_path):
    model = debug_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "qa"
    assert main(["eval", "babilong_qa2", "--checkpoint", str(tmp_path / "model"), "--lengths", "1k",
                 "--samples", "2", "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 and all(r["depth"] is None for r in records)
    assert not (out / "heatmap.png").exists()  # no depth axis for BABILong


def test_cli_eval_mqar(tmp_path):
    out = tmp_path / "mqar"
    assert main(["eval", "mqar", "--preset", "debug", "--lengths", "64,128", "--num-kv-pairs", "4,8",
                 "--samples", "4", "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 * 2 * 4
    assert "8 pairs" in (out / "results.md").read_text() and (out / "heatmap.png").exists()


def test_cli_eval_genomics(tmp_path):
    out = tmp_path / "dna"
    assert main(["eval", "genomics", "--preset", "debug", "--max-tokens", "2000", "--chunk-len", "512",
                 "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["data"] == "ecoli-ec590" and data["tokenizer"] == "nucleotide" and data["tokens"] == 1999
    assert sum(b["tokens"] for b in data["bins"]) == 1999
    assert 1.5 < data["bits"] < 3.5  # random weights over 6 tokens: about log2(6) = 2.58
    assert "bits per base" in (out / "results.md").read_text() and (out / "bits.png").exists()


@pytest.mark.parametrize("source", ["kjv", "file"])
def test_cli_eval_perplexity(tmp_path, source):
    out = tmp_path / "ppl"
    args = ["eval", "perplexity", "--preset", "debug", "--max-tokens", "2000", "--out", str(out), "--no-progress"]
    if source == "file":
        text = tmp_path / "book.txt"
        text.write_text("In the beginning was the word. " * 20)
        args += ["--data", str(text)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    n = 1999 if source == "kjv" else len("In the beginning was the word. " * 20) - 1
    assert data["tokens"] == n and math.isclose(data["bits_per_byte"], data["bits"], rel_tol=1e-12)
    assert 7.0 < data["bits"] < 9.0  # random weights over 256 bytes: about 8


@pytest.mark.parametrize("title", ["passkey, hybrid (mal)", "passkey, hybrid (mal): " + "a title too long to fit " * 4],
                         ids=["short", "long"])
def test_heatmap_of_a_small_grid_keeps_title_and_labels_inside(title, tmp_path):
    """One depth x two lengths makes a narrow figure; its wrapped title and labels must still fit."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    from titans_lnn.evals import report

    records = [{"length": n, "depth": 0.5, "score": s} for n, s in ((1024, 1.0), (4096, 0.0))]
    fig, ax = report._heatmap_figure(records)
    report._lay_out(fig, ax, title)
    fig.draw_without_rendering()
    for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
        box, edge = text.get_window_extent(), fig.bbox
        assert edge.x0 <= box.x0 and box.x1 <= edge.x1 and edge.y0 <= box.y0 and box.y1 <= edge.y1, text.get_text()
    plt.close(fig)
    # The written PNG: nothing drawn touches its edges (a clipped title would).
    pixels = matplotlib.image.imread(report.heatmap(records, tmp_path / "heatmap.png", title))[..., :3]
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    assert border.min() > 0.99
