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
from dataclasses import asdict, dataclass
from typing import Any

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
        metric: "loss", "perplexity" or "accuracy"; None picks accuracy for images, loss for text.
        interpolate: see speedup().

    Returns:
        Rows (dicts) ready for a table or JSON.
    """
    first = next(iter(results.values()), None)
    if metric is None:
        metric = "accuracy" if first is not None and first.unit == "images/s" else "loss"
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
