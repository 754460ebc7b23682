"""The unchanged engine data-parallel in 2 CPU processes (torchrun + gloo), against a 1-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from subclone_core.training.events import StepEvent, read_events

SCRIPT = Path(__file__).with_name("dist_train_script.py")
ROOT = SCRIPT.parent.parent


def run(cmd: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*cmd, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    single, double = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run([sys.executable], single)
    run([torchrun, "--standalone", "--nproc_per_node", "2"], double)
    reports = [json.loads((double / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"single": json.loads((single / "rank0.json").read_text()), "ranks": reports, "dir": double}


@pytest.mark.slow
def test_both_ranks_end_with_identical_weights_and_learned(runs):
    rank0, rank1 = runs["ranks"]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["hash"] == rank1["hash"]
    for name, curve in rank0["evals"].items():
        assert rank0["status"][name] == "done"
        assert curve[-1][1] < curve[0][1]
        assert rank1["evals"][name] == curve


@pytest.mark.slow
def test_each_rank_trains_on_its_half_of_the_same_global_batches(runs):
    rank0, rank1 = runs["ranks"]
    single = runs["single"]
    for name, global_batches in single["seen"].items():
        assert len(rank0["seen"][name]) == len(global_batches) == 8
        for step, batch in enumerate(global_batches):
            assert rank0["seen"][name][step] == batch[:4] and rank1["seen"][name][step] == batch[4:]
        # The 2-process run is the 1-process run up to float summation order.
        for (s2, v2), (s1, v1) in zip(rank0["evals"][name], single["evals"][name]):
            assert s2 == s1 and v2 == pytest.approx(v1, rel=1e-4)


@pytest.mark.slow
def test_only_the_main_process_writes_metrics_and_saves(runs):
    events = read_events(runs["dir"] / "metrics.jsonl")
    assert [e.event for e in events].count("start") == 1
    assert len([e for e in events if isinstance(e, StepEvent)]) == 8 * 2
    assert events[0].world_size == 2
    saved = sorted(p.name for p in (runs["dir"] / "models").iterdir())
    assert saved == ["random", "subclone"]  # and no temporary folders left behind
    manifest = json.loads((runs["dir"] / "models" / "random" / "subclone.json").read_text())
    assert manifest["training"]["world_size"] == 2
