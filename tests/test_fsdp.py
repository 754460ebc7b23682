"""`subclone compare --fsdp` and `subclone train --fsdp` under torchrun: each candidate sharded over 2 CPU processes
(FSDP2 + gloo) trains to the losses of a 1-process run and is saved once, gathered into a plain Hugging Face folder;
`train --fsdp` builds the saved child on the meta device and each process reads only its own shards from the files.

Run as a script under torchrun (``torchrun --nproc_per_node 2 tests/test_fsdp.py CHILD OUT``) it builds, shards and
fills a child and its random twin as `train --fsdp` does and writes what each process holds to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from subclone_core.cli.commands._training import load_training_child, random_twin
from subclone_core.core.errors import SubcloneError
from subclone_core.io.saving import read_manifest
from subclone_core.training.events import StartEvent, of_kind, read_events
from subclone_core.training.materialize import (
    FolderWeights,
    RandomWeights,
    is_meta,
    materialize,
    meta_init,
    tie_on_meta,
)
from tests import tiny_models as tm
from tests.test_cli_train import run_cli

ROOT = Path(__file__).resolve().parent.parent
# 192 validation tokens = 3 batches of 4 x 16: one process scores two, the other one (and runs one unscored);
# --grad-accum 2 exercises the unsynchronised first micro-batch of every step.
ARGS = ["--layers", 3, "--calib-tokens", 256, "--eval-tokens", 192, "--steps", 6, "--eval-every", 3,
        "--batch-size", 4, "--seq-len", 16, "--grad-accum", 2, "--device", "cpu", "--quiet", "--json"]


# `train` takes the same flags less the shape ones; --baseline random adds the random twin
TRAIN_ARGS = ["--baseline", "random", *ARGS[4:]]


def torchrun(*argv, procs: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node procs ARGV...`` from the checkout; fails the test on an error."""
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if launcher is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(c) for c in [launcher, "--standalone", "--nproc_per_node", procs, *argv]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def torchrun_cli(command: str, *argv) -> dict:
    """A `subclone` command under torchrun on 2 processes; its one JSON summary (only the main process prints)."""
    subclone = shutil.which("subclone", path=str(Path(sys.executable).parent))
    proc = torchrun(subclone, command, *argv)
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1
    return summaries[0]


def torchrun_compare(parent: Path, data: Path, out: Path, *extra: str) -> dict:
    return torchrun_cli("compare", "--parent", parent, "--data", data, "--out", out, *ARGS, *extra)


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


@pytest.fixture(scope="module")
def train_runs(runs, counting_text_file):
    """`train --baseline random` of the child saved by the one-process compare run: in one process, and sharded."""
    child, base = runs["dir"] / "one" / "subclone", runs["dir"]
    argv = ["--model", child, "--data", counting_text_file, *TRAIN_ARGS]
    code, stdout, err = run_cli(["train", *argv, "--out", base / "train-one"])
    assert code == 0, err
    sharded = torchrun_cli("train", *argv, "--out", base / "train-two", "--fsdp")
    return {"one": json.loads(stdout), "two": sharded, "dir": base}


@pytest.mark.slow
def test_sharded_train_of_a_saved_child_reaches_the_one_process_losses(train_runs):
    """The child read shard by shard from its files trains exactly as the child loaded whole; the random twin is
    drawn shard by shard (RandomWeights: another seeded draw than the whole-model one) and learns as well."""
    rows = {name: {r["name"]: r for r in train_runs[name]["rows"]} for name in ("one", "two")}
    assert sorted(rows["two"]) == sorted(rows["one"]) == ["random", "subclone"]
    for key in ("start", "final", "best"):
        assert rows["two"]["subclone"][key] == pytest.approx(rows["one"]["subclone"][key], rel=1e-5), key
    twin, whole_twin = rows["two"]["random"], rows["one"]["random"]
    assert twin["status"] == "done" and twin["final"] < twin["start"]
    assert twin["start"] == pytest.approx(whole_twin["start"], abs=0.2)  # the same initial distribution
    one, two = train_runs["dir"] / "train-one", train_runs["dir"] / "train-two"
    sharded, single = (load_file(d / "subclone" / "model.safetensors") for d in (two, one))
    assert sorted(sharded) == sorted(single)
    for key, tensor in single.items():
        torch.testing.assert_close(sharded[key], tensor, rtol=1e-4, atol=1e-5)
    assert read_manifest(two / "random").parent.twin_of is not None


