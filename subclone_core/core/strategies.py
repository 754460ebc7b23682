"""Strategies that build a child of a target shape from a parent, behind one interface.

- ``subclone``: the paper: neurons and heads in importance order, blocks chosen by relative magnitude.
- ``first-k``: the same slicing without reordering, and the same blocks (the paper's Fig. 14 ablation).
- ``uniform``: weight selection (Xu et al., ICLR 2024): evenly strided indices, the first N blocks, no data.
- ``random``: a fresh random initialization of the child's config.
- ``subclone+distill``: a training candidate, not a builder: subclone's child trained with the parent as teacher.

Published ways to cut a small model out of a big one, each as its selection and weight rule (the rest shared):

- ``shortgpt`` (Men et al., 2024): depth only; the blocks of lowest block influence 1 - cos(x, x + f(x)) go.
- ``wanda-sp`` (structured Wanda, as in FLAP's code): heads and FFN neurons by sum |W_ij| x ||x_j|| over the
  output projection's columns; sliced, no refit.
- ``flap`` (An et al., AAAI 2024): heads and FFN neurons by the fluctuation of their input x the squared column
  norm of the weight reading it; what a removed input carried on average is added to the projection's bias.
- ``minitron`` (NVIDIA ModelOpt): heads, FFN neurons and the residual stream by activations (mean over the
  sequence, L2 over the batch); blocks by 1 - cos; sliced only (no refit, no distillation here).
- ``llm-pruner`` (Ma et al., NeurIPS 2023): heads and FFN neurons by first-order Taylor importance, |W x dL/dW|
  summed over each one's group of weights (one backward pass over the calibration data); sliced, no refit
  (LLM-Pruner's LoRA recovery is training, which the training runs do).
- ``slicegpt`` (Ashkboos et al., ICLR 2024): the hidden size only: norms folded into their readers, the residual
  stream rotated into its PCA basis, the first dimensions kept (core.rotation). One rotation for every block:
  SliceGPT's per-block ones need Q_l^T Q_(l+1) matrices on the shortcuts, which a plain model cannot hold.

Everything the method knows about a strategy is one ``StrategySpec`` in ``STRATEGY_SPECS``, which the command
line reads; its training defaults live with training (``training.config.HPARAMS``), its label in the app
(``app.steps.STRATEGY_LABELS``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from subclone_core.core import __version__
from subclone_core.core.archs import arch_of_model
from subclone_core.core.archs.spec import ArchSpec
from subclone_core.core.building import build_model, empty_model
from subclone_core.core.calibration import RESIDUAL_COV, Importance
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import FORMAT, CalibrationRecord, Manifest, ParentRecord
from subclone_core.core.rng import seeded
from subclone_core.core.rotation import RotatedTensors, check_rotatable, pca_basis
from subclone_core.core.selection import (
    BLOCK_SCORES,
    SCORE_STATS,
    ReaderWeight,
    Selection,
    method_scores,
    pick_blocks,
    select,
)
from subclone_core.core.shape import SIZE_ROLES, Shape, target_shape, validate_target
from subclone_core.core.slicing import (
    ChildTensors,
    TensorSink,
    TensorSlicer,
    child_config_dict,
    head_rows,
    is_tied,
    slice_items,
    slice_state_dict,
)

# (the child's slicer, the child's config) -> every parent tensor with its refit moments:
# pipeline.refitting.refit_items
RefitItems = Callable[[TensorSlicer, object], ChildTensors]
OpenSink = Callable[[nn.Module], TensorSink]  # the child's empty model -> where its tensors go


@dataclass(frozen=True)
class StrategySpec:
    """One way to initialize a candidate.

    Attributes:
        name: the id users type (``--strategy``, ``--strategies``).
        order: how neurons and heads are ordered before slicing ("importance", "first", "uniform");
            None: no weights are taken from the parent.
        default_drop: the block policy when none is given ("magnitude", "middle", "first"); None: no
            blocks are chosen (random init builds the child's config afresh).
        uses_importance: its neuron and head order needs importance measured on data.
        builds_as: the strategy that builds its initial weights when it is a training variant of another.
        scores: the rule that scores heads and FFN neurons for the importance order (selection.SCORE_RULES).
        residual_score: its own ranking of the residual stream (calibration.RESIDUAL_SCORES); None: the family's.
        refit: False where the method's weight rule is its own (no least-squares refit, asking for it is an
            error); True: on unless turned off; None: the family's default.
        refit_rule: the family table's refit fields (ArchSpec.refit_*) the method replaces with its own rule
            (GRAIL's ridge towards zero on the parent's inputs); empty: the family's.
        scale: the sqrt(fan-in) scaling when none is asked; None: the family's default.
        bias_compensation: add the mean contribution of removed inputs to the output projections' biases (FLAP).
        rotation: slice the parent rotated into the PCA basis of its residual stream (SliceGPT, core.rotation),
            the hidden size only; needs the stream's covariance from calibration (needs_residual_cov).
    """

    name: str
    order: str | None
    default_drop: str | None
    uses_importance: bool
    builds_as: str | None = None
    scores: str = "paper"
    residual_score: str | None = None
    refit: bool | None = None
    scale: bool | None = None
    bias_compensation: bool = False
    rotation: bool = False
    refit_rule: tuple[tuple[str, object], ...] = ()


# default_drop: subclone's "magnitude" started lower than "middle" on the default parent
# (docs/BENCHMARKS.md); first-k is subclone without reordering, so it takes the same blocks; uniform
# takes the first N blocks, as in weight selection.
STRATEGY_SPECS: dict[str, StrategySpec] = {spec.name: spec for spec in (
    StrategySpec("subclone", "importance", "magnitude", uses_importance=True),
    StrategySpec("first-k", "first", "magnitude", uses_importance=False),
    StrategySpec("uniform", "uniform", "first", uses_importance=False),
    StrategySpec("random", None, None, uses_importance=False),
    StrategySpec("subclone+distill", "importance", "magnitude", uses_importance=True, builds_as="subclone"),
    # Published methods, slice only (their own weight rules; no sqrt(fan-in) scaling, which none of them uses).
    # Wanda-sp and FLAP prune widths only: a shallower child drops blocks by our default rule (shown in the plan).
    StrategySpec("shortgpt", "keep", "influence", uses_importance=False, scale=False),
    StrategySpec("wanda-sp", "importance", "magnitude", uses_importance=True, scores="wanda-sp",
                 refit=False, scale=False),
    StrategySpec("flap", "importance", "magnitude", uses_importance=True, scores="flap",
                 refit=False, scale=False, bias_compensation=True),
    StrategySpec("minitron", "importance", "influence", uses_importance=True, scores="minitron",
                 residual_score="minitron", refit=False, scale=False),
    # LLM-Pruner's block-wise mode leaves the first 3 and the last block of LLaMA-7B whole; here every block is cut
    # alike, as the child's shape has one width
    StrategySpec("llm-pruner", "importance", "magnitude", uses_importance=True, scores="llm-pruner",
                 refit=False, scale=False),
    # order "rotate": the first dimensions of the rotated stream; a shallower child drops blocks by our default
    StrategySpec("slicegpt", "rotate", "magnitude", uses_importance=True, refit=False, scale=False,
                 rotation=True),
    # GRAIL (arXiv:2602.23795)'s compensation on our selection: beside our refit, the same least squares with
    # its ridge, 1e-3 of the mean kept diagonal, towards zero instead of the slice, on the parent's inputs
    StrategySpec("grail", "importance", "magnitude", uses_importance=True, refit=True, scale=False,
                 refit_rule=(("refit_toward", "zero"), ("refit_ridge", 1e-3), ("refit_inputs", "parent"))),
)}
DEFAULT_STRATEGY = "subclone"
# the strategies that build a child (subclone+distill trains subclone's child)
STRATEGIES: tuple[str, ...] = tuple(name for name, spec in STRATEGY_SPECS.items() if spec.builds_as is None)


def strategy_spec(name: str) -> StrategySpec:
    """The spec of a strategy or training candidate by name, or an error listing the known ones."""
    try:
        return STRATEGY_SPECS[name]
    except KeyError:
        raise SubcloneError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGY_SPECS)}") from None


@dataclass
class Child:
    """A child model and the record of how it was made."""

    model: nn.Module
    shape: Shape
    manifest: Manifest
    selection: Selection | None = None
    preprocessor: object | None = None
    importance: Importance | None = field(default=None, repr=False)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SubcloneError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


def plan_shape(parent_model: nn.Module, strategy: str | None = None, **sizes: int | None) -> Shape:
    """The validated child shape for the given sizes (a size not given keeps the parent's value; for a strategy
    that cuts only the hidden size, the heads and FFN never follow it)."""
    parent = Shape.of(parent_model.config)
    if strategy is not None and STRATEGY_SPECS[strategy].rotation:
        sizes = {**{role: getattr(parent, role) for role in ("heads", "kv_heads", "ffn")},
                 **{role: size for role, size in sizes.items() if size is not None}}
    child = target_shape(parent, **sizes)
    validate_target(parent, child, arch_of_model(parent_model))
    return child


def strategy_shape(parent_model: nn.Module, strategy: str, target: Shape) -> Shape:
    """The shape a strategy builds when ``target`` is asked for: a depth-only strategy (ShortGPT) keeps every
    width of the parent, a rotation (SliceGPT) keeps its heads and FFN; the others build ``target`` itself.

    Raises:
        SubcloneError: the strategy is not defined for this family (a rotation where the norms do not fold).
    """
    spec, parent = STRATEGY_SPECS[strategy], Shape.of(parent_model.config)
    if spec.rotation:
        check_rotatable(arch_of_model(parent_model), parent_model.config.model_type)
    pinned = SIZE_ROLES[1:] if spec.order == "keep" else ("heads", "kv_heads", "ffn") if spec.rotation else ()
    if not pinned:
        return target
    return plan_shape(parent_model, **{r: getattr(parent if r in pinned else target, r) for r in SIZE_ROLES})


def refit_table(arch: ArchSpec, strategy: str) -> ArchSpec:
    """The family's table with the strategy's own refit rule in place of the family's (StrategySpec.refit_rule)."""
    return replace(arch, **dict(STRATEGY_SPECS[strategy].refit_rule))


