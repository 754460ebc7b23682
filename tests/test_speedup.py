"""The speedup arithmetic on synthetic curves: the paper's definition and its edge cases."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from subclone_core.training.events import EvalEvent, StartEvent, StepEvent
from subclone_core.training.speedup import (
    DROP_FRACTIONS,
    IsoLoss,
    best_value,
    drop_levels,
    format_iso_loss,
    iso_levels,
    iso_loss,
    iso_loss_by_candidate,
    iso_loss_summary,
    result_track,
    speedup,
    speedup_table,
    steps_to_reach,
    tracks_from_events,
)

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
        return SimpleNamespace(status="done", unit=unit, metric="loss", throughput=100.0,
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


# --- iso-loss -------------------------------------------------------------------------------------------

def track(points, tokens_per_step=1000):
    """(step, value) pairs -> (step, seen, value) evaluation points."""
    return [(step, step * tokens_per_step, value) for step, value in points]


# Random init: new bests 8, 6, 5 at steps 100, 200, 300; step 400 is worse than its best.
BASE = track([(0, 10.0), (100, 8.0), (200, 6.0), (300, 5.0), (400, 5.5)])


def test_iso_levels_are_random_inits_new_bests_after_step_0_in_the_order_reached():
    assert iso_levels(BASE) == [8.0, 6.0, 5.0]
    noisy = track([(0, 10.0), (10, 9.0), (20, 9.5), (30, float("nan")), (40, None), (50, 9.0), (60, 7.0)])
    assert iso_levels(noisy) == [9.0, 7.0]  # a relapse, NaN, None and a tie are not new levels
    accuracy = track([(0, 0.1), (10, 0.4), (20, 0.3), (30, 0.6)])
    assert iso_levels(accuracy, higher_is_better=True) == [0.4, 0.6]
    assert iso_levels([]) == [] and iso_levels(track([(0, 10.0)])) == []


def test_iso_loss_interpolates_the_candidates_crossing_between_evaluations():
    child = track([(0, 9.0), (100, 7.0), (200, 5.0), (300, 4.0)])
    rows = iso_loss(BASE, child)
    assert [r.level for r in rows] == [8.0, 6.0, 5.0]
    # 8.0 lies halfway from 9.0 (step 0) to 7.0 (step 100); 6.0 halfway from 7.0 to 5.0; 5.0 is a point.
    assert [r.candidate_steps for r in rows] == pytest.approx([50, 150, 200])
    assert [r.candidate_tokens for r in rows] == pytest.approx([50_000, 150_000, 200_000])
    assert [r.baseline_steps for r in rows] == [100, 200, 300]
    assert [r.speedup for r in rows] == pytest.approx([2.0, 200 / 150, 1.5])
    assert not any(r.lower_bound or r.at_start for r in rows)
    assert rows[0].text() == "2.0x" and rows[1].text() == "1.3x"


def test_iso_loss_never_extrapolates_past_the_end_of_the_candidates_run():
    child = track([(0, 9.0), (100, 7.0), (150, 5.5)])  # still falling fast when it stops
    rows = iso_loss(BASE, child)
    assert rows[1].speedup == pytest.approx(200 / (100 + 50 / 1.5))  # 6.0: between 7.0 at 100 and 5.5 at 150
    last = rows[2]
    assert last.level == 5.0 and last.speedup is None and last.candidate_steps is None
    assert last.candidate_tokens is None and last.baseline_steps == 300
    assert last.text() == "not reached in 150 steps"


def test_a_level_the_candidate_beat_at_step_0_is_a_lower_bound_from_its_first_evaluation_after_0():
    child = track([(0, 7.0), (25, 5.8), (50, 4.0)])
    first, second, third = iso_loss(BASE, child)
    assert first.at_start and first.lower_bound
    assert first.candidate_steps == 25 and first.candidate_tokens == 25_000  # an upper bound on its need
    assert first.speedup == pytest.approx(100 / 25) and first.text() == ">= 4.0x"
    assert not second.at_start and not second.lower_bound  # 6.0 is crossed between 7.0 at 0 and 5.8 at 25
    assert second.candidate_steps == pytest.approx(25 / 1.2) and second.speedup == pytest.approx(200 * 1.2 / 25)
    assert not third.at_start and not third.lower_bound  # 5.0 is crossed between 25 and 50
    assert third.candidate_steps == pytest.approx(25 + 25 * 0.8 / 1.8)
    alone = iso_loss(BASE, track([(0, 4.0)]))
    assert all(r.speedup is None and r.at_start for r in alone)
    assert alone[0].text() == "at the level at step 0 (no later evaluation)"


def test_speedup_is_always_baseline_over_candidate_in_tokens_when_runs_count_them():
    child = track([(0, 7.0), (25, 5.8), (50, 4.0)], tokens_per_step=2000)  # twice the batch of random init
    for row in iso_loss(BASE, child):
        assert row.speedup == pytest.approx(row.baseline_tokens / row.candidate_tokens)
        assert row.speedup == pytest.approx(row.baseline_steps / row.candidate_steps / 2)
    no_tokens = [(step, None, value) for step, _, value in child]
    assert iso_loss(BASE, no_tokens)[2].speedup == pytest.approx(300 / (25 + 25 * 0.8 / 1.8))


def test_iso_loss_for_accuracy_where_higher_is_better():
    base = track([(0, 0.10), (10, 0.40), (20, 0.60), (30, 0.70)])
    child = track([(0, 0.30), (10, 0.50), (20, 0.80)])
    rows = iso_loss(base, child, higher_is_better=True)
    assert [r.level for r in rows] == [0.40, 0.60, 0.70]
    # 0.40 halfway from 0.30 to 0.50; 0.60 and 0.70 are a third and two thirds from 0.50 to 0.80.
    assert [r.candidate_steps for r in rows] == pytest.approx([5, 10 + 10 / 3, 10 + 20 / 3])
    assert [r.speedup for r in rows] == pytest.approx([2.0, 20 / (40 / 3), 30 / (50 / 3)])
    as_loss = iso_loss(base, child)  # read as losses nothing after step 0 is a new best
    assert as_loss == []


def test_drop_levels_are_shares_of_random_inits_improvement():
    assert drop_levels(BASE) == [(0.25, 8.75), (0.5, 7.5), (0.75, 6.25), (1.0, 5.0)]
    accuracy = track([(0, 0.1), (10, 0.5), (20, 0.9)])
    assert drop_levels(accuracy, (0.5, 1.0), higher_is_better=True) == [(0.5, pytest.approx(0.5)), (1.0, 0.9)]
    assert drop_levels(track([(0, 10.0), (10, 11.0)])) == []  # never improves on its start
    assert drop_levels(track([(0, float("nan")), (10, 9.0)])) == [] and drop_levels([]) == []


def test_iso_loss_at_drop_fractions_interpolates_random_init_too():
    child = track([(0, 9.0), (100, 7.0), (200, 5.0), (300, 4.0)])
    rows = iso_loss(BASE, child, fractions=DROP_FRACTIONS)
    assert [r.fraction for r in rows] == list(DROP_FRACTIONS)
    assert [r.level for r in rows] == [8.75, 7.5, 6.25, 5.0]
    assert rows[0].baseline_steps == pytest.approx(62.5)  # 8.75 between 10.0 at 0 and 8.0 at 100
    assert rows[0].candidate_steps == pytest.approx(12.5)
    assert rows[0].speedup == pytest.approx(5.0)
    assert rows[-1].baseline_steps == 300 and rows[-1].speedup == pytest.approx(1.5)
    with pytest.raises(ValueError, match="not both"):
        iso_loss(BASE, child, levels=[5.0], fractions=DROP_FRACTIONS)


def test_levels_given_from_outside_random_init_never_reached_or_started_at():
    child = track([(0, 9.0), (100, 4.5), (200, 4.0)])
    beyond, above = iso_loss(BASE, child, levels=[4.0, 10.5])
    # Random init needed more than its whole run (400 steps) to reach 4.0: at least 400 / 200.
    assert beyond.lower_bound and not beyond.at_start
    assert beyond.baseline_steps == 400 and beyond.speedup == pytest.approx(2.0) and beyond.text() == ">= 2.0x"
    assert above.speedup is None and "step 0" in above.text()
    assert iso_loss([], child, levels=[5.0])[0].text() == "random init has no evaluation"


def test_nan_evaluations_never_count_and_are_not_interpolated_from():
    child = track([(0, 9.0), (100, float("nan")), (200, 5.0)])
    rows = iso_loss(BASE, child)
    assert [r.candidate_steps for r in rows] == [200, 200, 200]
    diverged = track([(0, 9.0), (100, 8.5), (200, float("nan"))])
    assert iso_loss(BASE, diverged)[0].text() == "not reached in 200 steps"


def test_tracks_from_results_and_events_feed_the_per_candidate_summary():
    evals = [SimpleNamespace(step=s, seen=t, value=lambda m, v=v: v) for s, t, v in BASE]
    assert result_track(SimpleNamespace(evals=evals), "loss") == list(BASE)
    events = [StartEvent()]
    for name, points in (("random", BASE), ("subclone", track([(0, 7.0), (100, 5.5), (200, 4.0)]))):
        events += [EvalEvent(candidate=name, step=s, seen=t, loss=v) for s, t, v in points]
    events.append(StepEvent(candidate="subclone", step=1, loss=3.0))
    tracks = tracks_from_events(events, "loss")
    assert tracks["random"] == list(BASE) and list(tracks) == ["random", "subclone"]
    by_name = iso_loss_by_candidate(tracks, higher_is_better=False)
    assert list(by_name) == ["subclone"] and by_name["subclone"][0].at_start
    assert iso_loss_by_candidate({"subclone": tracks["subclone"]}, higher_is_better=False) == {}
    summary = iso_loss_summary(tracks, higher_is_better=False)
    assert [r["level"] for r in summary["subclone"]["levels"]] == [8.0, 6.0, 5.0]
    assert [r["fraction"] for r in summary["subclone"]["drop"]] == list(DROP_FRACTIONS)
    assert summary["subclone"]["levels"][0]["text"] == ">= 1.0x"  # 100 / its first evaluation after 0 (100)
    # compare prints the summary's rows as read back from summary.json
    assert format_iso_loss({n: v["drop"] for n, v in summary.items()}) == format_iso_loss(
        iso_loss_by_candidate(tracks, higher_is_better=False, fractions=DROP_FRACTIONS))
    assert IsoLoss.from_dict(summary["subclone"]["levels"][1]) == by_name["subclone"][1]


def test_format_iso_loss_prints_one_line_per_candidate_with_a_column_per_level():
    rows = {"subclone": iso_loss(BASE, track([(0, 9.0), (100, 7.0), (200, 5.0)]), fractions=DROP_FRACTIONS),
            "first-k": iso_loss(BASE, track([(0, 12.0), (400, 7.0)]), fractions=DROP_FRACTIONS)}
    lines = format_iso_loss(rows)
    assert "random init's tokens" in lines[0]
    assert lines[1].split() == ["candidate", "25%", "(8.75)", "50%", "(7.5)", "75%", "(6.25)", "100%", "(5)"]
    assert set(lines[2]) == {"-", " "}
    # Random init needs 62.5, 125, 187.5 and 300 steps; the child 12.5, 75, 137.5 and 200.
    assert lines[3].split() == ["subclone", "5.0x", "1.7x", "1.4x", "1.5x"]
    # first-k gets there later than random init (a speedup under 1) and never reaches the last two levels.
    assert lines[4].split()[:3] == ["first-k", "0.2x", "0.3x"] and lines[4].count("not reached") == 2
    assert format_iso_loss({}) == [] and format_iso_loss({"subclone": []}) == []
    acc = {"child": [IsoLoss(0.7, 1.0, 30, None, 10, None, 3.0)]}
    assert "100% (70.0%)" in format_iso_loss(acc, metric="accuracy")[1]
    assert "random init's steps" in format_iso_loss(acc, metric="accuracy")[0]


def test_the_apps_iso_loss_chart_draws_exact_points_as_lines_and_lower_bounds_as_triangles():
    from subclone_core.app.speedup_chart import iso_loss_chart_from_events

    events = []
    for name, points in (("random", BASE), ("subclone", track([(0, 7.0), (100, 5.5), (200, 4.0)]))):
        events += [EvalEvent(candidate=name, step=s, seen=t, loss=v) for s, t, v in points]
    fig = iso_loss_chart_from_events(events)
    traces = {trace.name: trace for trace in fig.data}
    assert set(traces) == {"subclone", "subclone (at least: there at step 0)"}
    exact, bound = traces["subclone"], traces["subclone (at least: there at step 0)"]
    # 6.0 is crossed two thirds of the way to step 100, 5.0 a third of the way from 100 to 200.
    assert list(exact.x) == [6.0, 5.0] and list(exact.y) == pytest.approx([200 / (200 / 3), 300 / (400 / 3)])
    assert list(bound.x) == [8.0] and bound.marker.symbol == "triangle-up" and bound.mode == "markers"
    assert fig.layout.xaxis.autorange == "reversed" and fig.layout.yaxis.type == "log"
    waiting = iso_loss_chart_from_events(events[:1] + events[5:6])  # random's step 0 only: no level yet
    assert not waiting.data and "Waiting" in waiting.layout.annotations[-1].text
    accuracy = iso_loss_chart_from_events([replace(e, accuracy=e.loss) for e in events], metric="accuracy",
                                          higher_is_better=True)
    assert accuracy.layout.xaxis.autorange is True
