"""The shape explorer: which child shapes near a parameter budget start lowest when subcloned.

For every width the parent allows (one per attention-head count, with hidden, KV heads and FFN following
the parent's ratios), a few depths put the child near the budget. Each shape is subcloned and its
validation loss measured before any training (step 0); one randomly initialized child gives the
reference a subcloned child must beat. The Pareto front (no other shape is both smaller and lower) is
marked: those are the shapes worth training.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from subclone_core.core.archs import arch_for
from subclone_core.core.calibration import Importance
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape, target_shape, validate_target
from subclone_core.core.strategies import RefitItems, parameter_count, subclone_model
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.shapes import starting_shape

Progress = Callable[[int, int], None]
EVAL_TOKENS = 384  # shapes are compared on the same tokens: a few hundred rank them (paired differences)
# each shape is refit on this many of the calibration tokens (make refits the chosen one on all of them): on both
# embedded parents at their starting budget, 1,024 tokens gave the same best shape and Pareto front as 4,096
# (rank correlation 1.0 on SmolLM2-135M's 7 shapes, 0.9 on Gemma 3 270M's 5) in 40-50% of the time; 512 lost a
# front point on SmolLM2; without the refit Gemma 3's ranking changed (0.7, another best shape). At 0.6 of that
# budget SmolLM2's ranking held less well (0.88: two more front points, a best shape 0.32 nats worse at 4,096)
REFIT_TOKENS = 1024
DEPTHS_PER_WIDTH = 3
SPREAD = 1.5  # shapes between budget / SPREAD and budget x SPREAD parameters count as near the budget
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


@dataclass(frozen=True)
class ShapePoint:
    """One explored child: its shape, exact parameter count, step-0 validation loss, and whether it is on
    the Pareto front (no other explored shape has fewer or as many parameters and a lower or equal loss)."""

    shape: Shape
    params: int
    loss: float
    pareto: bool = False

    def to_json(self) -> dict:
        return {**self.shape.as_dict(), "params": self.params, "loss": self.loss, "pareto": self.pareto}


@dataclass
class Exploration:
    """The explored grid and its reference: a randomly initialized child of the smallest explored shape.

    Attributes:
        budget: the parameter budget asked for.
        points: the explored shapes, narrowest first, shallowest first.
        random_shape: the shape of the random reference child.
        random_metrics: that child's validation metrics (loss, and perplexity and tokens, or accuracy
            and images, as ``evaluate`` gives them).
    """

    budget: int
    points: list[ShapePoint]
    random_shape: Shape
    random_metrics: dict

    @property
    def random_loss(self) -> float:
        return float(self.random_metrics["loss"])

    @property
    def front(self) -> list[ShapePoint]:
        """The Pareto-optimal shapes, fewest parameters first."""
        return [p for p in self.points if p.pareto]

    def to_json(self) -> dict:
        return {"budget": self.budget, "random": {**self.random_shape.as_dict(), **self.random_metrics},
                "shapes": [p.to_json() for p in self.points]}


def parse_param_count(text: str) -> int:
    """'30M', '1.5B', '800k' or '30000000' as a number of parameters.

    Raises:
        SubcloneError: anything else, or a count that is not positive.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if match is None:
        raise SubcloneError(f"parameter budget {text!r} is not a number like 30M, 1.5B or 800k")
    count = int(float(match[1]) * _SUFFIXES[match[2].lower()])
    if count <= 0:
        raise SubcloneError(f"parameter budget {text!r} must be positive")
    return count


def width_shapes(parent_model: nn.Module) -> list[Shape]:
    """One valid full-depth shape per head count: hidden, KV heads and FFN scaled at the parent's ratios."""
    parent = Shape.of(parent_model.config)
    arch = arch_for(parent_model.config.model_type)
    shapes = []
    for heads in range(1, parent.heads + 1):
        hidden = _multiple(parent.hidden * heads / parent.heads, heads)
        ffn = _multiple(parent.ffn * hidden / parent.hidden, 8)  # multiples of 8 suit vector units
        shape = target_shape(parent, hidden=hidden, heads=heads, ffn=min(ffn, parent.ffn))
        try:
            validate_target(parent, shape, arch)
        except SubcloneError:
            continue  # e.g. a head count no KV grouping of the parent's allows
        shapes.append(shape)
    return shapes


def explored_widths(parent_model: nn.Module) -> list[Shape]:
    """width_shapes, and the starting child's width (two thirds of each size, at least half of the heads: the
    shape the quality bench found good) where the family's hidden size is free of the head count and so falls
    between them (Gemma 3: 426 wide with 3 heads, where width_shapes has 320 and 480), narrowest first."""
    widths = width_shapes(parent_model)
    start = replace(starting_shape(parent_model), layers=Shape.of(parent_model.config).layers)
    if all(w.hidden != start.hidden for w in widths):
        widths.append(start)
    return sorted(widths, key=lambda w: (w.hidden, w.heads))


def _multiple(value: float, multiple: int) -> int:
    """The multiple of ``multiple`` nearest ``value`` (at least ``multiple``)."""
    return max(multiple, round(value / multiple) * multiple)


