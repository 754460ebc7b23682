"""Parents at real scale, in miniature: a bf16 parent in several shards, placed in memory, offloaded to disk
and split over accelerate's hooks, gives the same calibration and the same child; the streaming builder reads
one parent tensor at a time; children are sharded; bad placement flags are one-line errors."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from accelerate import dispatch_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from subclone_core.cli.main import main
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import subclone_model
from subclone_core.io import streaming
from subclone_core.io.placement import memory_by_device, parse_max_memory
from subclone_core.sources.parents import describe, load_parent
from subclone_core.workflow.children import make_child, save_child
from tests import tiny_models as tm

TARGET = Shape(layers=3, hidden=16, heads=4, kv_heads=2, head_dim=8, ffn=24)
SHAPE_FLAGS = ["--layers", 3, "--hidden", 16, "--heads", 4, "--kv-heads", 2, "--ffn", 24]


@pytest.fixture(scope="module")
def bf16_parent_dir(tmp_path_factory):
    """A 4-block Llama (8 heads / 2 KV heads, hidden 64, tied head) in bf16, saved in several shards."""
    path = tmp_path_factory.mktemp("parents") / "llama-bf16"
    torch.manual_seed(0)
    model = tm.llama(layers=4).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="20KB")
    tm.tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(3, tm.VOCAB, (3000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(f"w{w}" for w in words[i:i + 300]) for i in range(0, 3000, 300)))
    return path


def child_of(parent, text_file, **options):
    child = make_child(parent, TARGET, data_id=str(text_file), calib_tokens=512, **options)
    manifest = {k: v for k, v in child.manifest.to_json().items() if k != "created"}
    return manifest, child.model.state_dict(), child.importance


def test_streamed_child_equals_the_in_memory_slicer(bf16_parent_dir, text_file):
    parent = load_parent(str(bf16_parent_dir), dtype="float32")  # streamed bf16 tensors are cast as loaded
    _, streamed, importance = child_of(parent, text_file, refit=False)  # sliced from the files, tensor by tensor
    in_memory = subclone_model(parent.model, TARGET, importance=importance, refit=False).model.state_dict()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in in_memory)
    assert {t.dtype for t in streamed.values()} == {torch.float32}


def split_over_hooks(parent):
    """The parent dispatched by accelerate over a device map of two placements (alternate blocks; on a machine
    without GPUs both are the CPU), with accelerate's hooks on every placed module as on a multi-GPU parent."""
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb"]
    device_map = {name: "cpu" for name in names} | {"lm_head": "cpu"}
    dispatch_model(parent.model, device_map=device_map, main_device="cpu", force_hooks=True)
    return parent


@pytest.mark.usefixtures("one_thread")
def test_placements_give_the_same_child(bf16_parent_dir, text_file):
    in_memory = load_parent(str(bf16_parent_dir))
    offloaded = load_parent(str(bf16_parent_dir), max_memory="24KB")
    split = split_over_hooks(load_parent(str(bf16_parent_dir)))
    assert in_memory.dtype == torch.bfloat16
    assert "disk" in memory_by_device(offloaded.model)
    assert any(p.is_meta for p in offloaded.model.parameters())  # really not in memory
    reference_manifest, reference, _ = child_of(in_memory, text_file)
    for placed in (offloaded, split):
        manifest, weights, _ = child_of(placed, text_file)
        assert manifest == reference_manifest
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert all(t.dtype == torch.bfloat16 for t in reference.values())


def test_streaming_reads_each_parent_tensor_once_and_lets_it_go(bf16_parent_dir, text_file, monkeypatch):
    parent = load_parent(str(bf16_parent_dir))
    alive, most = set(), [0]
    read = streaming.CheckpointTensors.__getitem__

    def counted(self, name):
        tensor = read(self, name)
        alive.add(id(tensor))
        most[0] = max(most[0], len(alive))
        weakref.finalize(tensor, alive.discard, id(tensor))
        return tensor

    monkeypatch.setattr(streaming.CheckpointTensors, "__getitem__", counted)
    monkeypatch.setattr(type(parent.model), "state_dict", _refuse_values(type(parent.model).state_dict))
    make_child(parent, TARGET, data_id=str(text_file), calib_tokens=256, refit=False)  # the slicing builder
    assert most[0] == 1  # never two parent tensors in memory at once, let alone the whole state dict


