"""The paper's speedup: training random init needs to reach a target, over what a child needs.

Definitions (Samragh et al. 2023, "speedup"): the target defaults to the best validation value random
init reaches within the budget; random init's cost is the first step at which it reaches that value,
the child's cost is the first step at which it reaches the same value; speedup = baseline / child.
Lower is better for loss and perplexity, higher for accuracy.

Honesty rules: a child that never reaches the target gets no number ("not reached in 500 steps"); a
child already at the target at its first evaluation (step 0) gets a lower bound, baseline steps over
the first evaluation step after 0 (">= 10x"): the evaluation grid cannot resolve anything finer, and
dividing by zero would print infinity. A baseline that never reaches a user-given target also gives a
lower bound (its cost is more than its budget).

By default a curve "reaches" the target at the first evaluation point at or past it (no
interpolation: evaluation steps only, the paper's convention). With ``interpolate=True`` the crossing
is placed by linear interpolation between that point and the one before it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from subclone_core.training.events import EvalEvent, Event, of_kind

Curve = Sequence[tuple[float, float | None]]  # (step, value) evaluation points in step order

HIGHER_IS_BETTER = {"loss": False, "perplexity": False, "accuracy": True}


@dataclass(frozen=True)
class Reach:
    """When a curve first reaches a target.

    Attributes:
        reached: whether any evaluation reached the target.
        step: the step it did (float when interpolated); None when not reached.
        budget: the last evaluated step (how long it had).
        at_start: reached already at the first evaluation.
        resolution: the first evaluation step after the first one (the finest a start can be resolved).
    """

    reached: bool
    step: float | None
    budget: float
    at_start: bool = False
    resolution: float | None = None

    def text(self) -> str:
        """E.g. "step 150", "step 0 (at start)" or "not reached in 500 steps"."""
        if not self.reached:
            return f"not reached in {_num(self.budget)} steps"
        return f"step {_num(self.step)}" + (" (at start)" if self.at_start else "")


def _num(x: float | None) -> str:
    """Steps as integers when whole, else one decimal."""
    return "?" if x is None else (f"{int(x)}" if float(x).is_integer() else f"{x:.1f}")


def _at_or_past(value: float | None, target: float, higher: bool) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher else value <= target


def steps_to_reach(curve: Curve, target: float, *, higher_is_better: bool = False,
                   interpolate: bool = False) -> Reach:
    """The first step at which ``curve`` is at or past ``target``.

    Args:
        curve: (step, value) evaluation points in step order; None or NaN values never count.
        target: the value to reach.
        higher_is_better: True for accuracy, False for loss or perplexity.
        interpolate: place the crossing linearly between the reaching point and the one before it.

    Returns:
        A Reach; ``reached=False`` (and ``step=None``) when no point gets there.
    """
    if not curve:
        return Reach(False, None, 0)
    budget = curve[-1][0]
    resolution = curve[1][0] if len(curve) > 1 else None
    for i, (step, value) in enumerate(curve):
        if not _at_or_past(value, target, higher_is_better):
            continue
        if i == 0:
            return Reach(True, step, budget, at_start=True, resolution=resolution)
        prev_step, prev_value = curve[i - 1]
        if interpolate and prev_value is not None and math.isfinite(prev_value) and value != prev_value:
            step = prev_step + (step - prev_step) * (prev_value - target) / (prev_value - value)
        return Reach(True, step, budget, resolution=resolution)
    return Reach(False, None, budget, resolution=resolution)


def best_value(curve: Curve, *, higher_is_better: bool = False) -> float | None:
    """The best finite value of a curve, or None when it has none."""
    values = [v for _, v in curve if v is not None and math.isfinite(v)]
    if not values:
        return None
    return max(values) if higher_is_better else min(values)


@dataclass(frozen=True)
class Speedup:
    """Baseline cost over child cost for one target.

    Attributes:
        target: the value both had to reach.
        baseline: when the baseline (random init) reached it.
        child: when the child reached it.
        ratio: the speedup, or its lower bound when ``lower_bound``; None when there is no number.
        lower_bound: the true speedup is at least ``ratio``.
        reason: why there is no number, else None.
    """

    target: float | None
    baseline: Reach
    child: Reach
    ratio: float | None
    lower_bound: bool = False
    reason: str | None = None

    def text(self) -> str:
        """E.g. "3.3x", ">= 10x", or the reason there is no number."""
        if self.ratio is None:
            return self.reason or "n/a"
        return (">= " if self.lower_bound else "") + f"{self.ratio:.1f}x"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the text form."""
        return {**asdict(self), "text": self.text()}


