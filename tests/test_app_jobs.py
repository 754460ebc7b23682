"""The app's non-Streamlit parts: settings and path rules, the background job and the server-wide
limiter, the analyses and the chart builders, uploads, and the training job's work on a tiny model."""

from __future__ import annotations

import threading
import time
import zipfile
from io import BytesIO

import pytest
import torch

from subclone_core.app import analysis, charts
from subclone_core.app.jobs import BackgroundJob, FailedEvent, JobLimiter, ServerBusy, StatusEvent
from subclone_core.app.longsteps import evaluate_parent, forward_rate
from subclone_core.app.settings import AppSettings, safe_name
from subclone_core.app.steps import TrainRequest, child_settings, make_children, store_upload, training_work
from subclone_core.core.calibration import Importance
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape
from subclone_core.sources import load_parent
from subclone_core.training.events import EvalEvent, StartEvent, StepEvent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small English text file (paragraphs) for the tiny byte-level tokenizer."""
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past", "old", "trees", "near",
             "quiet", "rivers", "and", "small", "towns"]
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(120)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture(scope="module")
def parent(tiny_llama_dir):
    return load_parent(str(tiny_llama_dir))


def fake_importance(layers: int = 3, hidden: int = 6, ffn: int = 5, heads: int = 2) -> Importance:
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=gen, dtype=torch.float64) + 0.01

    return Importance(residual_embed=rand(hidden), residual_attn=rand(layers, hidden),
                      residual_ffn=rand(layers, hidden),
                      residual_block=rand(layers, hidden), ffn=rand(layers, ffn), heads=rand(layers, heads),
                      rel_magnitude=rand(layers), one_minus_cos=rand(layers), tokens=100, data="test")


# --- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", "..", ".hidden", "-x", "a b", "x" * 101])
def test_safe_name_refuses_names_that_could_leave_the_folder(name):
    with pytest.raises(SubcloneError):
        safe_name(name)


def test_settings_come_from_env_then_secrets_then_defaults(tmp_path):
    env = {"SUBCLONE_OUTPUT_DIR": str(tmp_path / "out"), "SUBCLONE_MAX_JOBS": "2"}
    settings = AppSettings.load(env, {"max_jobs": 5, "max_queue": 7, "allowed_roots": [str(tmp_path)]})
    assert settings.output_dir == tmp_path / "out"
    assert (settings.max_jobs, settings.max_queue) == (2, 7)
    assert settings.allowed_roots == (tmp_path.resolve(),)
    assert AppSettings.load({}, {}).output_dir.name == "outputs"
    with pytest.raises(SubcloneError, match="SUBCLONE_MAX_JOBS"):
        AppSettings.load({"SUBCLONE_MAX_JOBS": "zero"})


def test_output_paths_and_allowed_roots(tmp_path):
    settings = AppSettings(output_dir=tmp_path / "out", allowed_roots=(tmp_path / "models",))
    assert settings.output_path("child-1", "children") == tmp_path / "out" / "children" / "child-1"
    with pytest.raises(SubcloneError, match="separator"):
        settings.output_path("../../etc", "children")
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert settings.check_local_path(tmp_path / "models" / "m") == (tmp_path / "models" / "m").resolve()
    for outside in (tmp_path / "other", tmp_path / "models" / ".." / "other"):
        with pytest.raises(SubcloneError, match="SUBCLONE_ALLOWED_ROOTS"):
            settings.check_local_path(outside, "parent")
    assert AppSettings().check_local_path("/") == AppSettings().check_local_path("/")  # no roots: anything


# --- jobs -------------------------------------------------------------------------------------------------


def waiting_work(release: threading.Event):
    """Work that emits one event, then waits for `release` (or a cancel) and returns how it ended."""
    def work(emit, cancel):
        emit(StatusEvent(message="working"))
        while not (release.is_set() or cancel.is_set()):
            time.sleep(0.01)
        return "released" if release.is_set() else "cancelled"
    return work


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_limiter_runs_one_job_and_queues_the_next_in_order():
    limiter = JobLimiter(max_running=1, max_queued=2)
    release = [threading.Event() for _ in range(3)]
    jobs = [BackgroundJob(waiting_work(r), name=f"j{i}", limiter=limiter) for i, r in enumerate(release)]
    for job in jobs:
        job.start()
    wait_until(lambda: jobs[0].status == "running")
    assert [j.status for j in jobs[1:]] == ["queued", "queued"]
    assert (jobs[1].position, jobs[2].position) == (1, 2)
    assert limiter.snapshot() == {"running": 1, "queued": 2, "max_running": 1, "max_queued": 2}
    with pytest.raises(ServerBusy, match="busy"):
        BackgroundJob(waiting_work(threading.Event()), limiter=limiter).start()
    jobs[1].stop()  # leaves the queue; the third moves up
    wait_until(lambda: jobs[1].done)
    assert jobs[1].status == "cancelled" and jobs[2].position == 1
    release[0].set()
    assert jobs[0].wait(10) and jobs[0].status == "done" and jobs[0].result == "released"
    wait_until(lambda: jobs[2].status == "running")
    jobs[2].stop()
    assert jobs[2].wait(10) and jobs[2].status == "cancelled" and jobs[2].result == "cancelled"
    assert limiter.snapshot()["running"] == 0


def test_job_events_are_its_own_and_failures_end_with_a_message():
    limiter = JobLimiter(max_running=2, max_queued=2)

    def user_error(emit, cancel):
        raise SubcloneError("batch_size must be >= 1")

    def oom(emit, cancel):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def bug(emit, cancel):
        raise KeyError("x")

    for work, expected in ((user_error, "batch_size"), (oom, "out of memory"), (bug, "KeyError")):
        job = BackgroundJob(work, limiter=limiter).start()
        assert job.wait(10) and job.status == "failed"
        assert expected in job.error and isinstance(job.events()[-1], FailedEvent)
    release = threading.Event()
    a, b = (BackgroundJob(waiting_work(release), limiter=limiter).start() for _ in range(2))
    wait_until(lambda: a.events() and b.events())
    a.stop()
    assert a.wait(10) and a.status == "cancelled"
    assert b.status == "running"  # stopping one session's job never touches another's
    release.set()
    assert b.wait(10) and b.status == "done" and len(b.events()) == 1


def test_a_job_starts_only_once():
    job = BackgroundJob(lambda emit, cancel: 1).start()
    job.wait(10)
    with pytest.raises(SubcloneError, match="already started"):
        job.start()


# --- live summaries, memory, files ---------------------------------------------------------------------


def test_live_summary_gives_speedup_and_throughput():
    evals = {"random": [(0, 5.0), (10, 4.0), (20, 3.0)], "subclone": [(0, 4.0), (10, 3.0)]}
    events = [EvalEvent(candidate=name, step=step, loss=loss) for name, curve in evals.items() for step, loss in curve]
    events.append(StepEvent(candidate="subclone", step=10, loss=3.1, throughput=100.0, unit="tokens/s"))
    rows = {r["model"]: r for r in analysis.live_summary(events)}
    assert rows["subclone"]["speedup vs random"] == "2.0x" and rows["subclone"]["tokens/s"] == 100.0
    assert rows["random"]["speedup vs random"] == "baseline"
    assert len(analysis.metrics_rows(events)) == len(events)
    assert analysis.metrics_rows(events)[-1]["throughput"] == 100.0
    assert analysis.run_progress([StartEvent(config={"steps": 50}), *events]) == (10, 50)


def test_memory_check_and_zip(tmp_path):
    analysis.check_memory(1, 100)
    with pytest.raises(SubcloneError, match="GiB"):
        analysis.check_memory(2**31, 2**30)
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "config.json").write_text("{}")
    names = zipfile.ZipFile(BytesIO(analysis.zip_folder(tmp_path / "child"))).namelist()
    assert names == ["child/config.json"]


# --- charts ------------------------------------------------------------------------------------------------


def test_heatmaps_sort_by_the_shared_ranking_and_hover_the_original_index():
    imp = fake_importance()
    fig = charts.residual_heatmap(imp, "block")
    heat = fig.data[0]
    order = imp.residual.argsort(descending=True).numpy()
    assert heat.z.shape == (3, 6)
    assert heat.customdata[0, :, 0].tolist() == order.tolist()  # neuron index in hover
    assert heat.customdata[1, 0, 1] == pytest.approx(float(imp.residual_block[1, order[0]]))  # raw score
    assert heat.z[1, 0] == pytest.approx(float(torch.log10(imp.residual_block[1, order[0]])))  # log colour
    ffn = charts.ffn_heatmap(imp).data[0]
    assert all(list(row) == sorted(row, reverse=True) for row in ffn.customdata[:, :, 1])
    heads = charts.heads_heatmap(imp, kept=[[1], [0]], blocks=[0, 2])
    assert heads.data[1].x == (1, 0) and heads.data[1].y == (0, 2)


def test_score_curve_block_bars_and_loss_chart():
    imp = fake_importance()
    kept, dropped = charts.score_curve(imp, 4).data
    assert (len(kept.x), len(dropped.x)) == (4, 2) and kept.y[0] >= kept.y[-1] >= dropped.y[0]
    bars = charts.block_bars(imp, removed=[1])
    assert list(bars.data[0].marker.color) == [charts.KEPT, charts.DROPPED, charts.KEPT]
    events = [StepEvent(candidate="subclone", step=1, loss=3.0), EvalEvent(candidate="subclone", step=0, loss=4.0),
              EvalEvent(candidate="random", step=0, loss=5.0)]
    names = [trace.name for trace in charts.loss_chart(events).data]
    assert names == ["subclone train", "subclone validation", "random validation"]
    assert charts.ablation_bars(2.0, [2.5, 3.0], [1]).data[0].marker.color == (charts.KEPT, charts.DROPPED)


# --- uploads and the training work ---------------------------------------------------------------------


def test_store_upload_checks_size_type_and_text(tmp_path):
    settings = AppSettings(output_dir=tmp_path, max_upload_mb=1)
    path = store_upload(settings, "abc", "my notes.txt", b"first paragraph\n\nsecond one")
    assert path == tmp_path / "uploads" / "abc" / "my_notes.txt" and path.exists()
    for name, data, message in (("x.txt", b"x" * (2 * 2**20), "limit"), ("x.pdf", b"%PDF", "not a text file"),
                                ("x.txt", b"\x00\x01binary", "binary"), ("x.txt", b"\xff\xfe\xfa", "UTF-8"),
                                ("x.txt", b"   \n\n  ", "x.txt is empty")):
        with pytest.raises(SubcloneError, match=message):
            store_upload(settings, "abc", name, data)
    assert sorted(p.name for p in path.parent.iterdir()) == ["my_notes.txt"]  # refused files are removed


def test_training_work_trains_copies_side_by_side_and_saves(parent, text_file, tmp_path):
    target = plan_shape(parent.model, layers=1, hidden=16, heads=2, kv_heads=1, ffn=16)
    settings = child_settings("subclone", "first", None, str(text_file), 256)
    child, twin = make_children(parent, target, settings, importance=None)
    before = {k: v.clone() for k, v in child.model.state_dict().items()}
    request = TrainRequest(parent=parent, data_id=str(text_file), child=child, twin=twin, settings=settings,
                           extra=("first-k",),
                           steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=2,
                           save_dir=tmp_path / "run")
    job = BackgroundJob(training_work(request), name="train").start()
    assert job.wait(120), job.status
    assert job.status == "done", job.error
    events = job.events()
    evals = {(e.candidate, e.step) for e in events if isinstance(e, EvalEvent)}
    assert evals == {(c, s) for c in ("subclone", "random", "first-k") for s in (0, 2, 4)}
    statuses = {name: r.status for name, r in job.result.items()}
    assert statuses == dict.fromkeys(("subclone", "random", "first-k"), "done")
    assert (tmp_path / "run" / "subclone" / "model.safetensors").exists()
    assert all(torch.equal(before[k], v) for k, v in child.model.state_dict().items())  # trained a copy


def test_training_work_refuses_a_run_that_does_not_fit_in_memory(parent, text_file):
    target = Shape.of(parent.model.config)
    settings = child_settings("uniform", None, None, None, 256)
    child, twin = make_children(parent, target, settings, importance=None)
    request = TrainRequest(parent=parent, data_id=str(text_file), child=child, twin=twin, settings=settings,
                           steps=2, batch_size=2, seq_len=16)
    job = BackgroundJob(training_work(request, memory=lambda device: 1000), name="train").start()
    assert job.wait(60) and job.status == "failed"
    assert "GiB" in job.error and "batch size" in job.error
    with pytest.raises(SubcloneError, match="steps"):
        TrainRequest(parent=parent, data_id=None, child=child, twin=twin, settings=settings, steps=0).config()


def test_the_forward_rate_is_timed_after_one_example_has_warmed_the_parent(parent, text_file, monkeypatch):
    from subclone_core.app import longsteps

    calls = []
    real = longsteps.evaluate_shared

    def recorded(model, batches):
        batches = list(batches)  # the sample comes as it is scored (its progress ticks batch by batch)
        calls.append([len(b["input_ids"]) for b in batches])
        return real(model, batches)

    monkeypatch.setattr(longsteps, "evaluate_shared", recorded)
    metrics = evaluate_parent(parent, str(text_file), 256)
    sample = longsteps.validation_sample(parent, str(text_file), 256)
    assert calls == [[1], [len(b["input_ids"]) for b in sample]]  # one example first, untimed; then the sample
    assert metrics["loss"] == pytest.approx(real(parent.model, sample)["loss"])  # the warm-up is not scored


def test_the_parents_validation_reports_progress_as_each_batch_is_scored(parent, text_file):
    events = []
    handle = parent.model.register_forward_hook(lambda module, args, out: events.append("forward"))
    try:
        evaluate_parent(parent, str(text_file), 4096, progress=lambda done, total: events.append("tick"))
    finally:
        handle.remove()
    scored = events[1:]  # after the untimed warm-up example
    assert scored.count("tick") >= 2 and scored.count("forward") == scored.count("tick")
    assert scored[:2] == ["forward", "tick"]  # not every tick before the first batch is scored


def test_the_parents_forward_rate_counts_the_tasks_unit(parent, text_file):
    metrics = evaluate_parent(parent, str(text_file), 256)
    assert metrics["tokens"] > 0 and metrics["seconds"] > 0
    assert forward_rate(metrics) == pytest.approx(metrics["tokens"] / metrics["seconds"])
    assert forward_rate(None) is None  # not measured yet


def test_generate_reports_the_childs_refit_block_by_block_before_the_scores(parent, text_file):
    """Generate's refit is most of its time: the page's bar moves after every block of it, not only once it ends."""
    from subclone_core.app.jobs import ProgressEvent
    from subclone_core.app.longsteps import child_work

    settings = child_settings("subclone", None, True, str(text_file), 256, refit=True)
    full = Shape.of(parent.model.config)
    target = plan_shape(parent.model, hidden=full.hidden // 2, heads=full.heads // 2, ffn=full.ffn // 2,
                        layers=full.layers)
    events = []
    child_work(parent, target, settings, None, None, "The", None)(events.append, threading.Event())
    ticks = [(e.stage, e.done, e.total) for e in events if isinstance(e, ProgressEvent)]
    stages = list(dict.fromkeys(stage for stage, _, _ in ticks))
    refit = "refitting the child block by block"
    assert stages.index("calibrating the parent") < stages.index(refit) < stages.index(
        "scoring the child, its twin and the parent")
    blocks = full.layers
    assert [(done, total) for stage, done, total in ticks if stage == refit] == [
        (done, blocks + 1) for done in range(1, blocks + 2)]
