"""Dynamic evaluation: a genome read by a network that keeps training on the bases it has already scored.

Krause et al. 2018 ("Dynamic evaluation of neural sequence models"): the sequence is read in blocks; each
block is first scored by the current weights (its next-base log-probabilities are kept as they are), then one
optimiser step is taken on that block's loss, and the next block is read with the updated weights. So the
network adapts to the genome it reads (its composition, its genes, its repeats: a context of millions of
bases held in the weights), and no base is ever predicted by weights that were trained on it. The streaming
state (attention cache, liquid and memory state) is carried from block to block, cut from the autograd graph.

    python -m titans_lnn.evals.genomics --checkpoint runs/dna/model --dynamic-eval 3e-5
    titans-lnn eval genomics --checkpoint runs/dna/model --dynamic-eval 3e-5 --dynamic-block 512

Block t's loss is the mean over its bases predicted from inside the block (the prediction of the block's
first base came from the block before, with the weights before that block's step); the loss is the quantity
scored (for k-mer tokens the log-softmax over the tokens that can follow, :func:`~titans_lnn.evals.genomics.
candidate_ids`), in nats. At ``lr = 0`` the readings equal a plain streamed pass in blocks of ``block``.
The caller's model is not changed (a copy adapts).

On the ``dna`` model (README), EC590's first 300,000 bases: plain 1.9165 bits/base; Adam lr 1e-5 / 3e-5 / 3e-4 /
1e-3 / 3e-3 per 512 bases 1.9143 / 1.9139 / 1.9231 / 1.9470 / 1.9729; Adam 3e-5 per 256 bases 1.9139; SGD 0.03 /
0.1 / 0.3 1.9151 / 1.9211 / 1.9429; Adam 1e-4 / 3e-4 with decay 0.01 / 0.05 1.9148 / 1.9161: a small step (Adam
3e-5) is best, larger ones forget more of the training genome than they learn of this one. Reading costs ~3x a
plain pass (a backward and a step per block: 342 CPU-s for all of EC590, one thread).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from titans_lnn.model import TitansLNN
from titans_lnn.tokenizers import Tokenizer

if TYPE_CHECKING:
    from titans_lnn.evals.genomics import GenomeReading

__all__ = ["OPTIMIZERS", "dynamic_base_logprobs", "read_genome_dynamic", "add_dynamic_arguments", "dynamic_name",
           "cached_dynamic"]

OPTIMIZERS = ("adam", "sgd")


def _block_logp(logits: torch.Tensor, pick: torch.Tensor, start: int) -> torch.Tensor:
    """(L, 4) natural-log p(A, C, G, T) from ``logits`` (L, V) of the tokens from ``start``: ``pick`` (4,) the
    base ids in the whole vocabulary, or (N, C) the ids that can follow each token (renormalised over them)."""
    if pick.dim() == 1:
        return torch.log_softmax(logits, dim=-1)[:, pick]  # (L, 4)
    rows = pick[start:start + logits.shape[0]]  # (L, C)
    return torch.log_softmax(logits.gather(1, rows), dim=-1)[:, :4]  # (L, 4)


def dynamic_base_logprobs(model: TitansLNN, tokens: np.ndarray, ids: np.ndarray, bases: np.ndarray, *,
                          lr: float, block: int = 512, optimizer: str = "adam", decay: float = 0.0,
                          progress: bool = True) -> np.ndarray:
    """(N, 4) float32: row t the natural-log probabilities of A, C, G, T at position t, having read
    ``tokens[:t]`` (N,), by a copy of ``model`` that takes one ``optimizer`` step of learning rate ``lr`` after
    each block of ``block`` tokens is scored (module docstring); row 0 is log(1/4). After each step the weights
    move ``decay`` (in [0, 1]) of the way back to the model's own (Krause et al.'s decay to the prior: what was
    learnt on DNA in general is kept while the weights follow the genome being read).

    ``ids`` as :func:`~titans_lnn.evals.genomics.stream_base_logprobs` ((4,) or (N, C)); ``bases`` (N,) 0..3 for
    A, C, G, T and anything else for bases neither scored nor learnt from (N, separators)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr={lr!r} is invalid: expected a learning rate >= 0")
    if not isinstance(block, int) or isinstance(block, bool) or block < 2:
        raise ValueError(f"block={block!r} is invalid: expected a whole number of tokens >= 2 (a block learns from "
                         f"the bases it predicts from inside itself)")
    if not (isinstance(decay, (int, float)) and 0 <= decay <= 1):
        raise ValueError(f"decay={decay!r} is invalid: expected a fraction in [0, 1]")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is invalid: expected one of {', '.join(OPTIMIZERS)}")
    tokens, bases = np.asarray(tokens), np.asarray(bases)
    if bases.shape != tokens.shape:
        raise ValueError(f"bases has shape {bases.shape}: expected {tokens.shape}, one per token")
    net = copy.deepcopy(model).eval()
    device = net.embed.weight.device
    params = [p for p in net.parameters() if p.requires_grad]
    prior = [p.detach().clone() for p in params]
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr))
    x = torch.from_numpy(tokens.astype(np.int64))[None]  # (1, N)
    target = torch.from_numpy(bases.astype(np.int64))  # (N,)
    pick = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    n = x.shape[1]
    if pick.dim() == 2 and pick.shape[0] != n:
        raise ValueError(f"ids has shape {tuple(pick.shape)}: expected (4,) or ({n}, C), a row per token")
    out = np.full((n, 4), -math.log(4), dtype=np.float32)
    from tqdm.auto import tqdm

    state = None
    with torch.enable_grad(), tqdm(total=n, unit="tok", unit_scale=True, desc="dynamic eval", disable=not progress,
                                   leave=False) as bar:
        for s in range(0, n, block):
            res = net(x[:, s:s + block].to(device), state=state)
            logp = _block_logp(res.logits[0].float(), pick, s)  # (L, 4): row i predicts base s + 1 + i
            L = logp.shape[0]
            out[s + 1:s + 1 + L] = logp[:n - s - 1].detach().cpu().numpy()  # scored BEFORE the step below
            state = res.state.detach()
            inner = target[s + 1:s + L].to(device)  # (L - 1,) the bases predicted from inside this block
            keep = inner < 4
            if bool(keep.any()):  # also at lr 0: the same path, a step of zero
                loss = -logp[:L - 1][keep].gather(1, inner[keep, None]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if decay > 0:
                    with torch.no_grad():
                        torch._foreach_lerp_(params, prior, decay)
            bar.update(L)
    return out


def add_dynamic_arguments(p: argparse.ArgumentParser) -> None:
    """The dynamic-evaluation flags (:mod:`~titans_lnn.evals.dynamic_eval`), shared with ``titans-lnn eval``."""
    from titans_lnn.cli import integer, number

    p.add_argument("--dynamic-eval", type=number(0, math.inf, open_hi=True), metavar="LR",
                   help="read the genome with dynamic evaluation: after each block is scored, one optimiser step "
                        "of this learning rate on it (e.g. 3e-5 with adam), so no base is predicted by weights that "
                        "saw it (titans-lnn eval genomics: the figures reported; python -m titans_lnn.evals.genomics: "
                        "more rows beside the plain network's)")
    p.add_argument("--dynamic-block", type=integer(2), default=512, help="bases per dynamic-evaluation step "
                                                                         "(default: 512)")
    p.add_argument("--dynamic-optimizer", choices=OPTIMIZERS, default="adam",
                   help="the dynamic evaluation's optimiser (default: adam)")
    p.add_argument("--dynamic-decay", type=number(0, 1), default=0.0,
                   help="after each step move the weights this fraction back to the model's own (default: 0)")


def dynamic_name(args: argparse.Namespace) -> str:
    """The row name of a dynamic evaluation with ``args``' settings."""
    decay = f", decay {args.dynamic_decay:g}" if args.dynamic_decay else ""
    return (f"network, dynamic evaluation ({args.dynamic_optimizer} lr {args.dynamic_eval:g} per "
            f"{args.dynamic_block} bases{decay})")


def read_genome_dynamic(model: TitansLNN, tokenizer: Tokenizer, data: str | os.PathLike | None, *,
                        max_tokens: int | None, lr: float, block: int = 512, optimizer: str = "adam",
                        decay: float = 0.0, progress: bool = True) -> GenomeReading:
    """:func:`~titans_lnn.evals.genomics.read_genome` with dynamic evaluation (:func:`dynamic_base_logprobs`)."""
    from titans_lnn.evals.genomics import candidate_ids, load_genome

    reading, tokens = load_genome(tokenizer, data, max_tokens=max_tokens)
    logp = dynamic_base_logprobs(model, tokens, candidate_ids(tokenizer, tokens), reading.bases, lr=lr, block=block,
                                 optimizer=optimizer, decay=decay, progress=progress)
    return reading._replace(logp=logp)


def cached_dynamic(args: argparse.Namespace, model: TitansLNN, tok: Tokenizer) -> np.ndarray:
    """(N, 4) the dynamic evaluation's log-probabilities, from ``--dynamic-cache`` when it holds this genome's."""
    from titans_lnn.evals.genomics import load_genome

    if args.dynamic_cache and os.path.exists(args.dynamic_cache):
        reading, _ = load_genome(tok, args.data, max_tokens=args.max_tokens)
        logp = np.load(args.dynamic_cache)
        if logp.shape != reading.logp.shape:
            raise ValueError(f"--dynamic-cache {args.dynamic_cache}: log-probabilities of shape {logp.shape}, but "
                             f"{reading.data} has {len(reading.bases)} tokens: expected a cache of this genome")
        return logp
    logp = read_genome_dynamic(model, tok, args.data, max_tokens=args.max_tokens, lr=args.dynamic_eval,
                               block=args.dynamic_block, optimizer=args.dynamic_optimizer, decay=args.dynamic_decay,
                               progress=not args.no_progress).logp
    if args.dynamic_cache:
        np.save(args.dynamic_cache, logp)
    return logp
