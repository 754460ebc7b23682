"""What one browser session has chosen and produced, kept in ``st.session_state`` (no Streamlit here).

Choosing another parent or data set drops every result computed from the old one, so a page never
shows importance or a child that belongs to a different parent. A training job is kept until the user
starts another one: it goes on (and its results stay) whatever page the user looks at.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subclone_core.core.calibration import Importance
from subclone_core.core.strategies import Child
from subclone_core.workflow.children import CALIB_TOKENS
from subclone_core.workflow.jobs import CandidateSettings

DEFAULT_PROMPT = "The history of the city"


@dataclass
class Workspace:
    """One session's choices and results.

    Attributes:
        key: a random id of the session (names its upload folder).
        parent_id: the chosen parent id, None until one is loaded.
        data_id: the chosen data id (None: the parent task's default).
        data_label: how to show the data to the user.
        parent_metrics: the parent's validation metrics on the chosen data.
        generations: (prompt, new tokens) -> the parent's continuation (text parents).
        importance: the last calibration of this parent on this data.
        drop: the block policy chosen on the Blocks page ("middle", "magnitude" or blocks to drop).
        child_layers: the number of blocks chosen on the Blocks page.
        ablation: {"base", "losses"} from analysis.block_ablation.
        child, random_child: the generated child and its random twin.
        child_settings: how they were made (the Train page builds extra strategies the same way).
        step0: model name -> its validation metrics before training.
        samples: model name -> its continuation of the prompt.
        saved_to: where the child was last saved.
        job: the last training job (a BackgroundJob).
        exploration: the shape explorer's last grid (explore.Exploration) for this calibration.
        inspection: the neuron inspector's last result, unit -> its top activations (inspector.Hit).
        calib_tokens: the calibration budget chosen on the Importance page (the Child page reuses it).
        prompt: the prompt chosen on the Parent page (the Child page samples the models with it).
        steps: name -> (a running BackgroundJob of a page step, what to do with its result).
        notes: name -> (kind, text) said once about a finished step ("error" or "info").
        unshown: steps applied since their page last drew its step panel (see ui.step_panel).
        opened: whether the app has run once in this session (the default parent loads on the first run).
    """

    key: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    parent_id: str | None = None
    data_id: str | None = None
    data_label: str = "default"
    parent_metrics: dict | None = None
    generations: dict[tuple[str, int], str] = field(default_factory=dict)
    importance: Importance | None = None
    drop: str | list[int] | None = None
    child_layers: int | None = None
    ablation: dict | None = None
    child: Child | None = None
    random_child: Child | None = None
    child_settings: CandidateSettings | None = None
    step0: dict[str, dict] | None = None
    samples: dict[str, str] = field(default_factory=dict)
    saved_to: Path | None = None
    job: Any = None
    exploration: Any = None
    inspection: dict = field(default_factory=dict)
    calib_tokens: int = CALIB_TOKENS
    prompt: str = DEFAULT_PROMPT
    steps: dict[str, tuple[Any, Callable[[Any], None]]] = field(default_factory=dict)
    notes: dict[str, tuple[str, str]] = field(default_factory=dict)
    unshown: set[str] = field(default_factory=set)
    opened: bool = False

    def choose(self, parent_id: str, data_id: str | None, data_label: str) -> bool:
        """Select a parent and data; drop everything derived from another choice. Whether it changed."""
        if (parent_id, data_id) == (self.parent_id, self.data_id):
            return False
        if parent_id != self.parent_id:
            self.generations = {}
            self.drop, self.child_layers = None, None
        self.parent_id, self.data_id, self.data_label = parent_id, data_id, data_label
        self.parent_metrics = None
        self.set_importance(None)
        return True

    def set_importance(self, importance: Importance | None) -> None:
        """Store a new calibration; the child and the block ablation came from the old one."""
        self.importance = importance
        self.ablation = None
        self.exploration = None
        self.inspection = {}
        self.set_child(None, None)

    def set_child(self, child: Child | None, random_child: Child | None,
                  settings: CandidateSettings | None = None) -> None:
        """Store a newly generated child and its random twin; their old reports no longer apply."""
        self.child, self.random_child, self.child_settings = child, random_child, settings
        self.step0, self.samples, self.saved_to = None, {}, None

    def start_step(self, name: str, job: Any, apply: Callable[[Any], None]) -> None:
        """Keep a started page step; ``apply(result)`` runs once it is done (on whatever page is shown)."""
        self.steps[name] = (job, apply)
        self.notes.pop(name, None)

    def running(self, name: str) -> Any:
        """The step's job while it has not been collected, else None."""
        entry = self.steps.get(name)
        return entry[0] if entry else None

    def jobs(self) -> list[Any]:
        """This session's unfinished jobs: the training job and the running page steps."""
        jobs = [job for job, _ in self.steps.values()]
        return [job for job in [self.job, *jobs] if job is not None and not job.done]

    def collect(self) -> list[str]:
        """Apply the results of finished steps (a note for a failed or cancelled one); their names."""
        finished = [name for name, (job, _) in self.steps.items() if job.done]
        self.unshown.update(finished)
        for name in finished:
            job, apply = self.steps.pop(name)
            if job.status == "done":
                apply(job.result)
            elif job.status == "failed":
                self.notes[name] = ("error", job.error or "failed")
            else:
                why = " (the page was closed)" if getattr(job, "orphaned", False) else ""
                self.notes[name] = ("info", f"cancelled{why}; nothing was changed")
        return finished
