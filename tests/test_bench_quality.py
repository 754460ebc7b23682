"""`bench/bench_quality.py` at the smoke size on a tiny random parent: every variant of every shape, the
training part's lr choice, the report and the plot (written into a temporary folder, never docs/)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from bench import _harness as h
from bench import bench_quality
from subclone_core.training import default_hparams

pytestmark = pytest.mark.slow
RUN_KEYS = ("lr", "weight_decay", "status", "message", "metric", "start", "best", "final", "throughput", "unit",
            "steps", "tokens", "values")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One smoke run (about half a minute on one thread); a parent id that cannot be loaded is skipped."""
    out = tmp_path_factory.mktemp("quality")
    missing = str(out / "no-such-parent")
    bench_quality.main(["--smoke", "--parents", f"{bench_quality.SMOKE_PARENT},{missing}", "--out-dir", str(out),
                        "--threads", "1"])
    return {"out": out, "results": json.loads((out / "quality.json").read_text()), "missing": missing}


def test_every_variant_of_every_shape_has_a_finite_loss(run):
    results = run["results"]
    assert list(results["parents"]) == [bench_quality.SMOKE_PARENT]
    parent = results["parents"][bench_quality.SMOKE_PARENT]
    shapes = parent["shapes"]
    assert len(shapes) >= 4 and sum(s["aggressive"] for s in shapes) == 1
    assert len({s["key"] for s in shapes}) == len(shapes)
    for shape in shapes:
        assert set(shape["losses"]) == set(bench_quality.VARIANTS)
        assert all(math.isfinite(v) for v in shape["losses"].values())
        assert shape["params"] > 0 and 0 < shape["width_share"] <= 1 and 0 < shape["depth_share"] <= 1
    assert math.isfinite(parent["loss"])


def test_random_init_scores_about_a_uniform_guess(run):
    parent = run["results"]["parents"][bench_quality.SMOKE_PARENT]
    assert parent["ln_vocab"] == pytest.approx(math.log(parent["vocab"]))
    for shape in parent["shapes"]:
        assert shape["losses"]["random"] == pytest.approx(parent["ln_vocab"], abs=0.3)


def test_each_arm_chose_its_lowest_best_loss_lr(run):
    training = run["results"]["parents"][bench_quality.SMOKE_PARENT]["training"]
    plan = bench_quality.SIZES["smoke"].training["*"]
    assert set(training["arms"]) == set(bench_quality.ARMS)
    for arm, data in training["arms"].items():
        assert [r["lr"] for r in data["runs"]] == list(plan.lrs[arm])
        done = [r for r in data["runs"] if r["status"] == "done"]
        assert done, f"{arm}: every run stopped"
        assert data["chosen_lr"] == min(done, key=lambda r: r["best"])["lr"]
        assert data["edge"] == h.edge_of(data["chosen_lr"], plan.lrs[arm])
        for r in data["runs"]:
            assert list(r) == [*RUN_KEYS, "seconds"]  # h.run_json's row, then the run's seconds
            assert (r["metric"], r["unit"]) == ("loss", "tokens/s")
            assert r["weight_decay"] == default_hparams(bench_quality.STRATEGY_OF[arm])["weight_decay"]
            assert r["steps"][0] == 0 and r["steps"][-1] == plan.steps and r["throughput"] > 0
            assert r["best"] == min(r["values"]) and math.isfinite(r["best"])
    assert training["comparison"]["child_start"] == training["arms"]["default"]["runs"][0]["start"]


def test_report_plot_and_skipped_parent(run):
    out, results = run["out"], run["results"]
    assert set(results["skipped"]) == {run["missing"]} and results["skipped"][run["missing"]]
    text = (out / "BENCHMARKS.md").read_text()
    assert "<!-- begin quality -->" in text and "(`bench/bench_quality.py`)" in text
    assert "nat below random init" in text and results["machine"] in text
    for label, _ in bench_quality.VARIANTS.values():
        assert label in text
    assert "](bench_quality.png)" in text
    assert (out / "bench_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_redrawing_from_the_json_gives_the_same_section(run, tmp_path):
    shutil.copy(run["out"] / "quality.json", tmp_path)
    bench_quality.main(["--report-only", "--out-dir", str(tmp_path)])
    assert (tmp_path / "bench_quality.png").stat().st_size > 0
    assert (tmp_path / "BENCHMARKS.md").read_text() == (run["out"] / "BENCHMARKS.md").read_text()


def test_chosen_run_and_edges_without_training():
    data = {"chosen_lr": 4e-3, "runs": [{"lr": 1e-3, "best": 5.0}, {"lr": 4e-3, "best": 4.0}]}
    assert h.chosen_run(data)["best"] == 4.0
    assert h.chosen_run({**data, "chosen_lr": None}) is None  # every run diverged
    assert h.edge_of(4e-3, (1e-3, 2e-3, 4e-3)) == "high"
    assert h.edge_of(1e-3, (1e-3, 2e-3, 4e-3)) == "low"
    assert h.edge_of(2e-3, (1e-3, 2e-3, 4e-3)) is None
    assert h.edge_of(1e-3, (1e-3,)) is None


def test_rerunning_one_parent_keeps_the_others_results(run, tmp_path):
    old = json.loads((run["out"] / "quality.json").read_text())
    old["parents"] = {"other": {"id": "other"}, "coder@code": {"id": "coder"}, **old["parents"]}
    (tmp_path / "quality.json").write_text(json.dumps(old))
    fresh = {**old, "parents": {bench_quality.SMOKE_PARENT: old["parents"][bench_quality.SMOKE_PARENT]}}
    kept = bench_quality.carried_over(fresh, tmp_path / "quality.json", [bench_quality.SMOKE_PARENT, "coder"])
    assert list(kept["parents"]) == ["other", bench_quality.SMOKE_PARENT] and kept["carried"] == ["other"]
    assert bench_quality.carried_over({**fresh, "size": "cpu"}, tmp_path / "quality.json", ["x"])["parents"] == {
        bench_quality.SMOKE_PARENT: old["parents"][bench_quality.SMOKE_PARENT]}  # another size's JSON: not mixed
