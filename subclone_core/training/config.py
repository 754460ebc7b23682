"""What to train and how: candidates, the shared training configuration, default hyperparameters."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from subclone_core.core.errors import SubcloneError
from subclone_core.core.strategies import STRATEGY_SPECS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@=-]*$")  # "@=": runs of a sweep, e.g. subclone@lr=1e-3
_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("auto", "bf16", "no")


# Peak learning rate and AdamW weight decay per strategy, used when a candidate gives none.
# The paper (Table 1) trains subcloned models at lr 1e-4 with low weight decay. On this project's default
# parent (SmolLM2-135M -> 6 x 192 child, batch 8 x 128, 100-500 steps on CPU) the prototype measured
# otherwise: random init is best at lr 1e-3, and the subcloned child at 1e-4 is slower than random
# init while at 1e-3 it reaches random init's best loss 3.3x sooner. So both start at 1e-3 here; the
# weight decay keeps the paper's split (high for random init, low for inherited weights so that
# training does not pull them towards zero). Every strategy that takes the parent's weights (first-k,
# uniform, distillation and the published methods, unmeasured) uses the subcloned child's values. Override
# per candidate (Candidate.lr / .weight_decay). Weight decay applies to weight matrices only, never to norm
# gains or biases.
_INHERITED = {"lr": 1e-3, "weight_decay": 1e-3}
HPARAMS: dict[str, dict[str, float]] = {"random": {"lr": 1e-3, "weight_decay": 0.1}}  # others: _INHERITED


def default_hparams(strategy: str) -> dict[str, float]:
    """The default peak learning rate and weight decay of a strategy.

    Args:
        strategy: a strategy or training candidate of STRATEGY_SPECS, e.g. "subclone" or "random".

    Returns:
        A new dict with "lr" and "weight_decay".

    Raises:
        SubcloneError: for a strategy with no defaults.
    """
    if strategy not in STRATEGY_SPECS:
        raise SubcloneError(
            f"no default learning rate for strategy {strategy!r}; known: {', '.join(STRATEGY_SPECS)} "
            "(or give lr and weight_decay explicitly)"
        )
    return dict(HPARAMS.get(strategy, _INHERITED))


@dataclass
class Candidate:
    """One model to train; all candidates of a run see the same batches in the same order.

    Attributes:
        name: label in events, results and the save folder name (letters, digits, ``._+-@=``).
        model: a Hugging Face model that computes its own loss from ``labels``; trained in place.
        lr: peak learning rate; None takes the strategy's default (HPARAMS).
        weight_decay: AdamW weight decay; None takes the strategy's default (HPARAMS).
        teacher: a frozen model with the same vocabulary / labels; adds the distillation loss.
        distill_alpha: weight of the distillation term, loss = (1 - a) CE + a T^2 KL.
        distill_temperature: softmax temperature T of the distillation term.
        strategy: key for the default hyperparameters; None uses ``name``.
        weights: for a model built on the meta device (training.materialize.meta_init), where each process
            fills its part from once the model is placed or sharded: FolderWeights or RandomWeights. None for a
            model that holds its weights.
    """

    name: str
    model: Any
    lr: float | None = None
    weight_decay: float | None = None
    teacher: Any = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    strategy: str | None = None
    weights: Any = None

    def hparams(self) -> tuple[float, float]:
        """The (lr, weight_decay) this candidate trains with, defaults filled in."""
        if self.lr is not None and self.weight_decay is not None:
            return float(self.lr), float(self.weight_decay)
        defaults = default_hparams(self.strategy or self.name)
        lr = defaults["lr"] if self.lr is None else float(self.lr)
        wd = defaults["weight_decay"] if self.weight_decay is None else float(self.weight_decay)
        return lr, wd

    def validate(self) -> None:
        """Raise SubcloneError for a bad name or distillation setting."""
        if not _NAME_RE.match(self.name or ""):
            raise SubcloneError(f"candidate name {self.name!r} must be letters, digits and ._+-@= only")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise SubcloneError(f"distill_alpha {self.distill_alpha} must be between 0 and 1")
        if not self.distill_temperature > 0:
            raise SubcloneError(f"distill_temperature {self.distill_temperature} must be > 0")
        lr, wd = self.hparams()
        if not (lr > 0 and math.isfinite(lr)):
            raise SubcloneError(f"learning rate {lr} of {self.name!r} must be a finite number > 0")
        if wd < 0:
            raise SubcloneError(f"weight decay {wd} of {self.name!r} must be >= 0")


@dataclass
class TrainConfig:
    """Settings shared by every candidate of a run.

    Attributes:
        steps: optimizer steps per candidate.
        batch_size: sequences (or images) per micro-batch over all processes together; under
            data parallelism each process takes batch_size / world_size of them.
        grad_accum: micro-batches per optimizer step.
        warmup: linear warmup length: a fraction of ``steps`` when < 1, else a number of steps.
        eval_every: validate every this many steps (and at step 0 and at the last step).
        eval_at: extra steps to validate after, e.g. early ones that resolve a pretrained start's lead.
        eval_batches: validation batches, the same fixed ones for every candidate and evaluation.
        eval_batch_size: validation batch size; None uses batch_size.
        max_grad_norm: gradient clipping norm; None disables clipping.
        min_lr_ratio: the cosine decays to this fraction of the peak learning rate.
        seed: seed of the training data order and of dropout, the same for every candidate.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        mixed_precision: "auto" (bf16 autocast on CUDA, none on CPU), "bf16" or "no".
        log_every: emit a step event every this many steps.
        fsdp: shard each candidate's parameters, gradients and optimizer state across the processes of
            ``torchrun`` (FSDP2) instead of keeping a full replica in each; needs a torchrun launch (or a
            process group the caller started).
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05
    eval_every: int = 25
    eval_at: tuple[int, ...] = ()
    eval_batches: int = 8
    eval_batch_size: int | None = None
    max_grad_norm: float | None = 1.0
    min_lr_ratio: float = 0.0
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"
    log_every: int = 1
    fsdp: bool = False

    def warmup_steps(self) -> int:
        """The warmup length in steps."""
        return round(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)

    def eval_steps(self) -> list[int]:
        """Steps after which validation runs: 0, every eval_every, the extra eval_at steps, and the last step."""
        return sorted({0, *range(self.eval_every, self.steps + 1, self.eval_every), *self.eval_at, self.steps})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the settings."""
        return dict(self.__dict__)

    def validate(self, world_size: int = 1) -> None:
        """Raise SubcloneError naming the first bad setting."""
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise SubcloneError(f"{key} must be a whole number >= 1, got {value!r}")
        bad = [s for s in self.eval_at if not isinstance(s, int) or not 1 <= s <= self.steps]
        if bad:
            raise SubcloneError(f"eval_at steps {bad} must be whole numbers from 1 to steps ({self.steps})")
        if self.warmup < 0 or self.warmup_steps() > self.steps:
            raise SubcloneError(f"warmup {self.warmup} must be a fraction < 1 or at most steps ({self.steps})")
        if self.batch_size % world_size:
            raise SubcloneError(
                f"batch_size {self.batch_size} must be divisible by the number of processes ({world_size})"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SubcloneError(f"max_grad_norm {self.max_grad_norm} must be > 0 or None")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SubcloneError(f"min_lr_ratio {self.min_lr_ratio} must be between 0 and 1")
        if self.device not in _DEVICES:
            raise SubcloneError(f"device {self.device!r} is not one of {', '.join(_DEVICES)}")
        if self.mixed_precision not in _PRECISIONS:
            raise SubcloneError(f"mixed_precision {self.mixed_precision!r} is not one of {', '.join(_PRECISIONS)}")
