"""Jobs belong to their session (a job nobody polls is cancelled, metrics kept; the queue says how long the
job ahead has run), page steps run in the background with Cancel, every input is checked where it is typed,
and the app speaks its own language. AppTest on the tiny local Llama of tests/test_app_pages.py."""

from __future__ import annotations

import threading
import time

import pytest
from test_app_pages import APP, TIMEOUT, errors, run, settle, start_app, train_on_page, workdir  # noqa: F401 (workdir: a fixture)

from subclone_core.app.inputs import app_words, duration_text, range_label, range_problem, without_suggestion
from subclone_core.app.jobs import BackgroundJob, JobLimiter, ProgressEvent, cancellable
from subclone_core.training.events import StepEvent

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps_until_cancelled(emit, cancel: threading.Event) -> int:
    """Work that reports a step every 10 ms until it is cancelled."""
    step = 0
    while not cancel.is_set():
        step += 1
        emit(StepEvent(step=step, loss=None))
        time.sleep(0.01)
    return step


def test_a_job_nobody_polls_is_cancelled_and_keeps_its_events():
    limiter = JobLimiter(max_running=1, max_queued=2)
    job = BackgroundJob(_steps_until_cancelled, name="orphan", limiter=limiter, orphan_after=0.4).start()
    assert job.wait(10) and job.status == "cancelled" and job.orphaned
    steps = [e for e in job.events() if isinstance(e, StepEvent)]
    assert len(steps) > 5 and job.result == steps[-1].step  # the metrics stay readable
    assert limiter.snapshot()["running"] == 0  # the slot is free for the next session


def test_a_polled_job_keeps_running():
    job = BackgroundJob(_steps_until_cancelled, name="watched", orphan_after=0.4).start()
    deadline = time.time() + 1.5
    while time.time() < deadline:
        job.heartbeat()
        time.sleep(0.05)
    assert job.status == "running" and not job.orphaned
    job.stop()
    assert job.wait(5) and job.status == "cancelled" and not job.orphaned


def test_a_finished_step_asks_for_a_full_run_until_its_page_draws_it(monkeypatch):
    """The step poll applies the result and asks for a full rerun; if that rerun never comes, every later
    poll asks again, until a full run of the page (step_panel) has shown it.

    (A poll used to ask once: a lost rerun left the page without the result and nothing asking again, the
    browser test's rare 180 s wait for "Explored shape".)"""
    from subclone_core.app import session, ui

    ws = session.Workspace()
    applied, reruns = [], []
    job = BackgroundJob(lambda emit, cancel: "explored", name="explore").start()
    assert job.wait(10) and job.status == "done"
    ws.start_step("explore", job, applied.append)
    monkeypatch.setattr(ui, "workspace", lambda: ws)
    monkeypatch.setattr(ui.st, "rerun", lambda scope="app": reruns.append(scope))  # requested, never run
    ui._poll_step("explore", "exploring", None)
    assert applied == ["explored"] and reruns == ["app"]
    ui._poll_step("explore", "exploring", None)  # the fragment still ticks: the page was not redrawn
    assert reruns == ["app", "app"] and applied == ["explored"]  # asked again, applied once
    assert ui.step_panel("explore", "exploring") is False  # the page's full run draws it...
    ui._poll_step("explore", "exploring", None)
    assert reruns == ["app", "app"]  # ...and the asking stops


def test_the_queue_knows_how_long_the_job_ahead_has_run():
    limiter = JobLimiter(max_running=1, max_queued=2)
    first = BackgroundJob(_steps_until_cancelled, limiter=limiter).start()
    while first.status != "running":
        time.sleep(0.01)
    time.sleep(0.3)
    second = BackgroundJob(_steps_until_cancelled, limiter=limiter).start()
    assert second.position == 1 and limiter.running_seconds()[0] >= 0.3
    first.stop()
    assert first.wait(5) and second.stop() is None and second.wait(5)


def test_a_cancelled_progress_callback_stops_the_work():
    def work(emit, cancel):
        progress = cancellable(cancel, emit)
        for done in range(1, 1000):
            progress(done, 1000)
            if done == 3:
                cancel.set()
        return "finished"

    job = BackgroundJob(work).start()
    assert job.wait(5) and job.status == "cancelled" and job.result is None
    assert [e.done for e in job.events()] == [1, 2, 3]


def test_messages_and_ranges_in_the_apps_words():
    assert range_label("Steps", 1, 1_000_000) == "Steps (1 to 1,000,000)"
    assert range_problem("Steps", 5, 1, 10) is None
    assert "from 1 to 10; 0 is outside" in range_problem("Steps", 0, 1, 10)
    assert "Sequence length" in app_words("give more text or a smaller --seq-len")
    assert "--" not in app_words("choose a new folder or pass --overwrite")
    assert without_suggestion("heads=5 is not divisible by kv_heads=3; nearest valid heads=4") == (
        "heads=5 is not divisible by kv_heads=3")
    assert duration_text(12.4) == "about 12 s" and duration_text(600) == "about 10 min"


