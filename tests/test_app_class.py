"""The app for a class of visitors: a second child is saved under its own name, page steps of several
sessions wait in one server-wide queue that says each one's place, identical requests share one result,
and the Child page's default shape starts below random init. AppTest on the tiny local Llama of
tests/test_app_pages.py (and the embedded parents for the default shape)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_app_pages import errors, run, set_value, settle, start_app, workdir  # noqa: F401 (workdir: a fixture)

from subclone_core.analysis.probes import validation_sample
from subclone_core.app import ui
from subclone_core.app.jobs import BackgroundJob, JobLimiter
from subclone_core.app.sharing import ResultStore, approx_bytes
from subclone_core.app.steps import child_settings, make_children
from subclone_core.core.archs import arch_for
from subclone_core.core.shape import Shape
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import CALIB_TOKENS
from subclone_core.workflow.shapes import starting_shape

pytestmark = pytest.mark.usefixtures("one_thread")


def shape_of(at) -> dict[str, int]:
    return {r: at.number_input(key=f"keep_shape_{r}").value for r in ("layers", "hidden")}


def test_a_second_child_is_saved_under_its_own_shapes_name(workdir, tmp_path):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    set_value(at, "keep_shape_layers", 2)
    at.button(key="generate_child").click()
    settle(at)
    first = shape_of(at)
    assert at.text_input(key="keep_save_name").value == f"child-{first['layers']}x{first['hidden']}"
    set_value(at, "keep_shape_layers", 3)
    at.button(key="generate_child").click()
    settle(at)
    second = at.session_state["workspace"].child.shape
    assert second.layers == 3
    at.button(key="save_child").click()
    run(at)
    assert not errors(at)
    saved = tmp_path / "outputs" / "children" / f"child-{second.layers}x{second.hidden}"
    assert (saved / "model.safetensors").exists()
    assert not (tmp_path / "outputs" / "children" / f"child-{first['layers']}x{first['hidden']}").exists()


# --- one server-wide queue -------------------------------------------------------------------------------


def waiting_work(release: threading.Event):
    """Work that holds the server's slot until ``release`` (or a cancel)."""
    def work(emit, cancel):
        while not (release.is_set() or cancel.is_set()):
            time.sleep(0.01)
    return work


def occupy_server(max_queue: int, monkeypatch) -> tuple[threading.Event, BackgroundJob]:
    """Give this test a limiter of its own (1 running, ``max_queue`` waiting) and a job holding its slot."""
    monkeypatch.setenv("SUBCLONE_MAX_JOBS", "1")
    monkeypatch.setenv("SUBCLONE_MAX_QUEUE", str(max_queue))
    release = threading.Event()
    blocker = BackgroundJob(waiting_work(release), name="blocker", limiter=ui._limiter(1, max_queue),
                            estimate=30.0).start()
    deadline = time.time() + 30
    while blocker.status != "running":
        assert time.time() < deadline, blocker.status
        time.sleep(0.01)
    return release, blocker


def calibrate_on_page(at, tokens: int):
    at.switch_page("pages/importance.py")
    run(at)
    set_value(at, "keep_calib_tokens", tokens)
    at.button(key="run_calibration").click()
    run(at)
    return at.session_state["workspace"].running("calibration")


def progress_texts(at) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def test_three_sessions_calibrating_at_once_wait_in_line_and_all_finish(workdir, monkeypatch):  # noqa: F811
    sessions = [start_app(workdir / "parent", workdir / "text.txt") for _ in range(3)]
    release, blocker = occupy_server(7, monkeypatch)
    handles = [calibrate_on_page(at, tokens) for at, tokens in zip(sessions, (512, 768, 1024))]
    assert len({id(h.job) for h in handles}) == 3  # different budgets: three computations
    for place, (at, handle) in enumerate(zip(sessions, handles), start=1):
        assert handle.status == "queued" and handle.position == place
        run(at)  # a poll of the page
        shown = progress_texts(at)
        assert any(f"Waiting: {place}{['st', 'nd', 'rd'][place - 1]} in line" in text for text in shown), shown
    assert "until it starts" in progress_texts(sessions[0])[0]  # the job ahead has an estimate
    release.set()
    for at, handle in zip(sessions, handles):
        assert handle.wait(120), handle.status
        run(at)
        importance = at.session_state["workspace"].importance
        assert handle.status == "done" and importance is not None and importance.tokens >= 512
    assert blocker.status == "done"


