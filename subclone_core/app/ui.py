"""Streamlit helpers shared by the pages: settings, the cached parent, the session's workspace, the
server's job limiter, progress bars, and error display. The only module of the app package that imports
Streamlit; the pages call these and the library, and draw."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from subclone_core.app.jobs import JobLimiter
from subclone_core.app.session import Workspace
from subclone_core.app.settings import AppSettings
from subclone_core.devices import resolve_device
from subclone_core.errors import SubcloneError
from subclone_core.sources import Parent, load_parent
from subclone_core.sources.parents import SPECIAL_IDS

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
    """Where parents are put: the GPU when there is one, else the CPU."""
    return str(resolve_device("auto"))


@st.cache_resource(max_entries=3, show_spinner=False)
def _cached_parent(parent_id: str, device_name: str) -> Parent:
    return load_parent(parent_id, device=device_name)


def get_parent(parent_id: str) -> Parent:
    """The parent, loaded once per server process and shared by all sessions (never modify it).

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
    return _cached_parent(parent_id, device())


@st.cache_resource(show_spinner=False)
def _limiter(max_running: int, max_queued: int) -> JobLimiter:
    return JobLimiter(max_running=max_running, max_queued=max_queued)


def limiter() -> JobLimiter:
    """The server-wide training job limiter (one per setting of max jobs and queue length)."""
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


def plain(text: str) -> str:
    """Text (e.g. a model's generation) escaped so that Markdown shows it as it is."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", text).replace("\n", " ")


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
        st.error(f"Could not finish {what}: {err}", icon=":material/error:")
    except (MemoryError, torch.OutOfMemoryError):
        st.error(f"Out of memory while {what}: use a smaller token budget, batch or model, or wait for other "
                 "jobs on this server to finish.", icon=":material/memory:")
    except OSError as err:
        st.error(f"A file could not be read or written while {what}: {err}. Check the path and its "
                 "permissions.",
                 icon=":material/error:")
    except Exception as err:
        logger.exception("unexpected error while %s", what)
        st.error(f"Unexpected error while {what}: {type(err).__name__}: {err}. Try again or choose other "
                 "settings; the server log has the details.", icon=":material/bug_report:")
