"""The speedup arithmetic on synthetic curves: the paper's definition and its edge cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from subclone_core.speedup import best_value, speedup, speedup_table, steps_to_reach

# Random init: best 5.0 first reached at step 300, then it gets a little worse.
RANDOM = [(0, 10.8), (100, 8.0), (200, 6.0), (300, 5.0), (400, 5.2)]


def test_speedup_is_baseline_steps_to_its_best_over_child_steps_to_the_same_value():
    child = [(0, 9.0), (100, 6.0), (200, 4.9), (300, 4.5), (400, 4.2)]
    result = speedup(RANDOM, child)
    assert result.target == 5.0
    assert result.baseline.step == 300 and result.child.step == 200
    assert result.ratio == pytest.approx(1.5) and not result.lower_bound
    assert result.text() == "1.5x"


def test_interpolation_places_the_crossing_between_evaluations():
    child = [(0, 9.0), (100, 6.0), (200, 4.0)]  # crosses 5.0 halfway between 100 and 200
    assert speedup(RANDOM, child).child.step == 200
    interpolated = speedup(RANDOM, child, interpolate=True)
    assert interpolated.child.step == pytest.approx(150)
    assert interpolated.ratio == pytest.approx(2.0)
    assert steps_to_reach(child, 5.0, interpolate=True).text() == "step 150"


def test_a_child_that_never_reaches_the_target_gets_no_number():
    child = [(0, 9.0), (100, 7.0), (200, 6.0), (300, 5.5), (400, 5.1)]
    result = speedup(RANDOM, child)
    assert result.ratio is None and not result.child.reached and result.child.step is None
    assert result.text() == "not reached in 400 steps"


def test_a_child_already_at_the_target_at_step_0_gets_a_lower_bound_never_infinity():
    child = [(0, 4.9), (50, 4.7), (100, 4.5)]
    result = speedup(RANDOM, child)
    assert result.child.at_start and result.child.step == 0
    assert result.lower_bound and result.ratio == pytest.approx(300 / 50)
    assert result.text() == ">= 6.0x"
    assert math.isfinite(result.ratio)
    only_start = speedup(RANDOM, [(0, 4.0)])
    assert only_start.ratio is None and "step 0" in only_start.text()


def test_accuracy_flips_the_direction():
    random_acc = [(0, 0.1), (10, 0.5), (20, 0.7), (30, 0.68)]
    child_acc = [(0, 0.3), (10, 0.72), (20, 0.8), (30, 0.85)]
    result = speedup(random_acc, child_acc, higher_is_better=True)
    assert result.target == 0.7 and result.baseline.step == 20 and result.child.step == 10
    assert result.text() == "2.0x"
    assert best_value(random_acc, higher_is_better=True) == 0.7
    # The same numbers read as losses would mean something else entirely.
    assert speedup(random_acc, child_acc).target == 0.1


def test_user_target_per_candidate_and_a_baseline_that_never_gets_there():
    child = [(0, 9.0), (100, 4.8), (200, 4.0), (300, 3.8), (400, 3.5)]
    assert steps_to_reach(child, 4.0).step == 200
    assert steps_to_reach(RANDOM, 4.0).text() == "not reached in 400 steps"
    result = speedup(RANDOM, child, target=4.0)
    # Random init needs more than its whole budget (400): the speedup is at least 400 / 200.
    assert result.lower_bound and result.ratio == pytest.approx(2.0) and result.text() == ">= 2.0x"


def test_baseline_best_at_step_0_or_no_finite_values_gives_no_number():
    diverged = [(0, 10.8), (100, float("nan")), (200, None)]
    result = speedup(diverged, [(0, 11.0), (100, 10.0)])
    assert result.target == 10.8 and result.ratio is None and "step 0" in result.text()
    empty = speedup([(0, float("nan"))], [(0, 1.0)])
    assert empty.ratio is None and empty.text() == "baseline has no finite evaluation"
    assert steps_to_reach([(0, 9.0), (100, float("nan"))], 9.5).step == 0  # NaN never counts as reached


def test_speedup_table_rows():
    def fake(curve, unit="tokens/s"):
        evals = [SimpleNamespace(step=s, value=v) for s, v in curve]
        return SimpleNamespace(status="done", unit=unit, throughput=100.0,
                               curve=lambda metric="loss": [(e.step, e.value) for e in evals])

    results = {"subclone": fake([(0, 9.0), (100, 6.0), (200, 4.9)]), "random": fake(RANDOM),
               "first-k": fake([(0, 12.0), (400, 6.0)])}
    rows = {row["name"]: row for row in speedup_table(results)}
    assert rows["subclone"]["speedup_text"] == "1.5x" and rows["subclone"]["steps_to_target"] == 200
    assert rows["subclone"]["start"] == 9.0 and rows["subclone"]["final"] == 4.9
    assert rows["random"]["speedup_text"] == "baseline" and rows["random"]["steps_to_target"] == 300
    assert rows["first-k"]["speedup"] is None and rows["first-k"]["speedup_text"] == "not reached in 400 steps"
    no_baseline = speedup_table({"subclone": results["subclone"]}, target=6.0)
    assert no_baseline[0]["steps_to_target"] == 100 and no_baseline[0]["speedup_text"] == "n/a"
