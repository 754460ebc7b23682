"""`bench/bench_budget.py` at the smoke size on a tiny parent: the JSON schema of issue 14 and the report."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from bench import _harness as h
from bench import bench_budget
from subclone_core.training import RunResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, counting_text_file, llama_dir):
    """One smoke run: a 4-block tiny Llama on a counting corpus, into a temporary docs folder and README."""
    root = tmp_path_factory.mktemp("budget")
    readme = root / "README.md"
    readme.write_text("intro\n<!-- begin budget-speedup -->old line<!-- end budget-speedup -->\n"
                      "| aggressive | <!-- begin budget-cell -->old cell<!-- end budget-cell --> |\nrest\n")
    bench_budget.main(["--smoke", "--parent", str(llama_dir), "--data", str(counting_text_file),
                       "--out", str(root / "docs"), "--readme", str(readme), "--threads", "1"])
    results = json.loads((root / "docs" / "speedup_vs_budget.json").read_text())
    return {"root": root, "results": results, "readme": readme}


def test_json_has_the_issue_schema(run):
    results = run["results"]
    assert set(results["arms"]) == {"random", "subclone", "subclone+distill"}
    for curve in results["arms"].values():
        assert len(curve["tokens"]) == len(curve["values"]) >= 3
        assert curve["tokens"][0] == 0 and curve["tokens"] == sorted(curve["tokens"])
    random = results["arms"]["random"]
    assert results["random_tokens"] == random["tokens"][-1] == 2048  # the smoke budget, whole steps of 4 x 32
    rows = results["iso_loss"]
    assert rows, "random init improved on the counting corpus, so there are levels"
    assert [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)
    assert {"loss", "random_tokens", "subclone_tokens", "speedup"} <= set(rows[0])
    for row in rows:
        assert row["loss"] in random["values"][1:]  # levels are random init's own evaluations
        if row["speedup"] is not None:
            assert row["speedup"] == pytest.approx(row["random_tokens"] / row["subclone_tokens"])
        else:
            assert row["subclone_tokens"] is None and row["text"].startswith("not reached")


def test_every_run_is_in_the_benchmarks_one_schema(run):
    """Each arm's run (the headline's and every stage's) holds exactly h.run_json's keys, each sweep row its
    summary's plus the arm, the budget in tokens, whether it was chosen and the note on the grid's edge."""
    results, empty = run["results"], RunResult("x", "random", 1e-3, 0.0)
    for arms in (results["arms"], *(s["arms"] for s in results["stages"].values())):
        for r in arms.values():
            assert list(r) == list(h.run_json(empty))
            assert r["unit"] == "tokens/s" and r["start"] == r["values"][0] and r["final"] == r["values"][-1]
    summary = list(h.run_json(empty, curve=False, arm="random", budget_tokens=0, chosen=False, note=None))
    assert all(list(r) == summary for r in results["sweep"])


def test_every_stage_and_the_sweep_are_recorded(run):
    results = run["results"]
    plan = bench_budget.SIZES["smoke"]
    assert list(results["stages"]) == [s.key for s in plan.stages]
    assert set(results["lrs"]) == set(bench_budget.ARMS)
    for arm, lr in results["lrs"].items():
        assert lr in plan.sweep_lrs[arm]
    first = plan.stages[0]
    assert len(results["sweep"]) == sum(len(plan.sweep_lrs[arm]) for arm in first.arms)
    distill = results["stages"]["distill"]
    assert distill["arms"]["subclone+distill"]["tokens"][-1] == 1024
    assert [r["fraction"] for r in distill["at_drop"]["subclone+distill"]] == [0.25, 0.5, 0.75, 1.0]
    assert results["stages"]["paper-like"]["shape_sizes"] == bench_budget.SMOKE_SHAPES["paper-like"]
    assert {r["stage"] for r in results["seed_spread"]} == {"seed1"}
    assert all(math.isfinite(m) for m in results["minutes"].values())


def test_the_sweep_runs_every_lr_at_the_full_budget_and_each_arm_is_its_best_run(run):
    results = run["results"]
    assert {r["budget_tokens"] for r in results["sweep"]} == {results["random_tokens"]}  # the budget reported
    for arm in ("random", "subclone"):
        rows = [r for r in results["sweep"] if r["arm"] == arm]
        best = min(rows, key=lambda r: r["best"])
        assert [r["lr"] for r in rows if r["chosen"]] == [best["lr"]] == [results["lrs"][arm]]
        assert results["arms"][arm]["lr"] == best["lr"]
        assert min(results["arms"][arm]["values"]) == results["arms"][arm]["best"] == pytest.approx(best["best"])
        lrs = bench_budget.SIZES["smoke"].sweep_lrs[arm]
        at_edge = best["lr"] in (min(lrs), max(lrs))
        assert all(bool(r["note"]) == at_edge for r in rows)
    assert "Learning-rate sweep (every run at the full budget" in (run["root"] / "docs" / "BENCHMARKS.md").read_text()


def test_report_section_plots_and_readme_line(run):
    docs = run["root"] / "docs"
    text = (docs / "BENCHMARKS.md").read_text()
    assert "<!-- begin budget -->" in text and "## Speedup at a longer budget" in text
    assert "random init's final loss" in text and "paper's ~4x" in text
    for name in ("bench_budget_curves.png", "bench_budget_speedup.png"):
        assert f"]({name})" in text
        assert (docs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = run["readme"].read_text()
    assert "old line" not in readme and readme.startswith("intro\n") and readme.endswith("\nrest\n")
    assert "-token budget" in readme and "random init's final validation loss" in readme
    final = run["results"]["at_drop"]["subclone"][-1]
    assert "old cell" not in readme and f"**{final['text']}** at " in readme  # the table cell: the same number


def test_redrawing_from_the_json_gives_the_same_report(run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(run["readme"].read_text().replace("**", "__"))  # the redraw must put the numbers back
    (tmp_path / "docs").mkdir()
    shutil.copy(run["root"] / "docs" / "speedup_vs_budget.json", tmp_path / "docs")
    bench_budget.main(["--smoke", "--report-only", "--out", str(tmp_path / "docs"), "--readme", str(readme)])
    assert (tmp_path / "docs" / "BENCHMARKS.md").read_text() == (run["root"] / "docs" / "BENCHMARKS.md").read_text()
    assert readme.read_text() == run["readme"].read_text()


def test_log_eval_steps_are_spread_evenly_in_log_steps():
    steps = bench_budget.log_eval_steps(1000, 10)
    assert steps[0] == 1 and steps[-1] < 1000 and list(steps) == sorted(set(steps))
    assert 20 <= steps[len(steps) // 2] <= 60  # the geometric middle of 1..1000 is about 32
    assert bench_budget.log_eval_steps(1, 5) == ()


def test_a_saved_child_trains_without_its_parent(tmp_path, counting_text_file, llama_dir):
    from subclone_core.cli.main import main as cli

    child = tmp_path / "child"
    sizes = bench_budget.SMOKE_SHAPES["aggressive"]
    assert cli(["make", "--parent", str(llama_dir), "--out", str(child), "--data", str(counting_text_file),
                "--calib-tokens", "256", *(f"--{k.replace('_', '-')}={v}" for k, v in sizes.items())]) == 0
    results = bench_budget.main(["--smoke", "--from-child", str(child), "--data", str(counting_text_file),
                                 "--out", str(tmp_path / "docs"), "--threads", "1"])
    assert list(results["stages"]) == ["final", "seed1"]  # distillation and the other shape need the parent
    assert len(results["left_out"]) == 2 and "stage distill" in results["left_out"][0]
    assert "stage distill" in (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "a child of" in results["parent"]
    assert results["iso_loss"] and results["arms"]["random"]["tokens"][-1] == 2048
