"""The shape of a transformer (blocks, widths, heads) and validation of a child's target shape."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from subclone_core.core.archs import arch_for
from subclone_core.core.archs.spec import ArchSpec
from subclone_core.core.errors import SubcloneError

if TYPE_CHECKING:
    from torch import nn

ROLES = ("layers", "hidden", "heads", "kv_heads", "ffn", "head_dim")


@dataclass(frozen=True)
class Shape:
    """Sizes that subcloning can shrink. head_dim never changes (rotary pairs live inside a head)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Shape:
        """Read the shape from a transformers config through its architecture table."""
        arch = arch_for(config.model_type)
        raw = {role: getattr(config, key, None) for role, key in arch.config_keys.items()}
        hidden, heads = raw["hidden"], raw["heads"]
        ffn = raw.get("ffn") or (arch.ffn_default_multiple or 0) * hidden
        return cls(
            layers=raw["layers"],
            hidden=hidden,
            heads=heads,
            kv_heads=raw.get("kv_heads") or heads,
            ffn=ffn,
            head_dim=raw.get("head_dim") or hidden // heads,
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def queries_per_kv(self) -> int:
        return self.heads // self.kv_heads


def target_shape(parent: Shape, **sizes: int | None) -> Shape:
    """The child shape: each size given replaces the parent's; one not given keeps the parent's value.

    When the parent's hidden is heads x head_dim and only one of hidden and heads is given, the other
    follows it; the KV heads follow the heads at the parent's queries-per-KV ratio or less.
    """
    given = {k: v for k, v in sizes.items() if v is not None}
    unknown = set(given) - set(ROLES) - {"head_dim"}
    if unknown:
        raise SubcloneError(f"unknown size {sorted(unknown)}; valid: {', '.join(ROLES[:-1])}")
    child = replace(parent, **given)
    if parent.hidden == parent.heads * parent.head_dim:
        if "hidden" in given and "heads" not in given:
            child = replace(child, heads=max(1, child.hidden // child.head_dim))
        elif "heads" in given and "hidden" not in given:
            child = replace(child, hidden=child.heads * child.head_dim)
    if "heads" in given or "hidden" in given:
        if "kv_heads" not in given and parent.kv_heads == parent.heads:
            child = replace(child, kv_heads=child.heads)
        elif "kv_heads" not in given:
            child = replace(child, kv_heads=_nearest_kv(parent, child.heads))
    return child


def _nearest_kv(parent: Shape, heads: int) -> int:
    """The smallest KV count that keeps the parent's queries-per-KV ratio or less and divides heads."""
    for kv in range(1, parent.kv_heads + 1):
        if heads % kv == 0 and heads // kv <= parent.queries_per_kv:
            return kv
    return parent.kv_heads


def validate_target(parent: Shape, child: Shape, arch: ArchSpec) -> None:
    """Refuse a child shape that cannot be cut from the parent, naming the nearest valid choice."""
    for role in ROLES:
        value, limit = getattr(child, role), getattr(parent, role)
        if value <= 0:
            raise SubcloneError(f"{role}={value} must be a positive integer (the parent has {limit})")
        if value > limit:
            raise SubcloneError(f"{role}={value} is larger than the parent's {limit}; use at most {limit}")
    if child.head_dim != parent.head_dim:
        raise SubcloneError(f"head_dim={child.head_dim} cannot change; the parent's is {parent.head_dim}")
    _validate_heads(parent, child, arch)


def _validate_heads(parent: Shape, child: Shape, arch: ArchSpec) -> None:
    # Families without a head_dim setting derive it as hidden / heads, so the two must agree. Llama-family
    # configs carry head_dim, and their attention width may differ from hidden.
    ties_hidden = "head_dim" not in arch.config_keys
    if ties_hidden and child.hidden != child.heads * child.head_dim:
        best = max(1, round(child.hidden / child.head_dim))
        raise SubcloneError(
            f"hidden={child.hidden} must equal heads x head_dim ({child.heads} x {child.head_dim}); "
            f"nearest valid: hidden={child.heads * child.head_dim}, or heads={best} with "
            f"hidden={best * child.head_dim}"
        )
    if "kv_heads" not in arch.config_keys and child.kv_heads != child.heads:
        raise SubcloneError(f"kv_heads={child.kv_heads} must equal heads={child.heads} for {arch.name}")
    if not ties_hidden and child.hidden % child.heads:
        divisors = [h for h in range(1, parent.heads + 1) if child.hidden % h == 0]
        nearest = min(divisors, key=lambda h: abs(h - child.heads))
        raise SubcloneError(f"hidden={child.hidden} is not a multiple of heads={child.heads} (transformers "
                            f"requires it); nearest valid heads={nearest}")
    if child.heads % child.kv_heads:
        options = [h for h in range(child.kv_heads, parent.heads + 1, child.kv_heads)]
        nearest = min(options, key=lambda h: abs(h - child.heads))
        raise SubcloneError(
            f"heads={child.heads} is not divisible by kv_heads={child.kv_heads}; nearest valid heads={nearest}"
        )
    if child.queries_per_kv > parent.queries_per_kv:
        need = -(-child.heads // parent.queries_per_kv)
        raise SubcloneError(
            f"heads={child.heads} with kv_heads={child.kv_heads} puts {child.queries_per_kv} query heads on "
            f"each KV head, more than the parent's {parent.queries_per_kv}; use kv_heads>={need} "
            f"or heads<={child.kv_heads * parent.queries_per_kv}"
        )


# --- shape search and parameter counts ----------------------------------------------------------------

SIZE_ROLES = tuple(r for r in ROLES if r != "head_dim")  # what a user may choose


def nearest_valid_shape(parent_model: nn.Module, sizes: dict[str, int]) -> Shape:
    """The valid child shape closest to the requested sizes (distance: sum of |log ratio| per size)."""
    parent = Shape.of(parent_model.config)
    arch = arch_for(parent_model.config.model_type)
    want = {role: max(1, int(sizes.get(role) or getattr(parent, role))) for role in SIZE_ROLES}
    ties_hidden = "head_dim" not in arch.config_keys
    best, best_cost = parent, math.inf
    for heads in range(1, parent.heads + 1):
        for kv in range(1, parent.kv_heads + 1):
            hidden = (heads * parent.head_dim if ties_hidden
                      else _round_to(min(want["hidden"], parent.hidden), heads))
            shape = Shape(layers=min(want["layers"], parent.layers), hidden=hidden, heads=heads, kv_heads=kv,
                          ffn=min(want["ffn"], parent.ffn), head_dim=parent.head_dim)
            try:
                validate_target(parent, shape, arch)
            except SubcloneError:
                continue
            cost = sum(abs(math.log(getattr(shape, r) / want[r])) for r in SIZE_ROLES)
            if cost < best_cost:
                best, best_cost = shape, cost
    return best


def suggested_layers(parent_layers: int) -> int:
    """A first guess at the child's depth: a fifth of the parent's, at least 2 (first and last kept)."""
    return min(parent_layers, max(2, parent_layers // 5))


def suggested_shape(parent_model: nn.Module, layers: int | None = None) -> Shape:
    """A first guess at a child: a fifth of the blocks (or ``layers``), about a third of every width."""
    parent = Shape.of(parent_model.config)
    start = {role: max(1, getattr(parent, role) // 3) for role in SIZE_ROLES}
    start["layers"] = layers or suggested_layers(parent.layers)
    return nearest_valid_shape(parent_model, start)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
