"""Streamlit helpers shared by the pages: settings, the cached parent, the session's workspace, the
server's job limiter, progress bars, and error display. The only module of the app package that imports
Streamlit; the pages call these and the library, and draw."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from subclone_core.app.inputs import app_words, range_label, range_problem
from subclone_core.app.jobs import ORPHAN_SECONDS, JobLimiter, ProgressEvent, Work
from subclone_core.app.session import Workspace
from subclone_core.app.settings import AppSettings
from subclone_core.app.sharing import ResultStore, SharedSteps, step_text
from subclone_core.core.errors import SubcloneError
from subclone_core.io.devices import resolve_device
from subclone_core.sources import Parent, load_parent
from subclone_core.sources.parents import SPECIAL_IDS
from subclone_core.training.events import Event, of_kind

logger = logging.getLogger(__name__)

PAGES = {"parent": "pages/parent.py", "importance": "pages/importance.py", "blocks": "pages/blocks.py",
         "child": "pages/child.py", "train": "pages/train.py"}


def settings() -> AppSettings:
    """The server settings: environment variables, then secrets.toml's [subclone] table, then defaults."""
    secrets = {}
    try:
        if st.secrets.load_if_toml_exists():
            secrets = dict(st.secrets.get("subclone", {}))
    except FileNotFoundError:
        pass  # no secrets file is the normal case
    except Exception as err:  # noqa: BLE001 - Streamlit raises its own types for a malformed file
        raise SubcloneError(f"the server's .streamlit/secrets.toml cannot be read: {err}") from None
    return AppSettings.load(secrets=secrets)


def device() -> str:
    """Where parents are put by default: the GPU when there is one, else the CPU."""
    return str(resolve_device("auto"))


PARENT_DTYPES = ("float32", "bfloat16", "float16", "auto")


def device_choices() -> list[str]:
    """The Parent page's device choices: the CPU, each visible GPU, and "auto" (spread over every GPU)."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu", *gpus, "auto"] if gpus else ["cpu"]


def placement() -> tuple[str, str]:
    """The session's (device, dtype) for parents: the Parent page's selectors, else cuda + bfloat16 where a GPU
    is visible and cpu + float32 where not."""
    gpu = torch.cuda.is_available()
    device_name = st.session_state.get(KEEP + "parent_device", "cuda:0" if gpu else "cpu")
    dtype_name = st.session_state.get(KEEP + "parent_dtype", "bfloat16" if gpu else "float32")
    return device_name, dtype_name


@st.cache_resource(max_entries=3, show_spinner=False)
def _cached_parent(parent_id: str, device_name: str, dtype_name: str = "float32") -> Parent:
    return load_parent(parent_id, device=device_name, dtype=dtype_name)


def get_parent(parent_id: str) -> Parent:
    """The parent, loaded once per server process per device and dtype and shared by all sessions (never
    modify it); placed as the session's Parent page says (see ``placement``).

    Local paths are checked against the allowed roots and Hub ids against the Hub setting first.

    Raises:
        SubcloneError: a path outside the allowed roots, a Hub id when the Hub is off, or any load error.
    """
    config = settings()
    if parent_id not in SPECIAL_IDS:
        if Path(parent_id).expanduser().exists() or parent_id.startswith((".", "/", "~")):
            parent_id = str(config.check_local_path(parent_id, "parent"))
        elif not config.allow_hub:
            raise SubcloneError(f"parent {parent_id!r}: Hub ids are turned off on this server; "
                                "choose the default or a local folder")
    return _cached_parent(parent_id, *placement())


@st.cache_resource(show_spinner=False)
def _limiter(max_running: int, max_queued: int) -> JobLimiter:
    return JobLimiter(max_running=max_running, max_queued=max_queued)


def limiter() -> JobLimiter:
    """The server-wide job limiter of training jobs and long page steps (one per setting of max jobs and
    queue length)."""
    config = settings()
    return _limiter(config.max_jobs, config.max_queue)


KEEP = "keep_"


def keep(name: str, default: Any) -> str:
    """The key of a widget whose value should survive page switches, set to ``default`` the first time.

    Streamlit forgets the state of widgets that a run does not draw; app.py writes every ``keep_`` key
    back into the session state at the start of each run, which keeps them.
    """
    key = KEEP + name
    if key not in st.session_state:
        st.session_state[key] = default
    return key


def keep_widget_state() -> None:
    """Re-assign every ``keep_`` value so that Streamlit keeps it while its page is not shown."""
    for key in [k for k in st.session_state if str(k).startswith(KEEP)]:
        st.session_state[key] = st.session_state[key]


def workspace() -> Workspace:
    """This browser session's choices and results."""
    if "workspace" not in st.session_state:
        st.session_state["workspace"] = Workspace()
    return st.session_state["workspace"]


