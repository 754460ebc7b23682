"""`subclone make`, `inspect` and `info` on tiny local parents: the contract of DESIGN.md, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subclone_core.core.manifest import CalibrationRecord
from subclone_core.io.saving import read_manifest
from tests import tiny_models as tm
from tests.cli_runner import run_cli


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A corpus of tiny-vocabulary words (w3..w60) the tiny tokenizer knows."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(3, tm.VOCAB, (6000,), generator=gen).tolist()
    paragraphs = [" ".join(f"w{w}" for w in words[i:i + 300]) for i in range(0, len(words), 300)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def test_make_writes_a_plain_hugging_face_folder(llama_dir, text_file, tmp_path):
    out = tmp_path / "child"
    code, stdout, err = run_cli(["make", "--parent", llama_dir, "--out", out, "--layers", 3, "--heads", 4,
                                 "--kv-heads", 1, "--ffn", 24, "--data", text_file, "--calib-tokens", 512,
                                 "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["shape"] == {"layers": 3, "hidden": 32, "heads": 4, "kv_heads": 1, "ffn": 24, "head_dim": 8}
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "subclone.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 1
    assert AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == [5, 6]
    manifest = read_manifest(out)
    assert manifest.parent.id == str(llama_dir) and len(manifest.parent.weights_sha256) == 64
    assert manifest.calibration == CalibrationRecord(str(text_file), 512)
    assert len(manifest.removed_blocks) == 1 and manifest.removed_blocks[0] not in (0, 3)
    assert "subclone" in (out / "README.md").read_text()


@pytest.mark.parametrize("flags,message", [
    (["--layers", 9], "layers=9 is larger than the parent's 4; use at most 4"),
    (["--hidden", 0], "--hidden: '0' is not a positive integer"),
    (["--heads", 5, "--kv-heads", 2], "nearest valid heads=4"),
    (["--heads", 8, "--kv-heads", 1], "use kv_heads>=2 or heads<=4"),
    (["--drop", "1,9"], "out of range; valid blocks are 0..3"),
    (["--strategy", "first-k", "--drop", "1", "--layers", 2], "use layers=3"),
])
def test_bad_shapes_exit_non_zero_with_one_line_and_write_nothing(llama_dir, text_file, tmp_path,
                                                                  flags, message):
    out = tmp_path / "child"
    code, _, err = run_cli(["make", "--parent", llama_dir, "--out", out, "--data", text_file, *flags])
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_output_folder_is_refused_before_loading(llama_dir, tmp_path):
    out = tmp_path / "child"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["make", "--parent", tmp_path / "no-such-parent", "--out", out])
    assert code != 0 and "exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, vocab_size=30)).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(["make", "--parent", tmp_path / "bert", "--out", tmp_path / "c"])
    assert code != 0 and "model_type='bert'" in err and "llama" in err and "gpt2" in err
    assert not (tmp_path / "c").exists()


def test_data_free_strategy_needs_no_data(llama_dir, tmp_path):
    code, _, err = run_cli(["make", "--parent", llama_dir, "--out", tmp_path / "u", "--strategy", "uniform",
                                 "--layers", 2, "--json"])
    assert code == 0, err
    manifest = read_manifest(tmp_path / "u")
    assert manifest.calibration is None and manifest.kept_blocks == [0, 1]
    assert manifest.selection["residual"] == list(range(64))


def test_inspect_writes_importance_and_block_statistics(llama_dir, text_file, tmp_path):
    out = tmp_path / "imp.json"
    code, stdout, err = run_cli(["inspect", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 256,
                                 "--out", out])
    assert code == 0, err
    report = json.loads(out.read_text())
    assert len(report["residual"]) == 64 and len(report["heads"]) == 4 and len(report["heads"][0]) == 8
    assert len(report["rel_magnitude"]) == 4 and report["tokens"] == 256
    assert "lowest relative magnitude at block" in stdout