def needs_input_stats(strategy: str) -> bool:
    """Whether the strategy scores by the layer-input statistics calibration records only on request
    (calibration.INPUT_STATS: the other published methods' scores)."""
    return bool(set(SCORE_STATS[STRATEGY_SPECS[strategy].scores]) & {"sq", "mean", "seq"})


def needs_taylor(strategy: str) -> bool:
    """Whether the strategy scores by LLM-Pruner's Taylor importance (calibration.TAYLOR_STATS), which needs a
    backward pass over the calibration data: recorded only on request."""
    return "taylor" in SCORE_STATS[STRATEGY_SPECS[strategy].scores]


def needs_residual_cov(strategy: str) -> bool:
    """Whether the strategy rotates by the residual stream's covariance, which calibration records only on
    request (calibrate(..., residual_cov=True): D x D per token and norm, wasted on every other strategy)."""
    return STRATEGY_SPECS[strategy].rotation


def needs_calibration(strategy: str, drop: str | list[int] | None) -> bool:
    """Whether this strategy with this block policy needs importance measured on data."""
    check_strategy(strategy)
    policy = STRATEGY_SPECS[strategy].default_drop if drop is None else drop
    return STRATEGY_SPECS[strategy].uses_importance or (isinstance(policy, str) and policy in BLOCK_SCORES)


