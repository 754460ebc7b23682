"""Page 5, Train: the subcloned child and its random twin (and optionally first-k / uniform) train side
by side in a background job; the loss chart updates live; the job goes on while you look elsewhere."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from subclone_core.app import charts, sizing, ui
from subclone_core.app.analysis import ending_notes, live_summary, metrics_rows, run_progress, sweep_view
from subclone_core.app.inputs import app_words, duration_text
from subclone_core.app.jobs import ORPHAN_SECONDS, BackgroundJob
from subclone_core.app.longsteps import forward_rate
from subclone_core.app.speedup_chart import iso_loss_chart_from_events
from subclone_core.app.steps import (
    STRATEGY_LABELS,
    TrainRequest,
    extra_strategies,
    fresh_folder,
    training_work,
)
from subclone_core.training.events import StartEvent, of_kind
from subclone_core.training.sweep import default_lr_grid, format_lr_sweep, parse_lr_sweep

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


def request_form() -> TrainRequest | None:
    """The training settings; None while one of them is out of its range (the input says which)."""
    text = parent.task_spec.sequences
    speed = sizing.speed_of(ws.child.model, text, ui.device().split(":")[0], torch.get_num_threads(),
                            measured=forward_rate((ws.step0 or {}).get("subclone")), parent=parent.model,
                            parent_rate=forward_rate(ws.parent_metrics))
    size = sizing.size_run(speed, sequences=text)  # the first defaults: a run of about two minutes here
    cols = st.columns(5)
    values = [ui.checked_number("Steps", 1, 1_000_000, "steps", size.steps, column=cols[0], step=1),
              ui.checked_number("Batch size", 1, 1024, "batch", size.batch_size, column=cols[1], step=1),
              ui.checked_number("Sequence length", 8, 8192, "seq_len", max(size.seq_len, 8), column=cols[2],
                                step=8, disabled=not text),
              ui.checked_number("Validate every (steps)", 1, 100_000, "eval_every", size.eval_every,
                                column=cols[3], step=1),
              ui.checked_number("Learning rate (0: defaults)", 0.0, 1.0, "lr", 0.0, column=cols[4], format="%.5f")]
    if None in values:
        return None
    steps, batch, seq_len, eval_every = (int(v) for v in values[:4])
    lr = float(values[4])
    fits = extra_strategies(parent.model, ws.child.shape)
    key = ui.keep("extra", [])
    st.session_state[key] = [s for s in st.session_state[key] if s in fits]  # chosen for an earlier child
    extra = st.multiselect("Also train", fits, format_func=lambda s: STRATEGY_LABELS[s].split(":")[0], key=key)
    sweep = lr_sweep_form((*ws.child_settings.names, *extra))
    models = sum(len(sweep.get(name, (None,))) for name in (*ws.child_settings.names, *extra))
    length = seq_len if text else 1  # an image is one unit
    seconds = sizing.run_seconds(speed, models, steps, batch, length, eval_every, TrainRequest.eval_batches)
    st.caption(f"Estimated time: {duration_text(seconds)} for {models} model(s), each training at about "
               f"{speed.training_rate(batch * length):,.0f} {parent.task_spec.unit} here (from its forward speed, "
               f"{speed.source}; the first settings are sized for "
               f"{duration_text(sizing.TARGET_SECONDS).removeprefix('about ')}).")
    save = st.checkbox("Save the trained models under the output folder", key=ui.keep("save_trained", True))
    run_name = st.text_input("Run name", key=ui.keep("run_name", "run"), disabled=not save)
    save_dir = ui.settings().output_path(run_name, "runs") if save else None
    return TrainRequest(parent=parent, data_id=ws.data_id, child=ws.child, twin=ws.random_child,
                        settings=ws.child_settings, extra=tuple(extra), steps=steps, batch_size=batch, seq_len=seq_len,
                        eval_every=eval_every, lr=lr or None, lr_sweep=sweep, save_dir=save_dir)


def lr_sweep_form(names: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    """The learning-rate sweep option: {} when off; a bad spec raises (the caller shows the error)."""
    on = st.checkbox("Learning-rate sweep: train each model at several learning rates and keep its best run "
                     "(models compared at one learning rate each can mislead)", key=ui.keep("lr_sweep", False))
    text = st.text_input("Learning rates per model (NAME=LR,LR,...; a model not named keeps the learning rate "
                         "above)", key=ui.keep("lr_sweep_spec", format_lr_sweep(default_lr_grid(names))),
                         disabled=not on)
    return parse_lr_sweep(text, names, flag="lr sweep") if on else {}


def start(request: TrainRequest) -> None:
    """Queue a new job for this session (the server bounds how many run at once)."""
    if request.save_dir is not None:
        request.save_dir = fresh_folder(request.save_dir)  # a second run never overwrites the first
    # a job whose session stops polling (its tab was closed) is cancelled and frees the slot
    job = BackgroundJob(training_work(request), name="train", limiter=ui.limiter(), orphan_after=ORPHAN_SECONDS)
    job.start()
    ws.job = job


def queue_text(job: BackgroundJob) -> str:
    """Where a waiting job stands, and how long the job ahead of it has run."""
    if job.position is None:  # it has its slot; its thread is about to start
        return "Starting the training job..."
    ahead = ui.limiter().running_seconds()
    running = f"; the job ahead has run for {duration_text(ahead[0]).removeprefix('about ')}" if ahead else ""
    return f"Waiting for a free training slot: place {job.position} in the server's queue{running}."


def show_status(job: BackgroundJob) -> None:
    """Status line, what the speedup can resolve, and the Stop button."""
    if job.cancelling:
        st.warning("Cancelling... the training stops at its next layer, within a second or two; the metrics "
                   "so far are kept.", icon=":material/hourglass_empty:")
    elif job.status == "queued":
        st.warning(queue_text(job), icon=":material/hourglass_empty:")
    elif job.status == "running":
        done, total = run_progress(job.events())
        left = job.elapsed() * (total - done) / done if done and total else None
        eta = f", {duration_text(left)} left" if left is not None else ""
        st.info(f"Training running for {job.elapsed():.0f} s: step {done} of {total or '?'}{eta}",
                icon=":material/directions_run:")
        st.progress(done / total if total else 0.0)
    elif job.status == "failed":
        st.error(f"Training failed: {app_words(job.error or '')}", icon=":material/error:")
    else:
        why = " because no page polled it for a minute (its tab was closed)" if job.orphaned else ""
        st.success(f"Training {job.status}{why} after {job.elapsed():.0f} s.", icon=":material/check_circle:")
    for note in ending_notes(job.events()) if job.done else ():
        st.info(note, icon=":material/info:")
    every = next((e.config.get("eval_every") for e in of_kind(job.events(), StartEvent)), None)
    if every:
        st.caption(f"Speedups are read at the validation points, every {every} steps: \"1.0x\" means the child "
                   f"reached random init's best loss within {every} steps of it, not that they are level. Until "
                   "random init improves on its step-0 loss there is no target, and the speedup reads n/a.")
    if not job.done and not job.cancelling:  # the click's callback runs first: the rerun says "Cancelling..."
        st.button("Stop", key="stop_job", on_click=job.stop)


def metrics_csv(job: BackgroundJob) -> str:
    """Every step and evaluation so far as CSV (made when the button is clicked)."""
    return pd.DataFrame(metrics_rows(job.events())).to_csv(index=False)


def show_results(job: BackgroundJob) -> None:
    """Live loss and iso-loss speedup charts, summary with speedup and throughput, the metrics table and its CSV."""
    events = job.events()
    task = parent.task_spec  # the metric the candidates are compared on, and its direction
    view = sweep_view(events, task.metric, task.higher_is_better)  # each swept model's best run so far
    left, right = st.columns(2)
    left.plotly_chart(charts.loss_chart(events, faint=view.faint), key="chart_loss")
    right.plotly_chart(iso_loss_chart_from_events(view.events, metric=task.metric,
                                                  higher_is_better=task.higher_is_better), key="chart_iso_loss")
    summary = live_summary(view.events, task.metric)
    if summary:
        st.dataframe(pd.DataFrame(summary), hide_index=True, key="table_summary")
    if view.rows:
        st.caption("Learning-rate sweep: every run; each model's chosen run (its best validation value so far) "
                   "is drawn in full and gives the speedup, the others are dotted.")
        st.dataframe(pd.DataFrame(view.rows), hide_index=True, key="table_sweep")
        for note in view.notes if job.done else ():
            st.warning(note, icon=":material/warning:")
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
    job.heartbeat()
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
