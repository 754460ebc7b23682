"""Training engine: candidates of one child shape trained side by side on the same data and seed."""

from subclone_core.training.config import Candidate, TrainConfig, default_hparams
from subclone_core.training.distill import distillation_loss, kl_to_teacher
from subclone_core.training.engine import train_candidates
from subclone_core.training.results import EvalPoint, RunResult
from subclone_core.training.schedule import make_scheduler

__all__ = [
    "Candidate",
    "EvalPoint",
    "RunResult",
    "TrainConfig",
    "default_hparams",
    "distillation_loss",
    "kl_to_teacher",
    "make_scheduler",
    "train_candidates",
]
