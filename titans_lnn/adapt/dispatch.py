"""Choosing the expert at test time: Transformer²'s three strategies (arXiv 2501.06252, section 3.2).

A first pass reads the prompt with the base weights and decides; a second pass answers with the chosen
expert (``SVF.apply``) or mixture (``SVF.mix``).

    prompt_dispatch(model, prompts, labels)           # the model itself names the task: the label it finds
                                                      # likeliest after "<prompt>\\n\\nThe task above is: "
    clf = Classifier.fit(prompt_features(model, prompts), targets, names)   # a classifier expert: a linear
    clf.predict(prompt_features(model, new_prompts))  # head over the first pass's final hidden states
    cem_mixture(svf, experts, score)                  # few-shot: alphas of z' = sum_k alpha_k z_k searched
                                                      # by the cross-entropy method on a few examples

The paper's classification expert is an SVF expert trained to emit the label; here (as the issue asks) it is
a linear head over the mean of the first pass's final hidden states, which costs no second model call.
Prompts are 1-D id tensors (any lengths); only their last ``max_len`` tokens are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_lnn.adapt.svf import SVF, Expert
from titans_lnn.io import atomic_write_bytes

PROMPT_TEMPLATE = "\n\nThe task above is: "
CLASSIFIER_FORMAT = "titans-lnn-svf-classifier"


def _check_prompts(prompts: Sequence[torch.Tensor]) -> None:
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of 1-D id tensors; got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 or p.is_floating_point():
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D integer tensor of token ids; got {got}")


# ----------------------------------------------------------------------------- prompt-based


@torch.no_grad()
def label_scores(model: nn.Module, prompt: torch.Tensor, labels: Sequence[str], *, template: str = PROMPT_TEMPLATE,
                 max_len: int = 512, encode: Callable[[str], list[int]] | None = None) -> torch.Tensor:
    """(K,) mean log-probability of each label's tokens after ``prompt[-max_len:] + template``, one batch of
    K rows (right-padded: padding after a label cannot change its causal scores). ``encode`` turns text
    into ids (default: UTF-8 bytes, for byte-level models)."""
    encode = encode or (lambda text: list(text.encode("utf-8")))
    head = prompt[-max_len:].tolist() + encode(template)
    rows = [encode(label) for label in labels]
    if any(not r for r in rows):
        raise ValueError(f"labels {list(labels)} include an empty label: expected task names")
    T = len(head) + max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # (K, T)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, :len(head) + len(row)] = torch.tensor(head + row)
        targets[k, len(head) - 1:len(head) + len(row) - 1] = torch.tensor(row)  # position t predicts t + 1
    device = next(model.parameters()).device
    logp = F.log_softmax(model(ids.to(device)).logits.float(), dim=-1)  # (K, T, V)
    mask = (targets != -100).to(device)
    picked = logp.gather(-1, targets.clamp_min(0).to(device)[..., None]).squeeze(-1) * mask  # (K, T)
    return (picked.sum(1) / mask.sum(1)).cpu()


def prompt_scores(model: nn.Module, prompts: Sequence[torch.Tensor], labels: Sequence[str], *,
                  calibrate: bool = False, **kwargs) -> torch.Tensor:
    """(N, K) ``label_scores`` of every prompt. With ``calibrate``, each label's score after a content-free
    prompt ("N/A") is subtracted (contextual calibration, Zhao et al. 2021): a base LM's preference for one
    label whatever the prompt cancels."""
    _check_prompts(prompts)
    if len(labels) < 2:
        raise ValueError(f"labels={list(labels)!r}: expected at least two task names to choose from")
    scores = torch.stack([label_scores(model, p, labels, **kwargs) for p in prompts])  # (N, K)
    if calibrate:
        encode = kwargs.get("encode") or (lambda text: list(text.encode("utf-8")))
        scores = scores - label_scores(model, torch.tensor(encode("N/A")), labels, **kwargs)
    return scores


def prompt_dispatch(model: nn.Module, prompts: Sequence[torch.Tensor], labels: Sequence[str], *,
                    calibrate: bool = False, **kwargs) -> list[int]:
    """For each prompt, the index of the label the model finds likeliest (``prompt_scores``)."""
    return prompt_scores(model, prompts, labels, calibrate=calibrate, **kwargs).argmax(-1).tolist()


# ----------------------------------------------------------------------------- classifier expert


@torch.no_grad()
def prompt_features(model: nn.Module, prompts: Sequence[torch.Tensor], *, max_len: int = 512) -> torch.Tensor:
    """(N, D) mean over each prompt's last ``max_len`` tokens of the model's final hidden states (the
    output of ``model.norm``, what the LM head reads), read with the weights the model has now."""
    _check_prompts(prompts)
    captured = []
    hook = model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    device = next(model.parameters()).device
    try:
        feats = []
        for p in prompts:
            captured.clear()
            model(p[-max_len:][None].to(device))
            feats.append(captured[-1][0].float().mean(0))  # (T, D) -> (D,)
    finally:
        hook.remove()
    return torch.stack(feats).cpu()


@dataclass
class Classifier:
    """A linear head (K, D) over ``prompt_features`` picking one of the experts ``names``; features are
    standardised with the training set's mean and std (kept with the head)."""

    names: list[str]
    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    fingerprint: str = ""  # the model whose features it reads
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fit(cls, features: torch.Tensor, targets: torch.Tensor, names: Sequence[str], *, steps: int = 300,
            lr: float = 0.05, weight_decay: float = 1e-3, fingerprint: str = "", seed: int = 0) -> Classifier:
        """Multinomial logistic regression (full-batch Adam) of ``targets`` (N,) in [0, K) on ``features`` (N, D)."""
        if features.dim() != 2 or targets.shape != (features.shape[0],):
            raise ValueError(f"features {tuple(features.shape)} and targets {tuple(targets.shape)}: expected (N, D) "
                             f"and (N,)")
        K = len(names)
        if K < 2 or int(targets.min()) < 0 or int(targets.max()) >= K:
            raise ValueError(f"targets must lie in [0, {K}) for the {K} names {list(names)}; got values "
                             f"{sorted(set(targets.tolist()))[:8]}")
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        x = (features - mean) / std
        g = torch.Generator().manual_seed(seed)
        weight = (torch.randn(K, x.shape[1], generator=g) * 0.01).requires_grad_(True)
        bias = torch.zeros(K, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = F.cross_entropy(x @ weight.T + bias, targets.long())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return cls(list(names), weight.detach(), bias.detach(), mean, std, fingerprint,
                   {"train_loss": f"{loss.item():.4f}", "n_train": str(len(targets))})

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) scores of each expert for features (N, D)."""
        if features.dim() != 2 or features.shape[1] != self.weight.shape[1]:
            raise ValueError(f"features have shape {tuple(features.shape)}: expected (N, {self.weight.shape[1]}), "
                             f"the width this classifier was fitted on")
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> list[int]:
        return self.logits(features).argmax(-1).tolist()

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        metadata = {"format": CLASSIFIER_FORMAT, "names": json.dumps(self.names), "fingerprint": self.fingerprint,
                    "meta": json.dumps(self.meta)}
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Classifier:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such classifier file")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CLASSIFIER_FORMAT:
                raise ValueError(f"{path}: metadata format={metadata.get('format')!r}: expected {CLASSIFIER_FORMAT!r}")
            t = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "std")}
        return cls(json.loads(metadata["names"]), t["weight"], t["bias"], t["mean"], t["std"], metadata["fingerprint"],
                   json.loads(metadata["meta"]))


def classifier_dispatch(model: nn.Module, classifier: Classifier, prompts: Sequence[torch.Tensor], *,
                        max_len: int = 512) -> list[int]:
    """For each prompt, the index (into ``classifier.names``) of the expert the classifier picks."""
    fingerprint = getattr(model, "fingerprint", "")
    if classifier.fingerprint and fingerprint and classifier.fingerprint != fingerprint:
        raise ValueError(f"the classifier was fitted on features of a model with fingerprint {classifier.fingerprint}; "
                         f"this model's is {fingerprint}")
    return classifier.predict(prompt_features(model, prompts, max_len=max_len))


# ----------------------------------------------------------------------------- few-shot mixture (CEM)


@dataclass
class CEMResult:
    alphas: list[float]  # the best mixture found: z' = sum_k alphas[k] z_k
    score: float  # its score
    history: list[float]  # the best score after each iteration


def cem_mixture(svf: SVF, experts: Sequence[Expert], score: Callable[[Expert], float], *, iterations: int = 6,
                population: int = 10, elite: int = 3, init_std: float = 0.5, seed: int = 0) -> CEMResult:
    """Search the mixing weights alpha (K,) of ``experts`` maximising ``score(svf.mix(experts, alpha))``
    with the cross-entropy method: sample ``population`` alphas from N(mu, sigma^2) (mu = 1/K at the start,
    sigma = ``init_std``), refit mu and sigma to the ``elite`` best, repeat ``iterations`` times; the
    best alpha ever scored is returned. The first population also holds each expert alone (one-hot
    alphas), so the search starts no worse than the best single expert on these examples. ``score`` sees
    each candidate as an ``Expert`` (e.g. minus the loss on a few examples with it applied: ``few_shot_score``)."""
    K = len(experts)
    if K < 1:
        raise ValueError("cem_mixture needs at least one expert")
    if not 1 <= elite <= population:
        raise ValueError(f"elite={elite} is invalid: expected 1 <= elite <= population={population}")
    g = torch.Generator().manual_seed(seed)
    mu, sigma = torch.full((K,), 1.0 / K, dtype=torch.float64), torch.full((K,), float(init_std), dtype=torch.float64)
    best_alpha, best, history = mu.clone(), float("-inf"), []
    for i in range(iterations):
        alphas = mu + sigma * torch.randn(population, K, generator=g, dtype=torch.float64)  # (P, K)
        if i == 0:
            alphas = torch.cat([torch.eye(K, dtype=torch.float64), alphas])  # (K + P, K)
        scores = torch.tensor([score(svf.mix(experts, a.tolist())) for a in alphas], dtype=torch.float64)
        top = scores.topk(elite).indices
        if scores[top[0]] > best:
            best, best_alpha = float(scores[top[0]]), alphas[top[0]].clone()
        mu, sigma = alphas[top].mean(0), alphas[top].std(0, unbiased=False).clamp_min(1e-3)
        history.append(best)
    return CEMResult(best_alpha.tolist(), best, history)


def few_shot_score(svf: SVF, ids: torch.Tensor, labels: torch.Tensor) -> Callable[[Expert], float]:
    """score(expert) = minus the model's loss on the few-shot batch (ids, labels: (B, T)) with ``expert`` applied."""
    device = next(svf.model.parameters()).device

    @torch.no_grad()
    def score(expert: Expert) -> float:
        with svf.applied(expert):
            return -float(svf.model(ids.to(device), labels=labels.to(device)).loss)

    return score
