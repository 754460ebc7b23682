"""The first child shape offered for a parent (the app's Child page and its explorer budget).

Measured on both embedded real parents (docs/BENCHMARKS.md, real-parent quality): children that keep about
two thirds of the blocks and of every width (18 x 384 or 12 x 384 with 2 heads / 1 KV and FFN 1024 from
Gemma 3 270M, 20 x 384 with 6 heads / 2 KV and FFN 1024 from SmolLM2-135M) start 4-6 nats below random
init, while a fifth of the blocks at a third of the width (3 x 213 with one head from Gemma 3) starts 8 nats
above it. Cutting the width hurts more than cutting depth, and one head is where it breaks, so the rule
keeps depth and never goes below half of the parent's heads.
"""

from __future__ import annotations

from torch import nn

from subclone_core.core.shape import SIZE_ROLES, Shape, nearest_valid_shape

KEPT = 2 / 3  # share of the parent's blocks and of each width the first child keeps
HEADS_FLOOR = 1 / 2  # never fewer than this share of the parent's query heads


def starting_shape(parent_model: nn.Module, layers: int | None = None) -> Shape:
    """The valid shape nearest two thirds of the parent's blocks (or ``layers``) and of each width, with at
    least half of its heads (and at least 2 blocks)."""
    parent = Shape.of(parent_model.config)
    sizes = {role: max(1, round(getattr(parent, role) * KEPT)) for role in SIZE_ROLES}
    sizes["heads"] = max(sizes["heads"], round(parent.heads * HEADS_FLOOR), 1)
    sizes["layers"] = layers or min(parent.layers, max(2, round(parent.layers * KEPT)))
    return nearest_valid_shape(parent_model, sizes)
