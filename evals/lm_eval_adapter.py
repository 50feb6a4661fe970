"""EleutherAI lm-eval adapter: a TitansLNN as an ``lm_eval.api.model.LM``, with no context limit.

Every input is streamed through the model with its state carried (no truncation, no windows):

- ``loglikelihood``: the context is read once per distinct context (its state reused by each of
  its continuations, e.g. the choices of a multiple-choice question), then each continuation is
  scored: (sum of log-probs, whether greedy decoding gives it).
- ``loglikelihood_rolling``: one pass over the whole document, summing every token's log-prob,
  where lm-eval's ``HFLM`` cuts a long document into windows of ``max_length``.
- ``generate_until``: greedy decoding with the fixed-size state as the cache, cut at the first stop
  string of ``until``, at most ``max_gen_toks`` tokens.

An empty context, and the start of a rolling document, is conditioned on ``prefix`` (default a
newline, the separator between the documents the package's corpora are trained on), as ``HFLM``
conditions on its EOS token. Trailing spaces of a context move to the continuation, as in lm-eval.

    import lm_eval
    from titans_lnn.evals.lm_eval_adapter import TitansLNNLM
    lm = TitansLNNLM(pretrained="runs/tiny/model")
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])   # tasks need their data offline

or, after importing this module (which registers the name), ``--model titans-lnn --model_args
pretrained=DIR,chunk_len=4096``. Needs ``pip install lm-eval`` (imported when this module is).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from titans_lnn.evals.runner import greedy_continue, load_model, stream_nll, stream_prompt
from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import Tokenizer, get_tokenizer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("titans_lnn.evals.lm_eval_adapter needs EleutherAI's lm-eval: pip install lm-eval "
                      "(or pip install 'titans-lnn[lmeval]')") from e

__all__ = ["TitansLNNLM"]


@register_model("titans-lnn", "titans_lnn")
class TitansLNNLM(LM):
    """``pretrained``: a save_pretrained directory (or ``model`` and ``tokenizer`` objects, or
    ``preset`` for random weights); ``chunk_len``: tokens per forward pass while streaming;
    ``max_gen_toks``: default generation budget; ``prefix``: text an empty context stands for.
    ``batch_size`` / ``max_batch_size`` are accepted for lm-eval's command line and ignored:
    requests run one at a time, each in fixed memory."""

    def __init__(self, pretrained: str | os.PathLike | None = None, *, model: TitansLNN | None = None,
                 tokenizer: str | Tokenizer | None = None, preset: str | None = None, variant: str = "mac",
                 device: str | None = None, chunk_len: int | str = 2048, max_gen_toks: int | str = 256,
                 prefix: str = "\n", batch_size: int | str | None = None, max_batch_size: int | None = None,
                 progress: bool = True):
        super().__init__()
        device = device or "cpu"
        if model is not None:
            if pretrained is not None or preset is not None:
                raise ValueError("give one of model, pretrained or preset")
            self.model = model.eval()
            self.tokenizer = get_tokenizer(tokenizer or "byte")
        else:
            self.model, self.tokenizer = load_model(pretrained, preset=preset, variant=variant, tokenizer=tokenizer,
                                                    device=device)
        self.chunk_len, self.max_gen_toks, self.progress = int(chunk_len), int(max_gen_toks), progress
        self.prefix_ids = [int(i) for i in self.tokenizer.encode(prefix)]
        if not self.prefix_ids:
            raise ValueError(f"prefix {prefix!r} encodes to no tokens")
        self._device = next(self.model.parameters()).device

    @property
    def device(self) -> torch.device:
        return self._device

    # Tokens.
    def tok_encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them: trailing spaces move to the
        continuation, the whole is encoded and split (so subword merges across the join stay)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return list(self.prefix_ids), self.tok_encode(continuation)
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        if whole[:len(ctx)] != ctx or len(whole) == len(ctx):  # the tokenizer merged across the join
            return ctx, self.tok_encode(continuation)
        return ctx, whole[len(ctx):]

    # Scoring.
    def _score(self, last_logits: torch.Tensor, state, ids: list[int]) -> tuple[float, bool]:
        """log p(ids | what the state has read, last_logits) and whether each token is the argmax."""
        logprob, greedy = 0.0, True
        for _, nll, hit in stream_nll(self.model, ids, self.chunk_len, state=state, prev_logits=last_logits):
            logprob -= float(nll.double().sum())
            greedy = greedy and bool(hit.all())
        return logprob, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            by_context[tuple(ctx)].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for ctx, members in by_context.items():
            last, state = stream_prompt(self.model, list(ctx), self.chunk_len)
            for i in members:
                cont = pairs[i][1]
                results[i] = self._score(last, state, cont) if cont else (0.0, True)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
                bar.update(1)
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or not self.progress):
            (text,) = req.args
            ids = self.prefix_ids + self.tok_encode(text)
            total = 0.0
            P = len(self.prefix_ids)
            if len(ids) > P:
                for start, nll, _ in stream_nll(self.model, ids, self.chunk_len):
                    total -= float(nll[0, max(P - start, 0):].double().sum())  # score the text, not the prefix
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or not self.progress):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) if context else list(self.prefix_ids)
            last, state = stream_prompt(self.model, ids, self.chunk_len)
            text = greedy_continue(self.model, self.tokenizer, last, state, max_toks, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