def _ratio(baseline: Reach, child: Reach, target: float) -> Speedup:
    """Apply the honesty rules of the module docstring to two reaches."""
    if not child.reached:
        return Speedup(target, baseline, child, None, reason=child.text())
    if baseline.reached and baseline.step == 0:
        return Speedup(target, baseline, child, None, reason="n/a: random init is at the target at step 0")
    # A baseline that never reached the target needed more than its budget: a lower bound.
    base_steps, bound = (baseline.step, False) if baseline.reached else (baseline.budget, True)
    if child.at_start or child.step == 0:
        if not child.resolution or not base_steps:
            return Speedup(target, baseline, child, None, reason="child at the target at step 0")
        return Speedup(target, baseline, child, base_steps / child.resolution, lower_bound=True)
    if not base_steps:
        return Speedup(target, baseline, child, None, reason="baseline was not trained")
    return Speedup(target, baseline, child, base_steps / child.step, lower_bound=bound)


def speedup(baseline: Curve, child: Curve, *, target: float | None = None, higher_is_better: bool = False,
            interpolate: bool = False) -> Speedup:
    """The speedup of ``child`` over ``baseline`` (random init).

    Args:
        baseline: the baseline's (step, value) evaluation points.
        child: the child's (step, value) evaluation points, on the same evaluation grid ideally.
        target: the value to reach; None uses the baseline's best value (the paper's definition).
        higher_is_better: True for accuracy.
        interpolate: linear interpolation between evaluation points (see module docstring).

    Returns:
        A Speedup; ``text()`` gives "3.3x", ">= 10x" or "not reached in N steps".
    """
    if target is None:
        target = best_value(baseline, higher_is_better=higher_is_better)
    if target is None:
        empty = Reach(False, None, 0)
        return Speedup(None, empty, empty, None, reason="baseline has no finite evaluation")
    kwargs = {"higher_is_better": higher_is_better, "interpolate": interpolate}
    return _ratio(steps_to_reach(baseline, target, **kwargs), steps_to_reach(child, target, **kwargs), target)


def speedup_table(results: Mapping[str, Any], *, baseline: str = "random", target: float | None = None,
                  metric: str | None = None, interpolate: bool = False) -> list[dict[str, Any]]:
    """One row per training result: start and final value, steps to target, speedup, throughput.

    Args:
        results: {name: RunResult} from train_candidates.
        baseline: the name of the random-init result; without it speedups are None.
        target: the value to reach; None uses the baseline's best value.
        metric: "loss", "perplexity" or "accuracy"; None takes the results' own metric (their task's).
        interpolate: see speedup().

    Returns:
        Rows (dicts) ready for a table or JSON.
    """
    first = next(iter(results.values()), None)
    if metric is None:
        metric = first.metric if first is not None else "loss"
    higher = HIGHER_IS_BETTER[metric]
    base = results.get(baseline)
    if target is None and base is not None:
        target = best_value(base.curve(metric), higher_is_better=higher)
    rows = []
    for name, result in results.items():
        curve = result.curve(metric)
        reach = steps_to_reach(curve, target, higher_is_better=higher, interpolate=interpolate) \
            if target is not None else None
        sp = speedup(base.curve(metric), curve, target=target, higher_is_better=higher,
                     interpolate=interpolate) if base is not None and name != baseline else None
        rows.append({
            "name": name, "status": result.status, "metric": metric,
            "start": curve[0][1] if curve else None, "final": curve[-1][1] if curve else None,
            "best": best_value(curve, higher_is_better=higher), "target": target,
            "steps_to_target": reach.step if reach and reach.reached else None,
            "steps_to_target_text": reach.text() if reach else "n/a",
            "speedup": sp.ratio if sp else None, "speedup_lower_bound": sp.lower_bound if sp else False,
            "speedup_text": sp.text() if sp else ("baseline" if name == baseline else "n/a"),
            "throughput": result.throughput, "unit": result.unit,
        })
    return rows


