"""Cancel is felt within moments (issue 31): a long step stops at the next module of its model, forward or
backward, not at its next progress report; the page says "Cancelling..." until it has; a stopped training
leaves no empty run folder without a word; a job that Start has just queued counts as running at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_app_jobs import parent, text_file  # noqa: F401 (fixtures)

from subclone_core.app.jobs import BackgroundJob, JobLimiter, NoteEvent
from subclone_core.app.sharing import SharedSteps
from subclone_core.app.steps import TrainRequest, child_settings, fresh_folder, make_children, training_work
from subclone_core.core.strategies import plan_shape
from subclone_core.training.events import CancelledEvent, StepEvent

pytestmark = pytest.mark.usefixtures("one_thread")


class SlowBlock(torch.nn.Module):
    """A block whose forward takes ``seconds`` and counts its calls (one batch of a large parent on a few
    CPU cores takes seconds per block)."""

    def __init__(self, calls: list[float], seconds: float = 0.05) -> None:
        super().__init__()
        self.linear, self.calls, self.seconds = torch.nn.Linear(4, 4), calls, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(time.time())
        time.sleep(self.seconds)
        return self.linear(x)


def one_long_forward(blocks: int, calls: list[float], started: threading.Event):
    """Work with no progress report at all: one forward pass through ``blocks`` slow blocks."""
    model = torch.nn.Sequential(*(SlowBlock(calls) for _ in range(blocks)))

    def work(emit, cancel):
        started.set()
        with torch.no_grad():
            return model(torch.ones(1, 4))

    return work


def test_a_cancelled_job_stops_at_the_next_block_of_a_forward_without_progress_reports():
    calls, started = [], threading.Event()
    job = BackgroundJob(one_long_forward(200, calls, started), name="calibrate").start()  # 10 s uncancelled
    assert started.wait(5)
    while len(calls) < 3:
        time.sleep(0.01)
    asked = time.time()
    job.stop()
    assert job.wait(5) and job.status == "cancelled"
    assert job.finished - asked < 2.0
    assert len([t for t in calls if t > asked]) <= 1  # at most the block that had already begun


class SlowGrad(torch.autograd.Function):
    """Identity whose backward takes a while and counts its calls."""

    @staticmethod
    def forward(ctx, x, calls):
        ctx.calls = calls
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.calls.append(time.time())
        time.sleep(0.05)
        return grad, None


def test_a_cancelled_job_stops_inside_a_backward_pass():
    calls = []
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(100))

    def work(emit, cancel):
        x = torch.ones(1, 4)
        for layer in layers:
            x = SlowGrad.apply(layer(x), calls)
        x.sum().backward()  # 5 s uncancelled
        return "finished"

    job = BackgroundJob(work, name="train").start()
    while len(calls) < 3:
        time.sleep(0.01)
    when = time.time()
    job.stop()
    assert job.wait(5) and job.status == "cancelled" and job.result is None
    assert len([t for t in calls if t > when]) <= 1


def test_a_module_forward_in_another_thread_is_not_interrupted_by_this_jobs_cancel():
    """The parent is shared by every session: one session's Cancel must not stop another's forward."""
    calls, started = [], threading.Event()
    job = BackgroundJob(one_long_forward(400, calls, started), name="mine").start()
    assert started.wait(5)
    job.stop()
    mine = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    assert mine(torch.ones(1, 4)).shape == (1, 4)  # this thread has no cancel flag
    assert job.wait(5) and job.status == "cancelled"


def test_a_shared_step_says_cancelling_until_its_work_has_stopped(monkeypatch):
    from subclone_core.app import session, ui

    calls, started = [], threading.Event()
    handle = SharedSteps().start(("calibration",), "calibration", one_long_forward(200, calls, started),
                                 JobLimiter(max_running=1, max_queued=1))
    assert started.wait(5)
    ws = session.Workspace()
    ws.start_step("calibration", handle, lambda result: None)
    monkeypatch.setattr(ui, "workspace", lambda: ws)
    bars = []
    monkeypatch.setattr(ui.st, "progress", lambda value, text=None: bars.append(text))
    monkeypatch.setattr(ui.st, "button", lambda *args, **kwargs: False)
    handle.stop()
    if not handle.job.done:  # the job stops within moments; until then the handle is not done
        assert handle.cancelling and not handle.done
        ui._poll_step("calibration", "calibrating", None)
        assert bars and bars[-1].startswith("Cancelling..."), bars
    assert handle.wait(5) and handle.job.status == "cancelled" and not handle.cancelling


def test_a_job_started_with_a_free_slot_counts_as_running_at_once():
    """The sidebar is drawn right after Start: it read "0/1 running, 1 waiting" until the job's thread woke."""
    limiter = JobLimiter(max_running=1, max_queued=2)
    limiter.submit("first")
    assert limiter.snapshot()["running"] == 1 and limiter.snapshot()["queued"] == 0
    limiter.submit("second")  # the slot is taken: it waits
    assert limiter.snapshot()["queued"] == 1 and limiter.position("second") == 1
    assert limiter.wait_turn("first", threading.Event())
    limiter.release("first")
    assert limiter.wait_turn("second", threading.Event()) and limiter.snapshot()["running"] == 1


def test_a_stopped_training_stops_mid_round_and_removes_its_empty_run_folder(parent, text_file, tmp_path):  # noqa: F811
    target = plan_shape(parent.model, layers=2, hidden=16, heads=2, kv_heads=1, ffn=16)
    settings = child_settings("subclone", "first", None, str(text_file), 256)
    child, twin = make_children(parent, target, settings, importance=None)
    folder = fresh_folder(tmp_path / "run")  # as the Train page makes it on Start
    request = TrainRequest(parent=parent, data_id=str(text_file), child=child, twin=twin, settings=settings,
                           steps=1000, batch_size=2, seq_len=16, eval_every=500, eval_batches=1, save_dir=folder)
    job = BackgroundJob(training_work(request), name="train")
    forwards, asked = [], []
    record = job.emit

    def emit(event):  # Stop is pressed the moment the child's first step is reported
        record(event)
        if isinstance(event, StepEvent) and not asked:
            asked.append(time.time())
            job.stop()

    def count(module, args, output):
        if type(module).__name__.endswith("DecoderLayer") and threading.current_thread().name.startswith("subclone"):
            forwards.append(time.time())

    job.emit = emit
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        job.start()
        assert job.wait(60) and job.status == "cancelled", job.error
    finally:
        handle.remove()
    assert job.finished - asked[0] < 2.0
    # before: the round went on (the twin's whole step 1) and stopped only before step 2
    assert not [t for t in forwards if t > asked[0]]
    assert any(isinstance(e, CancelledEvent) for e in job.events())
    assert {r.status for r in job.result.values()} == {"cancelled"}  # the results are returned, metrics kept
    assert not folder.exists()
    (note,) = [e.message for e in job.events() if isinstance(e, NoteEvent)]
    assert "empty run folder" in note and "'run'" in note
