"""The shape explorer on tiny models: valid grids, exact parameter counts, the Pareto front, the budget."""

from __future__ import annotations

import math

import pytest
import torch

from subclone_core.analysis.explore import (
    candidate_shapes,
    explore_shapes,
    explored_widths,
    parameter_count,
    pareto_flags,
    parse_param_count,
    width_shapes,
)
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.pipeline.calibration import calibrate
from subclone_core.workflow.shapes import starting_shape
from tests import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def middle_budget(model) -> int:
    """A budget that the middle width reaches at half depth."""
    widths = width_shapes(model)
    middle = widths[len(widths) // 2]
    return parameter_count(model, Shape(**{**middle.as_dict(), "layers": max(2, middle.layers // 2)}))


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_width_shapes_are_valid_and_keep_the_parents_ratios(family):
    model = tm.make(family, dtype=torch.float32)
    parent = Shape.of(model.config)
    shapes = width_shapes(model)
    assert shapes and shapes[-1].hidden == parent.hidden and shapes[-1].heads == parent.heads
    for shape in shapes:
        assert plan_shape(model, **{k: v for k, v in shape.as_dict().items() if k != "head_dim"}) == shape
        assert shape.ffn == pytest.approx(parent.ffn * shape.hidden / parent.hidden, abs=8)
        assert shape.queries_per_kv <= parent.queries_per_kv


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_candidate_parameter_counts_equal_the_built_childs(family):
    model = tm.make(family, dtype=torch.float32)
    budget = middle_budget(model)
    candidates = candidate_shapes(model, budget)
    assert candidates
    for shape, params in candidates:
        child = subclone_model(model, shape, strategy="random")
        assert params == sum(p.numel() for p in child.model.parameters()), shape
        assert budget / 1.5 <= params <= budget * 1.5


def test_candidate_shapes_are_counted_once_per_parent_and_budget_and_let_the_parent_go(monkeypatch):
    import gc
    import weakref

    from subclone_core.analysis import explore

    counted = []
    real = explore.parameter_count
    monkeypatch.setattr(explore, "parameter_count", lambda model, shape: counted.append(shape) or real(model, shape))
    model = tm.make("llama", dtype=torch.float32)
    budget = middle_budget(model)
    first = candidate_shapes(model, budget)
    calls = len(counted)
    assert calls and candidate_shapes(model, budget) == first and len(counted) == calls  # a page rerun: no count
    first.clear()  # the caller's list is its own
    assert candidate_shapes(model, budget) and len(counted) == calls
    candidate_shapes(model, budget * 2 // 3)
    assert len(counted) > calls  # another budget is counted
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the cache holds no parent alive


def test_pareto_flags_on_hand_made_points():
    points = [(10, 5.0), (20, 4.0), (20, 4.5), (30, 4.0), (40, 3.0), (5, 9.0), (10, 5.0)]
    assert pareto_flags(points) == [True, True, False, False, True, True, True]
    assert pareto_flags([]) == []


@pytest.mark.parametrize("text,count", [("30M", 30_000_000), ("1.5B", 1_500_000_000), ("800k", 800_000),
                                        ("12345", 12_345), (" 2m ", 2_000_000)])
def test_parse_param_count(text, count):
    assert parse_param_count(text) == count


@pytest.mark.parametrize("text", ["thirty", "30X", "-5M", "0", ""])
def test_parse_param_count_refuses_nonsense(text):
    with pytest.raises(SubcloneError, match="parameter budget"):
        parse_param_count(text)


def test_a_budget_no_shape_reaches_names_the_range():
    model = tm.make("llama", dtype=torch.float32)
    with pytest.raises(SubcloneError, match="shapes range from"):
        candidate_shapes(model, 10**12)


def test_explore_scores_every_shape_marks_the_front_and_a_random_reference():
    model = tm.make("llama", dtype=torch.float32)
    calib = [tm.inputs(model, batch=4, seq=16, seed=s) for s in range(2)]
    importance = calibrate(model, calib)
    batches = [{**b, "labels": b["input_ids"]} for b in (tm.inputs(model, batch=4, seq=16, seed=9),)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    result = explore_shapes(model, importance, middle_budget(model), batches,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(result.points) + 1,) * 2
    flags = pareto_flags([(p.params, p.loss) for p in result.points])
    # the front leaves out shapes that start no better than random init
    assert [p.pareto for p in result.points] == [f and p.loss < result.random_loss for f, p in zip(flags, result.points)]
    assert all(math.isfinite(p.loss) for p in result.points)
    assert result.random_shape == min(result.points, key=lambda p: p.params).shape
    assert abs(result.random_loss - math.log(tm.VOCAB)) < 1.0  # a random child predicts near-uniformly
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.to_json()["shapes"][0]["params"] == result.points[0].params


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_explorer_always_tries_the_starting_childs_width(family):
    model = tm.make(family, dtype=torch.float32)
    start = starting_shape(model)
    widths = explored_widths(model)
    assert any((w.hidden, w.heads, w.ffn) == (start.hidden, start.heads, start.ffn) for w in widths)
    assert {w.hidden for w in width_shapes(model)} <= {w.hidden for w in widths}
    budget = parameter_count(model, start)
    assert start in [shape for shape, _ in candidate_shapes(model, budget)]


def test_the_explorers_shapes_share_one_pass_over_the_parent_as_their_refit_allows(monkeypatch):
    """A refit on the parent's inputs shares the Gram matrices of one pass; a refit on the child's inputs shares
    the parent's side of one pass (its record); over SHARED_GRAMS_BYTES, or offloaded, each shape makes its own."""
    from subclone_core.pipeline.reconstruction import ParentRecord
    from subclone_core.sources import Parent
    from subclone_core.workflow import children

    def parent_of(family: str) -> Parent:
        return Parent(id="tiny", model=tm.make(family), preprocessor=tm.tokenizer(), task="causal-lm", source=None,
                      label=family)

    gemma, llama = parent_of("gemma3"), parent_of("llama")  # Gemma 3 refits on the parent's inputs, Llama on the child's
    assert children.refit_pass(gemma, 64) == "shared" and children.refit_pass(llama, 64) == "recorded"
    assert children.refit_pass(llama, 64, strategy="grail") == "shared"  # GRAIL's refit reads the parent's inputs
    items, kind = children.shared_refit_source(gemma, "default", 64)
    assert kind == "shared" and isinstance(items, children.SharedGrams)
    records = []
    real = children.refit_source
    monkeypatch.setattr(children, "refit_source", lambda *a, **k: records.append(k["record"]) or real(*a, **k))
    assert children.shared_refit_source(llama, "default", 64)[1] == "recorded"
    assert isinstance(records[0], ParentRecord)
    monkeypatch.setattr(children, "SHARED_GRAMS_BYTES", 0)  # over the limit: one pass per shape
    assert [children.shared_refit_source(p, "default", 64)[1] for p in (gemma, llama)] == ["per shape"] * 2
    monkeypatch.setattr(children, "in_memory", lambda parent: False)
    assert children.refit_pass(llama, 64) == "per shape"
