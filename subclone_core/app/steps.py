"""The app's multi-call steps over the library: the child and its random twin,
step-0 comparisons, saving, uploads, and the training job's work. No Streamlit here."""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from subclone_core.analysis.probes import exclusive
from subclone_core.app.analysis import check_memory, training_bytes
from subclone_core.app.jobs import Emit, NoteEvent, StatusEvent, Work
from subclone_core.app.settings import AppSettings, safe_name
from subclone_core.core.calibration import Importance, Progress
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import DEFAULT_STRATEGY, Child, strategy_shape
from subclone_core.data.text import TEXT_SUFFIXES, documents
from subclone_core.io.atomic import claim_output
from subclone_core.io.devices import available_bytes, resolve_device
from subclone_core.sources import Parent
from subclone_core.training import Candidate, TrainConfig, train_candidates
from subclone_core.training.sweep import LrGrid, save_plan
from subclone_core.workflow.children import save_child
from subclone_core.workflow.jobs import (
    BASELINE,
    CandidateSettings,
    build_candidates,
    build_child,
    calibration_plan,
    candidate_plan,
    candidate_plans,
    importance_for,
    training_data,
)
from subclone_core.workflow.plan import Plan

# what the Train page can add to subclone and random init: the app's other strategies
# the strategies the Child page offers (the Train page as extra candidates), as its picker describes them
STRATEGY_LABELS = {"subclone": "subclone: neurons and heads in importance order (the paper)",
                   "first-k": "first-k: the first neurons and heads, no reordering (ablation)",
                   "uniform": "uniform: evenly strided neurons, first blocks (weight selection)",
                   "minitron": "Minitron: activation importance, blocks by 1 - cos (NVIDIA)",
                   "shortgpt": "ShortGPT: removes blocks by 1 - cos only; keep every width",
                   "flap": "FLAP: input fluctuation, with bias compensation",
                   "wanda-sp": "Wanda-sp: |W| x ||x|| per neuron and head",
                   "llm-pruner": "LLM-Pruner: first-order Taylor |W x dL/dW| per neuron and head",
                   "slicegpt": "SliceGPT: rotates the stream (PCA), cuts its hidden size only",
                   "grail": "GRAIL: our selection, refit with a ridge towards zero"}
EXTRA_STRATEGIES = tuple(name for name in STRATEGY_LABELS if name != DEFAULT_STRATEGY)


def extra_strategies(parent_model: torch.nn.Module, shape: Shape) -> list[str]:
    """The extra strategies that build a child of exactly this shape (a depth-only method cannot narrow a width;
    a strategy refusing the shape for this family is left out too), to train beside the child."""
    def builds(strategy: str) -> bool:
        try:
            return strategy_shape(parent_model, strategy, shape) == shape
        except SubcloneError:
            return False
    return [strategy for strategy in EXTRA_STRATEGIES if builds(strategy)]


def child_settings(strategy: str, drop: str | list[int] | None, scale: bool | None, data_id: str | None,
                   calib_tokens: int, seed: int = 0, *, residual_score: str | None = None,
                   refit: bool | None = None) -> CandidateSettings:
    """The Child page's choices as the training job's settings: the child's strategy and its random twin."""
    return CandidateSettings(names=(strategy, BASELINE), drop=drop, scale=scale, seed=seed, data_id=data_id,
                             calib_tokens=calib_tokens, residual_score=residual_score, refit=refit)


def child_plan(parent: Parent, settings: CandidateSettings, target: Shape | None = None) -> Plan:
    """The plan of the child that make_children would build now (the settings' first strategy), for the Child
    page to show before Generate."""
    return candidate_plan(parent, settings.names[0], settings, target)


def make_children(parent: Parent, target: Shape, settings: CandidateSettings, *,
                  importance: Importance | None, progress: Progress | None = None,
                  refit_progress: Progress | None = None) -> tuple[Child, Child]:
    """The child of the settings' first strategy and a randomly initialized twin of the same shape, built as
    the training job builds them, each by its plan (recorded in its manifest), calibrating the shared parent
    first, under its lock, when needed (``progress``); ``refit_progress`` follows the child's refit."""
    strategy = settings.names[0]
    plans = candidate_plans(parent, settings, target)
    with exclusive(parent.model):
        importance = importance_for(parent, settings, [strategy], importance, progress, calibration_plan(plans))
        child = build_child(parent, target, strategy, settings, importance, plans[strategy], refit_progress)
    return child, build_child(parent, target, BASELINE, settings, None, plans[BASELINE])


