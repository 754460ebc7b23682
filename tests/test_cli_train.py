"""`subclone train` and `subclone compare` on tiny local parents: tables, JSON, metrics, saved models, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer

from subclone_core.io.saving import read_manifest
from subclone_core.training.events import DoneEvent, EvalEvent, StartEvent, StepEvent, read_events
from tests.cli_runner import run_cli  # also imported from here by test_cli_report, test_fsdp, test_lr_sweep

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", 6, "--eval-every", 3, "--batch-size", 4, "--seq-len", 16, "--quiet"]


@pytest.fixture(scope="module")
def text_file(counting_text_file) -> Path:
    return counting_text_file


@pytest.fixture(scope="module")
def compare_run(llama_dir, text_file, tmp_path_factory):
    """Every strategy (and distillation) made from one calibration and trained side by side."""
    out = tmp_path_factory.mktemp("runs") / "compare"
    code, stdout, err = run_cli(["compare", "--parent", llama_dir, "--layers", 3, "--heads", 4, "--kv-heads", 1,
                                 "--ffn", 24, "--data", text_file, "--calib-tokens", 256, "--eval-tokens", 64,
                                 "--strategies", "subclone,subclone+distill,first-k,uniform,random",
                                 "--lr", "random=3e-3", "--out", out, "--json", *FAST])
    assert code == 0, err
    return {"summary": json.loads(stdout), "out": out}


@pytest.fixture(scope="module")
def child_dir(llama_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("children") / "child"
    code, _, err = run_cli(["make", "--parent", llama_dir, "--out", out, "--layers", 3, "--hidden", 32,
                            "--data", text_file, "--calib-tokens", 256])
    assert code == 0, err
    return out


def test_compare_json_has_one_row_per_strategy_with_the_table_fields(compare_run):
    summary = compare_run["summary"]
    names = ["subclone", "subclone+distill", "first-k", "uniform", "random"]
    assert [r["name"] for r in summary["rows"]] == names
    assert summary["shape"] == {"layers": 3, "hidden": 32, "heads": 4, "kv_heads": 1, "ffn": 24, "head_dim": 8}
    assert summary["metric"] == "loss" and summary["target_from"] == "random init's best"
    assert summary["calibration_tokens"] == 256 and summary["config"]["steps"] == 6
    random_row = summary["rows"][-1]
    assert summary["target"] == pytest.approx(random_row["best"])
    assert random_row["speedup_text"] == "baseline" and random_row["lr"] == 3e-3
    for row in summary["rows"]:
        assert row["status"] == "done" and row["steps_done"] == 6 and row["unit"] == "tokens/s"
        assert {"start", "final", "best", "steps_to_target_text", "speedup_text", "throughput"} <= set(row)
        assert row["throughput"] > 0 and row["seen"] == 6 * 4 * 16
        if row["name"] != "random":
            assert row["speedup_text"].endswith("x") or row["speedup_text"].startswith("not reached")
    assert summary["rows"][0]["start"] == summary["rows"][1]["start"]  # distillation starts from the same child


def test_compare_writes_metrics_and_a_summary_and_saves_loadable_models(compare_run):
    out, summary = compare_run["out"], compare_run["summary"]
    events = read_events(out / "metrics.jsonl")
    assert isinstance(events[0], StartEvent) and len(events[0].candidates) == 5
    assert [c.distill for c in events[0].candidates] == [False, True, False, False, False]
    assert len([e for e in events if isinstance(e, StepEvent)]) == 5 * 6
    evals = [e for e in events if isinstance(e, EvalEvent) and e.candidate == "random"]
    assert [e.step for e in evals] == [0, 3, 6]
    assert [e.final.loss for e in events if isinstance(e, DoneEvent)] == [r["final"] for r in summary["rows"]]
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("subclone+distill", "random"):
        folder = out / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 24
        assert AutoTokenizer.from_pretrained(folder)("w5 w6")["input_ids"] == [5, 6]
        manifest = read_manifest(folder)
        assert manifest.training.steps_done == 6
    assert read_manifest(out / "subclone+distill").training.distill["alpha"] == 0.5
    assert read_manifest(out / "subclone").strategy == "subclone"


def test_train_child_beside_its_random_twin_prints_the_table(child_dir, text_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--model", child_dir, "--baseline", "random", "--data", text_file,
                                 "--eval-tokens", 64, "--out", out, *FAST])
    assert code == 0, err
    lines = stdout.splitlines()
    assert "3 blocks x 32" in lines[0] and "6 steps of 4 x 16 tokens" in lines[0]
    for column in ("step-0 loss", "final loss", "best loss", "steps to target", "speedup", "tokens/s"):
        assert column in lines[1]
    assert lines[3].startswith("subclone ") and lines[4].startswith("random ") and "baseline" in lines[4]
    assert "target: loss" in stdout and "random init's best" in stdout
    child, twin = (AutoModelForCausalLM.from_pretrained(out / name) for name in ("subclone", "random"))
    assert child.config.to_dict()["num_hidden_layers"] == twin.config.num_hidden_layers == 3
    assert sum(p.numel() for p in child.parameters()) == sum(p.numel() for p in twin.parameters())
    manifest = read_manifest(out / "subclone")
    assert manifest.parent.id == read_manifest(child_dir).parent.id  # provenance kept
    assert read_manifest(out / "random").strategy == "random"
    assert read_manifest(out / "random").parent.twin_of == str(child_dir)


def test_train_without_a_baseline_has_no_speedup_and_says_why(child_dir, text_file, tmp_path):
    code, stdout, err = run_cli(["train", "--model", child_dir, "--data", text_file, "--eval-tokens", 64,
                                 "--out", tmp_path / "run", "--json", *FAST])
    assert code == 0, err
    summary = json.loads(stdout)
    assert [r["name"] for r in summary["rows"]] == ["subclone"]
    assert summary["target"] is None and summary["rows"][0]["speedup"] is None
    code, stdout, _ = run_cli(["train", "--model", child_dir, "--data", text_file, "--eval-tokens", 64,
                               "--out", tmp_path / "run2", "--target", 10.0, *FAST])
    assert code == 0 and "target: loss 10.000 (--target)" in stdout and "step 0 (at start)" in stdout


def test_compare_on_an_image_parent_reports_accuracy(tmp_path):
    parent = tmp_path / "vit"
    torch.manual_seed(0)
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=32, image_size=8, patch_size=4, num_channels=1,
                                        num_labels=10)).save_pretrained(parent)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(parent)
    code, stdout, err = run_cli(["compare", "--parent", parent, "--hidden", 16, "--data", "digits",
                                 "--calib-tokens", 64, "--eval-images", 32, "--out", tmp_path / "run", "--json",
                                 *FAST])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["metric"] == "accuracy" and summary["rows"][0]["unit"] == "images/s"
    assert all(0.0 <= r["best"] <= 1.0 for r in summary["rows"])
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "subclone")
    assert model.config.hidden_size == 16


def bad_input(args) -> str:
    code, stdout, err = run_cli(args)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_unknown_strategy_lists_the_valid_ones(llama_dir, tmp_path):
    err = bad_input(["compare", "--parent", llama_dir, "--strategies", "subclone,magic", "--out", tmp_path / "r"])
    assert "unknown strategy 'magic'" in err
    assert "subclone, first-k, uniform, random, subclone+distill" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--steps", 0], "steps must be a whole number >= 1, got 0"),
    (["--batch-size", 0], "batch_size must be a whole number >= 1"),
    (["--strategies", "random,random"], "listed twice"),
    (["--lr", "bogus=1e-3"], "'bogus' is not a candidate; candidates: subclone, random"),
    (["--wd", "lots"], "'lots' is not a number"),
    (["--distill-alpha", 2, "--strategies", "subclone+distill,random"], "distill_alpha 2.0 must be between 0 and 1"),
])
def test_bad_settings_fail_in_one_line_before_any_work(llama_dir, tmp_path, flags, message):
    err = bad_input(["compare", "--parent", llama_dir, "--out", tmp_path / "r", *flags])
    assert message in err
    assert not (tmp_path / "r").exists()


def test_a_non_empty_run_folder_is_refused_and_left_alone(child_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = bad_input(["train", "--model", child_dir, "--out", out, *FAST])
    assert "exists and is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_train_needs_a_model_folder(tmp_path):
    err = bad_input(["train", "--model", tmp_path, "--out", tmp_path / "run"])
    assert "is not a model folder" in err


def help_text(args) -> str:
    """What `subclone ARGS` prints for --help (argparse exits with status 0)."""
    code, out, err = run_cli(args)
    assert code == 0, err
    return out


def test_every_subcommand_says_what_it_does_in_one_line():
    top = help_text(["--help"])
    for command, words in (("train", "train a saved child"), ("compare", "make a child with each strategy")):
        line = next(line for line in top.splitlines() if line.strip().startswith(command + " "))
        assert words in line
        text = help_text([command, "--help"])
        assert "--out" in text and "--steps" in text and "--json" in text and "--lr" in text
    compare = help_text(["compare", "--help"])
    assert "--strategies" in compare and "subclone+distill" in compare
    assert "--strategy " not in compare  # make's single --strategy would mean nothing here


@pytest.mark.slow
def test_compare_runs_unchanged_under_torchrun_with_two_processes(llama_dir, text_file, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "run"
    # --eval-tokens 64 makes one validation batch: the second process holds none and must still agree.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "subclone_core.cli", "compare",
           "--parent", llama_dir, "--layers", 3, "--data", text_file, "--calib-tokens", 256, "--eval-tokens", 64,
           "--out", out, "--json", *FAST]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only the main process prints
    events = read_events(out / "metrics.jsonl")
    assert [e.event for e in events].count("start") == 1 and events[0].world_size == 2
    assert len([e for e in events if isinstance(e, StepEvent)]) == 2 * 6  # one event per step, not per process
    assert all(r["seen"] == 6 * 4 * 16 for r in summaries[0]["rows"])  # the global batch, split in two
    for name in ("subclone", "random"):
        assert read_manifest(out / name).training.world_size == 2
