"""Sequential (block-by-block) calibration and block ablation equal the in-memory ones, read each weight once,
keep what memory does not hold on disk, and are chosen by default only for a parent whose memory budget did not
hold it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

from subclone_core.analysis import probes
from subclone_core.analysis.probes import block_ablation
from subclone_core.core.calibration import _TENSOR_FIELDS
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.io.activations import ActivationStore
from subclone_core.io.streaming import tensor_files
from subclone_core.pipeline.calibration import ablate_sequential, calibrate, calibrate_sequential
from subclone_core.sources.parents import load_parent
from subclone_core.workflow import children as workflow
from tests import tiny_models as tm

# every family, GPT-NeoX and ViT included: their checkpoints keep names transformers renames on loading
# (embed_out, encoder.layer), which the sequential reader follows
FAMILIES = list(tm.FAMILIES)


def _batches(model):
    # three batches, one with left padding, so masks and per-batch kwargs both matter
    return [tm.inputs(model, batch=3, seq=7, seed=s, pad=2 if s == 1 else 0) for s in range(3)]


def _assert_same(ref, got):
    for name in (*_TENSOR_FIELDS, "residual_read"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-12, msg=name)
    assert got.tokens == ref.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_equals_in_memory_and_keeps_the_same_indices(family, tmp_path):
    tm.save_parent_folder(family, tmp_path)
    auto = AutoModelForImageClassification if family == "vit" else AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path).eval()
    batches = _batches(model)
    ref = calibrate(model, batches)
    stats = {}
    got = calibrate_sequential(tmp_path, batches, dtype=model.dtype, stats=stats)
    _assert_same(ref, got)
    # every tensor of the checkpoint is read exactly once
    assert stats["tensors_read"] == len(tensor_files(tmp_path))
    # the image model's hidden size must stay a multiple of its heads
    shape = plan_shape(model, hidden=model.config.hidden_size // 2, heads=model.config.num_attention_heads // 2,
                       layers=model.config.num_hidden_layers - 1)
    kept = [subclone_model(model, shape, importance=imp, refit=False).selection for imp in (ref, got)]
    assert kept[0] == kept[1]


def test_token_budget_and_progress_match(tmp_path):
    tm.save_parent_folder("llama", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batches = _batches(model)
    ref = calibrate(model, batches, max_tokens=25)
    seen = []
    got = calibrate_sequential(tmp_path, batches, max_tokens=25, progress=lambda d, t: seen.append((d, t)))
    assert got.tokens == ref.tokens < sum(b["attention_mask"].sum() for b in batches)
    torch.testing.assert_close(got.ffn, ref.ffn, rtol=1e-6, atol=1e-12)
    layers = model.config.num_hidden_layers
    assert seen == [((i + 1) * ref.tokens, layers * ref.tokens) for i in range(layers)]


def test_a_folder_without_safetensors_is_a_clear_error(tmp_path):
    model = tm.save_parent_folder("qwen3", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SubcloneError, match="Qwen3 parent reads its safetensors files"):
        calibrate_sequential(tmp_path, _batches(model))


def test_default_is_sequential_only_when_the_budget_did_not_hold_the_parent(tmp_path, counting_text_file,
                                                                            monkeypatch):
    tm.save_parent_folder("llama", tmp_path)
    in_memory = load_parent(str(tmp_path))
    offloaded = load_parent(str(tmp_path), max_memory="24KB")
    assert not workflow.needs_sequential(in_memory)
    assert workflow.needs_sequential(offloaded)
    used = []
    real = workflow.calibrate_sequential
    monkeypatch.setattr(workflow, "calibrate_sequential", lambda *a, **k: used.append(1) or real(*a, **k))
    kwargs = {"tokens": 512, "batch_size": 2}
    ref = workflow.measure_importance(in_memory, str(counting_text_file), **kwargs)
    assert not used
    got = workflow.measure_importance(offloaded, str(counting_text_file), **kwargs)
    assert used == [1]
    _assert_same(ref, got)
    forced = workflow.measure_importance(in_memory, str(counting_text_file), sequential=True, **kwargs)
    assert used == [1, 1]
    _assert_same(ref, forced)
    workflow.measure_importance(offloaded, str(counting_text_file), sequential=False, **{**kwargs, "tokens": 128})
    assert used == [1, 1]


def test_cli_sequential_flag_gives_the_same_report_and_child(tmp_path, counting_text_file):
    from subclone_core.cli.main import main

    parent = tmp_path / "parent"
    tm.save_parent_folder("qwen3", parent)
    common = ["--parent", str(parent), "--data", str(counting_text_file), "--calib-tokens", "256"]
    reports = {}
    for flag in ("--sequential", "--no-sequential"):
        out = tmp_path / f"{flag}.json"
        assert main(["inspect", *common, flag, "--out", str(out)]) == 0
        reports[flag] = json.loads(out.read_text())
    for name in (*_TENSOR_FIELDS, "residual_read"):
        torch.testing.assert_close(torch.tensor(reports["--sequential"][name]),
                                   torch.tensor(reports["--no-sequential"][name]), rtol=1e-6, atol=1e-12)
    shape = ["--layers", "3", "--hidden", "16"]
    for flag in ("--sequential", "--no-sequential"):
        assert main(["make", *common, *shape, flag, "--out", str(tmp_path / f"child{flag}")]) == 0
    a, b = (load_file(tmp_path / f"child{flag}" / "model.safetensors") for flag in ("--sequential", "--no-sequential"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# --- the refit, block by block from the files ----------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox", "phi3"])
def test_an_offloaded_parents_refit_from_its_files_equals_the_in_memory_refit(family, tmp_path, counting_text_file):
    """The refit reads each block once from the checkpoint when the parent is offloaded, with its hidden states
    spilled to disk, and gives the child the in-memory parent gives."""
    tm.save_parent_folder(family, tmp_path / "parent")
    in_memory = load_parent(str(tmp_path / "parent"))
    offloaded = load_parent(str(tmp_path / "parent"), max_memory="24KB")
    shape = Shape.of(in_memory.model.config)
    target = plan_shape(in_memory.model, hidden=shape.hidden // 2, heads=shape.heads // 2, layers=shape.layers - 1)
    kwargs = {"data_id": str(counting_text_file), "calib_tokens": 256}
    ref = workflow.make_child(in_memory, target, **kwargs).model.state_dict()
    stats = {}
    got = workflow.make_child(offloaded, target, activation_memory=0, stats=stats, **kwargs)
    assert got.manifest.refit is True
    state = got.model.state_dict()
    for name, tensor in ref.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    files = len(tensor_files(tmp_path / "parent"))  # each weight read once by calibration, once by the refit
    assert stats["calibration"]["tensors_read"] == stats["refit"]["tensors_read"] == files
    assert stats["refit"]["activation_bytes_on_disk"] > 0


# --- hidden states on disk ------------------------------------------------------------------------------


def test_the_store_keeps_what_its_budget_holds_in_memory_and_the_rest_on_disk(tmp_path):
    a, b, c = (torch.full((2, 3), float(i)) for i in range(3))  # 24 bytes each
    with ActivationStore(budget=50, root=tmp_path / "spill") as store:
        store[(0, 0)], store[(0, 1)], store[(1, 0)] = a, b, c
        assert set(store.memory) == {(0, 0), (0, 1)} and store.on_disk == {(1, 0)}
        assert store.bytes_in_memory == 48 and store.bytes_written == 24
        assert torch.equal(store[(1, 0)], c) and torch.equal(store[(0, 1)], b)
        folder = next((tmp_path / "spill").iterdir())
        store.discard_stream(1)
        assert (1, 0) not in store and not list(folder.iterdir())
        store[(2, 0)] = c  # memory still holds 48 bytes: to disk
        assert store.on_disk == {(2, 0)}
        store.discard((0, 0))
        store[(2, 0)] = a  # replacing a key frees its old place first
        assert (2, 0) in store.memory and not store.on_disk
    assert not folder.exists()  # closing removes the folder


def test_calibration_with_every_hidden_state_on_disk_is_the_same(tmp_path):
    model = tm.save_parent_folder("gemma3", tmp_path / "parent")
    batches = _batches(model)
    ref = calibrate_sequential(tmp_path / "parent", batches)
    stats = {}
    got = calibrate_sequential(tmp_path / "parent", batches, stats=stats, activation_memory=0,
                               activation_root=tmp_path / "spill")
    _assert_same(ref, got)
    per_block = sum(b["attention_mask"].numel() for b in batches) * model.config.hidden_size * 4
    assert stats["activation_bytes_on_disk"] == per_block * (model.config.num_hidden_layers + 1)
    assert not list((tmp_path / "spill").iterdir())  # removed afterwards


# --- block ablation ---------------------------------------------------------------------------------


def _labelled(model):
    batches = _batches(model)
    for batch in batches:
        if "pixel_values" in batch:
            batch["labels"] = torch.arange(batch["pixel_values"].shape[0]) % model.config.num_labels
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batches


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_block_ablation_equals_the_in_memory_one(family, tmp_path):
    tm.save_parent_folder(family, tmp_path / "parent")
    auto = AutoModelForImageClassification if family == "vit" else AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path / "parent").eval()
    batches = _labelled(model)
    ref = block_ablation(model, batches)
    stats, seen = {}, []
    got = ablate_sequential(tmp_path / "parent", batches, dtype=model.dtype, stats=stats,
                            on_block=lambda i, metrics: seen.append(i),
                            activation_memory=0 if family == "llama" else None, activation_root=tmp_path)
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(value), rtol=1e-6, atol=1e-7, msg=name)
    assert stats["tensors_read"] == len(tensor_files(tmp_path / "parent"))  # every weight read once
    assert seen == list(range(-1, model.config.num_hidden_layers))


def test_inspect_ablation_block_by_block_gives_the_in_memory_losses(tmp_path, counting_text_file):
    from subclone_core.cli.main import main

    parent = tmp_path / "parent"
    tm.save_parent_folder("qwen3", parent)
    common = ["--parent", str(parent), "--data", str(counting_text_file), "--calib-tokens", "256", "--ablation",
              "--ablation-tokens", "128"]
    runs = {"memory": ["--no-sequential"], "offloaded": ["--max-memory", "24KB", "--activation-memory", "4KB"]}
    reports = {}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.json"
        assert main(["inspect", *common, *flags, "--out", str(out)]) == 0
        reports[name] = json.loads(out.read_text())["ablation"]
    layers = json.loads((parent / "config.json").read_text())["num_hidden_layers"]
    assert len(reports["memory"]["losses"]) == layers
    torch.testing.assert_close(torch.tensor([reports["offloaded"]["base"], *reports["offloaded"]["losses"]]),
                               torch.tensor([reports["memory"]["base"], *reports["memory"]["losses"]]),
                               rtol=1e-5, atol=1e-6)


def test_ablate_parent_goes_block_by_block_when_calibration_would(tmp_path, counting_text_file, monkeypatch):
    tm.save_parent_folder("llama", tmp_path)
    used = []
    real = probes.ablate_sequential
    monkeypatch.setattr(probes, "ablate_sequential", lambda *a, **k: used.append(1) or real(*a, **k))
    in_memory = probes.ablate_parent(load_parent(str(tmp_path)), str(counting_text_file), 128)
    assert not used
    offloaded = probes.ablate_parent(load_parent(str(tmp_path), max_memory="24KB"), str(counting_text_file), 128)
    assert used == [1]
    torch.testing.assert_close(torch.tensor(offloaded["losses"]), torch.tensor(in_memory["losses"]), rtol=1e-5,
                               atol=1e-6)


def test_a_partly_offloaded_parent_is_read_from_memory_where_it_is_held_and_from_files_elsewhere(
        tmp_path, counting_text_file):
    """Under a budget that holds part of the parent, the passes share what memory holds (no second copy) and read
    only the offloaded tensors from the files; the child is the in-memory parent's."""
    tm.save_parent_folder("llama", tmp_path / "parent")
    in_memory = load_parent(str(tmp_path / "parent"))
    partly = load_parent(str(tmp_path / "parent"), max_memory="200KB")  # the embedding and block 0 held
    held = sum(not t.is_meta for t in partly.model.state_dict().values())
    assert 0 < held < len(partly.model.state_dict())
    target = plan_shape(in_memory.model, hidden=16, heads=2, kv_heads=1, layers=3)
    kwargs = {"data_id": str(counting_text_file), "calib_tokens": 256}
    ref = workflow.make_child(in_memory, target, **kwargs).model.state_dict()
    stats = {}
    got = workflow.make_child(partly, target, stats=stats, **kwargs).model.state_dict()
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    files = len(tensor_files(tmp_path / "parent"))
    assert 0 < stats["calibration"]["tensors_read"] < files and 0 < stats["refit"]["tensors_read"] < files