def fresh_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``..., whichever is free, created now: two sessions asking for the same
    name at the same moment get different folders (mkdir either creates the folder or fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = path.with_name(f"{path.name}-{number}")


OWNER_FILE = ".subclone-owner"  # in a child folder the app saved: a hash of the session that saved it


def save_child_folder(child: Child, settings: AppSettings, name: str, task: str,
                      overwrite: bool = False, owner: str | None = None) -> Path:
    """Save the child under <output dir>/children/<name> (name checked: no separators, no '..').

    Args:
        child, settings, name, task: what to save, where, and the parent's task.
        overwrite: replace a folder of that name, which only the session that saved it (``owner``) may.
        owner: the saving session's key; recorded (hashed) in the folder.

    Raises:
        SubcloneError: the name is taken (without overwrite, or by another session), or being written.
    """
    path = settings.output_path(name, "children")
    with claim_output(path, overwrite=overwrite, flag="name", hint=REPLACE_HINT):
        if overwrite and path.is_dir() and any(path.iterdir()) and _owner_of(path) != _owner_tag(owner):
            raise SubcloneError(f"a folder named {name!r} was saved by another session (or outside the app) "
                                "and is not replaced; choose another name")
        saved = save_child(child, path, task=task, overwrite=overwrite)
        if owner is not None:
            (saved / OWNER_FILE).write_text(_owner_tag(owner))
    return saved


REPLACE_HINT = 'tick "Replace an existing folder of that name"'


def _owner_tag(owner: str | None) -> str | None:
    return None if owner is None else hashlib.sha256(owner.encode()).hexdigest()[:16]


def _owner_of(folder: Path) -> str | None:
    try:
        return (folder / OWNER_FILE).read_text().strip()
    except OSError:
        return None


def store_upload(settings: AppSettings, session_key: str, filename: str, data: bytes) -> Path:
    """Write an uploaded text file under <output dir>/uploads/<session>/ and check that it reads as text.

    The stored name is the visitor's, folded to plain letters (``résumé.txt`` -> ``resume.txt``); a name
    already taken in this session gets ``-2``, ``-3``... (an upload never replaces another).

    Raises:
        SubcloneError: too large, not .txt/.md/.jsonl, not UTF-8 text, or empty; the message says what to do.
    """
    size_mb = len(data) / 2**20
    if size_mb > settings.max_upload_mb:
        raise SubcloneError(f"the upload is {size_mb:.1f} MB; the limit is {settings.max_upload_mb} MB: "
                            "upload a smaller file")
    suffix = Path(filename).suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise SubcloneError(f"{filename!r} is not a text file this app reads; "
                            f"upload {', '.join(TEXT_SUFFIXES)}")
    path = _new_upload_file(settings.output_path(upload_stem(filename) + suffix, "uploads", safe_name(session_key)),
                            data)
    try:
        if next(iter(documents(str(path))), None) is None:
            raise SubcloneError(f"{filename} has no text")
    except SubcloneError as err:
        path.unlink(missing_ok=True)
        why = str(err).replace(str(path), filename)  # the visitor's file name, not the server's path
        raise SubcloneError(f"{why}; upload UTF-8 text with a few paragraphs") from None
    return path


def upload_stem(filename: str) -> str:
    """A file name's stem as plain ASCII letters, digits, '-' and '_' (accents folded), never empty."""
    folded = unicodedata.normalize("NFKD", Path(filename).stem).encode("ascii", "ignore").decode()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in folded)[:60].lstrip("-_")
    return stem or "upload"


