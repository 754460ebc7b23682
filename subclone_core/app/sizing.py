"""Training defaults a class can wait for: steps, batch and sequence length sized so that the child and its
twin train in about two minutes, from how fast this child runs forward here. No Streamlit here.

One constant for every parent was wrong by an order of magnitude: 100 steps of 8 x 128 tokens said "about
20 min left" on SmolLM2-135M, and Gemma 3 270M's child, whose 262k-word output layer alone is 100 M
multiply-adds a token, trains at 20-30 tokens/s on 2 cores. A rate of matrix weights a second, one constant of
one machine, missed by 39% even there (SmolLM2's child) and does not see the batch size: a step has a fixed
cost. So a training step's seconds are counted in forward positions of the model itself, whose speed the app
measures when it scores the child (or the parent): every position trained costs TRAIN_OVER_FORWARD forward
positions and every optimizer step STEP_OVERHEAD more.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TARGET_SECONDS = 120.0  # what a class waits for one run
# A training step over P positions takes (TRAIN_OVER_FORWARD x P + STEP_OVERHEAD) / the model's forward rate
# (positions a second through the model on validation batches of 8 x 128). Measured (bench_app's probe of the
# app's training) on 2 idle Zen 2 cores with the Child page's starting children at P = 32 to 1,024: SmolLM2-135M's
# 20 x 384 (forward 1,122 tokens/s) 0.36 s a step at P = 32, 2.88 s at P = 1,024; Gemma 3 270M's 12 x 426 (forward
# 320 tokens/s) 1.37 s at P = 32, 5.64 s at P = 512. Both fit 2.85 forward positions a position trained (forward
# and backward) and 315-346 for the step itself (AdamW, clipping, zeroing the gradients: costs that grow with the
# weights, as the forward does). The same numbers predict the runs measured on Zen 4 cores (126 against 128 tokens/s
# for SmolLM2's child at 1 x 64, 29 against 28 for Gemma 3's at 1 x 32) from the parents' forward rates there.
TRAIN_OVER_FORWARD = 2.85
STEP_OVERHEAD = 330.0
# Before anything was measured: forward multiply-adds a second a core (2 x matrix weights x forward rate: 62 G
# for SmolLM2-135M, 54 G for Gemma 3 270M on 2 Zen 2 cores), the slower one
CPU_FORWARD_FLOPS_PER_CORE = 54e9
GPU_FORWARD_FLOPS = 5e12  # a cautious share of one GPU's peak for small models and batches (never measured here)
SEQ_LENS = (128, 64, 32)  # preferred first: longer contexts, then bigger batches
BATCH_SIZES = (8, 4, 2, 1)
MIN_STEPS, MAX_STEPS = 30, 200  # fewer steps draw no curve to compare; more add nothing to the lesson
EVAL_POINTS = 10  # validations per run (plus step 0)


def matrix_weights(model: nn.Module) -> int:
    """The weights a position is multiplied by: every linear layer's, the output layer included (a tied
    output layer shares the embedding's storage but costs a product all the same)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def positions_per_example(model: nn.Module, sequences: bool, seq_len: int = 1) -> int:
    """Positions one example costs: its tokens, or an image's patches plus the class position."""
    if sequences:
        return seq_len
    config = getattr(model, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    return (image // patch) ** 2 + 1 if isinstance(image, int) and isinstance(patch, int) and patch else 1


@dataclass(frozen=True)
class Speed:
    """How fast one model runs here: ``rate`` tokens (or images of ``unit_positions`` positions) a second through
    its forward pass, and where that number comes from (one of SPEED_SOURCES)."""

    rate: float
    source: str
    unit_positions: int = 1

    def step_seconds(self, units: int) -> float:
        """Seconds one optimizer step over ``units`` tokens (or images) takes."""
        return (TRAIN_OVER_FORWARD * units + STEP_OVERHEAD / self.unit_positions) / self.rate

    def training_rate(self, units: int) -> float:
        """Tokens (or images) a second it trains at, ``units`` a step."""
        return units / self.step_seconds(units)


SPEED_SOURCES = ("measured when it was scored", "scaled from the parent's measured speed", "estimated from its size")


def speed_of(model: nn.Module, sequences: bool, device_type: str, cores: int, *, measured: float | None = None,
             parent: nn.Module | None = None, parent_rate: float | None = None) -> Speed:
    """``model``'s forward speed here: ``measured`` (tokens or images a second) where its step-0 score timed it;
    else the parent's measured rate scaled by their matrix weights (10-19% fast for the embedded parents'
    starting children); else an estimate from its size."""
    positions = positions_per_example(model, sequences)
    if measured:
        return Speed(measured, SPEED_SOURCES[0], positions)
    if parent is not None and parent_rate:
        return Speed(parent_rate * matrix_weights(parent) / max(1, matrix_weights(model)), SPEED_SOURCES[1],
                     positions)
    flops = GPU_FORWARD_FLOPS if device_type == "cuda" else CPU_FORWARD_FLOPS_PER_CORE * max(1, cores)
    return Speed(flops / (2 * max(1, matrix_weights(model)) * positions), SPEED_SOURCES[2], positions)


@dataclass(frozen=True)
class RunSize:
    """Training settings and how long they should take."""

    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    seconds: float


def run_seconds(speed: Speed, models: int, steps: int, batch_size: int, seq_len: int, eval_every: int,
                eval_batches: int) -> float:
    """Seconds a run should take: every model's steps and its validations (step 0, every ``eval_every`` steps and
    the last), one model after the other, each at ``speed`` (images: ``seq_len`` 1)."""
    evals = 1 + steps // eval_every + (1 if steps % eval_every else 0)
    units = batch_size * seq_len
    return models * (steps * speed.step_seconds(units) + evals * eval_batches * units / speed.rate)


def size_run(speed: Speed, models: int = 2, target: float = TARGET_SECONDS, eval_batches: int = 4,
             sequences: bool = True) -> RunSize:
    """The longest sequences and largest batches (in that order) that still give MIN_STEPS steps within
    ``target`` seconds, with as many steps (up to MAX_STEPS) as fit; the smallest batch when none does.

    Args:
        speed: how fast one model runs here (``speed_of``).
        models: models trained one after the other each step (the child and its twin: 2).
        target: seconds the run should take.
        eval_batches: batches of each validation.
        sequences: text (a sequence length applies); else images.
    """
    seq_lens = SEQ_LENS if sequences else (1,)
    shapes = [(batch, seq) for seq in seq_lens for batch in BATCH_SIZES]
    for batch, seq in shapes:
        steps = _steps_within(speed, models, target, batch * seq, eval_batches)
        if steps >= MIN_STEPS or (batch, seq) == shapes[-1]:
            steps = max(1, min(MAX_STEPS, steps))
            every = max(1, round(steps / EVAL_POINTS))
            return RunSize(steps, batch, seq, every, run_seconds(speed, models, steps, batch, seq, every,
                                                                 eval_batches))
    raise AssertionError("unreachable: the last shape always returns")


def _steps_within(speed: Speed, models: int, target: float, units: int, eval_batches: int) -> int:
    """Steps of ``units`` tokens (or images) that fit in ``target`` seconds with EVAL_POINTS validations."""
    validations = (EVAL_POINTS + 1) * eval_batches * units / speed.rate
    return int((target / models - validations) / speed.step_seconds(units))
