"""What `subclone compare` reports besides its table: TensorBoard event files through accelerate's trackers
(read back with TensorBoard's own reader and checked against metrics.jsonl) and the iso-loss speedup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from subclone_core.training import trackers
from subclone_core.training.events import parse_event
from subclone_core.training.speedup import speedup
from subclone_core.training.trackers import TrackerCallback
from tests.test_cli_train import FAST, ROOT, run_cli

LEVELS = ("25% (", "50% (", "75% (", "100% (")


@pytest.fixture(scope="module")
def report_run(llama_dir, counting_text_file, tmp_path_factory):
    """subclone and random init trained side by side with --report-to tensorboard, printed as a table."""
    parent = llama_dir
    out = tmp_path_factory.mktemp("runs") / "report"
    code, stdout, err = run_cli(["compare", "--parent", parent, "--layers", 3, "--heads", 4, "--kv-heads", 1,
                                 "--ffn", 24, "--data", counting_text_file, "--calib-tokens", 256,
                                 "--eval-tokens", 64, "--strategies", "subclone,random", "--lr", "random=3e-3",
                                 "--report-to", "tensorboard", "--out", out, *FAST])
    assert code == 0, err
    return {"out": out, "stdout": stdout, "summary": json.loads((out / "summary.json").read_text())}


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of one TensorBoard run: {tag: {step: value}}, read with TensorBoard's event reader."""
    reader = EventAccumulator(str(run_dir))
    reader.Reload()
    return {tag: {e.step: e.value for e in reader.Scalars(tag)} for tag in reader.Tags()["scalars"]}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as its raw JSON objects (what the trackers must agree with, read independently)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_scalars(events: list[dict], candidate: str) -> dict[str, dict[int, float]]:
    """metrics.jsonl's numbers of one candidate, as the tags the tracker should have written."""
    out: dict[str, dict[int, float]] = {}
    for event in events:
        prefix = {"step": "train", "eval": "val"}.get(event["event"])
        if prefix is None or event["candidate"] != candidate:
            continue
        for key, value in event.items():
            if key not in ("event", "candidate", "time", "step") and isinstance(value, (int, float)):
                out.setdefault(f"{prefix}/{key}", {})[event["step"]] = value
    return out


def test_compare_writes_one_tensorboard_run_per_candidate_matching_metrics_jsonl(report_run):
    out = report_run["out"]
    events = read_metrics(out / "metrics.jsonl")
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["random", "subclone"]
    for name in ("subclone", "random"):
        written, expected = scalars(out / "tensorboard" / name), expected_scalars(events, name)
        assert {"train/loss", "train/lr", "train/throughput", "val/loss", "val/perplexity"} <= set(expected)
        for tag, points in expected.items():
            assert sorted(written[tag]) == sorted(points), tag  # the same steps
            for step, value in points.items():
                assert written[tag][step] == np.float32(value), (tag, step)  # stored as float32
        assert sorted(written["val/loss"]) == [0, 3, 6]
    # the speedup so far sits in the candidate's run only; at the end it is the table's speedup
    assert "val/speedup" not in scalars(out / "tensorboard" / "random")
    row = report_run["summary"]["rows"][0]
    final = scalars(out / "tensorboard" / "subclone").get("val/speedup", {}).get(6)
    assert final == (None if row["speedup"] is None else pytest.approx(row["speedup"], rel=1e-6))


