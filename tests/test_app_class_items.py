"""Issue 31's smaller items: training defaults sized per parent for a two-minute run, a sweep's legend that
leaves the plot its room, model samples shown without their HTML tags."""

from __future__ import annotations

import pytest
import torch

from subclone_core.app import charts, sizing
from subclone_core.app.inputs import without_markup
from subclone_core.training.events import EvalEvent, StepEvent
from subclone_core.training.sweep import run_name

pytestmark = pytest.mark.unit

# measured (bench_app's probe of the app's training, 2 idle Zen 2 cores): the Child page's starting children, their
# forward rate on validation batches of 8 x 128 tokens and seconds a training step took (child and twin averaged)
GEMMA = sizing.Speed(320.0, sizing.SPEED_SOURCES[0])  # Gemma 3 270M's 12 x 426: 1.37 s at 1 x 32, 5.64 s at 4 x 128
SMOLLM2 = sizing.Speed(1122.0, sizing.SPEED_SOURCES[0])  # SmolLM2-135M's 20 x 384: 0.36 s at 1 x 32, 2.88 s at 8 x 128


def test_a_training_step_costs_its_positions_and_a_fixed_share_as_measured():
    for speed, small, large in ((GEMMA, (32, 1.37), (512, 5.64)), (SMOLLM2, (32, 0.36), (1024, 2.88))):
        for units, seconds in (small, large):
            assert speed.step_seconds(units) == pytest.approx(seconds, rel=0.1)
    # one rate for every batch was 2-4x off: tokens a second grow with the batch
    assert SMOLLM2.training_rate(1024) > 3 * SMOLLM2.training_rate(32)


def test_the_default_run_of_a_slow_parent_fits_in_two_minutes():
    size = sizing.size_run(GEMMA, models=2)
    assert size.seconds <= sizing.TARGET_SECONDS * 1.05
    assert size.steps >= sizing.MIN_STEPS and size.eval_every >= 1
    # the old constant defaults (100 steps of 8 x 128) would take over half an hour at this speed
    assert sizing.run_seconds(GEMMA, 2, 100, 8, 128, 10, 4) > 1800


def test_a_fast_parent_keeps_long_sequences_and_big_batches_and_is_capped_in_steps():
    size = sizing.size_run(sizing.Speed(1e6, "test"), models=2)
    assert (size.batch_size, size.seq_len, size.steps) == (8, 128, sizing.MAX_STEPS)
    assert size.seconds < sizing.TARGET_SECONDS
    middle = sizing.size_run(SMOLLM2, models=2)
    assert middle.seconds <= sizing.TARGET_SECONDS * 1.05 and middle.steps >= sizing.MIN_STEPS
    assert middle.batch_size * middle.seq_len < 8 * 128  # smaller than the fast parent's


def test_the_speed_is_measured_else_scaled_from_the_parent_else_estimated_from_the_size():
    small = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100))
    large = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 1000))
    assert sizing.matrix_weights(large) == 8000  # the embedding lookup costs no product
    assert sizing.speed_of(small, True, "cpu", 2, measured=42.0, parent=large, parent_rate=100.0) == sizing.Speed(
        42.0, sizing.SPEED_SOURCES[0])
    scaled = sizing.speed_of(small, True, "cpu", 2, parent=large, parent_rate=100.0)
    assert (scaled.rate, scaled.source) == (pytest.approx(1000.0), sizing.SPEED_SOURCES[1])
    guessed = sizing.speed_of(small, True, "cpu", 2)
    assert guessed.source == sizing.SPEED_SOURCES[2]
    assert sizing.speed_of(small, True, "cpu", 4).rate == pytest.approx(2 * guessed.rate)
    assert sizing.speed_of(large, True, "cpu", 2).rate == pytest.approx(guessed.rate / 10)


def test_an_image_parent_is_sized_in_images_its_step_shared_by_their_patches():
    speed = sizing.Speed(20.0, "test", unit_positions=197)  # a ViT-B/16's 196 patches and its class position
    assert speed.step_seconds(1) == pytest.approx((sizing.TRAIN_OVER_FORWARD + sizing.STEP_OVERHEAD / 197) / 20)
    size = sizing.size_run(speed, models=2, sequences=False)
    assert size.seq_len == 1 and size.seconds <= sizing.TARGET_SECONDS * 1.05


def _sweep_events() -> list:
    events = []
    for model in ("subclone", "random"):
        for lr in (1e-3, 3e-4, 1e-4):
            run = run_name(model, lr)
            events += [StepEvent(candidate=run, step=s, loss=5.0 - s / 10) for s in (1, 2)]
            events += [EvalEvent(candidate=run, step=s, loss=5.0 - s / 10) for s in (0, 2)]
    return events


def test_a_sweeps_loss_chart_has_one_legend_entry_per_model():
    events = _sweep_events()
    faint = {e.candidate for e in events} - {run_name("subclone", 1e-3), run_name("random", 1e-3)}
    fig = charts.loss_chart(events, faint=faint)
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert len(shown) == 2, shown  # was 8 (train + validation of 2 chosen runs, 4 runs not chosen)
    assert "dotted" in fig.layout.legend.title.text


def test_model_samples_lose_their_html_tags():
    assert without_markup("The city is <strong>old</strong> &amp; big.<br/>It") == "The city is old & big. It"
    assert without_markup("a < b and c > d") == "a < b and c > d"  # not tags: kept
