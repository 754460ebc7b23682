"""One training path for the command line and the app: which candidates, built how, on how much data.

`subclone compare`, `subclone train` and the app's Train page all come here: the same request builds the
same children (one block rule, below), reads the same data budget, and runs on the same engine.

The block rule: every candidate taken from the parent removes blocks by the request's policy (`--drop`,
or the Blocks page's choice); without one, each strategy uses its own default (StrategySpec.default_drop:
first-k, the paper's no-reordering ablation of subclone (Fig. 14), takes the blocks subclone takes), and the
app's caption states the same rule (block_policy_text). Each child is built by its plan (candidate_plan:
workflow.plan resolves every default before any work; the plan is recorded in the child's manifest).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from subclone_core.core.calibration import Importance, Progress
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import STRATEGY_SPECS, Child, needs_calibration
from subclone_core.sources import Parent, make_data
from subclone_core.training.config import Candidate, TrainConfig
from subclone_core.training.sweep import LrGrid, check_lr_sweep, sweep_runs
from subclone_core.workflow.children import (
    CALIB_TOKENS,
    has_statistics,
    measure_importance,
    recorded_statistics,
)
from subclone_core.workflow.locks import exclusive
from subclone_core.workflow.plan import Plan, make_planned_child, resolve_plan

BASELINE = "random"  # random init: the speedup's reference
DISTILL = "subclone+distill"  # the subcloned child trained with the parent as its teacher
CANDIDATES = tuple(STRATEGY_SPECS)  # every strategy, and subclone+distill

Drop = str | list[int] | None


@dataclass(frozen=True)
class CandidateSettings:
    """How to build the candidates of one run (the shape is given separately).

    Attributes:
        names: candidate names, from CANDIDATES, in order.
        drop: the block policy ("magnitude", "middle", "first" or parent blocks to drop); None: defaults.
        scale: sqrt(fan-in) weight scaling; None: the family's default.
        untie_head: give a tied parent's child its own scaled head.
        residual_score, refit: the residual ranking and the least-squares refit (strategies.subclone_model);
            None: the family's defaults.
        refit_dtype: the dtype the refit runs the blocks in (children.refit_dtype_for); None: its rule.
        seed: seed of random init (and the data order, in TrainConfig).
        data_id: calibration data (None: the task's default).
        calib_tokens: calibration budget.
        distill_alpha, distill_temperature: the distillation loss of subclone+distill.
        lr, weight_decay: per-candidate overrides of the strategies' defaults.
        lr_sweep: candidate -> the peak learning rates it is trained at, one run each (training.sweep);
            a candidate swept takes no ``lr`` override.
    """

    names: tuple[str, ...]
    drop: Drop = None
    scale: bool | None = None
    untie_head: bool = False
    residual_score: str | None = None
    refit: bool | None = None
    refit_dtype: str | None = None
    seed: int = 0
    data_id: str | None = None
    calib_tokens: int = CALIB_TOKENS
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    lr: Mapping[str, float] = field(default_factory=dict)
    weight_decay: Mapping[str, float] = field(default_factory=dict)
    lr_sweep: LrGrid = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse unknown or repeated names and a bad distillation setting, before any work."""
        if not self.names:
            raise SubcloneError(f"no candidates; valid: {', '.join(CANDIDATES)}")
        for name in self.names:
            if name not in CANDIDATES:
                raise SubcloneError(f"unknown strategy {name!r}; valid: {', '.join(CANDIDATES)}")
            if self.names.count(name) > 1:
                raise SubcloneError(f"strategy {name!r} is listed twice")
        for flag, values in (("--lr", self.lr), ("--wd", self.weight_decay)):
            for name in values:
                if name not in self.names:
                    raise SubcloneError(f"{flag}: {name!r} is not a candidate; candidates: {', '.join(self.names)}")
        check_lr_sweep(self.lr_sweep, self.names)
        both = [name for name in self.lr_sweep if name in self.lr]
        if both:
            raise SubcloneError(f"{both[0]!r} has a learning rate and a learning-rate sweep; give it only one")
        if DISTILL in self.names:
            Candidate(DISTILL, None, distill_alpha=self.distill_alpha,
                      distill_temperature=self.distill_temperature).validate()


def parse_names(text: str) -> tuple[str, ...]:
    """The candidate names of a comma-separated list such as "subclone,random" (checked by validate)."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise SubcloneError(f"the list of strategies is empty; valid: {', '.join(CANDIDATES)}")
    return names


def base_strategy(name: str) -> str:
    """The strategy that builds a candidate's initial weights."""
    return STRATEGY_SPECS[name].builds_as or name


def block_policy(strategy: str, drop: Drop) -> Drop:
    """The block rule of the module docstring: the request's policy, else the strategy's own default
    (StrategySpec.default_drop); None for random init, which has no blocks to choose."""
    default = STRATEGY_SPECS[base_strategy(strategy)].default_drop
    if default is None:
        return None
    return default if drop is None else drop


def block_policy_text(strategy: str, drop: Drop) -> str:
    """The block policy a child of this strategy is built with (block_policy), as the app states it."""
    policy = block_policy(strategy, drop)
    if policy is None:
        return "none (random init builds its blocks afresh)"
    return f"{policy} (the default)" if drop is None else str(policy)


def needs_importance(settings: CandidateSettings) -> bool:
    """Whether any candidate needs importance measured on data (then it is measured once, for all)."""
    return any(needs_calibration(base_strategy(n), block_policy(base_strategy(n), settings.drop))
               for n in settings.names)


def candidate_plan(parent: Parent, strategy: str, settings: CandidateSettings, target: Shape | None = None) -> Plan:
    """The resolved plan of one candidate's child (workflow.plan), by the block rule: the request's block
    policy, else the strategy's own (checked against ``target``'s depth when given); the residual ranking only
    for the importance order, which alone has one, and the refit only for those of its strategies without a
    weight rule of their own (the other candidates of a run that asks for them are built without)."""
    strategy = base_strategy(strategy)
    spec = STRATEGY_SPECS[strategy]
    importance_order = spec.order == "importance"
    return resolve_plan(parent, strategy=strategy, drop=settings.drop, scale=settings.scale,
                        untie_head=settings.untie_head,
                        residual_score=settings.residual_score if importance_order else None,
                        refit=settings.refit if importance_order and spec.refit is not False else None,
                        refit_dtype=settings.refit_dtype,
                        data_id=settings.data_id,
                        calib_tokens=settings.calib_tokens, seed=settings.seed, target=target)


def candidate_plans(parent: Parent, settings: CandidateSettings, target: Shape | None = None) -> dict[str, Plan]:
    """The plan of every strategy the settings build (subclone+distill trains subclone's child), in order."""
    strategies = dict.fromkeys(base_strategy(name) for name in settings.names)
    return {strategy: candidate_plan(parent, strategy, settings, target) for strategy in strategies}


def calibration_plan(plans: Mapping[str, Plan]) -> Plan | None:
    """The plan of a run's shared calibration: that of its first candidate that calibrates (they all share the
    parent, the data and the budget), or None when none does."""
    return next((plan for plan in plans.values() if plan.calibrate), None)


def shared_importance(parent: Parent, settings: CandidateSettings, progress: Progress | None = None,
                      plan: Plan | None = None) -> Importance | None:
    """Calibrate once when any candidate needs it; every child then reuses the result. ``plan``
    (calibration_plan) gives the calibration's mode and hidden-state budget (None: the defaults)."""
    if not needs_importance(settings):
        return None
    placement = {} if plan is None else {"sequential": plan.sequential, "activation_memory": plan.activation_memory}
    with exclusive(parent.model):  # calibration hooks the parent, which the app shares between sessions
        return measure_importance(parent, settings.data_id, tokens=settings.calib_tokens, progress=progress,
                                  **recorded_statistics(base_strategy(n) for n in settings.names),
                                  **placement)


def importance_for(parent: Parent, settings: CandidateSettings, strategies: Iterable[str],
                   importance: Importance | None, progress: Progress | None = None,
                   plan: Plan | None = None) -> Importance | None:
    """``importance`` when it holds every statistic ``strategies`` read, else a new calibration for the settings
    (shared_importance): one measured for the paper's method alone lacks e.g. FLAP's input statistics."""
    strategies = list(strategies)
    if not strategies or (importance is not None and has_statistics(importance, strategies)):
        return importance
    return shared_importance(parent, settings, progress, plan=plan)


def build_child(parent: Parent, target: Shape, strategy: str, settings: CandidateSettings,
                importance: Importance | None, plan: Plan | None = None, progress: Progress | None = None) -> Child:
    """One child of a strategy, by its plan (candidate_plan, resolved here when not given), calibrating when
    it needs importance and has none; the plan is recorded in its manifest. ``progress``: called as its
    calibration or its refit goes block by block.

    Importance goes only to a child that uses it, so a manifest names calibration data only when the
    child's weights or blocks were chosen by it.
    """
    plan = plan or candidate_plan(parent, strategy, settings, target)
    used = importance if plan.calibrate else None
    return make_planned_child(parent, target, plan, importance=used, progress=progress)


def build_candidates(parent: Parent, target: Shape, settings: CandidateSettings, *,
                     importance: Importance | None = None, made: Mapping[str, Child] | None = None,
                     plans: Mapping[str, Plan] | None = None) -> tuple[list[Candidate], dict[str, Manifest]]:
    """One candidate per name, with its manifest; the caller's children are copied, never trained.

    Args:
        parent: the (shared, never modified) parent.
        target: the children's shape.
        settings: names, block policy, scaling, seed, calibration, distillation, hyperparameters.
        importance: the parent's calibration (measured here once, when needed and not given).
        made: children the caller already built, by strategy (the app's child and random twin).
        plans: the plans of the strategies to build (candidate_plans; resolved here when not given).

    Returns:
        (candidates, {run name: manifest}): one candidate per name, or one per learning rate of a candidate
        swept (``settings.lr_sweep``; runs named like ``subclone@lr=1e-3``), all from the same initial weights.
    """
    settings.validate()
    children = dict(made or {})
    plans = dict(candidate_plans(parent, settings, target) if plans is None else plans)
    to_build = [base_strategy(n) for n in settings.names if base_strategy(n) not in children]
    importance = importance_for(parent, settings, to_build, importance, plan=calibration_plan(plans))
    candidates, manifests, used = [], {}, set()
    for name in settings.names:
        strategy = base_strategy(name)
        if strategy not in children:
            children[strategy] = build_child(parent, target, strategy, settings, importance, plans.get(strategy))
        child = children[strategy]
        for run, lr in sweep_runs(name, settings.lr_sweep, settings.lr.get(name)):
            # a model is trained in place: copy the caller's children and any child a second run shares
            shared = strategy in used or (made is not None and strategy in made)
            used.add(strategy)
            model = copy.deepcopy(child.model) if shared else child.model
            candidates.append(_candidate(run, name, lr, model, parent, settings))
            manifests[run] = child.manifest
    return candidates, manifests


def _candidate(run: str, name: str, lr: float | None, model: Any, parent: Parent,
               settings: CandidateSettings) -> Candidate:
    """One run of candidate ``name`` (its defaults, distillation and overrides) at peak ``lr``."""
    return Candidate(run, model.train(), strategy=name, teacher=parent.model if name == DISTILL else None,
                     lr=lr, weight_decay=settings.weight_decay.get(name), distill_alpha=settings.distill_alpha,
                     distill_temperature=settings.distill_temperature)


def training_examples(config: TrainConfig) -> int:
    """The run's data budget, in sequences or images: exactly what its steps consume (one pass)."""
    return config.steps * config.grad_accum * config.batch_size


def training_data(parent: Parent, data_id: str | None, config: TrainConfig, *, seq_len: int,
                  eval_tokens: int, eval_images: int) -> tuple[Any, Any, TrainConfig]:
    """Training data for the whole budget and the fixed validation set (each task reads its own unit).

    Returns:
        (train, validation, config with eval_batches covering the whole validation set).

    Raises:
        SubcloneError: a validation budget smaller than one sequence, or data that does not fit the task.
    """
    if parent.task_spec.sequences and eval_tokens < seq_len:
        raise SubcloneError(f"the validation budget ({eval_tokens} tokens) must be at least one sequence "
                            f"({seq_len} tokens)")
    train = make_data(parent, data_id, "train", seq_len=seq_len, examples=training_examples(config))
    val = make_data(parent, data_id, "validation", seq_len=seq_len, max_tokens=eval_tokens,
                    max_images=eval_images)
    eval_batches = max(1, math.ceil(len(val) / config.batch_size))
    return train, val, dataclasses.replace(config, eval_batches=eval_batches)

