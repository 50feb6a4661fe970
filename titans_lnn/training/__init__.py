"""Training, apart from the model: the loop (``trainer``), its config and schedule (``config``),
atomic checksummed checkpoints (``checkpoint``), corpora and samplers (``data``) and the
``titans-lnn train`` command line (``cli``).

    from titans_lnn.training import TrainConfig, train
"""

from titans_lnn.training.config import TrainConfig
from titans_lnn.training.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
