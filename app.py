"""The subclone workbench: pick a parent, see what matters inside it, cut a child, train it.

Run with ``streamlit run app.py`` (or ``make run``). The pages live in pages/ and stay thin: widgets,
calls into subclone_core, charts. Server settings: see subclone_core/app/settings.py.
"""

from __future__ import annotations

import streamlit as st

from subclone_core.app import ui
from subclone_core.app.analysis import run_progress

st.set_page_config(page_title="subclone workbench", page_icon=":material/content_cut:", layout="wide")

PAGES = [
    st.Page(ui.PAGES["parent"], title="1. Parent", icon=":material/account_tree:", default=True),
    st.Page(ui.PAGES["importance"], title="2. Importance", icon=":material/grid_on:"),
    st.Page(ui.PAGES["blocks"], title="3. Blocks", icon=":material/view_agenda:"),
    st.Page(ui.PAGES["child"], title="4. Child", icon=":material/child_care:"),
    st.Page(ui.PAGES["train"], title="5. Train", icon=":material/show_chart:"),
]
JOB_POLL_SECONDS = 2.0


def open_parent() -> None:
    """A new session opens with the server's default parent loaded (SUBCLONE_OPEN_PARENT)."""
    ws = ui.workspace()
    if ws.opened:
        return
    ws.opened = True
    parent_id = ui.settings().open_parent
    if parent_id and ws.parent_id is None:
        with ui.errors_shown(f"opening the parent {parent_id!r}"), st.spinner(
                f"Opening the parent {parent_id} (the first use on this server converts it once)..."):
            task = ui.get_parent(parent_id).task_spec
            ws.choose(parent_id, None, task.data_choices[task.default_data])


def session_summary() -> None:
    """What this session has chosen (drawn again after the page ran, so it is never one step behind)."""
    ws = ui.workspace()
    st.caption("Session")
    lines = [f"**Parent:** {ui.plain(ws.parent_id or 'none yet')}", f"**Data:** {ui.plain(ws.data_label)}"]
    if ws.child is not None:
        shape = ws.child.shape
        lines.append(f"**Child:** {shape.layers} blocks x {shape.hidden} ({ws.child.manifest.strategy})")
    st.markdown("  \n".join(lines))


def jobs_status() -> None:
    """The session's jobs and the server's queue; polled while a job runs, which also tells the jobs that
    their session is still open (a job nobody polls for a minute is cancelled)."""
    ws = ui.workspace()
    for job in ws.jobs():
        job.heartbeat()
    if any(job.done for job, _ in ws.steps.values()):
        ws.collect()  # a step finished while another page is shown: apply it and redraw that page
        st.rerun(scope="app")
    job = ws.job
    if job is not None:
        if job.cancelling:
            state = "cancelling..."
        elif job.status == "queued":
            state = f"waiting, place {job.position} in the queue" if job.position else "starting"
        elif job.status == "running":
            done, total = run_progress(job.events())
            state = f"running, step {done} of {total or '?'}"
        else:
            state = job.status
        st.markdown(f"**Training:** {state}")
    for name, (step, _) in ws.steps.items():
        st.markdown(f"**{'Cancelling' if step.cancelling else 'Running'}:** {name}")
    queue = ui.limiter().snapshot()
    st.caption(f"Server: {queue['running']}/{queue['max_running']} job(s) running (training and long steps), "
               f"{queue['queued']} waiting. Files go to `{ui.settings().output_dir}`. "
               "Parent on {}, {}.".format(*ui.placement()))


navigation = st.navigation(PAGES)
ui.keep_widget_state()
def sidebar(summary: st.delta_generator.DeltaGenerator, jobs: st.delta_generator.DeltaGenerator) -> None:
    """The session's summary and jobs, and the server's queue; polled while this session has a job."""
    with summary.container():
        session_summary()
    with jobs.container():
        st.fragment(jobs_status, run_every=JOB_POLL_SECONDS if ui.workspace().jobs() else None)()


with st.sidebar:
    summary, jobs = st.empty(), st.empty()
with ui.errors_shown("reading the server settings"):
    open_parent()
    ui.workspace().collect()  # results of page steps that finished since the last run
    sidebar(summary, jobs)
navigation.run()
with ui.errors_shown("reading the server settings"):
    sidebar(summary, jobs)  # again: the page may have started a job or a step (a page that stops keeps the first)