def test_invalid_numbers_say_why_and_block_the_action(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    for key, value, message in (("keep_shape_layers", 0, "Blocks must be from 1 to 4"),
                                ("keep_shape_hidden", -64, "Hidden must be from 1 to 64")):
        at.number_input(key=key).set_value(value)
        run(at)
        assert any(message in e for e in errors(at)), errors(at)
        assert not [b for b in at.button if b.key == "generate_child"]  # no Generate with the old values
        at.number_input(key=key).set_value({"keep_shape_layers": 2, "keep_shape_hidden": 32}[key])
        run(at)
    at.number_input(key="keep_shape_kv_heads").set_value(2)
    at.number_input(key="keep_shape_heads").set_value(5)  # 5 query heads cannot share 2 KV heads
    run(at)
    (message,) = [e for e in errors(at) if "not valid" in e]
    assert message.count("nearest valid") + message.count("Nearest valid") == 1, message  # one suggestion
    at.button(key="use_nearest").click()
    settle(at)
    at.button(key="generate_child").click()
    settle(at)
    assert at.session_state["workspace"].child is not None
    at.switch_page("pages/train.py")
    run(at)
    for key, value in (("keep_steps", 0), ("keep_batch", -1)):
        at.number_input(key=key).set_value(value)
        run(at)
        assert at.button(key="start_training").disabled, key
    assert any("Steps must be from 1 to 1,000,000" in e for e in errors(at))
    assert any("Batch size must be from 1 to 1,024" in e for e in errors(at))


def test_an_orphaned_training_job_is_cancelled_and_frees_the_slot(workdir, monkeypatch):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    at.button(key="generate_child").click()
    settle(at)  # settle waits without polling: the child's job must not be orphaned in the meantime
    monkeypatch.setattr("subclone_core.app.jobs.ORPHAN_SECONDS", 1.0)
    monkeypatch.setattr("subclone_core.app.ui.ORPHAN_SECONDS", 1.0)
    at.switch_page("pages/train.py")
    run(at)
    for key, value in (("keep_steps", 100_000), ("keep_batch", 1), ("keep_seq_len", 8)):
        at.number_input(key=key).set_value(value)
        run(at)
    at.checkbox(key="keep_save_trained").uncheck()
    run(at)
    at.button(key="start_training").click()
    run(at)
    job = at.session_state["workspace"].job
    assert job.orphan_after is not None
    # the tab is closed: nothing polls any more
    assert job.wait(30) and job.status == "cancelled" and job.orphaned
    assert any(isinstance(e, StepEvent) for e in job.events())  # its metrics are kept
    run(at)  # the session comes back: the page says what happened
    assert any("no page polled it" in s.value for s in at.success)


def test_block_ablation_replaying_the_blocks_before_matches_recomputing_them(monkeypatch):
    import tiny_models
    import torch

    from subclone_core.analysis import probes as analysis

    model = tiny_models.make("llama").eval()
    batches = [{"input_ids": torch.randint(0, 50, (2, 16)), "labels": torch.randint(0, 50, (2, 16))}
               for _ in range(3)]
    seen = []
    replayed = analysis.block_ablation(model, batches, on_block=lambda i, m: seen.append(i))
    monkeypatch.setattr(analysis, "REPLAY_BYTES", 0)  # nothing fits: every block is recomputed
    recomputed = analysis.block_ablation(model, batches)
    assert replayed == recomputed  # the same floats, not merely close
    assert seen == [-1, *range(len(replayed["losses"]))]  # each result as soon as it is known
    assert all("forward" not in block.__dict__ for block in model.model.layers)  # the model is as it was


def test_results_are_kept_per_parent_placement(monkeypatch):
    """A bfloat16 parent's scores are not a float32 parent's: the session's placement is part of the key."""
    from subclone_core.app import ui
    from subclone_core.app.sharing import ResultStore

    store = ResultStore(2**20)
    monkeypatch.setattr(ui, "_results", lambda: store)
    monkeypatch.setattr(ui, "placement", lambda: ("cpu", "float32"))
    key = ("parent-eval", "default", None, 2048)
    ui.remember(key, {"loss": 1.0})
    assert ui.cached(key) == {"loss": 1.0}
    monkeypatch.setattr(ui, "placement", lambda: ("cpu", "bfloat16"))
    assert ui.cached(key) is None


TINY_VIT = {"data": "digits", "layers": 1, "hidden": 16, "heads": 2, "ffn": 32, "patch": 4, "epochs": 0.5,
            "batch_size": 64, "lr": 3e-3}


@pytest.mark.usefixtures("workdir")
def test_the_vit_parent_is_pretrained_in_the_background_then_loaded(monkeypatch, tmp_path):
    """Choosing the self-pretrained ViT before it exists starts its pretraining as a page step with a
    progress bar and Cancel (minutes for the real recipe, a tiny one here); when it ends, it is the parent."""
    from streamlit.testing.v1 import AppTest

    from subclone_core.sources import vit_pretrain

    monkeypatch.setenv("SUBCLONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vit_pretrain, "DEFAULT_RECIPE", vit_pretrain.VitRecipe(**TINY_VIT))
    at = run(AppTest.from_file(APP, default_timeout=TIMEOUT))
    at.radio(key="keep_parent_source").set_value("default-vit")
    run(at)
    at.button(key="load_parent").click()
    run(at)
    job, _ = at.session_state["workspace"].steps["build-vit"]
    assert job.wait(120) and job.status == "done", job.error
    assert any(isinstance(e, ProgressEvent) for e in job.events())  # the bar had something to show
    run(at)
    assert at.session_state["workspace"].parent_id == "default-vit"
    assert not errors(at)


def test_cancelling_the_vit_pretraining_saves_nothing(tmp_path):
    from subclone_core.core.errors import SubcloneError
    from subclone_core.sources import vit_pretrain

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SubcloneError, match="cancelled"):
        vit_pretrain.pretrain_vit(tmp_path / "vit", cancel=cancel, **TINY_VIT)
    assert not (tmp_path / "vit").exists() and not list(tmp_path.iterdir())
