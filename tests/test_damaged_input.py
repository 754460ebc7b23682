"""Damaged and hostile model files (issue 30): sizes checked against the weights before anything is built,
missing or extra tensors refused by name, NaN weights refused unless allowed, a damaged cache rebuilt, and
exports that cannot be read back refused. Every refusal is one line and exit status 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf as gguf_lib
import pytest
import torch
from safetensors.torch import load_file, save_file

from subclone_core.core.errors import SubcloneError
from tests.test_adversarial import edit_json, run_cli
from tests.test_sources_parents import fake_embedded, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def edit_weights(folder: Path, edit) -> None:
    """Rewrite model.safetensors with ``edit(state)`` applied to its tensors."""
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def cli_in_subprocess(args, env_extra: dict | None = None) -> tuple[int, str]:
    """Run the CLI in its own process (a refusal that never came would grow memory there, not here); the
    timeout is only a safety net against a hang, never a measured assertion."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "subclone_core.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    return proc.returncode, proc.stderr


def one_line(stderr: str) -> str:
    """The one error line of stderr, leaving out warnings and the line announcing a GGUF conversion that began
    (no progress bar: the GGUF reader's own tqdm bar is hidden as transformers' are)."""
    lines = [line for line in stderr.strip().splitlines()
             if line.strip() and "Warning" not in line and not line.startswith("converting ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def refused(args, *needles: str) -> str:
    """The CLI, run in this process, refuses ``args`` with exit status 2 and one line holding every needle."""
    code, _, err = run_cli(args)
    line = one_line(err)
    assert code == 2, err[-2000:]
    assert all(needle in line for needle in needles), line
    return line


# --- 1. sizes checked before anything is allocated ------------------------------------------------------


def test_a_config_claiming_a_million_blocks_is_refused_before_loading(llama_dir, tmp_path):
    folder = copy_of(llama_dir, tmp_path)
    edit_json(folder, "config.json", num_hidden_layers=1_000_000)
    code, err = cli_in_subprocess(["info", "--parent", folder])
    line = one_line(err)
    assert code == 2, err[-2000:]
    assert "num_hidden_layers=1000000" in line and "num_hidden_layers<=4" in line, line


@pytest.mark.parametrize("key, value, needle", [
    ("vocab_size", 10**12, "vocab_size=1000000000000"),
    ("hidden_size", 2**30, "hidden_size=1073741824"),
])
def test_implausible_config_sizes_name_the_valid_range(llama_dir, tmp_path, key, value, needle):
    folder = copy_of(llama_dir, tmp_path)
    edit_json(folder, "config.json", **{key: value})
    line = refused(["info", "--parent", folder], "config.json")
    assert needle in line and ("valid: an integer from 1 to" in line or "weight files hold" in line), line


def lying_gguf(path: Path, monkeypatch, **claims) -> Path:
    """The tiny GGUF with header values replaced by ``claims`` (GGUFWriter method -> value written)."""
    with monkeypatch.context() as patch:
        for method, value in claims.items():
            original = getattr(gguf_lib.GGUFWriter, method)
            patch.setattr(gguf_lib.GGUFWriter, method, lambda self, _, o=original, v=value: o(self, v))
        return write_tiny_gguf(path)


@pytest.mark.parametrize("method, value, needle", [
    ("add_block_count", 1_000_000, "llama.block_count=1000000"),
    ("add_embedding_length", 10**9, "llama.embedding_length=1000000000"),
])
def test_a_gguf_header_claiming_huge_sizes_is_refused_before_conversion(tmp_path, monkeypatch, method, value,
                                                                         needle):
    path = lying_gguf(tmp_path / "huge.gguf", monkeypatch, **{method: value})
    code, err = cli_in_subprocess(["info", "--parent", path], {"SUBCLONE_CACHE": str(tmp_path / "cache")})
    line = one_line(err)
    assert code == 2, err[-2000:]
    assert needle in line and "huge.gguf" in line and "valid" in line, line


# --- 2. missing, extra and mis-shaped tensors are errors, by name --------------------------------------


def drop_tensor(name):
    return lambda state: state.pop(name)


@pytest.mark.parametrize("config, weights, needles", [
    ({"num_hidden_layers": 5}, None, ["num_hidden_layers=5", "num_hidden_layers<=4"]),  # fewer blocks than said
    ({"num_hidden_layers": 3}, None, ["unexpected tensors model.layers.3."]),  # more blocks than said
    ({}, drop_tensor("model.layers.1.mlp.up_proj.weight"), ["missing tensors model.layers.1.mlp.up_proj.weight"]),
    ({}, drop_tensor("model.norm.weight"), ["missing tensors model.norm.weight"]),
    ({"intermediate_size": 40}, None, ["model.layers.0.mlp.down_proj.weight is (64, 48) in the files but (64, 40)"]),
])
def test_weights_that_do_not_match_the_config_are_refused_by_name(llama_dir, tmp_path, config, weights,
                                                                  needles):
    folder = copy_of(llama_dir, tmp_path)
    if config:
        edit_json(folder, "config.json", **config)
    if weights:
        edit_weights(folder, weights)
    line = refused(["info", "--parent", folder], str(folder), *needles)
    assert "error" in line.lower(), line  # said as an error, not a traceback


def test_a_gguf_missing_a_block_tensor_is_refused_by_name(tmp_path, monkeypatch):
    original = gguf_lib.GGUFWriter.add_tensor
    with monkeypatch.context() as patch:
        patch.setattr(gguf_lib.GGUFWriter, "add_tensor",
                      lambda self, name, *a, **k: None if name == "blk.1.ffn_up.weight" else original(self, name, *a, **k))
        path = write_tiny_gguf(tmp_path / "holed.gguf")
    monkeypatch.setenv("SUBCLONE_CACHE", str(tmp_path / "cache"))
    line = refused(["info", "--parent", path], "holed.gguf", "missing tensors model.layers.1.mlp.up_proj.weight")
    assert "blk.1.ffn_up.weight" not in line  # named as the model names it, not as the file does


# --- 3. NaN and infinite weights -----------------------------------------------------------------------


@pytest.fixture
def nan_parent(llama_dir, tmp_path) -> Path:
    folder = copy_of(llama_dir, tmp_path)
    edit_weights(folder, lambda state: state["model.layers.2.self_attn.o_proj.weight"].__setitem__((0, 0), float("nan")))
    return folder


def test_make_refuses_a_parent_with_nan_weights_unless_allowed(nan_parent, tmp_path):
    out = tmp_path / "child"
    line = refused(["make", "--parent", nan_parent, "--out", out, "--layers", 2, "--strategy", "first-k"],
                                 "model.layers.2.self_attn.o_proj.weight", "--allow-nonfinite")
    assert "NaN" in line and not (out / "model.safetensors").exists()
    code, _, err = run_cli(["make", "--parent", nan_parent, "--out", out, "--layers", 2, "--strategy", "first-k",
                            "--allow-nonfinite"])
    assert code == 0, err[-2000:]
    assert (out / "model.safetensors").is_file()


def test_eval_says_plainly_that_the_loss_is_not_finite(nan_parent, counting_text_file):
    code, out, err = run_cli(["eval", "--parent", nan_parent, "--data", counting_text_file, "--tokens", 64,
                              "--seq-len", 16])
    assert code == 0, err[-2000:]
    assert "loss nan" in out
    assert "the loss is not finite" in err and "model.layers.2.self_attn.o_proj.weight" in err, err


@pytest.fixture
def exportable_child(tmp_path) -> Path:
    from tests.test_export_gguf import byte_level_bpe, save_child

    return save_child(tmp_path, "llama", byte_level_bpe())


def test_export_refuses_nan_weights_before_writing_and_verification_fails_when_allowed(exportable_child, tmp_path):
    edit_weights(exportable_child, lambda state: state["model.layers.0.mlp.up_proj.weight"].__setitem__((1, 1), float("inf")))
    out = tmp_path / "child.gguf"
    refused(["export", "--model", exportable_child, "--to", out], "model.layers.0.mlp.up_proj.weight",
                          "--allow-nonfinite")
    assert not out.exists()
    refused(["export", "--model", exportable_child, "--to", out, "--allow-nonfinite"],
                          "verification failed", "not finite")
    code, _, err = run_cli(["export", "--model", exportable_child, "--to", out, "--allow-nonfinite", "--no-verify",
                            "--overwrite"])
    assert code == 0, err[-2000:]


def test_a_read_back_that_differs_fails_verification(exportable_child, tmp_path):
    from subclone_core.io.gguf_export import export_gguf, verify_gguf

    path = export_gguf(exportable_child, tmp_path / "child.gguf").path
    tensor = next(t for t in gguf_lib.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    data = bytearray(path.read_bytes())
    start = tensor.data_offset
    data[start:start + tensor.n_bytes] = torch.full((tensor.n_bytes // 4,), 3.0).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(SubcloneError, match="verification failed.*differ from the child's by .* more than the 0.0001"):
        verify_gguf(exportable_child, path)


# --- 4. the embedded parent's cache is checked by content ----------------------------------------------


def test_a_damaged_cache_with_its_size_and_time_kept_is_rebuilt(tmp_path, monkeypatch):
    from subclone_core.sources import embedded, load_parent

    monkeypatch.setenv("SUBCLONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_VERIFIED", set(), raising=False)
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    fake_embedded(monkeypatch, tmp_path / "packages", "default", [tiny.read_bytes()])
    weights = load_parent("default").source / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64  # NaNs in the last tensor: header intact, same size ...
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same modification time
    monkeypatch.setattr(embedded, "_VERIFIED", set(), raising=False)  # a new process
    again = load_parent("default")
    assert all(torch.isfinite(p).all() for p in again.model.parameters())


def test_the_cache_content_is_hashed_once_per_process(tmp_path, monkeypatch):
    from subclone_core.sources import embedded, load_parent

    monkeypatch.setenv("SUBCLONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_VERIFIED", set(), raising=False)
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    fake_embedded(monkeypatch, tmp_path / "packages", "default", [tiny.read_bytes()])
    load_parent("default")  # converts
    load_parent("default")  # hashes every file once
    hashed = []
    monkeypatch.setattr(embedded, "file_sha256", lambda path: hashed.append(path), raising=False)
    load_parent("default")
    assert hashed == []


# --- 5. a tokenizer GGUF cannot hold --------------------------------------------------------------------


def test_a_byte_level_bpe_without_merges_is_refused_before_writing(tiny_llama_dir, tmp_path):
    out = tmp_path / "child.gguf"
    refused(["export", "--model", tiny_llama_dir, "--to", out], "no merges")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_make_refuses_nan_weights_of_an_offloaded_parent_as_the_child_is_written(nan_parent, tmp_path):
    # the parent's offloaded blocks are not read once more up front: the child tensor sliced from them is refused
    out = tmp_path / "child"
    line = refused(["make", "--parent", nan_parent, "--out", out, "--layers", 3, "--strategy", "first-k",
                    "--max-memory", "24KB"], "the child", "self_attn.o_proj.weight", "--allow-nonfinite")
    assert "NaN" in line and not out.exists()


def test_export_refuses_a_child_folder_missing_a_tensor(exportable_child, tmp_path):
    edit_weights(exportable_child, lambda state: state.pop("model.layers.0.mlp.up_proj.weight"))
    out = tmp_path / "child.gguf"
    refused(["export", "--model", exportable_child, "--to", out], "missing tensors model.layers.0.mlp.up_proj.weight")
    assert not out.exists()
