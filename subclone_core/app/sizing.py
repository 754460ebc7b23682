"""Training defaults a class can wait for: steps, batch and sequence length sized so that the child and its
twin train in about two minutes, from an estimate of how fast this child trains here. No Streamlit here.

One constant for every parent was wrong by an order of magnitude: 100 steps of 8 x 128 tokens said "about
20 min left" on SmolLM2-135M, and Gemma 3 270M's child, whose 262k-word output layer alone is 100 M
multiply-adds a token, trains at 30 tokens/s on 2 idle cores in the app (15 in a process that hands freed
memory back to the system). A model's training cost per position is about 6 x its matrix weights (forward 2,
backward 4), so the rate is estimated from the child's own weights and one measured rate of this kind of machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TARGET_SECONDS = 120.0  # what a class waits for one run
# measured (bench_app, the app's training): Gemma 3 270M's starting child (12 x 426, 143 M matrix weights with its
# output layer) trains at 30 tokens/s on 2 idle cores in the app's process, which keeps freed memory (15 without,
# io.devices.KEEP_FREED): 6 x 143 M x 30 / 2 = about 13 GFLOP/s a core. SmolLM2's children train faster than
# this predicts (it is the slower of the two measurements: runs end early, not late).
CPU_FLOPS_PER_CORE = 6 * 143e6 * 30 / 2
GPU_FLOPS = 5e12  # a cautious share of one GPU's peak for small models and batches
VALIDATION_COST = 1 / 3  # a validation position is a forward only: a third of a training step's cost
SEQ_LENS = (128, 64, 32)  # preferred first: longer contexts, then bigger batches
BATCH_SIZES = (8, 4, 2, 1)
MIN_STEPS, MAX_STEPS = 30, 200  # fewer steps draw no curve to compare; more add nothing to the lesson
EVAL_POINTS = 10  # validations per run (plus step 0)


def matrix_weights(model: nn.Module) -> int:
    """The weights a position is multiplied by: every linear layer's, the output layer included (a tied
    output layer shares the embedding's storage but costs a product all the same)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def training_rate(model: nn.Module, device_type: str, cores: int) -> float:
    """Positions (tokens, or images' patches) per second one model of this size trains at here (estimated)."""
    flops = GPU_FLOPS if device_type == "cuda" else CPU_FLOPS_PER_CORE * max(1, cores)
    return flops / (6 * max(1, matrix_weights(model)))


def positions_per_example(model: nn.Module, sequences: bool, seq_len: int = 1) -> int:
    """Positions one example costs: its tokens, or an image's patches plus the class position."""
    if sequences:
        return seq_len
    config = getattr(model, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    return (image // patch) ** 2 + 1 if isinstance(image, int) and isinstance(patch, int) and patch else 1


def example_rate(model: nn.Module, device_type: str, cores: int, sequences: bool) -> float:
    """Positions (text) or examples (images) per second one model of this size trains at here."""
    return training_rate(model, device_type, cores) / positions_per_example(model, sequences)


@dataclass(frozen=True)
class RunSize:
    """Training settings and how long they should take."""

    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    seconds: float


def run_seconds(rate: float, models: int, steps: int, batch_size: int, seq_len: int, eval_every: int,
                eval_batches: int) -> float:
    """Seconds a run should take: every model's steps and its validations (step 0, every ``eval_every``
    steps and the last), at ``rate`` positions per second each, one model after the other."""
    evals = 1 + steps // eval_every + (1 if steps % eval_every else 0)
    positions = batch_size * seq_len * (steps + VALIDATION_COST * evals * eval_batches)
    return models * positions / rate


def size_run(rate: float, models: int = 2, target: float = TARGET_SECONDS, eval_batches: int = 4,
             sequences: bool = True) -> RunSize:
    """The longest sequences and largest batches (in that order) that still give MIN_STEPS steps within
    ``target`` seconds, with as many steps (up to MAX_STEPS) as fit; the smallest batch when none does.

    Args:
        rate: positions per second one model trains at (``training_rate``).
        models: models trained one after the other each step (the child and its twin: 2).
        target: seconds the run should take.
        eval_batches: batches of each validation.
        sequences: text (a sequence length applies); else one position per example.
    """
    seq_lens = SEQ_LENS if sequences else (1,)
    shapes = [(batch, seq) for seq in seq_lens for batch in BATCH_SIZES]
    for batch, seq in shapes:
        steps = _steps_within(rate, models, target, batch, seq, eval_batches)
        if steps >= MIN_STEPS or (batch, seq) == shapes[-1]:
            steps = max(1, min(MAX_STEPS, steps))
            every = max(1, round(steps / EVAL_POINTS))
            return RunSize(steps, batch, seq, every, run_seconds(rate, models, steps, batch, seq, every,
                                                                 eval_batches))
    raise AssertionError("unreachable: the last shape always returns")


def _steps_within(rate: float, models: int, target: float, batch: int, seq: int, eval_batches: int) -> int:
    """Steps that fit in ``target`` seconds with EVAL_POINTS validations."""
    per_model = rate * target / models / (batch * seq)  # steps' worth of positions each model may use
    return int(per_model - VALIDATION_COST * (EVAL_POINTS + 1) * eval_batches)
