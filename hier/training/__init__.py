"""Training: ``TrainConfig`` and its presets (``config``), the loop (``trainer``), the end of a run
(``finish``), the run itself with resume (``run``) and torchrun's ranks (``distributed``)."""
from hier.training.config import PRESETS, TrainConfig, configs
from hier.training.run import train

__all__ = ["PRESETS", "TrainConfig", "configs", "train"]
