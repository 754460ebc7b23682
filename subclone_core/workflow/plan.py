"""One plan per child: every default the tool chooses, resolved once before any work and said out loud.

A command (`make`, `explore`, `compare`) or the app resolves the plan from the loaded parent and the user's
choices (None: the default), shows ``Plan.line()`` before the work starts and each of ``Plan.warnings()``,
passes the resolved values to ``children.make_child`` explicitly (``make_planned_child``), and records
``Plan.to_json()`` in the child's manifest. The defaults come from where the code keeps them:

- the strategy table (``STRATEGY_SPECS``): the neuron order and the block policy;
- the family's table (``arch_of_model``): the residual ranking, the least-squares refit and the weight scaling,
  each chosen by measurement per family (the refit applies to the importance order only);
- the parent's placement: calibration goes block by block only where ``--max-memory`` left part of the parent
  on disk and its checkpoint can be read block by block (``children.needs_sequential``);
- the parent's dtype and device, and the CPU: the refit pass runs the blocks in bfloat16 on a CPU that multiplies
  it in hardware, and a half-precision parent's blocks in float32 on other CPUs (``children.refit_dtype_for``);
- the machine: the stored hidden states of a block-by-block pass (sequential calibration, the refit) keep to
  half of the available RAM (``io.activations.default_budget``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from subclone_core.core.archs import arch_of_model
from subclone_core.core.errors import SubcloneError
from subclone_core.core.selection import pick_blocks
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import Child, needs_calibration, refit_table, strategy_spec
from subclone_core.io.activations import default_budget
from subclone_core.io.placement import memory_by_device
from subclone_core.io.streaming import checkpoint_tensors
from subclone_core.sources import Parent, default_data_id
from subclone_core.workflow.children import (
    CALIB_TOKENS,
    make_child,
    needs_sequential,
    parent_tensors,
    refit_dtype_for,
)

# the orders of the paper (arXiv:2312.09299), which scales sliced weights: its method and its Fig. 14 ablation
PAPER_ORDERS = ("importance", "first")
_PLACE_ORDER = {"cpu": 1, "disk": 2}  # GPUs first (0), then the CPU, then the disk
# the free RAM is read at most this often, so that plans resolved together (a run's candidates, the app's
# preview and the child it builds) record the same hidden-state budget
BUDGET_SECONDS = 60.0
_budget: list[tuple[float, int]] = []  # (when, bytes) of the last reading


@dataclass(frozen=True)
class Plan:
    """How one child is made, every default resolved (see the module docstring for where each comes from).

    Attributes:
        strategy, order: the strategy and its neuron order (None: random init takes no weights).
        drop: the block policy ("magnitude", "middle", "first") or the parent blocks removed; None for random.
        residual_score: the residual ranking ("read", "written"); None where the order is not "importance".
        refit: the least-squares refit of weights whose inputs shrank.
        refit_inputs: whose inputs the refit fits each layer on ("parent" or "child", the family's table); None
            without a refit. The refit runs block by block (pipeline.refitting) from memory, or from the parent's
            files where it is offloaded.
        refit_dtype: the dtype the refit pass runs the blocks in (children.refit_dtype_for); None without a refit.
        scale: the sqrt(fan-in ratio) scaling of sliced weights.
        untie_head, seed: as in strategies.subclone_model.
        calibrate: whether importance is measured on data; data_id, calib_tokens: on which data, how much.
        sequential: calibration block by block from the parent's files (else the parent's own forward passes).
        device: where the parent's weights are ("cpu", "cuda:0+cpu+disk"); dtype: their dtype.
        max_memory: the memory budget the parent was loaded under (None: none).
        block_readable: whether an offloaded parent's checkpoint can be read block by block (None: not offloaded).
        activation_memory: bytes of stored hidden states a block-by-block pass keeps in RAM (None: no such pass).
        family: the family's name, for the warnings.
        asked: the choices the caller made (given, not None).
        changed: those of them that differ from the default.
        child_flags: whether the caller offers --scale, --refit and --residual-score (explore does not).
    """

    strategy: str
    order: str | None
    drop: str | tuple[int, ...] | None
    residual_score: str | None
    refit: bool
    refit_inputs: str | None
    refit_dtype: str | None
    scale: bool
    untie_head: bool
    seed: int
    calibrate: bool
    data_id: str
    calib_tokens: int
    sequential: bool
    device: str
    dtype: str
    max_memory: str | None
    block_readable: bool | None
    activation_memory: int | None
    family: str
    asked: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    child_flags: bool = True

    @property
    def offloaded(self) -> bool:
        """Whether part of the parent lives on disk (accelerate's offload under --max-memory)."""
        return "disk" in self.device.split("+")

    @property
    def refit_torch_dtype(self) -> torch.dtype | None:
        """The refit's dtype as torch's (``refit_dtype`` is its name, as the manifest records it)."""
        return getattr(torch, self.refit_dtype) if self.refit_dtype else None

    def line(self) -> str:
        """The plan in one short line; values the caller changed from the default are marked "(asked)"."""
        parts = [self._method()]
        if self.calibrate:
            parts.append(f"calibration {self._mode()}, {self.calib_tokens} tokens of {_data_label(self.data_id)}")
        parts.append(self._placement())
        if self.activation_memory is not None:
            held = f"hidden states up to {_size(self.activation_memory)} in RAM"
            parts.append(self._mark("activation_memory", held))
        return "plan: " + " | ".join(parts)

    def _mark(self, name: str, text: str) -> str:
        return f"{text} (asked)" if name in self.changed else text

    def _method(self) -> str:
        """The strategy and its choices: block policy, residual ranking, refit, scaling."""
        if self.order is None:
            return f"{self.strategy} (fresh init, seed {self.seed})"
        drop = self.drop if isinstance(self.drop, str) else ",".join(map(str, self.drop))
        spec = strategy_spec(self.strategy)
        items = [self.strategy, self._mark("drop", f"drop {drop}")]
        if self.order == "keep":
            items.append("widths kept")
        if self.order == "rotate":
            items.append("one PCA rotation of the stream, slice only")
        if self.order == "importance":
            items.append(self._mark("residual_score", f"{self.residual_score} ranking"))
            wider = f" in {self.refit_dtype}" if self.refit_dtype != self.dtype else ""
            rule = " with a ridge towards zero" if dict(spec.refit_rule).get("refit_toward") == "zero" else ""
            refit = f"refit on {self.refit_inputs} inputs{rule}, block by block{wider}" if self.refit else "no refit"
            if spec.refit is False:  # the method's own weight rule: say what it is instead
                refit = "bias compensation, no refit" if spec.bias_compensation else "slice only, no refit"
            items.append(self._mark("refit", refit))
        items.append(self._mark("scale", "scaling" if self.scale else "no scaling"))
        if self.untie_head:
            items.append("untied head")
        return ", ".join(items)

    def _mode(self) -> str:
        if self.sequential:
            return self._mark("sequential", "block by block")
        return self._mark("sequential", "per batch through the offload" if self.offloaded else "in memory")

    def _placement(self) -> str:
        budget = ""
        if self.max_memory is not None:
            budget = f" under --max-memory {self.max_memory}" if self.offloaded else \
                f" (fits --max-memory {self.max_memory})"
        return f"parent on {self.device}{budget}, {self.dtype}"

    def warnings(self) -> list[str]:
        """One line for each thing a user would expect and is not getting, naming the flag that turns it on
        (or saying that none can); the user's own choices are never warned about."""
        found, spec = [], strategy_spec(self.strategy)
        paper = self.order in PAPER_ORDERS and spec.scores == "paper"  # published methods never scale
        if self.child_flags and paper and not self.scale and "scale" not in self.asked:
            found.append(f"weight scaling is off: the {self.family}'s measured default (the paper scales sliced "
                         "weights by sqrt(fan-in ratio)); --scale turns it on")
        if (self.child_flags and self.order == "importance" and spec.refit is None and not self.refit
                and "refit" not in self.asked):
            found.append(f"the least-squares refit is off: the {self.family}'s measured default; "
                         "--refit turns it on")
        if self.calibrate and self.block_readable is False and not self.sequential and "sequential" not in self.asked:
            found.append("the parent is offloaded to disk but its checkpoint cannot be read block by block (no "
                         "safetensors files under the model's tensor names), so calibration reads the offloaded "
                         "weights back once per batch; --sequential is impossible here: raise --max-memory "
                         "to hold the parent, or save it as safetensors")
        return found

    def to_json(self) -> dict:
        """The plan as the manifest records it (subclone.json's "plan"): every field, the line, the warnings."""
        data = asdict(self)
        data.update(drop=list(self.drop) if isinstance(self.drop, tuple) else self.drop, asked=list(self.asked),
                    changed=list(self.changed))
        return {**data, "line": self.line(), "warnings": self.warnings()}

    def make_kwargs(self) -> dict:
        """children.make_child's keyword arguments, every one resolved."""
        return {"strategy": self.strategy, "drop": list(self.drop) if isinstance(self.drop, tuple) else self.drop,
                "scale": self.scale, "untie_head": self.untie_head, "data_id": self.data_id,
                "calib_tokens": self.calib_tokens, "seed": self.seed, "residual_score": self.residual_score,
                "refit": self.refit, "refit_dtype": self.refit_torch_dtype,
                "sequential": self.sequential, "activation_memory": self.activation_memory}


def resolve_plan(parent: Parent, *, strategy: str = "subclone", drop: str | list[int] | None = None,
                 scale: bool | None = None, untie_head: bool = False, residual_score: str | None = None,
                 refit: bool | None = None, refit_dtype: str | None = None, sequential: bool | None = None,
                 activation_memory: int | None = None, data_id: str | None = None, calib_tokens: int = CALIB_TOKENS,
                 seed: int = 0, target: Shape | None = None, child_flags: bool = True, builds: bool = True) -> Plan:
    """Resolve every default of one child of ``parent`` now, before any work (None: the default).

    Args:
        parent: the loaded parent (its placement decides the calibration's mode).
        strategy ... seed: as in children.make_child.
        target: the child's shape, when known: the block policy is checked against its depth now.
        child_flags: whether the caller offers --scale, --refit and --residual-score (else no warning names them).
        builds: whether a child is built (its refit pass, its reads of an offloaded parent's files, checked now);
            False where the caller only calibrates.

    Raises:
        SubcloneError: a choice the strategy cannot honour (--refit or --residual-score without the importance
            order), a block policy the target's depth cannot take, --sequential for a parent with no folder, or an
            offloaded parent a child cannot be read from.
    """
    spec, arch, places = strategy_spec(strategy), arch_of_model(parent.model), memory_by_device(parent.model)
    policy = _policy(spec, drop)  # random init chooses no blocks, so it never calibrates for them
    calibrate = needs_calibration(strategy, list(policy) if isinstance(policy, tuple) else policy)
    ranking, refit_on = _ranking(spec, arch, residual_score, refit, builds)
    seq = _sequential(parent, sequential, calibrate)
    _check_blocks(parent, target, policy)
    if builds and "disk" in places:
        parent_tensors(parent)  # a child of an offloaded parent is read from its files: refuse one now, not later
    stores = (calibrate and seq) or refit_on  # the passes that keep hidden states between blocks
    given = {"drop": drop, "scale": scale, "residual_score": residual_score, "refit": refit,
             "refit_dtype": refit_dtype, "sequential": sequential, "activation_memory": activation_memory, "data_id": data_id}
    plan = Plan(
        strategy=strategy, order=spec.order, drop=policy, residual_score=ranking, refit=refit_on,
        refit_inputs=refit_table(arch, strategy).refit_inputs if refit_on else None,
        refit_dtype=_dtype_name(refit_dtype_for(parent, refit_dtype)) if refit_on else None,
        scale=_default_scale(spec, arch) if scale is None else scale and spec.order is not None,
        untie_head=untie_head, seed=seed, calibrate=calibrate, data_id=data_id or default_data_id(parent.task),
        calib_tokens=calib_tokens, sequential=seq, device=_device(places),
        dtype=_dtype_name(parent.dtype), max_memory=parent.placement.max_memory,
        block_readable=_readable(parent) if "disk" in places else None,
        activation_memory=(_default_budget() if activation_memory is None else activation_memory) if stores else None,
        family=arch.name, asked=tuple(name for name, value in given.items() if value is not None),
        child_flags=child_flags)
    return replace(plan, changed=_changed(plan, parent, arch, spec))


def _ranking(spec, arch, residual_score: str | None, refit: bool | None, builds: bool) -> tuple[str | None, bool]:
    """The residual ranking and the refit: the importance order's (as asked, else the strategy's, else the
    family's; no refit where no child is built, nor for a method with its own weight rule); other orders have
    neither, and asking for them there is an error (they would be silently ignored)."""
    if spec.order != "importance":
        for flag, value in (("--refit", refit), ("--residual-score", residual_score)):
            if value:
                raise SubcloneError(f"{flag} applies to the importance order (strategy subclone), not to "
                                    f"strategy {spec.name!r}: leave {flag} out")
        return None, False
    if spec.refit is False and refit:
        raise SubcloneError(f"strategy {spec.name!r} has its own weight rule, without the least-squares refit; "
                            "leave --refit out")
    return residual_score or _default_ranking(spec, arch), builds and (_default_refit(spec, arch) if refit is None
                                                                       else refit)


def _default_ranking(spec, arch) -> str:
    return spec.residual_score or arch.residual_score


def _default_refit(spec, arch) -> bool:
    return arch.refit_default if spec.refit is None else spec.refit


def _default_scale(spec, arch) -> bool:
    """The strategy's scaling (published methods: none), else the family's; random init takes no weights."""
    return (arch.scale_default if spec.scale is None else spec.scale) and spec.order is not None


def _changed(plan: Plan, parent: Parent, arch, spec) -> tuple[str, ...]:
    """The asked choices whose value differs from the default's (an activation budget asked always does)."""
    defaults = {"drop": _policy(spec, None), "scale": _default_scale(spec, arch),
                "residual_score": _default_ranking(spec, arch), "refit": _default_refit(spec, arch),
                "sequential": plan.calibrate and needs_sequential(parent), "data_id": default_data_id(parent.task),
                "refit_dtype": _dtype_name(refit_dtype_for(parent)) if plan.refit else None}
    return tuple(name for name in plan.asked if getattr(plan, name) != defaults.get(name, object()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sequential(parent: Parent, sequential: bool | None, calibrate: bool) -> bool:
    """Whether calibration goes block by block: as asked, else only where the parent's budget did not hold it."""
    if not calibrate:
        return False
    if sequential and parent.source is None:
        raise SubcloneError(f"--sequential: parent {parent.id!r} has no folder on disk to read block by block; "
                            "leave --sequential out")
    return needs_sequential(parent) if sequential is None else sequential


def _policy(spec, drop: str | list[int] | None) -> str | tuple[int, ...] | None:
    """The block policy: as asked, else the strategy's default; None for random init (no blocks chosen)."""
    if spec.order is None:
        return None
    policy = spec.default_drop if drop is None else drop
    return tuple(policy) if isinstance(policy, list) else policy


def _default_budget() -> int:
    """io.activations.default_budget (half the available RAM), read again once BUDGET_SECONDS have passed."""
    now = time.monotonic()
    if not _budget or now - _budget[0][0] > BUDGET_SECONDS:
        _budget[:] = [(now, default_budget())]
    return _budget[0][1]


def _check_blocks(parent: Parent, target: Shape | None, policy: str | tuple[int, ...] | None) -> None:
    """Refuse now a block policy the child's depth cannot take (an explicit list out of range or of the wrong
    length, too few blocks to keep the first and the last), rather than after the calibration."""
    if target is None or policy is None:
        return
    layers = Shape.of(parent.model.config).layers
    # which blocks "magnitude" drops depends on the calibration; any magnitudes check what the depth allows
    pick_blocks(layers, target.layers, list(policy) if isinstance(policy, tuple) else policy, torch.zeros(layers))


def _readable(parent: Parent) -> bool:
    """Whether the parent's checkpoint can be read block by block under the model's names (header reads only)."""
    return checkpoint_tensors(parent.model, parent.source, renames=True) is not None


def _device(places: dict[str, int]) -> str:
    """Where the parent's weights are, GPUs first, then the CPU, then the disk: "cuda:0+cpu+disk"."""
    return "+".join(sorted(places, key=lambda p: (_PLACE_ORDER.get(p, 0), p))) or "cpu"


def make_planned_child(parent: Parent, target: Shape, plan: Plan, **kwargs) -> Child:
    """children.make_child with every value of the plan passed explicitly; the plan is recorded in the child's
    manifest (subclone.json's "plan").

    Args:
        parent, target: as in make_child.
        plan: from resolve_plan for this parent.
        **kwargs: make_child's other arguments (importance, progress, stats).
    """
    child = make_child(parent, target, **plan.make_kwargs(), **kwargs)
    child.manifest.plan = plan.to_json()
    return child


def _data_label(data_id: str) -> str:
    """A data id as the line shows it: a file or folder by its name, an embedded set by its id."""
    return Path(data_id).name if "/" in data_id or "\\" in data_id else data_id


def _size(n: int) -> str:
    """Bytes as a short size: 5.8GiB, 512.0MiB, 4.0KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
