"""The manifest of a model folder (subclone.json) as typed records: how a child was made and trained.

On disk it is one JSON object: "format", "library_version", "created", "parent" (shape, id, label,
model_type, weights_sha256, licence, twin_of), "child" ({"shape": ...}), the strategy's choices ("strategy",
"order", "drop", "scale", "untie_head", "seed", "residual_score", "refit", "refit_ridge"), "kept_blocks",
"removed_blocks", "selection" (Selection.to_json), "calibration" ({"data", "tokens"}), "plan" (every default
resolved before the child was made, with its one-line summary and warnings: workflow.plan.Plan.to_json; absent
from older manifests), and, once trained, "training". A folder made elsewhere and trained here has only "note"
and "training". Keys this version does not know are kept and written back unchanged.

``Manifest.from_json`` is the one reader of that object (``io.saving.read_manifest`` reads the file);
``Manifest.to_json`` writes it back in the same format.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT = "subclone-manifest/1"


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that name a field of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass
class ParentRecord:
    """The parent a child was cut from: its shape, id and label, and the hash of its weights."""

    shape: dict[str, int] | None = None
    id: str | None = None
    label: str | None = None
    model_type: str | None = None
    weights_sha256: str | None = None
    licence: dict[str, str] | None = None
    twin_of: str | None = None  # a random twin: the folder whose shape it copies

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | None) -> ParentRecord | None:
        """The record of a "parent" entry (a bare id string in early manifests; "sha256" the hash's old key)."""
        if data is None:
            return None
        if isinstance(data, str):
            return cls(id=data)
        record = cls(**_known(cls, data))
        if record.weights_sha256 is None and "sha256" in data:
            record.weights_sha256 = data["sha256"]
        return record

    def to_json(self) -> dict[str, Any]:
        """The entry as written: the fields that are known."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class CalibrationRecord:
    """The data importance was measured on, and how many token positions (or image patches) it used."""

    data: str
    tokens: int


@dataclass
class TrainingInfo:
    """How a saved candidate was trained (the manifest's "training" entry, written by the training engine).

    Attributes:
        engine, schedule: the module that trained it and its optimizer and schedule, in words.
        strategy, lr, weight_decay: the candidate's strategy and hyperparameters.
        config: the TrainConfig as a dict.
        steps_done, seen: optimizer steps done; tokens (or images) trained on, over all processes.
        unit: what ``seen`` counts ("tokens", "images").
        world_size, device, bf16_autocast: where and how it ran.
        parallel: "ddp" (a full replica per process) or "fsdp" (sharded across the processes).
        distill: {"alpha", "temperature"} when trained with the parent as teacher, else None.
        evals: the validation results, one EvalPoint dict each, step 0 first.
    """

    engine: str | None = None
    strategy: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    config: dict[str, Any] | None = None
    steps_done: int | None = None
    seen: int | None = None
    unit: str | None = None
    world_size: int | None = None
    parallel: str | None = None
    device: str | None = None
    bf16_autocast: bool | None = None
    distill: dict[str, float] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TrainingInfo | None:
        return None if data is None else cls(**_known(cls, data))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_ENTRIES = {"parent", "child", "calibration", "training"}  # keys read into records of their own
# The strategy's choices, written even when null: a child's record names every one of them.
_CHOICES = ("strategy", "order", "drop", "scale", "untie_head", "seed", "residual_score", "refit", "refit_ridge")


@dataclass
class Manifest:
    """A model folder's subclone.json (see the module docstring for the format).

    Attributes:
        format, library_version, created: the record's format, the library that wrote it, when (ISO 8601).
        parent: where the weights came from (None: a model made elsewhere).
        child_shape: the child's Shape.as_dict() (the "child" entry's "shape").
        strategy ... refit_ridge: the strategy and its choices (strategies.subclone_model).
        kept_blocks, removed_blocks: the parent blocks kept and removed.
        selection: the kept indices (Selection.to_json()), None for a random child.
        calibration: the data importance was measured on, None when none was measured.
        plan: the resolved plan the child was made by (workflow.plan.Plan.to_json), None in older manifests.
        training: how it was trained, once it has been.
        note: what is known of a model folder made elsewhere.
        extra: keys this version does not know, written back unchanged.
    """

    format: str | None = None
    library_version: str | None = None
    created: str | None = None
    parent: ParentRecord | None = None
    child_shape: dict[str, int] | None = None
    strategy: str | None = None
    order: str | None = None
    drop: str | list[int] | None = None
    scale: bool | None = None
    untie_head: bool | None = None
    seed: int | None = None
    residual_score: str | None = None
    refit: bool | None = None
    refit_ridge: float | None = None
    kept_blocks: list[int] | None = None
    removed_blocks: list[int] | None = None
    selection: dict[str, Any] | None = None
    calibration: CalibrationRecord | None = None
    plan: dict[str, Any] | None = None
    training: TrainingInfo | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_child(self) -> bool:
        """Whether this records a child made here (its shape is known), not a model made elsewhere."""
        return self.child_shape is not None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """The manifest of a subclone.json object; unknown keys are kept in ``extra``."""
        simple = {f.name for f in fields(cls)} - {"parent", "child_shape", "calibration", "training", "extra"}
        child, calibration = data.get("child"), data.get("calibration")
        return cls(
            **{key: data[key] for key in simple if key in data},
            parent=ParentRecord.from_json(data.get("parent")),
            child_shape=child.get("shape") if isinstance(child, dict) else None,
            calibration=CalibrationRecord(**_known(CalibrationRecord, calibration)) if calibration else None,
            training=TrainingInfo.from_json(data.get("training")),
            extra={key: value for key, value in data.items() if key not in simple | _ENTRIES},
        )

    def to_json(self) -> dict[str, Any]:
        """The subclone.json object: a child's record names every choice (nulls included); any other
        manifest holds only what is known."""
        entries = {
            "format": self.format, "library_version": self.library_version, "created": self.created,
            "parent": self.parent.to_json() if self.parent is not None else None,
            "child": {"shape": self.child_shape} if self.child_shape is not None else None,
            **{name: getattr(self, name) for name in _CHOICES},
            "kept_blocks": self.kept_blocks, "removed_blocks": self.removed_blocks, "selection": self.selection,
            "calibration": asdict(self.calibration) if self.calibration is not None else None,
            "plan": self.plan,
            "training": self.training.to_json() if self.training is not None else None,
            "note": self.note,
        }
        always = set(entries) - {"plan", "training", "note"} if self.is_child else set()
        return {**{k: v for k, v in entries.items() if v is not None or k in always}, **self.extra}


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
