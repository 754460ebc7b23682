"""`subclone compare --fsdp` under torchrun: each candidate sharded over 2 CPU processes (FSDP2 + gloo) trains
to the losses of a 1-process run and is saved once, gathered into a plain Hugging Face folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from subclone_core.io.saving import read_manifest
from subclone_core.training.events import StartEvent, of_kind, read_events
from tests.test_cli_train import run_cli

ROOT = Path(__file__).resolve().parent.parent
# 192 validation tokens = 3 batches of 4 x 16: one process scores two, the other one (and runs one unscored);
# --grad-accum 2 exercises the unsynchronised first micro-batch of every step.
ARGS = ["--layers", 3, "--calib-tokens", 256, "--eval-tokens", 192, "--steps", 6, "--eval-every", 3,
        "--batch-size", 4, "--seq-len", 16, "--grad-accum", 2, "--device", "cpu", "--quiet", "--json"]


def torchrun_compare(parent: Path, data: Path, out: Path, *extra: str) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    subclone = shutil.which("subclone", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", subclone, "compare", "--parent", parent,
           "--data", data, "--out", out, *ARGS, *extra]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only the main process prints
    return summaries[0]


@pytest.fixture(scope="module")
def runs(llama_dir, counting_text_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    code, stdout, err = run_cli(["compare", "--parent", llama_dir, "--data", counting_text_file,
                                 "--out", base / "one", *ARGS])
    assert code == 0, err
    sharded = torchrun_compare(llama_dir, counting_text_file, base / "two", "--fsdp")
    return {"one": json.loads(stdout), "two": sharded, "dir": base}


@pytest.mark.slow
def test_sharded_run_reaches_the_one_process_losses(runs):
    for single, sharded in zip(runs["one"]["rows"], runs["two"]["rows"]):
        assert single["name"] == sharded["name"]
        assert sharded["status"] == "done"
        for key in ("start", "final", "best"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-5), (single["name"], key)
        assert sharded["final"] < sharded["start"]  # it learned


@pytest.mark.slow
def test_sharded_run_writes_one_run_folder_with_plain_children(runs):
    one, two = runs["dir"] / "one", runs["dir"] / "two"
    assert sorted(p.name for p in two.iterdir()) == ["metrics.jsonl", "random", "subclone", "summary.json"]
    starts = of_kind(read_events(two / "metrics.jsonl"), StartEvent)
    assert len(starts) == 1 and (starts[0].world_size, starts[0].parallel) == (2, "fsdp")
    for name in ("subclone", "random"):
        model = AutoModelForCausalLM.from_pretrained(two / name)
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.architectures == ["LlamaForCausalLM"]
        training = read_manifest(two / name).training
        assert (training.world_size, training.parallel, training.config["fsdp"]) == (2, "fsdp", True)
        sharded, single = load_file(two / name / "model.safetensors"), load_file(one / name / "model.safetensors")
        assert sorted(sharded) == sorted(single)
        for key, tensor in single.items():
            assert sharded[key].dtype == torch.float32
            torch.testing.assert_close(sharded[key], tensor, rtol=1e-4, atol=1e-5)


def test_fsdp_without_torchrun_is_refused_before_any_loading(tmp_path):
    code, _, err = run_cli(["compare", "--parent", tmp_path / "missing", "--out", tmp_path / "run", "--fsdp",
                            "--quiet"])
    assert code == 2
    assert err.strip().count("\n") == 0 and "--fsdp" in err and "torchrun --nproc_per_node" in err
    assert not (tmp_path / "run").exists()


def test_clip_gradients_matches_torch_clip_grad_norm():
    from subclone_core.training.parallel import clip_gradients

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    reference(torch.randn(5, 8)).pow(2).sum().backward()
    params = [torch.nn.Parameter(p.detach().clone()) for p in reference.parameters()]
    for mine, ref in zip(params, reference.parameters()):
        mine.grad = ref.grad.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
    assert expected > 0.5  # so that clipping changes the gradients
    assert clip_gradients(params, 0.5) == pytest.approx(expected, rel=1e-6)
    for mine, ref in zip(params, reference.parameters()):
        torch.testing.assert_close(mine.grad, ref.grad)
