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

GEMMA_RATE = 30.0  # measured (bench_app): Gemma 3 270M's starting child on 2 idle cores, in the app


def test_the_default_run_of_a_slow_parent_fits_in_two_minutes():
    size = sizing.size_run(GEMMA_RATE, models=2)
    assert size.seconds <= sizing.TARGET_SECONDS * 1.05
    assert size.steps >= sizing.MIN_STEPS and size.eval_every >= 1
    # the old constant defaults (100 steps of 8 x 128) would take over two hours at this rate
    assert sizing.run_seconds(GEMMA_RATE, 2, 100, 8, 128, 10, 4) > 3600


def test_a_fast_parent_keeps_long_sequences_and_big_batches_and_is_capped_in_steps():
    size = sizing.size_run(50_000.0, models=2)
    assert (size.batch_size, size.seq_len, size.steps) == (8, 128, sizing.MAX_STEPS)
    assert size.seconds < sizing.TARGET_SECONDS
    middle = sizing.size_run(300.0, models=2)
    assert middle.seconds <= sizing.TARGET_SECONDS * 1.05 and middle.steps >= sizing.MIN_STEPS
    assert middle.batch_size * middle.seq_len < 8 * 128  # smaller than the fast parent's


def test_the_rate_comes_from_the_models_matrix_weights_and_the_cores():
    small = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100))
    large = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 1000))
    assert sizing.matrix_weights(large) == 8000  # the embedding lookup costs no product
    assert sizing.training_rate(small, "cpu", 2) == pytest.approx(10 * sizing.training_rate(large, "cpu", 2))
    assert sizing.training_rate(small, "cpu", 4) == pytest.approx(2 * sizing.training_rate(small, "cpu", 2))
    # calibrated on the measurement: 143 M matrix weights train at 30 positions a second on 2 cores
    assert sizing.CPU_FLOPS_PER_CORE * 2 / (6 * 143e6) == pytest.approx(GEMMA_RATE)


def test_an_image_parent_is_sized_in_images():
    size = sizing.size_run(20.0, models=2, sequences=False)
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