# --- iso-loss: the speedup at every level random init reaches -------------------------------------------
#
# One number at one target hides how the speedup changes as training goes on: a pretrained start is far
# ahead early (a large ratio at high loss) and the lead usually shrinks towards random init's final loss.
# The iso-loss curve gives the ratio at every level random init's validation curve reaches. Curves here are
# "tracks": (step, seen, value) evaluation points, seen being the tokens (or images) trained on so far, so
# that each level gets both steps and tokens. Crossings are interpolated linearly between evaluations and
# never extrapolated past the last one.

Track = Sequence[tuple[float, float | None, float | None]]  # (step, seen, value) evaluation points, in step order

DROP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # shares of random init's improvement that compare prints


@dataclass(frozen=True)
class IsoLoss:
    """The speedup at one loss (or accuracy) level.

    Invariant: ``speedup`` is ``baseline_tokens / candidate_tokens`` when both runs report tokens, else
    ``baseline_steps / candidate_steps``.

    Attributes:
        level: the validation value both had to reach.
        fraction: the share of random init's improvement (start to best) this level stands for, when
            the level was chosen that way (drop_levels); else None.
        baseline_steps: steps random init needs (interpolated); its whole run when it never gets there.
        baseline_tokens: tokens (or images) random init needs, likewise; None without token counts.
        candidate_steps: steps the candidate needs; for a level it beat at step 0, its first evaluation
            step after 0 (an upper bound); None when it never gets there.
        candidate_tokens: the same in tokens (or images).
        speedup: the ratio, or its lower bound when ``lower_bound``; None when there is no number.
        lower_bound: the true speedup is at least ``speedup`` (the candidate was there at step 0, or
            random init never reached a level given from outside).
        at_start: the candidate was at the level at its first evaluation.
        reason: why there is no number, else None.
    """

    level: float
    fraction: float | None
    baseline_steps: float | None
    baseline_tokens: float | None
    candidate_steps: float | None
    candidate_tokens: float | None
    speedup: float | None
    lower_bound: bool = False
    at_start: bool = False
    reason: str | None = None

    def text(self) -> str:
        """E.g. "2.7x", ">= 8.0x" or "not reached in 500 steps"."""
        if self.speedup is None:
            return self.reason or "n/a"
        return (">= " if self.lower_bound else "") + f"{self.speedup:.1f}x"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the text form."""
        return {**asdict(self), "text": self.text()}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> IsoLoss:
        """Back from to_dict() (e.g. summary.json's rows); extra keys such as "text" are ignored."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


@dataclass(frozen=True)
class _Crossing:
    """Where a track first reaches a level: None when it never does."""

    step: float | None
    seen: float | None
    at_start: bool = False


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _crossing(track: Track, level: float, higher: bool) -> _Crossing:
    """The first point of ``track`` at or past ``level``, placed linearly between evaluations."""
    for i, (step, seen, value) in enumerate(track):
        if not _at_or_past(value, level, higher):
            continue
        if i == 0:
            return _Crossing(step, seen, at_start=True)
        prev_step, prev_seen, prev_value = track[i - 1]
        if not _finite(prev_value) or value == prev_value:
            return _Crossing(step, seen)  # nothing to interpolate from: the evaluation itself
        t = (prev_value - level) / (prev_value - value)  # in (0, 1]: the previous point was short of it
        seen_at = prev_seen + t * (seen - prev_seen) if prev_seen is not None and seen is not None else None
        return _Crossing(prev_step + t * (step - prev_step), seen_at)
    return _Crossing(None, None)


def iso_levels(baseline: Track, *, higher_is_better: bool = False) -> list[float]:
    """Every value random init reaches on its curve: each new best after step 0, in the order reached.

    For a loss these decrease, for accuracy they increase. The first evaluation is not a level: random
    init needs no training to be there, so no speedup can be defined at it.
    """
    levels: list[float] = []
    best = None
    for i, (_, _, value) in enumerate(baseline):
        if not _finite(value) or (best is not None and not _strictly_past(value, best, higher_is_better)):
            continue
        best = value
        if i > 0:
            levels.append(value)
    return levels


def _strictly_past(value: float, reference: float, higher: bool) -> bool:
    return value > reference if higher else value < reference


def drop_levels(baseline: Track, fractions: Sequence[float] = DROP_FRACTIONS, *,
                higher_is_better: bool = False) -> list[tuple[float, float]]:
    """Levels at shares of random init's improvement: start + fraction x (best - start).

    Args:
        baseline: random init's track.
        fractions: shares of the improvement; 1.0 is random init's best value.
        higher_is_better: True for accuracy.

    Returns:
        (fraction, level) pairs; empty when the curve has no finite start or never improves on it.
    """
    start = next((value for _, _, value in baseline[:1] if _finite(value)), None)
    best = best_value([(step, value) for step, _, value in baseline], higher_is_better=higher_is_better)
    if start is None or best is None or not _strictly_past(best, start, higher_is_better):
        return []
    return [(f, start + f * (best - start)) for f in fractions]


def _no_number(level: float, fraction: float | None, base: _Crossing, reason: str, *,
               at_start: bool = False) -> IsoLoss:
    return IsoLoss(level, fraction, base.step, base.seen, None, None, None, at_start=at_start, reason=reason)


def _level_row(level: float, fraction: float | None, baseline: Track, candidate: Track, higher: bool) -> IsoLoss:
    """One level under the honesty rules (see IsoLoss and the section comment)."""
    base, cand = _crossing(baseline, level, higher), _crossing(candidate, level, higher)
    if not baseline:
        return _no_number(level, fraction, base, "random init has no evaluation")
    if base.at_start:
        return _no_number(level, fraction, base, "n/a: random init is at this level at step 0")
    if cand.step is None:
        budget = candidate[-1][0] if candidate else 0
        return _no_number(level, fraction, base, f"not reached in {_num(budget)} steps")
    bound = base.step is None  # random init never got there: it needed more than its whole run
    if bound:
        base = _Crossing(baseline[-1][0], baseline[-1][1])
    if cand.at_start:
        if len(candidate) < 2:
            return _no_number(level, fraction, base, "at the level at step 0 (no later evaluation)", at_start=True)
        cand = _Crossing(candidate[1][0], candidate[1][1], at_start=True)  # the finest the grid resolves
    by_tokens = base.seen is not None and cand.seen  # both runs count tokens (and the candidate trained)
    num, den = (base.seen, cand.seen) if by_tokens else (base.step, cand.step)
    if not den:
        return _no_number(level, fraction, base, "candidate was not trained")
    return IsoLoss(level, fraction, base.step, base.seen, cand.step, cand.seen, num / den,
                   lower_bound=bound or cand.at_start, at_start=cand.at_start)


def iso_loss(baseline: Track, candidate: Track, *, levels: Sequence[float] | None = None,
             fractions: Sequence[float] | None = None, higher_is_better: bool = False) -> list[IsoLoss]:
    """The speedup of ``candidate`` over ``baseline`` (random init) at many loss or accuracy levels.

    Args:
        baseline: random init's (step, seen, value) evaluation points, in step order.
        candidate: the candidate's points; the same evaluation grid is best, but not needed.
        levels: the values to compare at; None (with no ``fractions``) takes every value random init
            reaches (iso_levels), in the order it reaches them.
        fractions: instead of ``levels``: shares of random init's improvement (drop_levels), e.g.
            DROP_FRACTIONS.
        higher_is_better: True for accuracy, False for loss or perplexity.

    Returns:
        One IsoLoss per level, in the order of the levels.

    Raises:
        ValueError: both ``levels`` and ``fractions`` were given.
    """
    if levels is not None and fractions is not None:
        raise ValueError("give levels or fractions, not both")
    if fractions is not None:
        pairs = drop_levels(baseline, fractions, higher_is_better=higher_is_better)
    else:
        chosen = iso_levels(baseline, higher_is_better=higher_is_better) if levels is None else levels
        pairs = [(None, level) for level in chosen]
    return [_level_row(level, fraction, baseline, candidate, higher_is_better) for fraction, level in pairs]


def result_track(result: Any, metric: str) -> list[tuple[int, int, float | None]]:
    """A training result's (step, seen, value) evaluation points.

    Args:
        result: a RunResult (anything with ``evals`` of EvalPoint).
        metric: "loss", "perplexity" or "accuracy".
    """
    return [(p.step, p.seen, p.value(metric)) for p in result.evals]


def tracks_from_events(events: Sequence[Event], metric: str) -> dict[str, list[tuple]]:
    """Per-candidate (step, seen, value) points from training events (read_events or live callbacks).

    Args:
        events: engine events; only evaluations that carry ``metric`` count.
        metric: "loss", "perplexity" or "accuracy".
    """
    out: dict[str, list[tuple]] = {}
    for event in of_kind(events, EvalEvent):
        if event.value(metric) is not None:
            out.setdefault(event.candidate, []).append((event.step, event.seen, event.value(metric)))
    return out


def iso_loss_by_candidate(tracks: Mapping[str, Track], *, higher_is_better: bool, baseline: str = "random",
                          fractions: Sequence[float] | None = None) -> dict[str, list[IsoLoss]]:
    """iso_loss of every candidate but the baseline against it.

    Args:
        tracks: {name: (step, seen, value) points}, e.g. from result_track or tracks_from_events.
        higher_is_better: True for accuracy.
        baseline: the random-init candidate's name.
        fractions: shares of random init's improvement (e.g. DROP_FRACTIONS); None for every level
            random init reaches.

    Returns:
        {name: rows}, in the order of ``tracks``; empty when there is no baseline.
    """
    if baseline not in tracks:
        return {}
    return {name: iso_loss(tracks[baseline], track, fractions=fractions, higher_is_better=higher_is_better)
            for name, track in tracks.items() if name != baseline}


def iso_loss_summary(tracks: Mapping[str, Track], *, higher_is_better: bool,
                     baseline: str = "random") -> dict[str, dict[str, list[dict[str, Any]]]]:
    """JSON-ready iso-loss results for a run summary (summary.json's "iso_loss").

    Returns:
        {candidate: {"levels": every level random init reaches, "drop": the DROP_FRACTIONS levels}},
        each a list of IsoLoss.to_dict() rows; empty when there is no baseline.
    """
    curves = iso_loss_by_candidate(tracks, higher_is_better=higher_is_better, baseline=baseline)
    drops = iso_loss_by_candidate(tracks, higher_is_better=higher_is_better, baseline=baseline,
                                  fractions=DROP_FRACTIONS)
    return {name: {"levels": [r.to_dict() for r in curves[name]], "drop": [r.to_dict() for r in drops[name]]}
            for name in curves}


def _cell(row: IsoLoss) -> str:
    """A table cell: "2.7x", ">= 8.0x", "not reached" or "n/a"."""
    if row.speedup is not None:
        return row.text()
    return "not reached" if row.reason and row.reason.startswith("not reached") else "n/a"


def format_iso_loss(rows_by_candidate: Mapping[str, Sequence[IsoLoss | Mapping[str, Any]]], *,
                    metric: str = "loss") -> list[str]:
    """Plain-text lines: one column per level (the same levels for every candidate), one row per candidate.

    Args:
        rows_by_candidate: {name: rows}, e.g. iso_loss_by_candidate(..., fractions=DROP_FRACTIONS), or
            the "drop" rows of iso_loss_summary (dicts, as read back from summary.json).
        metric: what the levels are values of, for the title line.

    Returns:
        A title line, a header, a rule and one line per candidate; no lines when there is nothing to show.
    """
    rows_by_candidate = {name: [r if isinstance(r, IsoLoss) else IsoLoss.from_dict(r) for r in rows]
                         for name, rows in rows_by_candidate.items()}
    first = next((rows for rows in rows_by_candidate.values() if rows), None)
    if first is None:
        return []
    header = ["candidate"] + [_level_name(row, metric) for row in first]
    body = [[name] + [_cell(row) for row in rows] for name, rows in rows_by_candidate.items()]
    widths = [max(len(line[i]) for line in [header, *body] if i < len(line)) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    table.insert(1, "  ".join("-" * w for w in widths))
    unit = "tokens" if first[0].baseline_tokens is not None else "steps"
    title = (f"iso-{metric} speedup: random init's {unit} to reach a validation {metric} / the candidate's "
             "(interpolated between evaluations)")
    return [title, *table]


def _level_name(row: IsoLoss, metric: str) -> str:
    """E.g. "50% (7.61)": the share of random init's improvement and the level itself."""
    value = f"{row.level:.1%}" if metric == "accuracy" else f"{row.level:.3g}"
    return f"{row.fraction:.0%} ({value})" if row.fraction is not None else value
