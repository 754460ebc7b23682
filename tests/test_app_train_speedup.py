"""The Train page's second chart: the iso-loss speedup beside the loss chart, from the run's own events;
and the learning-rate sweep: each model trained at several rates, its best run charted, compared and saved."""

from __future__ import annotations

import json

import pytest
import tiny_models
from test_app_pages import (  # noqa: F401 (workdir: a fixture)
    chart_titles,
    errors,
    run,
    start_app,
    train_on_page,
    wait_for_job,
    workdir,
)

from subclone_core.core.shape import SIZE_ROLES, suggested_shape
from subclone_core.training.events import DoneEvent, EvalEvent, StartEvent, StepEvent
from subclone_core.training.speedup import iso_loss_by_candidate, tracks_from_events
from subclone_core.training.sweep import (
    candidate_of,
    chosen_events,
    default_lr_grid,
    format_lr_sweep,
    parse_lr_sweep,
    run_name,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ISO_TITLE = "Speedup at every loss level random init reached"
LOSS_TITLE = "Training and validation loss"
# each model's best rate is neither its first nor its last, nor its lowest nor its highest (3e-1 overshoots)
SWEEP = "subclone=3e-1,2e-3,5e-4,random=5e-4,2e-3,3e-1"
TINY = {"keep_steps": 6, "keep_batch": 4, "keep_seq_len": 16, "keep_eval_every": 2}


def generate_child(at, timeout: float = 120, *, refit: bool | None = None,
                   residual_score: str | None = None) -> None:
    """Click Generate on the Child page; wait for the page's background steps where the app has them.

    Args:
        refit: set the toggle "Refit weights whose inputs shrank" first (None: leave the page's default).
        residual_score: set "Rank the residual stream by" first ("read" or "written"; None: the default).
    """
    at.switch_page("pages/child.py")
    run(at)
    # the small shape these speedups were measured at (a fifth of the blocks, a third of the widths), not the
    # page's default
    small = suggested_shape(tiny_models.make("llama"))
    for role in SIZE_ROLES:
        at.number_input(key=f"keep_shape_{role}").set_value(getattr(small, role))
        run(at)
    if refit is not None:
        at.toggle(key="keep_refit").set_value(refit)
        run(at)
        assert at.toggle(key="keep_refit").value is refit
    if residual_score is not None:
        at.selectbox(key="keep_residual_score").set_value(residual_score)
        run(at)
        assert at.selectbox(key="keep_residual_score").value == residual_score
    at.button(key="generate_child").click()
    run(at)
    for job, _ in list(getattr(at.session_state["workspace"], "steps", {}).values()):
        assert job.wait(timeout), f"{job.name} still {job.status}"
    run(at)  # applies the finished step's result, as the page's polling would
    ws = at.session_state["workspace"]
    assert ws.child is not None, [e.value for e in at.error]
    if refit is not None:
        assert ws.child_settings.refit is refit  # the child was made with the setting asked for
    if residual_score is not None:
        assert ws.child_settings.residual_score == residual_score


def test_the_train_page_shows_the_iso_loss_chart_beside_the_loss_chart(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    # On this tiny random parent the default child (least-squares refit, residual ranked by what reads it)
    # starts above random init and reaches none of its levels in 6 steps, so no level has a speedup; the plain
    # slice ranked by what is written starts below random init's best, so every level has one (a lower bound).
    generate_child(at, refit=False, residual_score="written")
    job = train_on_page(at, TINY)
    charts = chart_titles(at)
    assert {LOSS_TITLE, ISO_TITLE} <= set(charts)
    # side by side: the iso-loss chart sits in the column next to the loss chart's
    pair = [c for c in at.columns if c.get("plotly_chart")]
    assert len(pair) == 2 and len(pair[0].get("plotly_chart")) == len(pair[1].get("plotly_chart")) == 1
    # the chart draws exactly the rows the speedup module computes from the job's events
    rows = iso_loss_by_candidate(tracks_from_events(job.events(), "loss"), higher_is_better=False)["subclone"]
    points = [(r.level, r.speedup) for r in rows if r.speedup is not None]
    drawn = [(x, y) for trace in charts[ISO_TITLE]["data"] for x, y in zip(trace["x"], trace["y"])]
    assert points  # random init improved within 6 steps, so there are levels
    flat = lambda pairs: [v for pair in sorted(pairs) for v in pair]
    assert flat(drawn) == pytest.approx(flat(points), rel=1e-6)  # Plotly carries float32


# --- the learning-rate sweep -------------------------------------------------------------------------------


def validation_losses(events) -> dict[str, list[tuple[int, float]]]:
    """Each run's (step, validation loss) points, straight from the job's events."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        if isinstance(event, EvalEvent):
            out.setdefault(event.candidate, []).append((event.step, event.loss))
    return out


def expected_choice(events) -> dict[str, str]:
    """Each candidate's run with the lowest best validation loss (ties: the lower lr), computed here."""
    lrs = {c.name: c.lr for c in next(e for e in events if isinstance(e, StartEvent)).candidates}
    best = {swept: min(loss for _, loss in points) for swept, points in validation_losses(events).items()}
    out: dict[str, str] = {}
    for swept, value in best.items():
        name = swept.split("@lr=")[0]
        if name not in out or (value, lrs[swept]) < (best[out[name]], lrs[out[name]]):
            out[name] = swept
    return out


def table_with(at, column: str):
    """The page's one table (a DataFrame) that has ``column``."""
    tables = [d.value for d in at.dataframe if column in d.value.columns]
    assert len(tables) == 1, (column, [list(d.value.columns) for d in at.dataframe])
    return tables[0]


def spec_error(at, spec: str) -> list[str]:
    """Type a sweep spec; the errors shown. Start must then be blocked."""
    at.text_input(key="keep_lr_sweep_spec").set_value(spec)
    run(at)
    shown = errors(at)
    assert at.button(key="start_training").disabled, (spec, shown)
    return shown


def test_the_train_page_sweeps_learning_rates_and_charts_each_models_best_run(workdir):  # noqa: F811
    # the child of the iso-loss test above, so that the chosen runs' curves give speedups
    at = start_app(workdir / "parent", workdir / "text.txt")
    generate_child(at, refit=False, residual_score="written")
    at.switch_page("pages/train.py")
    run(at)
    for key, value in TINY.items():
        at.number_input(key=key).set_value(value)
        run(at)
    names = ("subclone", "random")
    default = format_lr_sweep(default_lr_grid(names))
    assert default == "subclone=5e-4,1e-3,2e-3,random=5e-4,1e-3,2e-3"  # each default lr x0.5, x1, x2
    spec = at.text_input(key="keep_lr_sweep_spec")
    assert spec.value == default and spec.disabled  # off by default: the spec is shown but not used

    at.checkbox(key="keep_lr_sweep").check()
    run(at)
    assert not at.text_input(key="keep_lr_sweep_spec").disabled
    assert not errors(at) and not at.button(key="start_training").disabled

    # a bad spec says what is wrong and blocks Start; the good one unblocks it
    shown = spec_error(at, "subclone=1e-3,teacher=1e-3")
    assert any("'teacher' is not a candidate" in e and "subclone, random" in e for e in shown), shown
    shown = spec_error(at, "random=1e-3,-2e-3")
    assert any("learning rate '-2e-3' of 'random' must be a finite number > 0" in e for e in shown), shown
    shown = spec_error(at, "subclone=1e-3,subclone=2e-3")
    assert any("'subclone' is named twice" in e for e in shown), shown
    at.text_input(key="keep_lr_sweep_spec").set_value(SWEEP)
    run(at)
    assert not errors(at) and not at.button(key="start_training").disabled

    at.button(key="start_training").click()
    run(at)
    job = wait_for_job(at)
    assert job.status == "done", job.error
    run(at)  # the page as it stands once the job is done
    events = job.events()

    # every (candidate, lr) pair was its own run, trained all the way
    grid = parse_lr_sweep(SWEEP, names)
    runs = [run_name(name, lr) for name, lrs in grid.items() for lr in lrs]
    start = next(e for e in events if isinstance(e, StartEvent))
    assert sorted(c.name for c in start.candidates) == sorted(runs)
    assert {c.name: c.lr for c in start.candidates} == {
        run_name(name, lr): pytest.approx(lr) for name, lrs in grid.items() for lr in lrs}
    done = {e.candidate: e.status for e in events if isinstance(e, DoneEvent)}
    assert done == dict.fromkeys(runs, "done")
    last_step = {}
    for event in events:
        if isinstance(event, StepEvent):
            last_step[event.candidate] = event.step
    assert last_step == dict.fromkeys(runs, 6)
    losses = validation_losses(events)
    assert {swept: [s for s, _ in points] for swept, points in losses.items()} == {r: [0, 2, 4, 6]
                                                                                   for r in runs}

    # each candidate's chosen run: the lowest best validation loss among its runs
    expected = expected_choice(events)
    assert set(expected) == set(names)
    faint = set(runs) - set(expected.values())
    assert len(faint) == 4
    # the scenario: no simpler rule (first, last, lowest or highest rate) picks the chosen runs
    for name, chosen in expected.items():
        order = [run_name(name, lr) for lr in grid[name]]  # as the spec lists them
        chosen_lr = grid[name][order.index(chosen)]
        assert chosen not in (order[0], order[-1]) and min(grid[name]) < chosen_lr < max(grid[name]), expected

    # the loss chart draws each chosen run in full (train and validation) and the four others faintly
    loss = chart_titles(at)[LOSS_TITLE]["data"]
    by_name = {t["name"]: t for t in loss}
    assert len(by_name) == len(loss)
    full_names = {f"{r} {kind}" for r in expected.values() for kind in ("train", "validation")}
    assert set(by_name) == full_names | {f"{r} (not chosen)" for r in faint}
    for name, chosen in expected.items():
        full = by_name[f"{chosen} validation"]
        assert full["line"]["width"] == 3 and full["line"].get("dash") in (None, "solid")
        assert full["x"] == [s for s, _ in losses[chosen]]
        assert full["y"] == pytest.approx([v for _, v in losses[chosen]], rel=1e-6)
    for other in faint:
        dotted = by_name[f"{other} (not chosen)"]
        assert dotted["line"]["dash"] == "dot" and dotted["opacity"] < 0.5 and dotted["line"]["width"] < 3
        assert dotted["y"] == pytest.approx([v for _, v in losses[other]], rel=1e-6)
        chosen_color = by_name[f"{expected[candidate_of(other)]} validation"]["line"]["color"]
        assert dotted["line"]["color"] == chosen_color  # a sweep's runs share their candidate's colour

    # the speedups compare the chosen runs: the summary table and the iso-loss chart read only them
    summary = table_with(at, "speedup vs random")
    assert list(summary["model"]) == list(names)
    assert list(summary["val loss"]) == pytest.approx([losses[expected[n]][-1][1] for n in names], rel=1e-6)
    rows = iso_loss_by_candidate(tracks_from_events(chosen_events(events, expected), "loss"),
                                 higher_is_better=False)["subclone"]
    points = [(r.level, r.speedup) for r in rows if r.speedup is not None]
    assert points  # the best random run improved within 6 steps: there are levels to compare
    drawn = [(x, y) for trace in chart_titles(at)[ISO_TITLE]["data"] for x, y in zip(trace["x"], trace["y"])]
    flat = lambda pairs: [v for pair in sorted(pairs) for v in pair]
    assert flat(drawn) == pytest.approx(flat(points), rel=1e-6)

    assert not [w.value for w in at.warning if "may lie beyond" in w.value]  # no chosen rate at a grid's edge

    # the sweep table: every run once, the chosen ones marked
    table = table_with(at, "chosen")
    assert len(table) == len(runs)
    marked = {(m, lr) for m, lr, c in zip(table["model"], table["lr"], table["chosen"]) if c}
    assert marked == {(n, expected[n].split("@lr=")[1]) for n in names}

    # only the chosen runs were saved, each in a folder named after its candidate
    saved = {name: r.saved_to for name, r in job.result.items() if r.saved_to}
    assert set(saved) == set(expected.values())
    folder = workdir.parent / "outputs" / "runs" / "run"  # the output dir the workdir fixture sets
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(names)
    for name, chosen in expected.items():
        assert saved[chosen] == folder / name
        manifest = json.loads((folder / name / "subclone.json").read_text())
        lr = next(lr for lr in grid[name] if run_name(name, lr) == chosen)
        assert manifest["training"]["lr"] == pytest.approx(lr) and job.result[chosen].lr == pytest.approx(lr)
        trained = [p["loss"] for p in manifest["training"]["evals"]]
        assert trained == pytest.approx([v for _, v in losses[chosen]])
    captions = [c.value for c in at.caption if c.value.startswith("Saved: ")]
    assert len(captions) == 1, captions
    caption = captions[0]
    assert sorted(caption.removeprefix("Saved: ").split(", ")) == sorted(f"`{folder / n}`" for n in names)
