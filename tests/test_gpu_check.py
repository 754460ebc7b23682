"""The ready GPU check (bench/gpu_check.py, `make gpu-check`) and the scale benchmark run end to end on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900,
                          check=False)


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_report(tmp_path):
    out = tmp_path / "GPU.md"
    done = run_script("-m", "bench.gpu_check", "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "Spearman of the residual scores" in text and "subclone vs random init" in text
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["calibration"]["child_dtype"] == "bfloat16"
    assert result["training"]["steps"] >= 1 and result["training"]["tokens_per_s"] > 0
    assert -1.0 <= result["calibration"]["spearman_residual"] <= 1.0
    # the two paths for parents and children larger than one device
    assert "Sequential calibration" in text and "Sharded training" in text
    assert result["sequential"]["spearman_residual"] == pytest.approx(1.0) and result["sequential"]["same_blocks"]
    fsdp = result["fsdp"]
    assert fsdp["processes"] == 2 and fsdp["saved_class"] == "LlamaForCausalLM"
    assert fsdp["max_rel_diff"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_check_without_a_gpu_says_so():
    done = run_script("-m", "bench.gpu_check")
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr


@pytest.mark.slow
@pytest.mark.integration  # the benchmark's workers are subprocesses
def test_bench_scale_smoke_keeps_the_same_indices_offloaded(tmp_path):
    """The tiny synthetic parent made into a child in memory and with --max-memory at a quarter (each in a
    fresh worker process, as the benchmark runs them): the same child, read back from the files offloaded."""
    from bench import bench_scale

    row = bench_scale.measure_size("tiny", tmp_path, bench_scale.TOKENS["tiny"])
    assert row["same_indices"] and row["memory"]["kept_blocks"] == row["offload"]["kept_blocks"]
    assert row["child_max_rel_diff"] <= 1e-5  # the benchmark's own tolerance for "the same child"
    assert row["offload"]["read_bytes"] > row["memory"]["read_bytes"]  # the offloaded blocks came from disk
    assert row["within"], (row["offload"]["peak_anon_gib"], row["limit_gib"])  # the memory acceptance


@pytest.mark.slow
@pytest.mark.integration  # the benchmark's workers are subprocesses
def test_bench_scale_sequential_smoke_keeps_the_same_rankings(tmp_path):
    """Calibration of the tiny parent at a quarter budget: plain offload reads the offloaded weights again for
    each of its two batches, sequential calibration reads every weight once, and both rank as in memory."""
    from bench import bench_scale

    report = bench_scale.sequential_bench("tiny", tmp_path)
    run = report["runs"][0]
    assert report["same_rankings"] and run["sequential"]["batches"] == 2
    assert run["memory"]["read_bytes"] == 0
    assert run["sequential"]["read_bytes"] == report["bytes"]  # each tensor of the checkpoint exactly once
    assert run["offload"]["read_bytes"] > run["sequential"]["read_bytes"]


@pytest.mark.slow
@pytest.mark.integration  # the benchmark's workers are subprocesses
def test_bench_scale_ablation_smoke_orders_the_blocks_alike_in_every_placement(tmp_path):
    """The loss without each block of the tiny parent, in memory, offloaded and block by block: the same losses
    (to float32 rounding) and so the same order of the blocks."""
    from bench import bench_scale

    report = bench_scale.ablation_bench("tiny", tmp_path)
    modes = report["modes"]
    assert set(modes) == {"memory", "offload", "sequential"} and report["same_order"]
    assert len(modes["memory"]["losses"]) == report["blocks"] and report["max_loss_difference"] < 1e-3
    assert all(math.isfinite(loss) for r in modes.values() for loss in [r["base"], *r["losses"]])


@pytest.mark.slow
@pytest.mark.integration  # torchrun
def test_bench_fsdp_smoke_trains_replicated_and_sharded_to_the_same_loss(tmp_path):
    """The tiny child trained 3 steps under torchrun on 2 processes, replicated (DDP) and sharded (FSDP2): the same
    final validation loss, each rank's peak memory measured."""
    from bench import bench_fsdp

    rows = bench_fsdp.measure("tiny", tmp_path)
    assert [r["mode"] for r in rows] == ["ddp", "fsdp"] and all("row" in r for r in rows)
    ddp, fsdp = (r["row"]["final"] for r in rows)
    assert math.isfinite(ddp) and ddp == pytest.approx(fsdp, rel=1e-4)
    assert all(len(r["rank_peak_rss_gib"]) == 2 and min(r["rank_peak_rss_gib"]) > 0 for r in rows)