def current_parent() -> Parent:
    """The session's parent; without one, a pointer to the Parent page and the page stops here."""
    ws = workspace()
    if ws.parent_id is None:
        st.info("Choose a parent model first.")
        st.page_link(PAGES["parent"], label="Go to the Parent page", icon=":material/arrow_forward:")
        st.stop()
    with errors_shown("loading the parent"):
        return get_parent(ws.parent_id)
    st.stop()


# GitHub's autolinks need no Markdown punctuation: "www." and "name@host" start one. A zero-width space after
# "www" and after "@" breaks them; URLs ("http://", "ftp://", "mailto:") are broken at their colon.
_AUTOLINK_STARTS = re.compile(r"(?i)(www(?=\\?\.)|@)")


def plain(text: str) -> str:
    """Text from a user or a model (a path, a name, a generation, an error) made safe to show as Markdown:
    Markdown's punctuation is escaped (no link, image, emphasis or code), and a zero-width space after
    every colon breaks Streamlit's ``:emoji:``, ``:material/icon:`` and ``:color[...]`` codes and URLs, and
    one after "www" and "@" GitHub's autolinks of web and e-mail addresses."""
    escaped = re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", str(text)).replace("\n", " ")
    return _AUTOLINK_STARTS.sub("\\1\u200b", escaped.replace(":", ":\u200b"))


