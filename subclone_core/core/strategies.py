"""Strategies that build a child of a target shape from a parent, behind one interface.

- ``subclone``: the paper: neurons and heads in importance order, blocks chosen by relative magnitude.
- ``first-k``: the same slicing without reordering (the paper's Fig. 14 ablation).
- ``uniform``: weight selection (Xu et al., ICLR 2024): evenly strided indices, the first N blocks, no data.
- ``random``: a fresh random initialization of the child's config.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from subclone_core.core import __version__
from subclone_core.core.archs import arch_for
from subclone_core.core.building import build_model
from subclone_core.core.calibration import Importance
from subclone_core.core.errors import SubcloneError
from subclone_core.core.rng import seeded
from subclone_core.core.selection import Selection, pick_blocks, select
from subclone_core.core.shape import Shape, target_shape, validate_target
from subclone_core.core.slicing import child_config_dict, slice_state_dict

# strategy -> neuron/head ordering (None: no weights are taken from the parent)
STRATEGIES: dict[str, str | None] = {"subclone": "importance", "first-k": "first", "uniform": "uniform",
                                     "random": None}
# Block policy used when none is given. subclone: "magnitude" started lower than "middle" on the default
# parent (docs/BENCHMARKS.md); uniform: the first N blocks, as in weight selection.
DEFAULT_DROP: dict[str, str] = {"subclone": "magnitude", "first-k": "middle", "uniform": "first",
                                "random": "first"}
FORMAT = "subclone-manifest/1"


@dataclass
class Child:
    """A child model and the record of how it was made."""

    model: nn.Module
    shape: Shape
    manifest: dict
    selection: Selection | None = None
    preprocessor: object | None = None
    importance: Importance | None = field(default=None, repr=False)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SubcloneError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


def plan_shape(parent_model: nn.Module, **sizes: int | None) -> Shape:
    """The validated child shape for the given sizes (a size not given keeps the parent's value)."""
    parent = Shape.of(parent_model.config)
    child = target_shape(parent, **sizes)
    validate_target(parent, child, arch_for(parent_model.config.model_type))
    return child


def needs_calibration(strategy: str, drop: str | list[int] | None) -> bool:
    """Whether this strategy with this block policy needs importance measured on data."""
    check_strategy(strategy)
    policy = DEFAULT_DROP[strategy] if drop is None else drop
    return strategy == "subclone" or policy == "magnitude"


def subclone_model(
    parent_model: nn.Module,
    target: Shape,
    *,
    strategy: str = "subclone",
    importance: Importance | None = None,
    drop: str | list[int] | None = None,
    scale: bool | None = None,
    untie_head: bool = False,
    seed: int = 0,
    parent_tensors: Mapping[str, Tensor] | None = None,
    residual_score: str | None = None, refit: bool | None = None,
) -> Child:
    """Build a child of shape `target` from a loaded parent model; the parent is never modified.

    Args:
        parent_model: a transformers model of a supported family.
        target: the child's shape (validated here again).
        strategy: one of STRATEGIES.
        importance: calibration result; required by "subclone" and by drop="magnitude".
        drop: block policy ("middle", "magnitude", "first"), parent blocks to drop, or None (the default).
        scale: scale sliced linear weights by sqrt(fan-in ratio); None uses the family's measured default.
        untie_head: give a tied parent's child its own scaled head instead of sharing the embedding.
        seed: seed of the random initialization (strategy "random").
        parent_tensors: the parent's tensors streamed from its checkpoint (io.streaming.checkpoint_tensors), for a
            parent spread over devices or offloaded to disk.
        residual_score, refit: the residual ranking ("read" or "written", Importance.residual_ranking) and the
            least-squares refit (slicing.refit_input) of the importance order; None: the family's defaults.
    """
    check_strategy(strategy)
    arch, parent, order = arch_for(parent_model.config.model_type), Shape.of(parent_model.config), STRATEGIES[strategy]
    validate_target(parent, target, arch)
    scale = arch.scale_default if scale is None else scale
    residual_score, refit = _ranking_options(order, arch, residual_score, refit, importance)
    if order is None:
        sel, policy, blocks = None, None, list(range(target.layers))
        model = _random_model(parent_model, arch, target, seed)
    else:
        policy = DEFAULT_DROP[strategy] if drop is None else drop
        blocks, sel = _kept(parent, target, order, policy, importance, residual_score)
        tensors = parent_model.state_dict() if parent_tensors is None else parent_tensors
        model = _sliced_model(parent_model, tensors, target, sel, scale=scale, untie_head=untie_head,
                              grams=importance.grams if refit else None)
    settings = {"strategy": strategy, "order": order, "drop": policy, "scale": scale and order is not None,
                "untie_head": untie_head, "seed": seed, "residual_score": residual_score, "refit": refit,
                "refit_ridge": arch.refit_ridge if refit else None}
    manifest = build_manifest(parent, target, blocks, sel, importance, settings)
    return Child(model=model, shape=target, manifest=manifest, selection=sel, importance=importance)


def _kept(parent: Shape, target: Shape, order: str, policy: str | list[int], importance: Importance | None,
          residual_score: str | None) -> tuple[list[int], Selection]:
    """The parent blocks the child keeps (by the block policy) and what it keeps inside them (by the order)."""
    rel = importance.rel_magnitude if importance is not None else None
    blocks = pick_blocks(parent.layers, target.layers, policy, rel)
    return blocks, select(parent, target, importance, order, blocks, residual_score=residual_score)


def _sliced_model(parent_model: nn.Module, tensors: Mapping[str, Tensor], target: Shape, sel: Selection, *,
                  scale: bool, untie_head: bool, grams: Mapping[str, Tensor] | None) -> nn.Module:
    """The child model: its config from the parent's with the target sizes, its weights sliced (or refit)."""
    arch, parent = arch_for(parent_model.config.model_type), Shape.of(parent_model.config)
    cfg = child_config_dict(parent_model.config, arch, target, sel, tie_head=not untie_head)
    sd = slice_state_dict(tensors, arch, parent, sel, scale=scale, untie_head=untie_head, grams=grams,
                          ridge=arch.refit_ridge)
    return build_model(type(parent_model), type(parent_model.config).from_dict(cfg), sd)


def _ranking_options(order: str | None, arch, residual_score: str | None, refit: bool | None,
                     importance: Importance | None) -> tuple[str | None, bool]:
    """The residual ranking and whether to refit: the importance order's (as asked, else the family's
    defaults); other orders use neither."""
    if order != "importance":
        return None, False
    return residual_score or arch.residual_score, _refit_choice(refit, arch, importance)


def _refit_choice(refit: bool | None, arch, importance: Importance | None) -> bool:
    """Whether to refit: as asked, or the family's default where the calibration recorded Gram matrices
    (calibration skips them for parents whose matrices would not fit its memory budget)."""
    has_grams = importance is not None and importance.grams is not None
    if refit and not has_grams:
        raise SubcloneError("refit needs the Gram matrices of a calibration that recorded them "
                            "(measure_importance(..., grams=True)); calibrate again or turn refit off")
    return arch.refit_default and has_grams if refit is None else refit


def shape_config(parent_model: nn.Module, target: Shape):
    """The config of a child of shape ``target`` (the first blocks' per-layer settings)."""
    arch = arch_for(parent_model.config.model_type)
    dummy = Selection(residual=[], blocks=list(range(target.layers)), heads=[], kv_heads=[], ffn=[])
    cfg = child_config_dict(parent_model.config, arch, target, dummy, tie_head=True)
    return type(parent_model.config).from_dict(cfg)


def parameter_count(parent_model: nn.Module, shape: Shape) -> int:
    """Parameters of a child of this shape (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = type(parent_model)(shape_config(parent_model, shape))
    return sum(p.numel() for p in model.parameters())


def _random_model(parent_model: nn.Module, arch, target: Shape, seed: int) -> nn.Module:
    """A freshly initialized model of the child's config, seeded without touching the global RNG."""
    with seeded(seed):
        model = type(parent_model)(shape_config(parent_model, target))
    dtype = next(parent_model.parameters()).dtype
    return model.to(dtype).eval()


def build_manifest(parent: Shape, child: Shape, blocks: list[int], sel: Selection | None,
                   importance: Importance | None, settings: dict) -> dict:
    """The subclone.json record: what was kept, how, and from which data."""
    return {
        "format": FORMAT,
        "library_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parent": {"shape": parent.as_dict()},
        "child": {"shape": child.as_dict()},
        **settings,
        "kept_blocks": blocks,
        "removed_blocks": [] if sel is None else sel.removed_blocks(parent.layers),
        "selection": sel.to_json() if sel else None,
        "calibration": ({"data": importance.data, "tokens": importance.tokens} if importance else None),
    }
