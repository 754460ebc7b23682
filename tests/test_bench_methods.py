"""`bench/bench_methods.py` at the smoke size on a tiny random parent: every method of every row built the way
`make` builds it, scored at both windows, refusals recorded with their reason, and the report's table; the smallest
width row's children trained matched, each arm's lr grid grown beyond an edge until its best lr is inside (or the
cap says so), with iso-loss speedups against random init and subclone."""

from __future__ import annotations

import json
import math

import pytest

from bench import _harness as h
from bench import bench_methods
from subclone_core.training import RunResult, default_hparams
from subclone_core.training.results import EvalPoint
from subclone_core.training.sweep import run_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    assert bench_methods.main(["--smoke", "--out-dir", str(out), "--threads", "1"]) == 0
    return json.loads((out / "methods.json").read_text())


def test_every_method_of_every_row_has_finite_losses_at_both_windows(report):
    (parent,) = report["parents"]
    kinds = [row["kind"] for row in parent["rows"]]
    assert kinds == ["width", "hidden", "depth"]
    for row in parent["rows"]:
        methods = {"width": bench_methods.WIDTH_METHODS, "hidden": bench_methods.HIDDEN_METHODS,
                   "depth": bench_methods.DEPTH_METHODS}[row["kind"]]
        assert list(row["results"]) == list(methods)
        for method, result in row["results"].items():
            assert "refused" not in result, (row["kind"], method, result)  # the tiny Llama takes every method
            assert set(result["losses"]) == {"128", "2048"}
            assert all(math.isfinite(v) for v in result["losses"].values()), (method, result)
            assert result["params"] > 0 and result["seconds"] >= 0


def test_the_rows_cut_what_they_say(report):
    rows = {row["kind"]: row["sizes"] for row in report["parents"][0]["rows"]}
    parent = rows["depth"]  # the depth row keeps every width
    assert rows["hidden"]["heads"] == parent["heads"] and rows["hidden"]["ffn"] == parent["ffn"]
    assert rows["hidden"]["hidden"] < parent["hidden"] and rows["hidden"]["layers"] == rows["width"]["layers"]
    assert rows["width"]["ffn"] < parent["ffn"] and rows["depth"]["layers"] < rows["width"]["layers"]


def test_the_report_has_a_table_per_parent(report):
    text = bench_methods.markdown(report)
    assert text.startswith(bench_methods.SECTION)
    assert ("| cut | ratio | shape | subclone | grail | wanda-sp | flap | minitron | llm-pruner | random | slicegpt | "
            "shortgpt |") in text


def test_every_trained_arm_has_its_lr_inside_its_grid_or_says_it_is_at_an_edge(report):
    (parent,) = report["parents"]
    training = parent["training"]
    assert (training["kind"], training["ratio"]) == ("width", 0.5)  # the smoke size's one width row
    assert list(training["arms"]) == list(bench_methods.WIDTH_METHODS)  # every method that builds there
    for method, arm in training["arms"].items():
        assert arm["chosen_lr"] in arm["lrs"] and arm["lrs"] == sorted(arm["lrs"]), method
        assert arm["lrs"] == sorted([*arm["start_grid"], *arm["added"]])
        at_edge = arm["chosen_lr"] in (min(arm["lrs"]), max(arm["lrs"]))
        assert at_edge == (arm["edge"] is not None), (method, arm["chosen_lr"], arm["lrs"], arm["edge"])
        # an arm left at an edge has used every extension it may
        assert arm["edge"] is None or len(arm["added"]) == bench_methods.MAX_EXTENSIONS
        plan = training["plan"]
        for run in arm["runs"]:
            assert run["steps"] == [0, *bench_methods.rp.log_eval_steps(plan["steps"], plan["evals"] + 1),
                                    plan["steps"]]
            assert len(run["tokens"]) == len(run["values"]) == len(run["steps"])
            assert all(math.isfinite(v) for v in run["values"]) and run["throughput"] > 0
            assert (run["metric"], run["unit"]) == ("loss", "tokens/s") and "seconds" in run
            assert run["weight_decay"] == default_hparams(method)["weight_decay"]  # each method its own strategy
        target = arm["target"]
        assert target == min(h.chosen_run(training["arms"]["random"])["values"])
        assert set(arm["vs_random"]) >= {"speedup", "text", "candidate_tokens", "level"}
        assert arm["vs_random"]["level"] == arm["vs_subclone"]["level"] == target
        assert arm["tokens_to_target"] is None or arm["tokens_to_target"] >= 0


def test_the_report_has_a_training_table_a_plot_and_says_where_subclone_is_not_best(report, tmp_path):
    text = bench_methods.markdown(report)
    assert "| method | lr chosen (of grid) | step 0 | best | final | tokens to random's best |" in text
    assert "**Where subclone is not the best.**" in text and f"]({bench_methods.PLOT})" in text
    bench_methods.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def _fake_trainer(best_lr: float):
    """A train_at whose runs end at a loss that grows with the distance (in log lr) from ``best_lr``."""
    trained = []

    def train_at(lr: float):
        trained.append(lr)
        loss = 5.0 + 0.1 * math.log(lr / best_lr) ** 2  # below the start (10) within the grids tried
        result = RunResult(run_name("arm", lr), "random", lr, 0.1, status="done",
                           evals=[EvalPoint(0, 0, 10.0), EvalPoint(4, 1024, loss)])
        return result, h.run_json(result)
    return train_at, trained


@pytest.mark.parametrize(("best_lr", "added", "chosen", "edge"), [
    (1.5e-3, [], 2e-3, None),  # inside the grid: nothing added
    (5e-3, [8e-3], 4e-3, None),  # at the top edge once: one lr above, then inside
    (4.5e-4, [5e-4, 2.5e-4], 5e-4, None),  # twice at the bottom edge: two lrs below, then inside
    (1.0, [8e-3, 1.6e-2, 3.2e-2], 3.2e-2, "high"),  # still at the edge after the cap: recorded
])
def test_the_grid_grows_beyond_an_edge_until_the_best_lr_is_inside(best_lr, added, chosen, edge):
    train_at, trained = _fake_trainer(best_lr)
    arm = bench_methods.extend_until_inside(train_at, (1e-3, 2e-3, 4e-3))
    assert arm["added"] == trained[3:] == pytest.approx(added)
    assert arm["chosen_lr"] == pytest.approx(chosen) and arm["edge"] == edge
    assert arm["start_grid"] == [1e-3, 2e-3, 4e-3] and arm["lrs"] == sorted(arm["lrs"])