def progress_bar(text: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress bar and (update(done, total), clear()) for library progress callbacks."""
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int) -> None:
        fraction = min(1.0, done / total) if total else 0.0
        bar.progress(fraction, text=f"{text}: {done:,} of {total:,}" if total else f"{text}: {done:,}")

    return update, bar.empty


@contextlib.contextmanager
def errors_shown(what: str) -> Iterator[None]:
    """Show errors met while doing ``what`` as st.error (with what to do) and let the app go on."""
    try:
        yield
    except SubcloneError as err:
        st.error(f"Could not finish {plain(what)}: {plain(app_words(str(err)))}", icon=":material/error:")
    except (MemoryError, torch.OutOfMemoryError):
        st.error(f"Out of memory while {plain(what)}: use a smaller token budget, batch or model, or wait for other "
                 "jobs on this server to finish.", icon=":material/memory:")
    except OSError as err:
        st.error(f"A file could not be read or written while {plain(what)}: {plain(str(err))}. Check the path and its "
                 "permissions.",
                 icon=":material/error:")
    except Exception as err:
        logger.exception("unexpected error while %s", what)
        st.error(f"Unexpected error while {plain(what)}: {type(err).__name__}: {plain(str(err))}. Try again or choose other "
                 "settings; the server log has the details.", icon=":material/bug_report:")


# --- results kept for every session; page steps in the background ------------------------------------

STEP_POLL_SECONDS = 0.5
RESULTS_BYTES = 2 * 2**30  # results kept for every session: their tensors' bytes at most


@st.cache_resource(show_spinner=False)
def _results() -> ResultStore:
    return ResultStore(RESULTS_BYTES)


@st.cache_resource(show_spinner=False)
def _shared_steps() -> SharedSteps:
    return SharedSteps()


def cached(key: tuple) -> Any:
    """A result kept by ``remember`` under ids and settings (longsteps.result_key), or None.

    The session's parent placement (device, dtype) is part of every key: a bfloat16 parent's scores are
    not a float32 parent's.
    """
    return _results().get((*placement(), *key))


def remember(key: tuple, value: Any) -> Any:
    """Keep a result for every session of this server (the least recently used go beyond RESULTS_BYTES);
    returns it."""
    return _results().put((*placement(), *key), value)


def start_step(name: str, work: Work, apply: Callable[[Any], None], key: tuple | None = None,
               estimate: float | None = None) -> None:
    """Run a page step in the server's queue; ``apply(result)`` runs on the next rerun after it is done.
    Sessions asking for the same ``key`` (ids and settings; the placement is added) share one job. The
    step is cancelled when no page has polled it for ORPHAN_SECONDS (a closed tab)."""
    shared = None if key is None else (name, *placement(), *key)
    with errors_shown(f"starting {name}"):
        handle = _shared_steps().start(shared, name, work, limiter(), orphan_after=ORPHAN_SECONDS,
                                       estimate=estimate)
        workspace().start_step(name, handle, apply)


def step_panel(name: str, label: str, partial: Callable[[list[Event]], None] | None = None) -> bool:
    """The step's progress bar and Cancel button (polled) while it runs, or its note once; whether it runs.

    Args:
        name: the step's name in the workspace.
        label: what it does, for the bar and the notes.
        partial: draws what the events so far show (e.g. the bars known so far).
    """
    ws = workspace()
    ws.unshown.discard(name)  # this full run of the page shows the step's result
    note = ws.notes.pop(name, None)
    if note is not None:
        (st.error if note[0] == "error" else st.info)(f"{label}: {note[1]}")
    if ws.running(name) is None:
        return False
    st.fragment(_poll_step, run_every=STEP_POLL_SECONDS)(name, label, partial)
    return True


def _poll_step(name: str, label: str, partial: Callable[[list[Event]], None] | None) -> None:
    job = workspace().running(name)
    if job is None:
        if name in workspace().unshown:  # the full rerun asked for below never came: ask again
            st.rerun(scope="app")
        return
    job.heartbeat()
    if job.done:
        workspace().collect()  # apply the result here: a fragment rerun does not run app.py
        st.rerun(scope="app")
    events = job.events()
    ticks = of_kind(events, ProgressEvent)
    last = ticks[-1] if ticks else ProgressEvent(done=0, total=0)
    done, total, stage = last.done, last.total, last.stage or label
    text = f"{stage.capitalize()}: {done:,} of {total:,}" if total else step_text(job, label)
    began = next((e.time for e in ticks if e.stage == last.stage), None)
    if done and began is not None and total > done:
        text += f", about {max(1, round((time.time() - began) * (total - done) / done))} s left"
    if job.cancelling:  # until the work has stopped: a second click would seem to do nothing
        text = f"Cancelling... ({label} stops within a second or two)"
    st.progress(min(1.0, done / total) if total else 0.0, text=text)
    if not job.cancelling:  # the click's callback runs before the rerun, which then says "Cancelling..."
        st.button("Cancel", key=f"cancel_{name}", on_click=job.stop)
    if partial is not None:
        partial(events)


def checked_number(label: str, low: float, high: float, name: str, default: float, *, column: Any = None,
                   **options: Any) -> Any:
    """A number input that keeps any typed value, shows its range in the label, and says when the value
    is outside it; returns the value, or None (the caller then blocks its action).

    Args:
        label: what the number is, e.g. "Steps".
        low, high: the valid range.
        name: the kept widget's name (see ``keep``).
        default: the first value.
        column: where to draw (default: the main area).
        options: more st.number_input arguments (step, format, disabled, help).
    """
    where = column if column is not None else st
    value = where.number_input(range_label(label, low, high), key=keep(name, default), **options)
    problem = range_problem(label, value, low, high)
    if problem is not None and not options.get("disabled"):
        where.error(problem, icon=":material/error:")
        return None
    return value