def _refuse_values(state_dict):
    """state_dict whose names may be read (streaming matches them) but whose tensors must not be sliced."""
    def names_only(self, *args, **kwargs):
        return {name: torch.empty(0, device="meta") for name in state_dict(self, *args, **kwargs)}
    return names_only


def test_make_offloaded_bf16_child_in_shards_loads_in_stock_transformers(bf16_parent_dir, text_file, tmp_path,
                                                                         capsys):
    out = tmp_path / "child"
    code = main([str(a) for a in ["make", "--parent", bf16_parent_dir, "--dtype", "bfloat16", "--max-memory", "24KB",
                                  "--max-shard-size", "10KB", "--data", text_file, "--calib-tokens", 512,
                                  "--out", out, *SHAPE_FLAGS]])
    assert code == 0, capsys.readouterr().err
    index = json.loads((out / streaming.INDEX_NAME).read_text())
    shards = sorted({out / f for f in index["weight_map"].values()})
    assert len(shards) > 1 and all(path.is_file() for path in shards)
    assert not (out / "model.safetensors").exists()
    with safe_open(str(shards[0]), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 - not a dict
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    _, reference, _ = child_of(load_parent(str(bf16_parent_dir)), text_file)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_dtype_flag_sets_the_child_dtype(bf16_parent_dir, text_file, tmp_path):
    parent = load_parent(str(bf16_parent_dir), dtype="float32")
    child = make_child(parent, TARGET, strategy="uniform")
    out = save_child(child, tmp_path / "child", task=parent.task)
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.float32
    assert (out / "model.safetensors").is_file()  # small child: one file, no index
    assert describe(parent)["dtype"] == "float32"


def exit_code(args: list) -> int:
    """The CLI's exit status, run in this process (argparse exits on a value it refuses while parsing)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("flags, named", [
    (["--dtype", "int8"], "'int8'"),
    (["--max-memory", "lots"], "'lots'"),
    (["--max-memory", "gpu7=3GiB"], "'gpu7'"),
    (["--max-shard-size", "big"], "'big'"),
    (["--device", "tpu"], "'tpu'"),
    (["--activation-memory", "half"], "'half'"),
])
def test_bad_placement_values_are_one_line_errors(flags, named, bf16_parent_dir, tmp_path, capsys):
    code = exit_code(["make", "--parent", bf16_parent_dir, "--out", tmp_path / "c", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["inspect", "explore"])
def test_a_bad_activation_memory_is_refused_before_loading(command, tmp_path, capsys):
    extra = {"inspect": ["--out", tmp_path / "i.json"], "explore": ["--params", "10k"]}[command]
    code = exit_code([command, "--parent", tmp_path / "missing", "--activation-memory", "0MB", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--activation-memory: '0MB' is not a positive size" in err
    assert not (tmp_path / "i.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("command", ["info", "inspect", "make", "explore"])
def test_cuda_without_a_gpu_is_a_one_line_error(command, bf16_parent_dir, tmp_path, capsys):
    extra = {"inspect": ["--out", tmp_path / "i.json"], "make": ["--out", tmp_path / "c"],
             "explore": ["--params", "10k"]}.get(command, [])
    code = main([str(a) for a in [command, "--parent", bf16_parent_dir, "--device", "cuda", *extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no CUDA GPU" in err


def test_max_memory_budgets():
    assert parse_max_memory("12GiB", "cpu") == {"cpu": 12 * 2**30}
    assert parse_max_memory("cpu=500MB", "auto") == {"cpu": 500 * 10**6}
    assert parse_max_memory(None, "cpu") is None
