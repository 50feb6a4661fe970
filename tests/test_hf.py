"""The Hugging Face wrapper (titans_lnn.hf) against our own model, offline, on tiny saved models:
AutoModelForCausalLM loads a TitansLNN.save_pretrained folder, its logits are ours, its greedy
generate() is ours token for token with the fixed-size state as the cache, and what it saves we load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from titans_lnn import TitansLNN, TitansLNNConfig  # noqa: E402
from titans_lnn.hf import TitansLNNCache, TitansLNNForCausalLM, TitansLNNHFConfig  # noqa: E402

VARIANTS = ("mac", "mag", "mal", "swa", "lmm")


def _saved(tmp_path, variant="mac", seed=0):
    """A random debug-preset model and the folder it was saved to."""
    torch.manual_seed(seed)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant)).eval()
    model.save_pretrained(tmp_path / variant)
    return model, tmp_path / variant


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _prompt(B=2, T=13, seed=1):
    # T = 13 spans more than one attention window (8) and MAC segment, and is no multiple of the memory chunk (4).
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_model_loads_our_folder_with_our_logits(tmp_path, variant):
    model, path = _saved(tmp_path, variant)
    hf = _load(path)
    assert isinstance(hf, TitansLNNForCausalLM) and hf.model.config == model.config
    ids = _prompt()
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_equals_ours_reading_one_token_per_step(tmp_path, variant):
    model, path = _saved(tmp_path, variant)
    hf = _load(path)
    lengths = []
    hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    ids = _prompt()
    out = hf.generate(ids, max_new_tokens=20, do_sample=False)
    # The prompt once through forward; then one-token decode steps (titans_lnn.decode), never forward:
    # the state carries everything.
    assert lengths == [ids.shape[1]]
    # Ours on the very weights transformers loaded (its tensors sit unaligned in the safetensors map,
    # so the original model's logits differ in the last bit and could break an exact tie).
    assert torch.equal(out, hf.model.generate(ids, 20, temperature=0))
    wrapped = TitansLNNForCausalLM.from_model(model)  # the original's own tensors: exactly ours
    out = wrapped.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, model.generate(ids, 20, temperature=0))


def test_cache_continues_a_sequence_like_one_pass(tmp_path):
    model, path = _saved(tmp_path)
    hf = _load(path)
    ids = _prompt(T=21)
    with torch.no_grad():
        first = hf(ids[:, :9])
        cache = first.cache if "cache" in first else first.past_key_values
        assert isinstance(cache, TitansLNNCache) and cache.get_seq_length() == 9
        rest = hf(ids[:, 9:], attention_mask=torch.ones_like(ids), **{"cache" if "cache" in first else
                                                                       "past_key_values": cache})
        whole = model(ids).logits
    assert cache.get_seq_length() == 21  # updated in place, as transformers' caches are
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole, atol=1e-5, rtol=0)


def test_generate_continues_from_a_returned_cache(tmp_path):
    model, path = _saved(tmp_path)
    hf = _load(path)
    ids = _prompt()
    first = hf.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = first["cache"] if "cache" in first else first["past_key_values"]
    assert cache.get_seq_length() == ids.shape[1] + 4  # the last token is chosen, not yet read
    key = "cache" if "cache" in first else "past_key_values"
    more = hf.generate(first.sequences, max_new_tokens=6, do_sample=False, **{key: cache})
    assert torch.equal(more, hf.model.generate(ids, 11, temperature=0))


def test_labels_follow_transformers_convention(tmp_path):
    model, path = _saved(tmp_path)
    hf = _load(path)
    ids = _prompt()
    ids[0, 5] = 7
    labels = ids.clone()
    labels[0, 5] = -100  # ignored, as in transformers
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # ours: targets already shifted
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, labels=labels).loss, model(ids, labels=shifted).loss, atol=1e-5, rtol=0)


def test_beam_search_reorders_the_state_like_recomputing_without_cache():
    # init_std 0.2: logits sharp enough that beams which kept a wrong row's state would pick other tokens
    # (checked: with reorder_cache a no-op this test fails).
    torch.manual_seed(0)
    hf = TitansLNNForCausalLM.from_model(TitansLNN(TitansLNNConfig.from_preset("debug", init_std=0.2)).eval())
    ids = _prompt()
    beams = dict(max_new_tokens=8, do_sample=False, num_beams=4, num_return_sequences=2)
    cached = hf.generate(ids, **beams)
    assert torch.equal(cached, hf.generate(ids, use_cache=False, **beams))  # every step reads the whole sequence


def test_padding_is_refused_clearly(tmp_path):
    _, path = _saved(tmp_path)
    hf = _load(path)
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="padding"):
        hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 5\)"):
        hf(ids, attention_mask=mask[:, :5])


def test_sampling_several_sequences_per_prompt(tmp_path):
    _, path = _saved(tmp_path)
    hf = _load(path)
    ids = _prompt()
    torch.manual_seed(0)
    out = hf.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=3)
    assert out.shape == (6, ids.shape[1] + 6)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(3, 0))


def test_hf_save_is_our_format_and_round_trips(tmp_path):
    model, path = _saved(tmp_path, "mag")
    hf = _load(path)
    hf.save_pretrained(tmp_path / "again")
    ours = TitansLNN.from_pretrained(tmp_path / "again")  # verified manifest and fingerprint
    assert ours.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert isinstance(_load(tmp_path / "again"), TitansLNNForCausalLM)


def test_loading_refuses_weights_of_another_config(tmp_path):
    _, path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["mem_chunk"] = 2  # same shapes, another function
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fingerprint"):
        _load(path)
    config["d_model"] = 64  # other shapes
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match="do not fit the config|mismatch"):  # transformers' own
        _load(path)


def test_config_wraps_ours_with_its_validation(tmp_path):
    ours = TitansLNNConfig.from_preset("debug", variant="mal")
    config = TitansLNNHFConfig.from_titans_config(ours)
    assert config.to_titans_config() == ours
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("titans_lnn", 32, 2)
    with pytest.raises(ValueError, match="d_model"):
        TitansLNNHFConfig(d_model=30, n_heads=4)
    _, path = _saved(tmp_path, "mal")
    loaded = AutoConfig.from_pretrained(path, local_files_only=True)
    assert isinstance(loaded, TitansLNNHFConfig) and loaded.to_titans_config() == ours


def test_readme_example_runs_offline_and_titans_lnn_alone_never_imports_transformers(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import torch
        import titans_lnn
        assert "transformers" not in sys.modules, "import titans_lnn imported transformers"
        from titans_lnn import TitansLNN, TitansLNNConfig
        TitansLNN(TitansLNNConfig.from_preset("debug")).save_pretrained({str(tmp_path / "ckpt")!r})

        import titans_lnn.hf  # registers model_type "titans_lnn"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        ids = model.generate(torch.tensor([[72, 105, 33]]), max_new_tokens=8, do_sample=False)
        print(ids.shape[1])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "11"


def test_built_from_config_with_our_init_and_generate_refuses_dt(tmp_path):
    config = TitansLNNHFConfig.from_titans_config(TitansLNNConfig.from_preset("debug", variant="mag"))
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(3)
    ours = TitansLNN(config.to_titans_config())  # transformers' init hooks leave our init alone
    for name, tensor in ours.state_dict().items():
        assert torch.equal(hf.model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="dt"):
        hf.generate(_prompt(), dt=torch.ones(2, 13), max_new_tokens=2, do_sample=False)