def _new_upload_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` or the first free ``stem-N`` beside it; never replaces a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = path, 1
    while True:
        try:
            with candidate.open("xb") as f:
                f.write(data)
            return candidate
        except FileExistsError:
            number += 1
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")


# --- training -------------------------------------------------------------------------------------------


@dataclass
class TrainRequest:
    """What the Train page asks for; the models are copied when the job starts, never trained in place.

    Attributes:
        parent: the (shared, never modified) parent; its preprocessor prepares the data.
        data_id: the training data (the validation split is held out from the same id).
        child: the child from the Child page.
        twin: its random twin.
        settings: how the child was made (child_settings); the extra strategies are built the same way.
        extra: more strategies to build and train alongside ("first-k", "uniform").
        steps, batch_size, seq_len, eval_every, lr: training settings (lr None: each strategy's default).
        lr_sweep: candidate -> learning rates to train it at, one run each (training.sweep); a candidate
            swept is shown and saved by its best run, and ``lr`` applies to the others.
        save_dir: where finished models are saved (None: not saved; with a sweep, each candidate's best run).
    """

    parent: Parent
    data_id: str | None
    child: Child
    twin: Child
    settings: CandidateSettings
    extra: tuple[str, ...] = ()
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    eval_every: int = 10
    eval_batches: int = 4
    lr: float | None = None
    lr_sweep: LrGrid = field(default_factory=dict)
    save_dir: Path | None = None

    def config(self) -> TrainConfig:
        """The engine's settings; validated here so that a bad one is reported before queueing."""
        config = TrainConfig(steps=self.steps, batch_size=self.batch_size, eval_every=self.eval_every,
                             eval_batches=self.eval_batches, warmup=0.05, device="auto")
        config.validate()
        return config

    def candidate_settings(self) -> CandidateSettings:
        """The child's settings with the extra strategies added, the sweep, and the learning rate applied to
        every candidate not swept."""
        for strategy in self.extra:
            if strategy not in EXTRA_STRATEGIES:
                raise SubcloneError(f"unknown extra strategy {strategy!r}; valid: {', '.join(EXTRA_STRATEGIES)}")
        names = tuple(dict.fromkeys((*self.settings.names, *self.extra)))
        lr = {name: self.lr for name in names if name not in self.lr_sweep} if self.lr else {}
        return replace(self.settings, names=names, lr=lr, lr_sweep=dict(self.lr_sweep))


def build_request_candidates(request: TrainRequest) -> tuple[list[Candidate], dict[str, dict]]:
    """Copies of the child and its twin, plus the extra strategies built by the training job's rule."""
    made = {request.settings.names[0]: request.child, BASELINE: request.twin}
    with exclusive(request.parent.model):  # calibration and the refit run the parent other sessions share
        return build_candidates(request.parent, request.child.shape, request.candidate_settings(),
                                importance=request.child.importance, made=made)


def training_work(request: TrainRequest, *,
                  memory: Callable[[torch.device | str | None], int] = available_bytes) -> Work:
    """The function a BackgroundJob runs: build the candidates, check memory, prepare data, train, save."""
    config = request.config()

    def work(emit: Emit, cancel: threading.Event) -> dict:
        emit(StatusEvent(message="building the models and preparing the data"))
        candidates, manifests = build_request_candidates(request)
        need = training_bytes([c.model for c in candidates], request.batch_size, request.seq_len)
        check_memory(need, memory(resolve_device(config.device)))
        per_eval = request.eval_batches * request.batch_size
        train, val, run_config = training_data(request.parent, request.data_id, config, seq_len=request.seq_len,
                                               eval_tokens=per_eval * request.seq_len, eval_images=per_eval)
        task = request.parent.task_spec
        try:
            return train_candidates(candidates, train, val, run_config, callbacks=[emit], cancel=cancel,
                                    save_dir=request.save_dir, preprocessor=request.parent.preprocessor,
                                    manifest_for=manifests.get,
                                    save_plan=save_plan(task.metric, higher_is_better=task.higher_is_better))
        finally:
            _drop_unused_folder(request.save_dir, emit)

    return work


def remove_if_empty(folder: Path | None) -> bool:
    """Remove ``folder`` when it exists and holds nothing; whether it did."""
    try:
        if folder is None or any(folder.iterdir()):
            return False
        folder.rmdir()
        return True
    except OSError:  # gone already, or written to meanwhile: leave it
        return False


def _drop_unused_folder(save_dir: Path | None, emit: Emit) -> None:
    """A run stopped (or failed) before anything was saved must not leave its folder empty and unexplained:
    the page made it when the run started (fresh_folder), so remove it and say so."""
    if remove_if_empty(save_dir):
        emit(NoteEvent(message=f"No model was saved, so the empty run folder {save_dir.name!r} was removed."))