def test_identical_requests_share_one_job_and_cancel_lets_go_of_it_only(workdir, monkeypatch):  # noqa: F811
    first, second = (start_app(workdir / "parent", workdir / "text.txt") for _ in range(2))
    release, _ = occupy_server(8, monkeypatch)
    mine, theirs = calibrate_on_page(first, 640), calibrate_on_page(second, 640)
    assert mine.job is theirs.job and mine.position == 1  # one computation for both sessions
    second.button(key="cancel_calibration").click()
    run(second)
    assert any("cancelled" in i.value for i in second.info)  # said in the run of the click (a callback)
    assert theirs.done and theirs.status == "cancelled" and not mine.done  # the other session still waits
    assert mine.job.status == "queued"
    release.set()
    assert mine.wait(120) and mine.status == "done"
    run(first)
    run(second)
    assert first.session_state["workspace"].importance is mine.result
    assert second.session_state["workspace"].importance is None


def test_stopping_a_job_the_queue_has_just_let_in_keeps_its_slot():
    limiter = JobLimiter(max_running=1, max_queued=2)
    release = threading.Event()
    job = BackgroundJob(waiting_work(release), limiter=limiter).start()
    while job.status != "running":
        time.sleep(0.01)
    job.status = "queued"  # the moment between wait_turn letting it in and the thread saying so
    job.stop()
    assert limiter.snapshot()["running"] == 1  # its slot is freed by its own thread only, once it ends
    other = BackgroundJob(waiting_work(release), limiter=limiter).start()
    assert job.wait(10) and job.status == "cancelled"
    release.set()
    assert other.wait(10) and other.status == "done"
    assert limiter.snapshot()["running"] == 0


def test_kept_results_are_bounded_by_bytes():
    store = ResultStore(max_bytes=3 * 4096 + 1000)
    for i in range(4):
        store.put(("calibration", i), {"scores": torch.zeros(1024)})  # 4 kB each
    assert len(store) == 3 and store.get(("calibration", 0)) is None and store.get(("calibration", 3)) is not None
    store.put("huge", torch.zeros(10_000))  # larger than the whole budget: not kept
    assert store.get("huge") is None and len(store) == 3
    assert approx_bytes(torch.nn.Linear(10, 10)) == 110 * 4


# --- the Child page's first shape ------------------------------------------------------------------------


def test_the_child_page_opens_on_the_starting_shape(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    parent = ui._cached_parent(str((workdir / "parent").resolve()), "cpu", "float32")
    wanted = starting_shape(parent.model)
    shown = {r: at.number_input(key=f"keep_shape_{r}").value for r in ("layers", "hidden", "heads", "kv_heads", "ffn")}
    assert shown == {r: getattr(wanted, r) for r in shown}
    assert wanted.heads >= Shape.of(parent.model.config).heads // 2


def default_child_against_random(parent) -> tuple[float, float]:
    """Step-0 validation loss of the Child page's default child (starting shape, the family's defaults, the
    page's calibration budget) and of its random twin, on 1,024 tokens of the default text."""
    arch = arch_for(parent.model.config.model_type)
    settings = child_settings("subclone", None, arch.scale_default, None, CALIB_TOKENS,
                              residual_score=arch.residual_score, refit=arch.refit_default)
    child, twin = make_children(parent, starting_shape(parent.model), settings, importance=None)
    batches = validation_sample(parent, None, 1024)
    return evaluate(child.model, batches)["loss"], evaluate(twin.model, batches)["loss"]


def test_the_default_child_of_gemma3_starts_below_random_init(gemma_parent):
    # SmolLM2-135M's default child (its starting shape) is checked by test_core_refit's
    # test_smollm2_children_start_no_worse_with_the_defaults
    child, random = default_child_against_random(gemma_parent)
    assert child < random - 1, (child, random)  # measured: Gemma 3 7.5 vs 12.5, SmolLM2 6.6 vs 10.9


def test_the_explorer_never_puts_a_shape_worse_than_random_init_on_its_front(monkeypatch):
    import tiny_models as tm

    from subclone_core.analysis import explore
    from subclone_core.pipeline.calibration import calibrate

    model = tm.make("llama", dtype=torch.float32)
    importance = calibrate(model, [tm.inputs(model, batch=2, seq=16, seed=0)])
    budget = sum(p.numel() for p in model.parameters()) // 2
    shapes = explore.candidate_shapes(model, budget)
    smallest = min(range(len(shapes)), key=lambda i: shapes[i][1])
    # the smallest shape starts above random init (12); every other one below it
    losses = iter([15.0 if i == smallest else 5.0 + i for i in range(len(shapes))] + [12.0])
    monkeypatch.setattr(explore, "evaluate", lambda model, batches: {"loss": next(losses)})
    result = explore.explore_shapes(model, importance, budget, [])
    assert not result.points[smallest].pareto  # the smallest is undominated, but worse than random
    assert result.front and all(p.loss < result.random_loss for p in result.front)



def test_the_child_page_estimates_the_explorer_and_generate_before_they_start(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    captions = [c.value for c in at.caption]
    assert any(c.startswith("Estimated time: about ") for c in captions), captions  # the explorer's
    assert any(c.startswith("Generate: about ") for c in captions), captions  # the refit child's
