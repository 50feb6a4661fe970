"""Transformer²-style self-adaptation (arXiv 2501.06252): singular-value experts chosen at test time.

    svf.py       SVF: decompose chosen linear layers once; an expert is a vector z per layer; apply/remove
    train.py     train an expert (cross-entropy or policy gradient) with the base model frozen
    dispatch.py  the three strategies: prompt-based, classifier expert, few-shot CEM mixture
    lora.py      the LoRA baseline on the same layers
    tasks.py     the demonstration's tasks (passkey, DNA, bAbI-style QA) and scores
    demo.py      the demonstration (``titans-lnn adapt demo``); cli.py the ``titans-lnn adapt`` command
"""

from titans_lnn.adapt.dispatch import Classifier, cem_mixture, classifier_dispatch, prompt_dispatch, prompt_features
from titans_lnn.adapt.lora import LoRA
from titans_lnn.adapt.svf import DEFAULT_TARGETS, SVF, Expert
from titans_lnn.adapt.train import train_lora, train_svf

__all__ = ["DEFAULT_TARGETS", "SVF", "Classifier", "Expert", "LoRA", "cem_mixture", "classifier_dispatch",
           "prompt_dispatch", "prompt_features", "train_lora", "train_svf"]
