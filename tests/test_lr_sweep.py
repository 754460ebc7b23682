"""`subclone compare --lr-sweep`: every candidate at several learning rates on identical batches, each reported
and saved by its best run; the choice rule on its own; bad specs refused in one line."""

from __future__ import annotations

import json

import pytest
from test_cli_train import FAST, bad_input, run_cli

from subclone_core.cli.commands._training import format_report
from subclone_core.io.saving import read_manifest
from subclone_core.training.events import DoneEvent, EvalEvent, StepEvent, read_events
from subclone_core.training.sweep import (
    SweptRun,
    choose_runs,
    default_lr_grid,
    edge_of,
    format_lr_sweep,
    lr_text,
    parse_lr_sweep,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = "random=1e-2,3e-2,1e-1,subclone=1e-3,3e-2"
RUNS = ["subclone@lr=1e-3", "subclone@lr=3e-2", "first-k", "random@lr=1e-2", "random@lr=3e-2", "random@lr=1e-1"]


@pytest.fixture(scope="module")
def sweep_run(llama_dir, counting_text_file, tmp_path_factory):
    """subclone and random swept, first-k at the single --lr, trained side by side."""
    out = tmp_path_factory.mktemp("runs") / "sweep"
    code, stdout, err = run_cli(["compare", "--parent", llama_dir, "--layers", 3, "--heads", 4, "--kv-heads", 1,
                                 "--ffn", 24, "--data", counting_text_file, "--calib-tokens", 256,
                                 "--eval-tokens", 64, "--strategies", "subclone,first-k,random", "--lr", "2e-3",
                                 "--lr-sweep", SPEC, "--out", out, "--json", *FAST])
    assert code == 0, err
    return {"summary": json.loads(stdout), "out": out, "events": read_events(out / "metrics.jsonl")}


def evals_by_run(events) -> dict[str, list[float]]:
    """Validation losses per run, in step order, straight from metrics.jsonl."""
    out: dict[str, list[float]] = {}
    for event in events:
        if isinstance(event, EvalEvent):
            out.setdefault(event.candidate, []).append(event.loss)
    return out


def expected_choice(events) -> dict[str, str]:
    """Each candidate's run with the lowest best validation loss (ties: the lower lr), computed here."""
    lrs = {c.name: c.lr for c in events[0].candidates}
    best = {run: min(losses) for run, losses in evals_by_run(events).items()}
    out: dict[str, str] = {}
    for run, value in best.items():
        name = run.split("@")[0]
        if name not in out or (value, lrs[run]) < (best[out[name]], lrs[out[name]]):
            out[name] = run
    return out


def test_each_candidate_trains_once_per_swept_lr_and_the_others_keep_their_single_lr(sweep_run):
    start = sweep_run["events"][0]
    assert [c.name for c in start.candidates] == RUNS
    assert [c.lr for c in start.candidates] == [1e-3, 3e-2, 2e-3, 1e-2, 3e-2, 1e-1]
    assert [c.strategy for c in start.candidates] == ["subclone", "subclone", "first-k", *["random"] * 3]
    assert sweep_run["summary"]["lr_sweep"] == {"random": [1e-2, 3e-2, 1e-1], "subclone": [1e-3, 3e-2]}


def test_runs_of_one_candidate_start_alike_and_see_identical_batches(sweep_run):
    events = sweep_run["events"]
    evals = evals_by_run(events)
    first_step = {e.candidate: e.loss for e in events if isinstance(e, StepEvent) and e.step == 1}
    for name in ("subclone", "random"):
        runs = [r for r in RUNS if r.startswith(name + "@")]
        # the same initial weights on the same validation set, and the same first batch before any update
        assert len({evals[r][0] for r in runs}) == 1, {r: evals[r][0] for r in runs}
        assert len({first_step[r] for r in runs}) == 1, {r: first_step[r] for r in runs}
        # ... yet each trained at its own rate
        assert len({evals[r][-1] for r in runs}) == len(runs)


def test_each_candidate_is_reported_by_its_run_with_the_lowest_best_loss(sweep_run):
    summary, events = sweep_run["summary"], sweep_run["events"]
    chosen = expected_choice(events)
    lrs = {c.name: c.lr for c in events[0].candidates}
    best = {run: min(losses) for run, losses in evals_by_run(events).items()}
    assert [r["name"] for r in summary["rows"]] == ["subclone", "first-k", "random"]
    for row in summary["rows"]:
        assert row["run"] == chosen[row["name"]] and row["lr"] == lrs[row["run"]]
        assert row["best"] == pytest.approx(best[row["run"]])
    # the target and the speedups are random init's chosen run's
    assert summary["target"] == pytest.approx(best[chosen["random"]])
    assert summary["target_from"] == "random init's best"
    assert set(summary["iso_loss"]) == {"subclone", "first-k"}
    sweep = {c["candidate"]: c for c in summary["sweep"]}
    assert {name: c["chosen"] for name, c in sweep.items()} == chosen
    for name, c in sweep.items():
        assert [r["chosen"] for r in c["runs"]] == [r["run"] == chosen[name] for r in c["runs"]]
        assert [r["best"] for r in c["runs"]] == pytest.approx([best[r["run"]] for r in c["runs"]])


def test_a_chosen_lr_at_the_edge_of_its_grid_is_flagged(sweep_run):
    summary, events = sweep_run["summary"], sweep_run["events"]
    lrs = {c.name: c.lr for c in events[0].candidates}
    for c in summary["sweep"]:
        grid = [lrs[r["run"]] for r in c["runs"]]
        edge = None if len(grid) < 2 else "lowest" if c["lr"] == min(grid) else \
            "highest" if c["lr"] == max(grid) else None
        assert c["edge"] == edge
        assert (c["note"] is not None) == (edge is not None)
    # this grid has both cases: random's best rate inside its grid, subclone's at the top of its own
    assert {c["candidate"]: c["edge"] for c in summary["sweep"]} == {"subclone": "highest", "first-k": None,
                                                                      "random": None}
    lines = format_report(summary).splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("learning-rate sweep"))
    table = lines[title + 3:title + 3 + len(RUNS)]  # after the header and its rule: one line per run
    chosen = {c["chosen"] for c in summary["sweep"]}
    shown = [(line.split()[0], line.split()[1], " * " in line) for line in table]
    assert shown == [(r.split("@")[0], lr_text(lrs[r]), r in chosen) for r in RUNS]
    for c in summary["sweep"]:
        if c["note"]:
            assert f"note: {c['note']}" in lines and "extend the grid" in c["note"]