@pytest.mark.slow
def test_each_process_materializes_only_its_own_shards(llama_dir, tmp_path):
    """Under torchrun, with from_pretrained forbidden: each of 2 processes holds half of the child's parameters,
    whose gathered values are the file's; the tied head stays tied, the rotary buffers are computed; the random
    twin's gathered values are the ones a single process draws."""
    torchrun(Path(__file__), llama_dir, tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["total"]
    assert sum(r["local"] for r in reports) == total
    for report in reports:
        assert report["built_on_meta"] and report["tied"] and report["buffers_match"]
        assert abs(report["local"] - total / 2) <= 0.05 * total  # about half: row counts round up
        assert report["child_max_diff"] == 0.0
        assert report["twin"] == reports[0]["twin"]
    twin = _twin_whole(llama_dir)
    for name, value in reports[0]["twin"].items():
        assert value == pytest.approx(twin[name], rel=1e-6), name


def test_fsdp_loading_builds_the_child_on_meta_without_reading_it_whole(llama_dir, monkeypatch):
    """`train --fsdp` reads the folder's config and tokenizer only; without --fsdp it loads the weights whole."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained loaded the whole child")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    child, weights = load_training_child(str(llama_dir), fsdp=True)
    assert is_meta(child.model) and all(p.is_meta for p in child.model.parameters())
    assert all(p.dtype == torch.float32 for p in child.model.parameters())
    assert weights == FolderWeights(llama_dir) and child.preprocessor is not None and child.task == "causal-lm"
    twin, twin_weights = random_twin(child.model, 3, meta=True)
    assert is_meta(twin.model) and twin_weights == RandomWeights(3)
    with pytest.raises(SubcloneError, match="whole child"):  # load_parent words the failure
        load_training_child(str(llama_dir), fsdp=False)


@pytest.mark.parametrize("family", sorted(tm.FAMILIES))
def test_random_weights_draw_each_family_like_its_own_init(family):
    """RandomWeights runs the model's own _init_weights group by group: the same values on every call, norms and
    biases and buffers as a whole-model init, matrices of the same scale (GPT-2's rescaled c_proj included)."""
    torch.manual_seed(0)
    reference = tm.FAMILIES[family]()
    draws = []
    for _ in range(2):
        with meta_init():
            model = type(reference)(reference.config)
        tie_on_meta(model)
        materialize(model, RandomWeights(0), torch.device("cpu"))
        draws.append(model.state_dict())
    for name, expected in reference.state_dict().items():
        drawn = draws[0][name]
        torch.testing.assert_close(draws[1][name], drawn, rtol=0, atol=0)
        if drawn.dim() >= 2:
            assert 0.7 < float(drawn.std() / expected.std()) < 1.4, name
        else:
            torch.testing.assert_close(drawn, expected, msg=name)


def _twin_whole(folder: Path) -> dict[str, float]:
    """The random twin of the child in ``folder`` drawn in this one process: a checksum per parameter."""
    child, _ = load_training_child(str(folder), fsdp=True)
    twin, weights = random_twin(child.model, 0, meta=True)
    tie_on_meta(twin.model)
    materialize(twin.model, weights, torch.device("cpu"))
    return {name: _checksum(p) for name, p in twin.model.named_parameters()}


def _checksum(tensor: torch.Tensor) -> float:
    """A position-sensitive sum of a tensor's values (float64), to compare draws across processes."""
    flat = tensor.detach().double().reshape(-1)
    return float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).sin()).sum())


def _shard_report(folder: Path, out: Path) -> None:
    """What this torchrun process holds once the child of ``folder`` and its random twin are built on the meta
    device, sharded and filled as `train --fsdp` does (any whole load of the child fails the run)."""
    from accelerate import Accelerator
    from safetensors.torch import load_file as read

    from subclone_core.training.parallel import Sharded

    transformers.PreTrainedModel.from_pretrained = classmethod(lambda *a, **k: sys.exit("loaded the child whole"))
    acc = Accelerator(cpu=True)
    child, weights = load_training_child(str(folder), fsdp=True)
    twin, twin_weights = random_twin(child.model, 0, meta=True)
    built_on_meta = is_meta(child.model) and is_meta(twin.model)
    with meta_init():
        buffers = dict(type(child.model)(child.model.config).named_buffers())
    model, twin_model = Sharded(acc).wrap(child.model, weights), Sharded(acc).wrap(twin.model, twin_weights)
    files = read(str(folder / "model.safetensors"))
    report = {
        "built_on_meta": built_on_meta,
        "local": sum(p.to_local().numel() for p in model.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "buffers_match": all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()),
        # full_tensor() all-gathers: every process calls it for every parameter, in the same order
        "child_max_diff": max(float((p.full_tensor() - files[n].float()).abs().max())
                              for n, p in model.named_parameters()),
        "twin": {n: _checksum(p.full_tensor()) for n, p in twin_model.named_parameters()},
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    # leave together: a process that exits while its peer is still in gloo's last collective aborts it
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _shard_report(Path(sys.argv[1]), Path(sys.argv[2]))
