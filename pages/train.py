"""Page 5, Train: the subcloned child and its random twin (and optionally first-k / uniform) train side
by side in a background job; the loss chart updates live; the job goes on while you look elsewhere."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from subclone_core.app import charts, ui
from subclone_core.app.analysis import live_summary, metrics_rows, run_progress
from subclone_core.app.jobs import BackgroundJob
from subclone_core.app.steps import EXTRA_STRATEGIES, TrainRequest, fresh_folder, training_work

POLL_SECONDS = 1.0

ws = ui.workspace()
st.title("5. Train")
st.write("Both models see the same batches in the same order. The speedup is how many steps random init "
         "needs to reach its best validation loss, over how many the child needs to reach it.")
parent = ui.current_parent()
if ws.child is None:
    st.info("Generate a child on the Child page first.")
    st.page_link(ui.PAGES["child"], label="Go to the Child page", icon=":material/arrow_forward:")
    st.stop()


def request_form() -> TrainRequest:
    """The training settings."""
    cols = st.columns(5)
    steps = int(cols[0].number_input("Steps", 1, 1_000_000, key=ui.keep("steps", 100)))
    batch = int(cols[1].number_input("Batch size", 1, 1024, key=ui.keep("batch", 8)))
    seq_len = int(cols[2].number_input("Sequence length", 8, 8192, key=ui.keep("seq_len", 128),
                                       disabled=not parent.task_spec.sequences))
    eval_every = int(cols[3].number_input("Validate every (steps)", 1, 100_000,
                                          key=ui.keep("eval_every", 10)))
    lr = float(cols[4].number_input("Learning rate (0: defaults)", 0.0, 1.0, format="%.5f",
                                    key=ui.keep("lr", 0.0)))
    extra = st.multiselect("Also train", EXTRA_STRATEGIES, key=ui.keep("extra", []))
    save = st.checkbox("Save the trained models under the output folder", key=ui.keep("save_trained", True))
    run_name = st.text_input("Run name", key=ui.keep("run_name", "run"), disabled=not save)
    save_dir = ui.settings().output_path(run_name, "runs") if save else None
    return TrainRequest(parent=parent, data_id=ws.data_id, child=ws.child, twin=ws.random_child,
                        settings=ws.child_settings, extra=tuple(extra), steps=steps, batch_size=batch, seq_len=seq_len,
                        eval_every=eval_every, lr=lr or None, save_dir=save_dir)


def start(request: TrainRequest) -> None:
    """Queue a new job for this session (the server bounds how many run at once)."""
    if request.save_dir is not None:
        request.save_dir = fresh_folder(request.save_dir)  # a second run never overwrites the first
    job = BackgroundJob(training_work(request), name="train", limiter=ui.limiter())
    job.start()
    ws.job = job


def show_status(job: BackgroundJob) -> None:
    """Status line and the Stop button."""
    if job.status == "queued":
        st.warning(f"Waiting for a free training slot: place {job.position} in the server's queue.",
                   icon=":material/hourglass_empty:")
    elif job.status == "running":
        done, total = run_progress(job.events())
        st.info(f"Training running for {job.elapsed():.0f} s: step {done} of {total or '?'}",
                icon=":material/directions_run:")
        st.progress(done / total if total else 0.0)
    elif job.status == "failed":
        st.error(f"Training failed: {job.error}", icon=":material/error:")
    else:
        st.success(f"Training {job.status} after {job.elapsed():.0f} s.", icon=":material/check_circle:")
    if not job.done and st.button("Stop", key="stop_job"):
        job.stop()


def metrics_csv(job: BackgroundJob) -> str:
    """Every step and evaluation so far as CSV (made when the button is clicked)."""
    return pd.DataFrame(metrics_rows(job.events())).to_csv(index=False)


def show_results(job: BackgroundJob) -> None:
    """Live chart, summary with speedup and throughput, the metrics table and its CSV."""
    events = job.events()
    st.plotly_chart(charts.loss_chart(events), key="chart_loss")
    summary = live_summary(events)
    if summary:
        st.dataframe(pd.DataFrame(summary), hide_index=True, key="table_summary")
    rows = metrics_rows(events)
    if rows:
        with st.expander(f"All metrics ({len(rows)} rows)"):
            st.dataframe(pd.DataFrame(rows), hide_index=True, key="table_metrics")
        st.download_button("Download metrics (CSV)", data=lambda: metrics_csv(job), file_name="metrics.csv",
                           mime="text/csv", key="download_metrics", on_click="ignore")
    if job.status == "done" and isinstance(job.result, dict):
        saved = [str(r.saved_to) for r in job.result.values() if r.saved_to]
        if saved:
            st.caption("Saved: " + ", ".join(f"`{s}`" for s in saved))


def live(job: BackgroundJob) -> None:
    """Redrawn every POLL_SECONDS while the job runs; one full rerun when it ends, to stop polling."""
    show_status(job)
    show_results(job)
    if job.done and st.session_state.get("polled_job") == job.id:
        st.session_state["polled_job"] = None
        st.rerun(scope="app")


request = None
with ui.errors_shown("reading the training settings"):
    request = request_form()
job = ws.job
busy = job is not None and not job.done
if st.button("Start training", type="primary", key="start_training", disabled=busy or request is None):
    with ui.errors_shown("starting the training job"):
        request.config()
        start(request)
        job = ws.job
if job is not None:
    active = not job.done
    if active:
        st.session_state["polled_job"] = job.id
    st.fragment(live, run_every=POLL_SECONDS if active else None)(job)
