"""The time estimates the Child page shows before the explorer and Generate start (app/longsteps.py): scaled
from the parent's measured speed through its blocks alone, the calibration added where none is known."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
from torch import nn

from subclone_core.analysis.explore import EVAL_TOKENS, REFIT_TOKENS, candidate_shapes
from subclone_core.app import longsteps
from subclone_core.app.sizing import matrix_weights
from subclone_core.app.steps import child_plan, child_settings
from subclone_core.core.shape import Shape
from subclone_core.sources import Parent
from subclone_core.workflow import children
from tests import tiny_models as tm

METRICS = {"forward_rate": 500.0}  # positions per second of a validation pass of the parent


@pytest.fixture
def parent(monkeypatch) -> Parent:
    """A tiny float32 llama whose refit runs in float32 (on a CPU without bfloat16 matrix instructions)."""
    monkeypatch.setattr(children, "cpu_multiplies_bfloat16", lambda: False)
    return Parent(id="tiny", model=tm.make("llama"), preprocessor=tm.tokenizer(), task="causal-lm", source=None,
                  label="tiny llama")


def test_the_blocks_run_faster_than_the_whole_model_by_the_output_layers_share():
    model = tm.make("llama")
    head = model.get_output_embeddings()
    assert isinstance(head, nn.Linear) and head.weight.numel() > 0
    total = matrix_weights(model)
    assert longsteps.blocks_rate(model, 100.0) == pytest.approx(100.0 * total / (total - head.weight.numel()))
    assert longsteps.blocks_rate(model, None) is None  # the parent not scored yet


def test_the_explorer_costs_a_refit_per_narrowed_block_a_score_per_shape_and_the_calibration_when_none_is_known(
        parent):
    budget = sum(p.numel() for p in parent.model.parameters()) // 2
    candidates = candidate_shapes(parent.model, budget)
    full = Shape.of(parent.model.config)
    depths = sum(s.layers for s, _ in candidates if s.hidden < full.hidden) / full.layers  # llama: a recorded pass
    assert depths > 0
    per_token = (1 + longsteps.EXPLORE_CHILD * depths) / longsteps.blocks_rate(parent.model, METRICS["forward_rate"])
    sizes = [params for _, params in candidates]
    parent_size = sum(p.numel() for p in parent.model.parameters())
    scores = EVAL_TOKENS * (sum(sizes) + min(sizes)) / parent_size / METRICS["forward_rate"]
    calibrated = longsteps.explorer_seconds(parent, METRICS, budget, 4096, calibrated=True)
    assert calibrated == pytest.approx(min(4096, REFIT_TOKENS) * per_token + scores)
    fresh = longsteps.explorer_seconds(parent, METRICS, budget, 4096, calibrated=False)
    assert fresh == pytest.approx(calibrated + longsteps.estimate_seconds("calibration", 4096, METRICS["forward_rate"]))
    assert longsteps.explorer_seconds(parent, None, budget, 4096, calibrated=True) is None


def test_the_explorer_refits_only_narrowed_shapes_from_a_shared_pass_each_width_once_or_from_a_recorded_one():
    model = tm.make("llama")
    full = Shape.of(model.config)
    narrow = replace(full, hidden=full.hidden // 2, ffn=full.ffn // 2, heads=full.heads // 2,
                     kv_heads=max(1, full.kv_heads // 2))
    shapes = [replace(full, layers=2), replace(narrow, layers=2), replace(narrow, layers=3)]
    cost = functools.partial(longsteps.explorer_refit_cost, model, shapes)
    assert cost("shared") == pytest.approx(longsteps.EXPLORE_REFIT * 3 / full.layers)  # the deepest of one width
    assert cost("recorded") == pytest.approx(1 + longsteps.EXPLORE_CHILD * 5 / full.layers)  # the parent once
    assert cost("per shape") == pytest.approx(2 + longsteps.EXPLORE_CHILD * 5 / full.layers)  # a pass a shape
    assert longsteps.explorer_refit_cost(model, shapes[:1], "recorded") == 0  # a full-width shape: no refit


def test_generate_is_estimated_for_a_refit_child_only_its_refit_then_scores_and_samples_of_its_size(parent):
    target = Shape.of(parent.model.config)
    refit = child_plan(parent, child_settings("subclone", None, True, None, 2048, refit=True), target)
    sliced = child_plan(parent, child_settings("subclone", None, True, None, 2048, refit=False), target)
    assert refit.refit and not sliced.refit
    rate = longsteps.blocks_rate(parent.model, METRICS["forward_rate"])
    size = sum(p.numel() for p in parent.model.parameters())
    seconds = longsteps.generate_seconds(parent, METRICS, refit, size, calibrated=True)
    scores = (2 * longsteps.STEP0_TOKENS + 2 * longsteps.SAMPLE_POSITIONS * longsteps.SAMPLE_TOKENS) / 500.0
    assert seconds == pytest.approx(longsteps.GENERATE_REFIT * 2048 / rate + scores)
    # a child a quarter of the parent's size is scored and sampled in a quarter of the time; its refit is the same
    assert longsteps.generate_seconds(parent, METRICS, refit, size // 4, calibrated=True) == pytest.approx(
        seconds - 0.75 * scores, rel=1e-3)
    assert longsteps.generate_seconds(parent, METRICS, refit, size, calibrated=False) > seconds
    assert longsteps.generate_seconds(parent, METRICS, sliced, size, calibrated=True) is None


def test_a_refit_in_bfloat16_on_a_cpu_that_multiplies_it_is_estimated_at_its_measured_share(parent, monkeypatch):
    """Only the refit's share shrinks: the explorer's scores stay float32."""
    parent = replace(parent, model=parent.model.float())
    budget = sum(p.numel() for p in parent.model.parameters()) // 2
    target = Shape.of(parent.model.config)
    candidates = candidate_shapes(parent.model, budget)
    depths = sum(s.layers for s, _ in candidates if s.hidden < target.hidden) / target.layers
    rate = longsteps.blocks_rate(parent.model, METRICS["forward_rate"])
    refit = (1 + longsteps.EXPLORE_CHILD * depths) * REFIT_TOKENS / rate
    plan = child_plan(parent, child_settings("subclone", None, True, None, 2048, refit=True), target)
    size = sum(p.numel() for p in parent.model.parameters())
    wide = (longsteps.explorer_seconds(parent, METRICS, budget, 4096, calibrated=True),
            longsteps.generate_seconds(parent, METRICS, plan, size, calibrated=True))
    monkeypatch.setattr(children, "cpu_multiplies_bfloat16", lambda: True)
    plan = child_plan(parent, child_settings("subclone", None, True, None, 2048, refit=True), target)
    assert plan.refit_dtype == "bfloat16" and plan.refit_inputs == "child"  # the llama table refits on the child's
    share = longsteps.BFLOAT16_SHARE["child"]
    generate_refit = longsteps.GENERATE_REFIT * 2048 / rate
    assert longsteps.generate_seconds(parent, METRICS, plan, size, calibrated=True) == pytest.approx(
        wide[1] - (1 - share) * generate_refit)
    explorer = longsteps.explorer_seconds(parent, METRICS, budget, 4096, calibrated=True)
    assert explorer == pytest.approx(wide[0] - (1 - share) * refit)