def test_compare_summary_holds_the_iso_loss_curve_and_the_table_prints_its_levels(report_run):
    summary, stdout = report_run["summary"], report_run["stdout"]
    iso = summary["iso_loss"]
    assert list(iso) == ["subclone"]  # every candidate but random init
    random_evals = [e for e in read_metrics(report_run["out"] / "metrics.jsonl")
                    if e["event"] == "eval" and e["candidate"] == "random"]
    start, best = random_evals[0]["loss"], min(e["loss"] for e in random_evals)
    assert best < start  # random init improved, so there are levels to compare at
    drop = iso["subclone"]["drop"]
    assert [r["fraction"] for r in drop] == [0.25, 0.5, 0.75, 1.0]
    for row in drop:
        assert row["level"] == pytest.approx(start + row["fraction"] * (best - start))
        assert row["text"] and (row["speedup"] is None or row["speedup"] > 0)
    assert iso["subclone"]["levels"] and all(r["fraction"] is None for r in iso["subclone"]["levels"])
    lines = stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("iso-loss speedup"))
    assert all(level in lines[title + 1] for level in LEVELS)
    assert lines[title + 3].startswith("subclone ") and lines[title + 4].startswith("target: loss")


def feed(callback: TrackerCallback, order: list[str], curves: dict[str, list[float]]) -> None:
    """Start and evaluation events as the engine sends them: candidates in ``order`` at steps 0, 10, 20..."""
    callback(parse_event({"event": "start", "candidate": None, "candidates": [{"name": n, "lr": 1e-3} for n in order],
                          "config": {"steps": 10 * (len(curves["random"]) - 1)}, "metric": "loss",
                          "higher_is_better": False}))
    for i in range(len(curves["random"])):
        for name in order:
            callback(parse_event({"event": "eval", "candidate": name, "step": 10 * i, "seen": 100 * i,
                                  "loss": curves[name][i]}))


@pytest.mark.parametrize("order", [["child", "random"], ["random", "child"]])
def test_the_speedup_so_far_is_logged_once_both_are_evaluated_whatever_the_order(tmp_path, order):
    curves = {"random": [5.0, 4.0, 3.0, 2.0], "child": [4.5, 2.0, 1.8, 1.5]}
    callback = TrackerCallback(["tensorboard"], tmp_path, project="run")
    feed(callback, order, curves)
    callback.close()
    logged = scalars(tmp_path / "tensorboard" / "child")["val/speedup"]
    for step in (10, 20, 30):  # at step 0 random init is at its own best: no number
        points = [(10 * i, v) for i, v in enumerate(curves["child"][: step // 10 + 1])]
        base = [(10 * i, v) for i, v in enumerate(curves["random"][: step // 10 + 1])]
        assert logged[step] == pytest.approx(speedup(base, points).ratio)
    assert sorted(logged) == [10, 20, 30] and logged[30] == pytest.approx(3.0)  # random 30 steps, child 10


def test_bad_report_to_fails_in_one_line_before_any_work(tmp_path, monkeypatch):
    missing = replace(trackers._KINDS["wandb"], available=lambda: False)
    monkeypatch.setitem(trackers._KINDS, "wandb", missing)
    for flags, message in [
        (["--report-to", "tensorbored", "--out", tmp_path / "r"],
         "unknown tracker 'tensorbored'; choose from tensorboard, wandb, mlflow"),
        (["--report-to", "wandb", "--out", tmp_path / "r"], "needs the 'wandb' package, which is not installed"),
        (["--report-to", "tensorboard"], "give --out RUN"),
    ]:
        code, stdout, err = run_cli(["compare", "--parent", tmp_path / "nowhere", *flags])
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
        assert message in err
    assert not (tmp_path / "r").exists()


def test_under_torchrun_only_the_main_process_writes_event_files(llama_dir, counting_text_file, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "subclone_core.cli", "compare",
           "--parent", llama_dir, "--layers", 3, "--data", counting_text_file, "--calib-tokens", 256,
           "--eval-tokens", 64, "--report-to", "tensorboard", "--out", out, "--json", *FAST]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = read_metrics(out / "metrics.jsonl")
    for name in ("subclone", "random"):
        assert len(list((out / "tensorboard" / name).glob("events.out.tfevents.*"))) == 1  # one writer
        written = scalars(out / "tensorboard" / name)
        for tag, points in expected_scalars(events, name).items():
            assert written[tag] == {step: pytest.approx(np.float32(v)) for step, v in points.items()}, tag
