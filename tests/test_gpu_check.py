"""The ready GPU check (bench/gpu_check.py, `make gpu-check`) and the scale benchmark run end to end on the CPU."""

from __future__ import annotations

import json
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
    done = run_script("bench/gpu_check.py", "--dry-run", "--out", str(out))
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
    done = run_script("bench/gpu_check.py")
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr


@pytest.mark.slow
def test_bench_scale_smoke_keeps_the_same_indices_offloaded():
    done = run_script("bench/bench_scale.py", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny offload" in done.stdout


@pytest.mark.slow
def test_bench_scale_sequential_smoke_keeps_the_same_rankings():
    done = run_script("bench/bench_scale.py", "--sequential", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny 512 tokens sequential" in done.stdout


@pytest.mark.slow
def test_bench_scale_ablation_smoke_orders_the_blocks_alike_in_every_placement():
    done = run_script("bench/bench_scale.py", "--ablation", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny ablation sequential" in done.stdout


@pytest.mark.slow
def test_bench_fsdp_smoke_trains_replicated_and_sharded_to_the_same_loss():
    done = run_script("bench/bench_fsdp.py", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny ddp" in done.stdout and "tiny fsdp" in done.stdout