def subclone_model(
    parent_model: nn.Module, target: Shape, *, strategy: str = "subclone", importance: Importance | None = None,
    drop: str | list[int] | None = None, scale: bool | None = None, untie_head: bool = False, seed: int = 0,
    parent_tensors: Mapping[str, Tensor] | None = None,
    residual_score: str | None = None, refit: bool | None = None, refit_items: RefitItems | None = None,
    open_sink: OpenSink | None = None) -> Child:
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
        refit_items: what the refit reads (required by it): given the child's slicer and config, every parent
            tensor with the moments of a narrowed linear weight's input (pipeline.refitting.refit_items, block by
            block).
        open_sink: given a sliced child's empty model (on the meta device), where its tensors go as they are made
            (io.saving.StreamedWeights); the child's model then stays on the meta device, never whole in memory.
    """
    check_strategy(strategy)
    spec = STRATEGY_SPECS[strategy]
    arch, parent, order = arch_of_model(parent_model), Shape.of(parent_model.config), spec.order
    validate_target(parent, target, arch)
    scale = (arch.scale_default if spec.scale is None else spec.scale) if scale is None else scale
    residual_score, refit = _ranking_options(spec, arch, residual_score, refit, refit_items is not None)
    if order is None:
        sel, policy, blocks = None, None, list(range(target.layers))
        model = _random_model(parent_model, arch, target, seed)
    else:
        policy = spec.default_drop if drop is None else drop
        tensors = parent_model.state_dict() if parent_tensors is None else parent_tensors
        build = _rotated_child if spec.rotation else _ordered_child
        blocks, sel, model = build(parent_model, tensors, target, spec, policy, importance, residual_score,
                                   scale=scale, untie_head=untie_head, refit_items=refit_items if refit else None,
                                   open_sink=open_sink)
    settings = {"strategy": strategy, "order": order, "drop": policy, "scale": scale and order is not None,
                "untie_head": untie_head, "seed": seed, "residual_score": residual_score, "refit": refit,
                "refit_ridge": refit_table(arch, strategy).refit_ridge if refit else None}
    return Child(model=model, shape=target, manifest=build_manifest(parent, target, blocks, sel, importance, settings),
                 selection=sel, importance=importance)


def _ordered_child(parent_model: nn.Module, tensors: Mapping[str, Tensor], target: Shape, spec: StrategySpec,
                   policy: str | list[int], importance: Importance | None, residual_score: str | None, *,
                   scale: bool, untie_head: bool, refit_items: RefitItems | None,
                   open_sink: OpenSink | None) -> tuple[list[int], Selection, nn.Module]:
    """(kept blocks, selection, child) of a strategy that slices the parent's own coordinates in its order, refit
    where refit_items is given, bias-compensated where the strategy says (FLAP)."""
    arch, parent = arch_of_model(parent_model), Shape.of(parent_model.config)
    weight = _reader_weight(tensors, arch)
    blocks, sel = _kept(parent, target, spec, policy, importance, residual_score, weight)
    compensation = _Compensation(importance, weight, bias_switches(
        arch, parent_model.config.model_type, tensors, parent, target)) if spec.bias_compensation else None
    model = _sliced_model(parent_model, tensors, target, sel, scale=scale, untie_head=untie_head,
                          refit_items=refit_items, open_sink=open_sink, compensation=compensation,
                          table=refit_table(arch, spec.name))
    return blocks, sel, model


def _rotated_child(parent_model: nn.Module, tensors: Mapping[str, Tensor], target: Shape, spec: StrategySpec,
                   policy: str | list[int], importance: Importance | None, residual_score: str | None, *,
                   scale: bool, untie_head: bool, refit_items: RefitItems | None,
                   open_sink: OpenSink | None) -> tuple[list[int], Selection, nn.Module]:
    """(kept blocks, selection, child) of SliceGPT: the parent rotated into its stream's PCA basis, then sliced
    to its first dimensions (no ranking, refit or scaling: those arguments are the other builders')."""
    sel = _rotated_selection(parent_model, target, policy, importance)
    return sel.blocks, sel, _rotated_model(parent_model, tensors, target, sel, importance, untie_head=untie_head,
                                           open_sink=open_sink)


def _kept(parent: Shape, target: Shape, spec: StrategySpec, policy: str | list[int], importance: Importance | None,
          residual_score: str | None, weight: ReaderWeight) -> tuple[list[int], Selection]:
    """The parent blocks the child keeps (by the block policy and its block scores) and what it keeps inside them
    (by the order, under the strategy's score rule)."""
    ranked = isinstance(policy, str) and policy in BLOCK_SCORES and importance is not None
    blocks = pick_blocks(parent.layers, target.layers, policy,
                         getattr(importance, BLOCK_SCORES[policy][0]) if ranked else None)
    scores = importance
    if spec.order == "importance" and importance is not None:
        scores = method_scores(spec.scores, importance, parent, residual_score, weight)
    return blocks, select(parent, target, scores, spec.order, blocks, residual_score=residual_score)


def _rotated_selection(parent_model: nn.Module, target: Shape, policy: str | list[int],
                       importance: Importance | None) -> Selection:
    """SliceGPT's selection in the rotated basis: the first target.hidden dimensions, every head and FFN neuron,
    the blocks of the block policy. Refuses a family whose stream cannot be rotated, a cut of any width but the
    hidden size, and a calibration without the stream's covariance."""
    arch, parent = arch_of_model(parent_model), Shape.of(parent_model.config)
    check_rotatable(arch, parent_model.config.model_type)
    cut = [f"{role}={getattr(target, role)}" for role in ("heads", "kv_heads", "ffn")
           if getattr(target, role) != getattr(parent, role)]
    if cut:
        raise SubcloneError(f"strategy 'slicegpt' slices the hidden size only (and blocks by --drop), not "
                            f"{', '.join(cut)}; keep heads={parent.heads}, kv_heads={parent.kv_heads}, "
                            f"ffn={parent.ffn} (the parent's) or use another strategy")
    if importance is None or RESIDUAL_COV not in importance.input_stats:
        raise SubcloneError("strategy 'slicegpt' rotates by the residual stream's covariance, which this "
                            "calibration did not record; calibrate with residual_cov=True (needs_residual_cov)")
    ranked = isinstance(policy, str) and policy in BLOCK_SCORES
    blocks = pick_blocks(parent.layers, target.layers, policy,
                         getattr(importance, BLOCK_SCORES[policy][0]) if ranked else None)
    every = lambda n: [list(range(n)) for _ in blocks]
    return Selection(residual=list(range(target.hidden)), blocks=blocks, heads=every(parent.heads),
                     kv_heads=every(parent.kv_heads), ffn=every(parent.ffn))


def _rotated_model(parent_model: nn.Module, tensors: Mapping[str, Tensor], target: Shape, sel: Selection,
                   importance: Importance, *, untie_head: bool, open_sink: OpenSink | None) -> nn.Module:
    """The child of the rotated parent (norms folded, stream in its PCA basis), sliced to its first dimensions:
    a plain model of the family, its head untied where the final norm's weight was folded into it."""
    arch, parent = arch_of_model(parent_model), Shape.of(parent_model.config)
    q = pca_basis(importance.stat(RESIDUAL_COV))
    rotated = RotatedTensors(tensors, arch, q, target.hidden, tied=is_tied(tensors, arch))
    tie = rotated.tied and not untie_head
    config = type(parent_model.config).from_dict(
        child_config_dict(parent_model.config, arch, target, sel, tie_head=tie))
    if open_sink is None:
        return build_model(type(parent_model), config,
                           slice_state_dict(rotated, arch, parent, sel, scale=False, untie_head=untie_head))
    empty = empty_model(type(parent_model), config, next(parent_model.parameters()).dtype)
    slice_state_dict(rotated, arch, parent, sel, scale=False, untie_head=untie_head, sink=open_sink(empty))
    return empty


def _reader_weight(tensors: Mapping[str, Tensor], arch) -> ReaderWeight:
    """The weight of a block's attention or FFN output projection as (out, in), whatever the family's layout."""
    def weight(block: int, role: str) -> Tensor:
        path = getattr(arch, role)
        param = arch.block_params[f"{path}.weight"]
        return tensors[f"{arch.blocks}.{block}.{path}.weight"].movedim(param.fan_in, -1)
    return weight


def _sliced_model(parent_model: nn.Module, tensors: Mapping[str, Tensor], target: Shape, sel: Selection, *,
                  scale: bool, untie_head: bool, refit_items: RefitItems | None,
                  open_sink: OpenSink | None = None, compensation: _Compensation | None = None,
                  table: ArchSpec | None = None) -> nn.Module:
    """The child model: its config from the parent's with the target sizes, its weights sliced, or refit where
    refit_items gives the Gram columns (block by block: each block's tensors sliced as they come) by ``table``'s
    refit rule (default: the family's), or sliced and bias-compensated (compensation); with open_sink, its
    tensors go to the sink and the model returned is the empty one on the meta device."""
    arch, parent = arch_of_model(parent_model), Shape.of(parent_model.config)
    cfg = child_config_dict(parent_model.config, arch, target, sel, tie_head=not untie_head)
    config = type(parent_model.config).from_dict({**cfg, **(compensation.switches if compensation else {})})
    table = table or arch
    slicer = TensorSlicer(table, parent, sel, scale=scale, ridge=table.refit_ridge)
    empty = sink = None
    if open_sink is not None or compensation is not None:
        empty = empty_model(type(parent_model), config, next(parent_model.parameters()).dtype)
        sink = open_sink(empty) if open_sink is not None else None
    if compensation is not None:
        sd = compensation.apply(slice_state_dict(tensors, arch, parent, sel, scale=scale, untie_head=untie_head),
                                empty, arch, parent, sel)
        if sink is None:
            return build_model(type(parent_model), config, sd)
        _to_sink(sd, sink, arch, tied=is_tied(tensors, arch) and not untie_head)
        return empty
    if refit_items is not None and _narrows_any(parent_model, sel, scale):
        # the refit pass may run wider than the parent (float32 on the CPU); the child keeps the parent's dtype
        dtype = next(parent_model.parameters()).dtype
        into = None if sink is None else (lambda name, tensor: sink(name, tensor.to(dtype)))
        sd = _cast(slice_items(refit_items(slicer, config), slicer, arch, parent, sel, tied=is_tied(tensors, arch),
                               untie_head=untie_head, sink=into), dtype)
    else:
        sd = slice_state_dict(tensors, arch, parent, sel, scale=scale, untie_head=untie_head, sink=sink)
    return empty if empty is not None else build_model(type(parent_model), config, sd)


def _cast(state_dict: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The state dict in ``dtype``, a tensor shared by two names (a tied head) still shared."""
    done: dict[int, Tensor] = {}
    for tensor in state_dict.values():
        if id(tensor) not in done:  # a tied head's second name: cast once, not twice
            done[id(tensor)] = tensor.to(dtype)
    return {name: done[id(tensor)] for name, tensor in state_dict.items()}


# role -> whether a child narrows that output projection's input (its heads, its FFN neurons)
_NARROWED: dict[str, Callable[[Shape, Shape], bool]] = {
    "attn_out": lambda parent, child: child.heads < parent.heads,
    "ffn_down": lambda parent, child: child.ffn < parent.ffn,
}


def bias_switches(arch, model_type: str, tensors: Mapping[str, Tensor], parent: Shape, target: Shape) -> dict:
    """The child's config switches that give a bias to each output projection whose inputs shrink and which
    has none in the parent (ArchSpec.bias_switches), for FLAP's compensation.

    Raises:
        SubcloneError: the family cannot give that projection a bias (no config switch adds one).
    """
    switches = {}
    for role, narrowed in _NARROWED.items():
        path = getattr(arch, role)
        if not narrowed(parent, target) or f"{arch.blocks}.0.{path}.bias" in tensors:
            continue
        key = arch.bias_switches.get(model_type, {}).get(role)
        if key is None:
            size = "--heads" if role == "attn_out" else "--ffn"
            raise SubcloneError(f"strategy 'flap' adds what removed inputs carried on average to the bias of {path}, "
                                f"and {arch.name} ({model_type}) has no config switch that gives it a bias; keep "
                                f"{size} at the parent's or use another strategy")
        switches[key] = True
    return switches


@dataclass
class _Compensation:
    """FLAP's bias compensation: an output projection whose inputs lost channels adds, to its bias, what the
    removed channels carried on average over the calibration tokens, W[:, removed] @ mean(x[removed])."""

    importance: Importance
    weight: ReaderWeight
    switches: dict

    def apply(self, sd: dict[str, Tensor], empty: nn.Module, arch, parent: Shape, sel: Selection) -> dict:
        """The sliced state dict with the compensated biases; a bias the switches newly created (q, k, v, gate,
        up along with o and down) starts at zero."""
        out = dict(sd)
        for name, t in empty.state_dict().items():
            if name not in out:
                out[name] = torch.zeros(t.shape, dtype=t.dtype)
        for j, b in enumerate(sel.blocks):
            kept = {"attn_out": head_rows(sel.heads[j], parent.head_dim), "ffn_down": torch.tensor(sel.ffn[j])}
            for role, prefix in (("attn_out", "heads"), ("ffn_down", "ffn")):
                mean = self.importance.stat(f"{prefix}_mean")[b]  # (C,)
                removed = torch.ones(mean.numel(), dtype=torch.bool)
                removed[kept[role]] = False
                if removed.any():
                    w = self.weight(b, role).double().cpu()  # (D, C)
                    extra = (w[:, removed] @ mean[removed])[sel.residual]  # (D',)
                    name = f"{arch.blocks}.{j}.{getattr(arch, role)}.bias"
                    out[name] = out[name] + extra.to(out[name].device, out[name].dtype)
        return out


def _to_sink(sd: dict[str, Tensor], sink: TensorSink, arch, *, tied: bool) -> None:
    """Send a finished state dict to a sink, a tied head once under the embedding's name (as slice_items does)."""
    for name, t in sd.items():
        if not (tied and name == arch.tied_head[0]):
            sink(name, t)


def _narrows_any(parent_model: nn.Module, sel: Selection, scale: bool) -> bool:
    """Whether the child narrows any linear weight's input (else a refit has nothing to do: a full-size child is
    sliced, exactly). Shapes only: an offloaded parent's tensors are on the meta device."""
    slicer = TensorSlicer(arch_of_model(parent_model), Shape.of(parent_model.config), sel, scale=scale)
    return any(slicer.kept_inputs(name, t) is not None for name, t in parent_model.named_parameters())


def _ranking_options(spec: StrategySpec, arch, residual_score: str | None, refit: bool | None,
                     has_items: bool) -> tuple[str | None, bool]:
    """The residual ranking and whether to refit: the importance order's (as asked, else the strategy's, else the
    family's defaults, whatever the parent's size); other orders use neither; a strategy with its own weight rule
    never refits. The refit reads the calibration data (refit_items): without it the default is off and asking for
    it is an error."""
    if spec.order != "importance":
        return None, False
    residual_score = residual_score or spec.residual_score
    if spec.refit is False:
        if refit:
            raise SubcloneError(f"strategy {spec.name!r} has its own weight rule, without the least-squares refit; "
                                "leave --refit out")
        return residual_score or arch.residual_score, False
    if refit and not has_items:
        raise SubcloneError("the refit reads the parent's inputs on calibration data (refit_items: "
                            "pipeline.refitting.refit_items, as workflow.children.make_child passes it); give it "
                            "or turn the refit off")
    default = arch.refit_default if spec.refit is None else spec.refit
    return residual_score or arch.residual_score, (default and has_items) if refit is None else refit


def shape_config(parent_model: nn.Module, target: Shape):
    """The config of a child of shape ``target`` (the first blocks' per-layer settings)."""
    arch = arch_of_model(parent_model)
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
                   importance: Importance | None, settings: dict) -> Manifest:
    """The subclone.json record: what was kept, how, and from which data."""
    return Manifest(
        format=FORMAT,
        library_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        parent=ParentRecord(shape=parent.as_dict()),
        child_shape=child.as_dict(),
        **settings,
        kept_blocks=blocks,
        removed_blocks=[] if sel is None else sel.removed_blocks(parent.layers),
        selection=sel.to_json() if sel else None,
        calibration=CalibrationRecord(importance.data, importance.tokens) if importance else None,
    )