def test_only_each_candidates_chosen_run_is_saved_under_the_candidates_name(sweep_run):
    out, summary = sweep_run["out"], sweep_run["summary"]
    assert sorted(p.name for p in out.iterdir()) == ["first-k", "metrics.jsonl", "random", "subclone", "summary.json"]
    for row in summary["rows"]:
        assert row["saved_to"] == str(out / row["name"])
        assert read_manifest(out / row["name"]).training.lr == row["lr"]
    done = {e.candidate: e.saved_to for e in sweep_run["events"] if isinstance(e, DoneEvent)}
    assert sorted(run for run, saved in done.items() if saved) == sorted(r["run"] for r in summary["rows"])


def test_without_a_sweep_the_summary_has_none():
    from subclone_core.cli.commands._training import build_summary
    from subclone_core.training import EvalPoint, RunResult, TrainConfig

    results = {name: RunResult(name, name, 1e-3, 0.0, status="done", evals=[EvalPoint(0, 0, 5.0), EvalPoint(2, 8, v)])
               for name, v in (("subclone", 3.0), ("random", 4.0))}
    context = {"task": "causal-lm"}
    summary = build_summary(results, TrainConfig(steps=2), None, context, None, 1.0)
    assert summary["sweep"] is None and [r["run"] for r in summary["rows"]] == ["subclone", "random"]


# --- the choice on its own ----------------------------------------------------------------------------


def run(name: str, lr: float, best: float | None, status: str = "done") -> SweptRun:
    return SweptRun(name, lr, status, best, best)


