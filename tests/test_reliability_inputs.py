"""Issue 13's reproducers for inputs: bad arguments, flags and data fail with one clear line.

Each test is one item's reproducer (the issue's numbering in the test name): generated ids, config
values, sampling arguments, command-line flags and data files are checked before any work starts, and
the error names the bad value and what was expected. Saved files are in test_reliability_files.py.
"""

import math
from pathlib import Path

import pytest
import torch
from reliability_helpers import debug_model, flip_bytes

from titans_lnn import TitansLNNConfig
from titans_lnn.cli import main
from titans_lnn.generation import sample
from titans_lnn.pretrained import save_pretrained
from titans_lnn.tokenizers import get_tokenizer
from titans_lnn.training.data import load_corpus, read_fasta

# ----------------------------------------------------------------------------- 6. generated ids


@pytest.mark.parametrize("dtype,vocab", [(torch.uint8, 1000), (torch.int16, 70_000), (torch.int32, 300)])
def test_6_generate_returns_int64_ids_of_the_whole_vocabulary(dtype, vocab):
    model = debug_model(vocab_size=vocab)
    with torch.no_grad():  # make the largest ids the likeliest
        model.embed.weight[-5:] *= 50
    prompt = torch.tensor([[1, 2, 3]], dtype=dtype)
    ids = model.generate(prompt, 8, temperature=0.0)
    assert ids.dtype == torch.int64 and ids[0, :3].tolist() == [1, 2, 3]
    logits = model(ids[:, :-1]).logits
    assert ids[0, 3:].tolist() == logits[0, 2:].argmax(-1).tolist()  # greedy, never wrapped
    assert int(ids.max()) >= 256 > 0 <= int(ids.min())


# ----------------------------------------------------------------------------- 8. config values


@pytest.mark.parametrize("field,value,message", [
    ("init_std", math.inf, "init_std=inf is invalid: expected a finite number"),
    ("mem_max_lr", math.inf, "mem_max_lr=inf is invalid: expected a finite number"),
    ("liquid_tau_max", math.inf, "liquid_tau_max=inf is invalid: expected a finite number"),
    ("rope_theta", math.inf, "rope_theta=inf is invalid: expected a finite number"),
    ("norm_eps", math.nan, "norm_eps=nan is invalid"),
    ("n_persistent", True, "n_persistent=True is invalid: expected an integer"),
    ("mem_depth", False, "mem_depth=False is invalid: expected an integer"),
    ("mem_gate_context", 1, "mem_gate_context=1 is invalid: expected true or false"),
    ("mlp_mult", 0.01, "mlp_mult=0.01 is invalid: expected a multiple of d_model=32 giving a feed-forward width"),
    ("mem_chunk", 10 ** 9, "mem_chunk=1000000000 is invalid: expected at most 4096"),
    ("window", 10 ** 9, "window=1000000000 is invalid: expected at most"),
    ("variant", None, "variant=None is invalid"),
    ("mem_max_grad_norm", "2", "mem_max_grad_norm='2' is invalid: expected a finite number or None"),
])
def test_8_config_values_are_checked(field, value, message):
    with pytest.raises(ValueError) as info:
        TitansLNNConfig.from_preset("debug", **{field: value})
    assert message in str(info.value)


def test_8_unknown_preset_overrides_are_named():
    with pytest.raises(ValueError, match=r"unknown TitansLNNConfig fields \['dmodel'\]"):
        TitansLNNConfig.from_preset("debug", dmodel=3)


def test_8_from_dict_rejects_what_is_not_a_config():
    with pytest.raises(TypeError, match="got NoneType, expected a dict"):
        TitansLNNConfig.from_dict(None)
    fields = TitansLNNConfig.from_preset("debug").to_dict()
    assert TitansLNNConfig.from_dict(fields) == TitansLNNConfig.from_preset("debug")


# ----------------------------------------------------------------------------- 9. sampling arguments


