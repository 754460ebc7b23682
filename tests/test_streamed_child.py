"""A child written to disk tensor by tensor as it is made (io.saving.StreamedWeights): the folder equals what
save_pretrained writes of the same child in memory, for every family, tied or not, in one file or in shards."""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import partial

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.io.saving import StreamedWeights, write_model_files
from subclone_core.sources.parents import load_parent
from tests import tiny_models as tm
from tests.test_core_refit import calibration, items_of, narrow_sizes


def tensors_of(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder's safetensors files, by name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def streamed_child(parent, target, imp, folder, *, refit: bool, max_shard_size="5GB", untie_head=False):
    """The child of subclone_model with its tensors streamed into `folder` and its config files written."""
    writers = []

    def open_sink(model):
        writers.append(StreamedWeights(folder, model, max_shard_size))
        return writers[-1]
    child = subclone_model(parent, target, importance=imp, refit=refit, refit_items=items_of(parent),
                           untie_head=untie_head, open_sink=open_sink)
    for w in writers:
        w.close()
    write_model_files(child.model, folder, weights_written=True)
    return child, writers


@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_a_streamed_child_is_the_folder_save_pretrained_writes_of_the_child_in_memory(family, tmp_path):
    parent = tm.make(family, dtype=torch.float32)
    imp = calibration(parent)
    target = plan_shape(parent, **narrow_sizes(family, Shape.of(parent.config)))
    for refit in (False, True):
        memory = subclone_model(parent, target, importance=imp, refit=refit, refit_items=items_of(parent)).model
        saved, streamed = tmp_path / f"saved-{refit}", tmp_path / f"streamed-{refit}"
        memory.save_pretrained(saved)
        streamed.mkdir()
        child, writers = streamed_child(parent, target, imp, streamed, refit=refit)
        assert writers and all(p.is_meta for p in child.model.parameters())  # never built in memory
        want, got = tensors_of(saved), tensors_of(streamed)
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name
        assert json.loads((streamed / "config.json").read_text()) == json.loads((saved / "config.json").read_text())
        assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in saved.iterdir())
        reloaded = type(memory).from_pretrained(streamed).eval()
        batch = tm.inputs(memory)
        torch.testing.assert_close(tm.output(reloaded, batch), tm.output(memory, batch), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "llama-untied"])
def test_a_streamed_child_in_shards_has_the_index_save_pretrained_writes(family, tmp_path):
    parent = tm.make(family, dtype=torch.float32)
    imp = calibration(parent)
    target = plan_shape(parent, **narrow_sizes(family, Shape.of(parent.config)))
    memory = subclone_model(parent, target, importance=imp, refit=True, refit_items=items_of(parent)).model
    memory.save_pretrained(tmp_path / "saved", max_shard_size=20_000)
    (tmp_path / "streamed").mkdir()
    streamed_child(parent, target, imp, tmp_path / "streamed", refit=True, max_shard_size=20_000)
    index = [json.loads((tmp_path / f / "model.safetensors.index.json").read_text()) for f in ("saved", "streamed")]
    assert index[1] == index[0] and len(set(index[0]["weight_map"].values())) > 1
    assert tensors_of(tmp_path / "streamed").keys() == tensors_of(tmp_path / "saved").keys()


def test_streamed_weights_refuse_a_wrong_tensor_and_a_missing_one(tmp_path):
    model = tm.make("llama", dtype=torch.float32)
    config = AutoConfig.for_model(**model.config.to_dict())
    from subclone_core.core.building import empty_model
    empty = empty_model(type(model), config, torch.float32)
    writer = StreamedWeights(tmp_path, empty)
    with pytest.raises(SubcloneError, match="the model's is"):
        writer("model.norm.weight", torch.zeros(3))
    with pytest.raises(SubcloneError, match="not one of the model's"):
        writer("model.nothing", torch.zeros(3))
    writer("model.norm.weight", torch.ones(model.config.hidden_size))
    with pytest.raises(SubcloneError, match="never written"):
        writer.close()