@pytest.mark.parametrize("runs, higher, expected", [
    ([run("s@lr=1e-3", 1e-3, 3.0), run("s@lr=2e-3", 2e-3, 2.5), run("s@lr=4e-3", 4e-3, 2.9)], False, "s@lr=2e-3"),
    ([run("s@lr=1e-3", 1e-3, 0.6), run("s@lr=2e-3", 2e-3, 0.8)], True, "s@lr=2e-3"),  # accuracy: higher wins
    ([run("s@lr=2e-3", 2e-3, 2.5), run("s@lr=1e-3", 1e-3, 2.5)], False, "s@lr=1e-3"),  # a tie: the lower lr
    ([run("s@lr=1e-3", 1e-3, 3.0), run("s@lr=2e-3", 2e-3, 1.0, "stopped")], False, "s@lr=1e-3"),  # diverged
    ([run("s@lr=2e-3", 2e-3, None, "stopped"), run("s@lr=1e-3", 1e-3, None, "stopped")], False, "s@lr=1e-3"),
])
def test_choose_runs_takes_the_best_value_in_the_tasks_direction(runs, higher, expected):
    assert choose_runs(runs, higher_is_better=higher) == {"s": expected}


def test_edges_are_the_lowest_and_highest_rates_of_a_grid_of_two_or_more():
    runs = [run("s@lr=1e-3", 1e-3, 3.0), run("s@lr=2e-3", 2e-3, 2.0), run("s@lr=4e-3", 4e-3, 1.0), run("r", 1e-3, 3.0)]
    assert [edge_of(runs, r) for r in ("s@lr=1e-3", "s@lr=2e-3", "s@lr=4e-3", "r")] == \
        ["lowest", None, "highest", None]


def test_the_default_grid_surrounds_each_strategys_default_lr_and_reads_back():
    grid = default_lr_grid(("subclone", "random"))
    assert grid == {"subclone": (5e-4, 1e-3, 2e-3), "random": (5e-4, 1e-3, 2e-3)}
    assert format_lr_sweep(grid) == "subclone=5e-4,1e-3,2e-3,random=5e-4,1e-3,2e-3"
    assert parse_lr_sweep(format_lr_sweep(grid), ["subclone", "random"]) == grid


# --- bad specs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--lr-sweep", "magic=1e-3,2e-3"], "--lr-sweep: 'magic' is not a candidate; candidates: subclone, random"),
    (["--lr-sweep", "subclone=0,1e-3"], "learning rate '0' of 'subclone' must be a finite number > 0"),
    (["--lr-sweep", "subclone=-1e-3"], "learning rate '-1e-3' of 'subclone' must be a finite number > 0"),
    (["--lr-sweep", "random=nan"], "learning rate 'nan' of 'random' must be a finite number > 0"),
    (["--lr-sweep", "random=1e-3,inf"], "learning rate 'inf' of 'random' must be a finite number > 0"),
    (["--lr-sweep", "subclone=1e-3,0.001"], "'subclone' lists learning rate 1e-3 twice"),
    (["--lr-sweep", "subclone=1e-3,random=2e-3,subclone=3e-3"], "'subclone' is named twice"),
    (["--lr-sweep", "subclone=fast"], "'fast' (for 'subclone') is not a number; write NAME=LR,LR,..."),
    (["--lr-sweep", "1e-3,subclone=2e-3"], "--lr-sweep: '1e-3,subclone=2e-3' is malformed at '1e-3'"),
    (["--lr-sweep", "subclone=1e-3,,2e-3"], "is malformed at ''"),
    (["--lr-sweep", "=1e-3"], "is malformed at '=1e-3'"),
    (["--lr-sweep", ""], "--lr-sweep: the spec is empty"),
    (["--lr", "subclone=1e-3", "--lr-sweep", "subclone=2e-3,3e-3"],
     "'subclone' has a learning rate and a learning-rate sweep; give it only one"),
])
def test_a_bad_sweep_spec_fails_in_one_line_before_any_work(llama_dir, tmp_path, flags, message):
    err = bad_input(["compare", "--parent", llama_dir, "--out", tmp_path / "r", *flags])
    assert message in err, err
    assert not (tmp_path / "r").exists()