@pytest.mark.parametrize("kw,message", [
    (dict(top_k=0), "top_k=0 is invalid"), (dict(top_k=-1), "top_k=-1 is invalid"),
    (dict(top_k=1.5), "top_k=1.5 is invalid"), (dict(top_k=True), "top_k=True is invalid"),
    (dict(temperature=math.nan), "temperature=nan is invalid"), (dict(temperature=-1), "temperature=-1"),
    (dict(temperature=math.inf), "temperature=inf is invalid"), (dict(top_p=0), "top_p=0 is invalid"),
    (dict(top_p=math.nan), "top_p=nan is invalid"), (dict(max_new_tokens=1.5), "max_new_tokens=1.5 is invalid"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1 is invalid"),
])
def test_9_sampling_arguments_are_checked(kw, message):
    model = debug_model()
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model.generate(torch.tensor([[1, 2]]), **kw)


def test_9_sample_handles_tiny_temperatures_and_bad_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample(logits, temperature=1e-30).item() == 1  # no overflow to inf / NaN
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample(torch.tensor([[math.nan, 0.0]]), temperature=1.0)
    with pytest.raises(ValueError, match=r"logits must be a float tensor \(batch, vocab\)"):
        sample(torch.zeros(3), temperature=1.0)


# ----------------------------------------------------------------------------- 10. command line


@pytest.mark.parametrize("argv,flag", [
    (["demo", "--piece", "0"], "--piece"), (["demo", "--length", "-5"], "--length"),
    (["demo", "--preset", "huge"], "--preset"), (["demo", "--variant", "gpt"], "--variant"),
    (["eval", "passkey", "--preset", "debug", "--samples", "0"], "--samples"),
    (["eval", "passkey", "--preset", "debug", "--lengths", ""], "--lengths"),
    (["eval", "passkey", "--preset", "debug", "--depths", ""], "--depths"),
    (["eval", "passkey", "--preset", "debug", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "passkey", "--preset", "debug", "--seed", "-1"], "--seed"),
    (["eval", "passkey", "--preset", "debug", "--val-fraction", "nan"], "--val-fraction"),
    (["eval", "passkey", "--preset", "debug", "--device", "gpu"], "--device"),
    (["eval", "passkey", "--preset", "huge"], "--preset"),
    (["eval", "passkey", "--checkpoint", "nope"], "--checkpoint"),
    (["eval", "genomics", "--preset", "debug", "--data", "nope.fa"], "--data"),
    (["train", "--steps", "0"], "--steps"), (["train", "--lr", "nan"], "--lr"),
    (["train", "--warmup", "-1"], "--warmup"), (["train", "--beta2", "1"], "--beta2"),
    (["train", "--save-every", "0"], "--save-every"), (["train", "--val-fraction", "1"], "--val-fraction"),
])
def test_10_bad_flags_fail_in_one_line_with_exit_2(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert f"argument {flag}" in err[-1] and "error:" in err[-1]
    assert not (tmp_path / "eval-results").exists()  # no work started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_10_train_on_a_missing_device_is_a_clear_error(capsys, tmp_path):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TrainConfig.device='cuda' is invalid here: CUDA is not available" in err[0]
    assert not (tmp_path / "r").exists()


def test_10_any_subcommand_given_a_damaged_or_missing_model_fails_in_one_line(tmp_path, capsys):
    save_pretrained(debug_model(), tmp_path / "m")
    flip_bytes(tmp_path / "m" / "model.safetensors", 10)
    for folder in (tmp_path / "m", tmp_path / "nope"):
        assert main(["stability", "--checkpoint", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("titans-lnn stability: error: ") and str(folder) in err[0]


def test_10_a_broken_subcommand_module_fails_loudly(monkeypatch, capsys):
    import importlib

    import titans_lnn.cli as cli

    real = importlib.import_module

    def broken(name, *args):
        if name == "titans_lnn.evals.cli":
            raise ModuleNotFoundError("No module named 'titans_lnn.evals.tasks_v2'", name="titans_lnn.evals.tasks_v2")
        if name == "titans_lnn.stability":
            raise ModuleNotFoundError("No module named 'scipy'", name="scipy")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="tasks_v2"):
        cli.build_parser()
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {k: v for k, v in cli._SUBCOMMANDS.items() if k != "eval"})
    assert main(["stability", "--variant", "mac"]) == 2  # listed, and says what is missing
    assert "needs the package 'scipy'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 12. data


def test_12_fasta_folder_with_a_readme_is_not_silently_text(tmp_path):
    (tmp_path / "a.fa").write_text(">a\nACGT\n")
    (tmp_path / "README.md").write_text("# genomes\n")
    with pytest.raises(ValueError, match=r"mixes FASTA files \(1\) with other files \(README.md\)"):
        load_corpus(tmp_path)
    assert load_corpus(tmp_path, "byte").tokenizer.name == "byte"  # an explicit choice is honoured
    with pytest.raises(ValueError, match=r"README.md: nucleotide tokenizer: invalid character '#'"):
        load_corpus(tmp_path, "nucleotide")  # and a tokenizer error names the file


def test_12_lone_cr_fasta_reads_and_long_lines_are_clipped_in_errors(tmp_path):
    path = tmp_path / "cr.fa"
    path.write_bytes(b">one\rACGT\rAC\r>two\rGG\r")
    assert [(r.name, r.seq) for r in read_fasta(path)] == [("one", "ACGTAC"), ("two", "GG")]
    path.write_bytes(b">" + b"x" * 20_000 + b"\n")
    with pytest.raises(ValueError) as info:
        read_fasta(path)
    assert len(str(info.value)) < 400 and "20,000 characters" in str(info.value)
    path.write_bytes(b"ACGT" * 5000)
    with pytest.raises(ValueError) as info:
        read_fasta(path)
    assert len(str(info.value)) < 400 and "before the first '>' header" in str(info.value)


def test_12_nul_bytes_are_not_text(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\x00" * 50_000)
    with pytest.raises(ValueError, match=r"zeros.txt:1: a NUL byte \(offset 0\): a binary file"):
        load_corpus(tmp_path / "zeros.txt")


def test_12_eval_genomics_warns_on_a_few_bases_and_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "three.fa").write_text(">r\nACG\n")
    argv = ["eval", "genomics", "--preset", "debug", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv + ["--data", str(tmp_path / "three.fa")]) == 0
    assert "warning: " in capsys.readouterr().err
    (tmp_path / "bad.fa").write_text(">r\nACGTXX\n")
    assert main(argv + ["--data", str(tmp_path / "bad.fa")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.fa:2: invalid character 'X'" in err[0]


def test_12_nucleotide_encode_error_names_the_file(tmp_path):
    (tmp_path / "dna.txt").write_text("ACGT ACGT")
    with pytest.raises(ValueError, match=r"dna.txt: nucleotide tokenizer: invalid character ' '"):
        load_corpus(tmp_path / "dna.txt", get_tokenizer("nucleotide"))



def test_the_adversarial_probe_finds_nothing_raw_silent_or_lost(monkeypatch):
    """tests/reliability_probe.py's attempts (the issue's kinds), every group."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reliability_probe", Path(__file__).with_name("reliability_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    results = probe.probe()
    assert sum(sum(c.values()) for c in results.values()) >= 150
    bad = {group: {k: n for k, n in counts.items() if k != "clear"} for group, counts in results.items()}
    assert not any(bad.values()), bad
