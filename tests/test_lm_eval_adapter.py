"""The lm-eval adapter on the debug model: its three methods against one full forward pass, and
local tasks (YAML + a JSON-lines file in tmp_path) run offline through ``lm_eval.simple_evaluate``."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from titans_lnn import TitansLNN, TitansLNNConfig  # noqa: E402
from titans_lnn.evals.lm_eval_adapter import TitansLNNLM  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug")).double().eval()
    return TitansLNNLM(model=model, tokenizer="byte", chunk_len=5, progress=False)


def full_logprobs(lm, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``text``'s bytes: (ids (T,), log-probs (T, V) of the next token at each position)."""
    ids = torch.tensor(list(text.encode()), dtype=torch.long)
    with torch.no_grad():
        return ids, F.log_softmax(lm.model(ids[None]).logits[0], -1)


def direct_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    context = context or "\n"  # the prefix an empty context stands for
    ids, logp = full_logprobs(lm, context + continuation)
    n = len(context.encode())
    pred, target = logp[n - 1:-1], ids[n:]
    return float(pred.gather(-1, target[:, None]).sum()), bool((pred.argmax(-1) == target).all())


def req(kind: str, *args) -> Instance:
    return Instance(kind, doc={}, arguments=args, idx=0)


PAIRS = [("The grass is", " green"), ("The grass is", " blue and the sky is green"), ("", "hello"),
         ("abc  ", "def"), ("x", "y")]


def test_loglikelihood_equals_a_full_pass(lm):
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in PAIRS])
    for (ctx, cont), (logprob, greedy) in zip(PAIRS, got):
        ref, ref_greedy = direct_loglikelihood(lm, ctx, cont)
        assert math.isclose(logprob, ref, rel_tol=1e-9), (ctx, cont)
        assert greedy == ref_greedy and logprob < 0


def test_loglikelihood_shared_context_state_is_not_disturbed(lm):
    alone = lm.loglikelihood([req("loglikelihood", "The grass is", " green")])
    together = lm.loglikelihood([req("loglikelihood", "The grass is", c) for c in (" red", " green", " blue")])
    assert math.isclose(alone[0][0], together[1][0], rel_tol=1e-12)


def test_loglikelihood_is_greedy_for_the_greedy_continuation():
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", vocab_size=6)).double().eval()
    dna = TitansLNNLM(model=model, tokenizer="nucleotide", chunk_len=3, progress=False)  # ASCII: A C G T N \n
    ctx = "ACGTTGCAAC"
    cont = dna.generate_until([req("generate_until", ctx, {"max_gen_toks": 6})])[0]
    assert len(cont) == 6
    assert dna.loglikelihood([req("loglikelihood", ctx, cont)])[0][1]
    other = next(c for c in "ACGT" if c != cont[0])
    assert not dna.loglikelihood([req("loglikelihood", ctx, other + cont[1:])])[0][1]


@pytest.mark.parametrize("text", ["a", "Hello, world.", "In the beginning God created the heaven and the earth. " * 4])
def test_loglikelihood_rolling_equals_a_full_pass(lm, text):
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    ids, logp = full_logprobs(lm, "\n" + text)
    ref = float(logp[:-1].gather(-1, ids[1:, None]).sum())
    assert math.isclose(got, ref, rel_tol=1e-9)


def test_generate_until_is_greedy(lm):
    ctx = "The pass key is"
    (free,) = lm.generate_until([req("generate_until", ctx, {"until": [], "max_gen_toks": 12})])
    ids = torch.tensor([list(ctx.encode())])
    ref = lm.model.generate(ids, 12, temperature=0.0)[0, ids.shape[1]:]
    assert free == lm.tokenizer.decode(ref)


def test_generate_until_stops(counter_model):
    counter = TitansLNNLM(model=counter_model, tokenizer="byte", chunk_len=2, progress=False)
    got = counter.generate_until([req("generate_until", "xyza", {"until": ["de", "zz"], "max_gen_toks": 9}),
                                  req("generate_until", "a", {"until": "d"}),
                                  req("generate_until", "a", {"max_gen_toks": 3}),
                                  req("generate_until", "", {"until": ["never"], "max_gen_toks": 2})])
    assert got == ["bc", "bc", "bcd", "\x0b\x0c"]  # an empty context is the prefix "\n" (byte 10)


def test_registered_and_built_from_an_arg_string(tmp_path):
    from lm_eval.api.registry import get_model

    torch.manual_seed(0)
    TitansLNN(TitansLNNConfig.from_preset("debug")).save_pretrained(tmp_path / "m")
    cls = get_model("titans-lnn")
    assert cls is TitansLNNLM
    lm = cls.create_from_arg_string(f"pretrained={tmp_path / 'm'},chunk_len=7",
                                    {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    assert lm.chunk_len == 7 and lm.tokenizer.name == "byte"


def write_tasks(tmp_path) -> None:
    rows = [{"question": "The grass is", "choices": [" green", " blue"], "label": 0,
             "text": "In the beginning God created the heaven and the earth.", "answer": "green"},
            {"question": "The sky is", "choices": [" green", " blue"], "label": 1,
             "text": "And the earth was without form, and void.", "answer": "blue"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              f"  cache_dir: {tmp_path / 'hf-cache'}\ntest_split: test\n")
    (tmp_path / "mc.yaml").write_text(
        "task: titans_local_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "ppl.yaml").write_text(
        "task: titans_local_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    (tmp_path / "gen.yaml").write_text(
        "task: titans_local_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: answer\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")


def test_local_tasks_through_simple_evaluate(lm, tmp_path):
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["titans_local_mc", "titans_local_ppl", "titans_local_gen"],
                                  task_manager=manager, bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert res["titans_local_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    bpb = res["titans_local_ppl"]["bits_per_byte,none"]
    assert 6.0 < bpb < 10.0  # random weights over 256 bytes: about 8 bits per byte
    assert res["titans_local_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
