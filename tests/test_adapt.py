"""titans_lnn.adapt: SVF experts (Transformer²), their training, dispatch and streaming composition.

Small debug-preset models on the CPU; the demonstration itself is ``titans-lnn adapt demo``.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.adapt import SVF, Classifier, Expert, LoRA, cem_mixture, classifier_dispatch, prompt_features
from titans_lnn.adapt.dispatch import few_shot_score, label_scores, prompt_dispatch, prompt_scores
from titans_lnn.adapt.svf import target_layers
from titans_lnn.adapt.train import adapter_loss, frozen, train_svf
from titans_lnn.cli import main


def make_model(seed: int = 0, variant: str = "mac", dtype=torch.float32, **overrides) -> TitansLNN:
    torch.manual_seed(seed)
    return TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant, **overrides)).to(dtype).eval()


def random_z(svf: SVF, seed: int, spread: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 1 + spread * (2 * torch.rand(R, generator=g) - 1) for n, R in svf.sizes().items()}


def ids_of(seed: int, shape=(2, 37)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- decomposition and experts


@pytest.mark.parametrize("variant", ["mac", "lmm", "swa"])
def test_z_one_reproduces_the_base_model_exactly(variant):
    model = make_model(variant=variant)
    ids = ids_of(1)
    with torch.no_grad():
        ref = model(ids).logits
        svf = SVF(model)
        svf.apply(svf.expert(svf.ones(), "identity"))
        assert torch.equal(model(ids).logits, ref)
        got = torch.func.functional_call(model, svf.weights(svf.ones()), (ids,)).logits
    assert torch.equal(got, ref)


def test_default_targets_are_every_mlp_and_custom_targets_work():
    model = make_model()
    assert list(SVF(model).layers) == [f"blocks.{i}.mlp.{w}" for i in range(2) for w in ("w13", "w2")]
    wo = next(n for n, _ in model.named_modules() if n.startswith("blocks.0.") and n.endswith("attn.wo"))
    svf = SVF(model, ("mlp.w2", wo))
    assert list(svf.layers) == [wo, "blocks.0.mlp.w2", "blocks.1.mlp.w2"]
    ids = ids_of(2)
    with torch.no_grad():
        ref = model(ids).logits
        svf.apply(svf.expert(svf.ones(), "identity"))
        assert torch.equal(model(ids).logits, ref)


def test_adapted_weight_is_u_diag_sz_vt():
    model = make_model(dtype=torch.float64)
    svf = SVF(model)
    z = random_z(svf, 3)
    for name, layer in svf.layers.items():
        u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
        torch.testing.assert_close(svf.weight(name, z[name]), (u * (s * z[name].double())) @ vh, rtol=0, atol=1e-12)


def test_apply_and_remove_are_exact_and_never_redecompose(monkeypatch):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svf = SVF(model)
    a, b = svf.expert(random_z(svf, 1), "a"), svf.expert(random_z(svf, 2), "b")
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("re-decomposed"))
    ids = ids_of(4)
    with torch.no_grad():
        svf.apply(b)
        only_b = model(ids).logits
        svf.apply(a)
        assert svf.active is a
        assert not torch.equal(model(ids).logits, only_b)
        svf.apply(b)  # switching from a to b == applying b to the base
        assert torch.equal(model(ids).logits, only_b)
        with svf.applied(a):
            assert svf.active is a
        assert svf.active is b  # the scoped expert is undone, the one before restored
        svf.remove()
    assert svf.active is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_expert_round_trip(tmp_path):
    model = make_model()
    svf = SVF(model)
    expert = svf.expert(random_z(svf, 5), "dna", task="dna", steps=60)
    path = expert.save(tmp_path / "dna.safetensors")
    loaded = Expert.load(path)
    assert (loaded.name, loaded.fingerprint, loaded.weights_digest, loaded.targets, loaded.meta) == (
        "dna", model.fingerprint, svf.weights_digest, ("mlp.w13", "mlp.w2"), {"task": "dna", "steps": "60"})
    assert list(loaded.z) == list(expert.z)
    for name in expert.z:
        assert torch.equal(loaded.z[name], expert.z[name])
    ids = ids_of(6)
    with torch.no_grad():
        svf.apply(expert)
        ref = model(ids).logits
        svf.apply(loaded)
        assert torch.equal(model(ids).logits, ref)
    # A fresh SVF of a reloaded copy of the model accepts it too (the digest is of the weights, not the object).
    other = make_model()
    SVF(other).check_expert(loaded)


def test_mix_is_the_weighted_sum_of_z():
    svf = SVF(make_model())
    a, b = svf.expert(random_z(svf, 1), "a"), svf.expert(random_z(svf, 2), "b")
    m = svf.mix([a, b], [0.25, 1.5])
    for name in a.z:
        torch.testing.assert_close(m.z[name], 0.25 * a.z[name] + 1.5 * b.z[name])
    assert torch.equal(svf.mix([a, b], [1.0, 0.0]).z[next(iter(a.z))], a.z[next(iter(a.z))])
    with pytest.raises(ValueError, match="one alpha per expert: got 1 alphas for 2 experts"):
        svf.mix([a, b], [1.0])


# ----------------------------------------------------------------------------- bad inputs


def test_z_of_the_wrong_size_or_layers_is_refused():
    svf = SVF(make_model())
    z = svf.ones()
    z["blocks.0.mlp.w2"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"z\['blocks.0.mlp.w2'\] has shape \(5,\): expected \(32,\)"):
        svf.weights(z)
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.w2'\]"):
        svf.weights({k: v for k, v in svf.ones().items() if k != "blocks.1.mlp.w2"})
    z = svf.ones()
    z["blocks.0.mlp.w13"][3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        svf.expert(z, "bad")
    with pytest.raises(TypeError, match="floating-point"):
        svf.weights({k: v.long() for k, v in svf.ones().items()})


def test_expert_of_another_model_is_refused(tmp_path):
    model = make_model(seed=0)
    expert = SVF(model).expert(SVF(model).ones(), "e")
    other_config = make_model(seed=0, window=16)  # same shapes, another config
    with pytest.raises(ValueError, match=f"config fingerprint {model.fingerprint}; this model's is "
                                         f"{other_config.fingerprint}"):
        SVF(other_config).apply(expert)
    other_weights = make_model(seed=1)  # same config, other weights: other singular vectors
    with pytest.raises(ValueError, match="made for other weights"):
        SVF(other_weights).apply(Expert.load(expert.save(tmp_path / "e.safetensors")))
    wider = make_model(d_model=64)
    with pytest.raises(ValueError, match="config fingerprint"):
        SVF(wider).check_expert(expert)


def test_bad_files_and_targets_are_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format='pt': expected 'titans-lnn-svf-expert'"):
        Expert.load(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        Expert.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such expert file"):
        Expert.load(tmp_path / "missing.safetensors")
    model = make_model()
    with pytest.raises(ValueError, match="target 'mlp.w4' matches no module"):
        target_layers(model, ("mlp.w4",))
    with pytest.raises(ValueError, match="selects blocks.0.mlp, a SwiGLU: expected nn.Linear"):
        target_layers(model, ("mlp",))


def test_weights_changed_after_decomposition_are_noticed():
    model = make_model()
    svf = SVF(model)
    with torch.no_grad():
        model.blocks[0].mlp.w2.weight.add_(0.01)
    with pytest.raises(RuntimeError, match=r"blocks.0.mlp.w2.weight changed since the decomposition"):
        svf.apply(svf.expert(svf.ones(), "e"))


# ----------------------------------------------------------------------------- training


def teacher_batches(model: TitansLNN, svf: SVF, z: dict, seed: int):
    """Batches labelled by the model with ``z`` applied (its argmax): a task an SVF expert can solve exactly."""
    def batch(step: int):
        ids = ids_of(1000 * seed + step, (4, 24))
        with torch.no_grad():
            labels = torch.func.functional_call(model, svf.weights(z), (ids,)).logits.argmax(-1)
        return ids, labels
    return batch


@pytest.mark.parametrize("objective", ["ce", "pg"])
def test_gradients_reach_only_z(objective):
    model = make_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    svf = SVF(model)
    z = svf.ones(requires_grad=True)
    ids, labels = teacher_batches(model, svf, random_z(svf, 7, 2.0), 0)(0)
    with frozen(model):
        adapter_loss(model, svf.weights(z), ids, labels, objective=objective, kl_coef=0.1,
                     generator=torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z.values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_train_svf_learns_a_planted_expert_and_leaves_the_model_alone():
    model = make_model(init_std=0.3)  # peaked predictions: the teacher's labels differ from the base's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svf = SVF(model)
    planted = random_z(svf, 8, 2.0)
    batches = teacher_batches(model, svf, planted, 1)
    expert = train_svf(svf, batches, 30, name="planted", lr=0.2)
    ids, labels = batches(99)  # a batch never trained on
    with torch.no_grad():
        base, teacher, learned = (adapter_loss(model, svf.weights(z), ids, labels).item()
                                  for z in (svf.ones(), planted, expert.z))
    assert learned < base - 0.5 * (base - teacher), (base, teacher, learned)  # most of the gap closed
    assert expert.meta["objective"] == "ce" and expert.name == "planted"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="objective='sgd' is invalid"):
        train_svf(svf, batches, 1, name="x", objective="sgd")


def test_lora_starts_as_the_base_and_counts_its_parameters():
    model = make_model()
    lora = LoRA(model, rank=2)
    ids = ids_of(9)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(model, lora.weights(), (ids,)).logits,
                                   model(ids).logits, rtol=0, atol=0)
    expected = sum(2 * (layer.weight.shape[0] + layer.weight.shape[1]) for layer in lora.layers.values())
    assert lora.num_parameters() == expected


# ----------------------------------------------------------------------------- dispatch


def planted_prompts(seed: int, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """Two toy tasks the first pass can tell apart: low bytes [0, 64) vs high bytes [192, 256)."""
    g = torch.Generator().manual_seed(seed)
    prompts, targets = [], []
    for i in range(n):
        k = i % 2
        T = int(torch.randint(20, 50, (1,), generator=g))
        prompts.append(torch.randint(0, 64, (T,), generator=g) + 192 * k)
        targets.append(k)
    return prompts, targets


def test_classifier_dispatch_picks_the_planted_task(tmp_path):
    model = make_model()
    prompts, targets = planted_prompts(0, 24)
    clf = Classifier.fit(prompt_features(model, prompts), torch.tensor(targets), ["low", "high"],
                         fingerprint=model.fingerprint)
    held, truth = planted_prompts(1, 20)
    assert classifier_dispatch(model, clf, held) == truth
    loaded = Classifier.load(clf.save(tmp_path / "clf.safetensors"))
    assert classifier_dispatch(model, loaded, held) == truth
    with pytest.raises(ValueError, match="fitted on features of a model with fingerprint"):
        classifier_dispatch(make_model(window=16), loaded, held)


def test_cem_mixture_finds_the_expert_that_made_the_data():
    model = make_model(init_std=0.3)  # peaked predictions: the experts' labels differ
    svf = SVF(model)
    experts = [svf.expert(random_z(svf, s, 2.0), f"e{s}") for s in (11, 12, 13)]
    for k, expert in enumerate(experts):
        ids, labels = teacher_batches(model, svf, expert.z, 5)(0)
        result = cem_mixture(svf, experts, few_shot_score(svf, ids, labels), seed=k)
        assert max(range(3), key=lambda j: result.alphas[j]) == k, result.alphas
        assert result.alphas[k] > 0.7, result.alphas  # close to the planted one-hot mixture
        assert result.history == sorted(result.history)  # the best score never decreases
        assert svf.active is None


def test_prompt_dispatch_scores_labels_as_separate_passes_would():
    model = make_model()
    prompt = ids_of(14, (1, 30))[0]
    labels = ["dna", "a question", "pass key"]
    got = label_scores(model, prompt, labels, template=": ", max_len=20)
    for k, label in enumerate(labels):  # each label scored alone, without padding
        ids = torch.tensor(prompt[-20:].tolist() + list(b": ") + list(label.encode()))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        n = len(label)
        want = logp[-n:].gather(1, ids[0, -n:, None]).mean()
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)
    assert prompt_dispatch(model, [prompt], labels, template=": ", max_len=20) == [int(got.argmax())]
    prior = label_scores(model, torch.tensor(list(b"N/A")), labels, template=": ", max_len=20)
    assert prompt_dispatch(model, [prompt], labels, template=": ", max_len=20, calibrate=True) == [
        int((got - prior).argmax())]
    torch.testing.assert_close(prompt_scores(model, [prompt, prompt], labels, template=": ", max_len=20,
                                             calibrate=True), torch.stack([got - prior] * 2))
    with pytest.raises(ValueError, match="at least two task names"):
        prompt_dispatch(model, [prompt], ["only"])
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a non-empty 1-D integer tensor"):
        prompt_dispatch(model, [torch.zeros(2, 3, dtype=torch.long)], labels)


# ----------------------------------------------------------------------------- streaming


def test_switching_experts_mid_stream_keeps_the_state_valid():
    """The state holds what was read (attention cache, liquid and memory state), not the MLP weights:
    switching experts between pieces gives exactly what a model with the new weights does from that state,
    and streaming under an expert still equals one pass."""
    model = make_model(dtype=torch.float64)
    svf = SVF(model)
    a, b = svf.expert(random_z(svf, 21), "a"), svf.expert(random_z(svf, 22), "b")
    ids = ids_of(23, (2, 50))
    with torch.no_grad():
        svf.apply(a)
        first = model(ids[:, :23])
        kept = {k: v.clone() for k, v in first.state.named_tensors().items()}
        svf.apply(b)  # switch mid-stream
        assert all(torch.equal(v, kept[k]) for k, v in first.state.named_tensors().items())
        model.check_state(first.state, 2)
        second = model(ids[:, 23:], state=first.state)
        streamed = model.stream(ids[:, 23:], chunk_len=7, state=first.state, logits="all")
        merged = copy.deepcopy(model)  # an independent model whose weights simply are b's
        svf.remove()
        assert not torch.equal(model(ids[:, 23:], state=first.state).logits, second.logits)
        want = merged(ids[:, 23:], state=first.state)
    assert torch.equal(second.logits, want.logits)
    torch.testing.assert_close(streamed.logits, second.logits, rtol=1e-10, atol=1e-10)
    assert second.state.pos == 50


# ----------------------------------------------------------------------------- command line


def test_cli_show_and_train(tmp_path, capsys):
    model = make_model()
    model.save_pretrained(tmp_path / "model")
    svf = SVF(model)
    svf.expert(random_z(svf, 31), "e", task="toy").save(tmp_path / "e.safetensors")
    assert main(["adapt", "show", str(tmp_path / "e.safetensors"), "--model", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "expert 'e': 4 layers, 128 parameters" in out and "task: toy" in out and "fits" in out
    make_model(seed=3).save_pretrained(tmp_path / "other")
    assert main(["adapt", "show", str(tmp_path / "e.safetensors"), "--model", str(tmp_path / "other")]) == 1
    assert "made for other weights" in capsys.readouterr().err
    assert main(["adapt", "show", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["adapt", "train", "--model", str(tmp_path / "model"), "--task", "passkey", "--out",
                 str(tmp_path / "p.safetensors"), "--steps", "2", "--batch-size", "2", "--eval-rows", "2"]) == 0
    assert Expert.load(tmp_path / "p.safetensors").meta["task"] == "passkey"
    with pytest.raises(SystemExit):
        main(["adapt", "train", "--model", "x", "--task", "chess", "--out", "y"])
    capsys.readouterr()
    assert main(["adapt", "train", "--model", str(tmp_path / "model"), "--task", "dna", "--out", "y",
                 "--targets", "mlp.w9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--targets: target 'mlp.w9' matches no module" in err[0]


def test_task_rows_and_prompts():
    from titans_lnn.adapt.tasks import Task, qa_row, row_scores

    ids, labels = qa_row("passkey", 300, seed=5, depth=0.5)
    text = bytes(ids.tolist()).decode()
    answer = bytes(labels[labels != -100].tolist()).decode()
    assert answer.strip(" .").isdigit() and answer.strip(" .") in text  # the key, stated in the needle
    assert bytes(Task.prompt(ids, labels).tolist()).decode().endswith("What is the pass key? The pass key is")
    every = torch.arange(10)
    assert torch.equal(Task.prompt(every, every), every[:5])  # language modelling: the first half decides
    model = make_model()
    scores = row_scores(model, [(ids, labels)], ("exact match", "answer bits per byte"))
    assert scores["exact match"] == [0.0] and 0 < scores["answer bits per byte"][0] < 20
    with pytest.raises(ValueError, match="metric='accuracy' is invalid"):
        row_scores(model, [(ids, labels)], ("accuracy",))