def test_on_a_cpu_with_bfloat16_products_the_refit_runs_float32_and_bfloat16_parents_in_bfloat16(llama_dir,
                                                                                                monkeypatch):
    """Where the CPU multiplies bfloat16 in hardware (2.5x float32's rate), the refit's blocks run in bfloat16 for
    a float32 or bfloat16 parent; float16 is run in float32 and float64 keeps float64; --refit-dtype overrides the
    rule, and the plan says which dtype it runs in and records what was asked."""
    from subclone_core.workflow import children
    from subclone_core.workflow.children import refit_dtype_for
    from subclone_core.workflow.plan import resolve_plan

    monkeypatch.setattr(children, "cpu_multiplies_bfloat16", lambda: True)
    wide = load_parent(str(llama_dir), dtype="float32")
    chosen = {dtype: refit_dtype_for(dataclasses.replace(wide, model=copy.deepcopy(wide.model).to(dtype)))
              for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
    assert chosen == {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16,
                      torch.float16: torch.float32, torch.float64: torch.float64}
    assert refit_dtype_for(wide, "float32") == torch.float32 and refit_dtype_for(wide, "auto") == torch.bfloat16
    assert "block by block in bfloat16" in resolve_plan(wide).line()
    asked = resolve_plan(wide, refit_dtype="float32")
    assert "block by block in" not in asked.line() and asked.refit_dtype == "float32"
    assert asked.changed == ("refit_dtype",) and asked.make_kwargs()["refit_dtype"] == torch.float32
    assert resolve_plan(wide, refit_dtype="auto").changed == ()
    monkeypatch.setattr(children, "cpu_multiplies_bfloat16", lambda: False)
    assert refit_dtype_for(wide) == torch.float32 and "block by block in" not in resolve_plan(wide).line()


def test_the_cpus_bfloat16_instructions_are_read_from_its_flags(tmp_path, monkeypatch):
    from subclone_core.io import devices

    for flags, native in (("fpu sse2 avx2 fma", False), ("fpu avx512f avx512_bf16 avx512_vnni", True),
                          ("fpu avx512f amx_tile amx_bf16", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(devices, "CPUINFO", tmp_path / "cpuinfo")
        devices.cpu_multiplies_bfloat16.cache_clear()
        assert devices.cpu_multiplies_bfloat16() is native, flags
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "absent")
    devices.cpu_multiplies_bfloat16.cache_clear()
    assert devices.cpu_multiplies_bfloat16() is False
    devices.cpu_multiplies_bfloat16.cache_clear()


def test_a_bfloat16_parent_is_refit_with_float32_blocks_on_a_cpu_without_bfloat16_products_and_its_child_stays_bfloat16(
        llama_dir, tmp_path, monkeypatch):
    """CPUs without native bfloat16 matrix products run a bfloat16 forward several times slower than float32:
    the refit pass runs each block in float32 (the stream between blocks stays bfloat16). The child stays
    bfloat16, streamed to disk as built in memory, and is closer to the refit of the same weights in float32
    than the refit with bfloat16 blocks is."""
    from subclone_core.workflow import children
    from subclone_core.workflow.children import (
        make_child,
        make_child_into_folder,
        measure_importance,
        refit_dtype_for,
    )
    from subclone_core.workflow.plan import resolve_plan

    monkeypatch.setattr(children, "cpu_multiplies_bfloat16", lambda: False)
    half = load_parent(str(llama_dir), dtype="bfloat16")
    wide = dataclasses.replace(half, model=copy.deepcopy(half.model).float())  # the same weights, upcast exactly
    assert refit_dtype_for(half) == torch.float32 and refit_dtype_for(wide) == torch.float32
    plan = resolve_plan(half)
    assert "refit on child inputs, block by block in float32" in plan.line() and "cpu, bfloat16" in plan.line()
    assert "block by block in" not in resolve_plan(wide).line()  # said only where it differs from the parent's
    imp = measure_importance(wide, tokens=256)
    target = plan_shape(half.model, **narrow_sizes("llama", Shape.of(half.model.config)))
    kwargs = {"importance": imp, "calib_tokens": 256, "refit": True}
    child = make_child(half, target, **kwargs).model.state_dict()
    want = make_child(wide, target, **kwargs).model.state_dict()
    half_blocks = make_child(half, target, **kwargs, refit_dtype="bfloat16").model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in child.values())
    error = {name: sum(float((got[k].float() - want[k]).norm()) for k in want)
             for name, got in (("float32 blocks", child), ("bfloat16 blocks", half_blocks))}
    assert error["float32 blocks"] < error["bfloat16 blocks"], error
    make_child_into_folder(partial(make_child, half, target, **kwargs), tmp_path / "streamed", task=half.task)
    streamed = tensors_of(tmp_path / "streamed")
    assert streamed and all(t.dtype == torch.bfloat16 for t in streamed.values())
    for name, tensor in streamed.items():
        assert torch.equal(tensor, child[name]), name


def test_a_pass_with_float32_blocks_shares_the_parents_other_tensors_and_keeps_its_stream():
    """open_pass(block_dtype=float32) over a bfloat16 parent in memory: the embedding and head are the parent's
    own tensors (not float32 copies: those would double their memory), a loaded block runs in float32 and the
    stored stream between blocks stays bfloat16."""
    from subclone_core.pipeline.passes import (
        activation_store,
        forward_block,
        loaded_block,
        module_tensor,
        open_pass,
    )

    parent = tm.make("llama", dtype=torch.bfloat16)
    state = parent.state_dict()
    with activation_store(None, None) as store:
        p = open_pass(state, [tm.inputs(parent)], store, config=parent.config, model_class=type(parent),
                      device="cpu", dtype=torch.bfloat16, max_tokens=None, block_dtype=torch.float32)
        embed = "model.embed_tokens.weight"
        assert module_tensor(p.model, embed).data_ptr() == state[embed].data_ptr()
        with loaded_block(p, 0) as block:
            assert {t.dtype for t in block.parameters()} == {torch.float32}
            forward_block(p, 0, block, 0, 0)
        assert store[(0, 0)].dtype == torch.bfloat16
        assert all(t.is_meta for t in p.blocks[0].parameters())