def candidate_shapes(parent_model: nn.Module, budget: int, *, depths_per_width: int = DEPTHS_PER_WIDTH,
                     spread: float = SPREAD) -> list[tuple[Shape, int]]:
    """Shapes near the budget with their exact parameter counts, narrowest first, shallowest first.

    For each width the depth that lands nearest the budget and its neighbours (a tenth of the parent's
    depth apart) are kept when their count lies within a factor ``spread`` of the budget. A budget inside
    the parent's range that falls in a gap between shapes gets the nearest shape on each side. Computed once
    per parent model and settings (counting takes about 0.1 s of meta-device models, which the Child page's
    estimate would pay on every rerun); the cache lets the model go with its last other reference.

    Raises:
        SubcloneError: the budget is outside the range of the parent's shapes (which the message names).
    """
    known = _CANDIDATES.setdefault(parent_model, {})
    key = (budget, depths_per_width, spread)
    if key not in known:
        known[key] = tuple(_candidate_shapes(parent_model, budget, depths_per_width, spread))
    return list(known[key])


_CANDIDATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # parent model -> settings -> shapes


def _candidate_shapes(parent_model: nn.Module, budget: int, depths_per_width: int,
                      spread: float) -> list[tuple[Shape, int]]:
    parent_layers = Shape.of(parent_model.config).layers
    shallowest = min(2, parent_layers)  # the block policies keep the first and the last block
    step = max(1, parent_layers // 10)
    offsets = range(-(depths_per_width // 2), depths_per_width - depths_per_width // 2)
    grid, found = [], []
    for width in explored_widths(parent_model):
        one, two = (parameter_count(parent_model, replace(width, layers=n)) for n in (1, min(2, parent_layers)))
        per_block = max(two - one, 1)  # parameters grow linearly with depth
        grid += [(replace(width, layers=n), one + (n - 1) * per_block) for n in range(shallowest, parent_layers + 1)]
        best = round((budget - one) / per_block) + 1
        for depth in sorted({min(parent_layers, max(shallowest, best + k * step)) for k in offsets}):
            params = one + (depth - 1) * per_block
            if budget / spread <= params <= budget * spread:
                found.append((replace(width, layers=depth), params))
    return found or _nearest_either_side(grid, budget)


def _nearest_either_side(grid: list[tuple[Shape, int]], budget: int) -> list[tuple[Shape, int]]:
    """The largest shape below the budget and the smallest above it (narrowest first), for a budget that falls
    in a gap of the grid; refused when the budget is below or above every shape."""
    below = [point for point in grid if point[1] <= budget]
    above = [point for point in grid if point[1] >= budget]
    if not below or not above:
        sizes = [params for _, params in grid]
        raise SubcloneError(f"no child of this parent has about {budget:,} parameters: shapes range from "
                            f"{min(sizes):,} to {max(sizes):,}; choose a budget in that range")
    nearest = {max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])}
    return sorted(nearest, key=lambda p: (p[0].hidden, p[0].layers))


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (size, loss) points, whether each is Pareto-optimal: no other point is at most as large and at
    most as lossy while being strictly better in one of the two."""
    def dominated(i: int) -> bool:
        size, loss = points[i]
        return any(s <= size and v <= loss and (s < size or v < loss) for s, v in points)

    return [not dominated(i) for i in range(len(points))]


def explore_shapes(parent_model: nn.Module, importance: Importance, budget: int, batches: Sequence[dict], *,
                   depths_per_width: int = DEPTHS_PER_WIDTH, spread: float = SPREAD, seed: int = 0,
                   progress: Progress | None = None, refit_items: RefitItems | None = None) -> Exploration:
    """Subclone every candidate shape near the budget and measure its step-0 validation loss.

    Args:
        parent_model: the parent; never modified.
        importance: a calibration of the parent (the subclone strategy and block choice need it).
        budget: the target number of parameters.
        batches: fixed validation batches (a few hundred tokens suffice to rank shapes).
        depths_per_width, spread: as in ``candidate_shapes``.
        seed: the seed of the random reference child.
        progress: called with (children evaluated, children to evaluate) after each one.
        refit_items: the refit's block-by-block reads of the parent on the calibration data
            (workflow.children.refit_source), so that each shape is made as `make` makes it; None: sliced only.
    """
    candidates = candidate_shapes(parent_model, budget, depths_per_width=depths_per_width, spread=spread)
    total = len(candidates) + 1
    losses = []
    for done, (shape, _) in enumerate(candidates, start=1):
        child = subclone_model(parent_model, shape, importance=importance, refit_items=refit_items)
        losses.append(evaluate(child.model, batches)["loss"])
        del child  # one child in memory at a time
        if progress:
            progress(done, total)
    # a random child's step-0 loss hardly depends on its shape (its logits are near zero: about ln(vocab)),
    # so the cheapest shape to initialize stands for all of them
    reference = min(candidates, key=lambda c: c[1])[0]
    random_metrics = evaluate(subclone_model(parent_model, reference, strategy="random", seed=seed).model,
                              batches)
    if progress:
        progress(total, total)
    flags = pareto_flags([(params, loss) for (_, params), loss in zip(candidates, losses)])
    # a shape that starts no better than random init is never worth offering, however small it is
    worse = [loss >= random_metrics["loss"] for loss in losses]
    points = [ShapePoint(shape, params, loss, flag and not bad)
              for (shape, params), loss, flag, bad in zip(candidates, losses, flags, worse)]
    return Exploration(budget=budget, points=points, random_shape=reference, random_metrics=random_metrics)

