"""GGUF export: every exportable family on a tiny random model, read back by transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaTokenizer,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen3Config,
)

from subclone_core.core.archs import arch_for, supported_model_types
from subclone_core.core.errors import SubcloneError
from subclone_core.io.gguf_export import (
    SAMPLE_TEXT,
    export_gguf,
    exportable_model_types,
    parsed_once,
    verify_gguf,
)
from tests.cli_runner import run_cli

SENTENCES = [
    "The river rises in the hills north of the town and flows to the sea.",
    "A stone bridge replaced the old ferry in 1887; it still carries the main road.",
    "Fishing, farming and tourism are the local economy's mainstays since the 1990s.",
    "Small models run where small models run: on laptops, phones and old servers.",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_level_bpe(tokenizer_class=GPT2Tokenizer) -> GPT2Tokenizer:
    """A byte-level BPE trained on a few sentences (every byte is in its alphabet), in GPT-2's pipeline
    or (with Qwen2Tokenizer) Qwen's, which transformers' GGUF reader uses for Qwen files."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    model = json.loads(tok.to_str())["model"]
    out = tokenizer_class(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                        unk_token=SPECIALS[0], bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[2])
    out.chat_template = CHAT
    return out


def sentencepiece_bpe() -> LlamaTokenizer:
    """A Llama-2-style BPE with byte fallback (what transformers makes of a SentencePiece model)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=200))
    trained = json.loads(tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]])


def tiny_config(family: str, vocab: int, bos: int, eos: int):
    """Tiny configs of every exportable family (norms and biases perturbed later so mistakes show)."""
    ids = {"vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos}
    rotary = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, **ids)
    return {
        "llama": lambda: LlamaConfig(**rotary, head_dim=8, tie_word_embeddings=True),
        "llama-untied": lambda: LlamaConfig(**rotary, head_dim=8, tie_word_embeddings=False, rope_theta=50000.0),
        "mistral": lambda: MistralConfig(**rotary, head_dim=8, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**rotary, tie_word_embeddings=True),
        # a Qwen3 child keeps its parent's head_dim, and every Qwen3 has 128 (the GGUF loader assumes it)
        "qwen3": lambda: Qwen3Config(**{**rotary, "num_attention_heads": 2, "num_key_value_heads": 1},
                                     head_dim=128, tie_word_embeddings=True),
        "phi3": lambda: Phi3Config(**{**rotary, "num_key_value_heads": 4}, tie_word_embeddings=False,
                                   pad_token_id=eos),
        # llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim) and transformers' reader assumes 256 for
        # both: a Gemma 3 child keeps its parent's head_dim, and Gemma 3 1B/4B/12B have 256
        "gemma3": lambda: Gemma3TextConfig(**rotary, head_dim=256, query_pre_attn_scalar=256, sliding_window=16),
        # transformers' reader rebuilds GPT-2 with n_positions=1024 and n_inner=4 x n_embd, as in GPT-2 itself
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, **ids),
    }[family]()


FAMILIES = ["llama", "llama-untied", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt2"]


def save_child(tmp_path, family: str, tokenizer, pad_vocab: int = 0):
    """A child folder: tiny random model, tokenizer, and a subclone.json like `subclone make` writes."""
    torch.manual_seed(0)
    config = tiny_config(family, len(tokenizer) + pad_vocab, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms at 1 and biases at 0 would hide layout mistakes
    out = tmp_path / family
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {"parent": {"id": "tiny-parent", "label": "tiny", "weights_sha256": "ab" * 32},
                "strategy": "subclone", "removed_blocks": [1], "library_version": "0.1.0",
                "child": {"shape": {"layers": 2}}}
    (out / "subclone.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_reads_back_to_the_same_logits_and_token_ids(tmp_path, bpe, family):
    tokenizer = byte_level_bpe(Qwen2Tokenizer) if family.startswith("qwen") else bpe
    child = save_child(tmp_path, family, tokenizer, pad_vocab=3 if family == "gpt2" else 0)
    result = export_gguf(child, tmp_path / "child.gguf")
    check = verify_gguf(child, result.path)
    assert check["max_rel_logit_diff"] < 1e-5, check
    assert check["same_token_ids"] and check["tokens"] > 20


def test_a_read_back_parses_the_file_once(tmp_path, bpe, monkeypatch):
    """transformers makes a reader for the config, the tokenizer and the weights; the header (a whole vocabulary
    walked in Python) is parsed once, and a reader of another file is made as usual."""
    child = save_child(tmp_path, "llama", bpe)
    path = export_gguf(child, tmp_path / "child.gguf").path
    made, original = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda where, *a, **k: made.append(where) or original(where, *a, **k))
    assert verify_gguf(child, path)["same_token_ids"]
    assert [Path(p) for p in made] == [path] and gguf.GGUFReader is not original  # our counter is back in place
    with parsed_once(path):
        gguf.GGUFReader(path)
        gguf.GGUFReader(path)
        gguf.GGUFReader(export_gguf(child, tmp_path / "other.gguf").path)
    assert [Path(p).name for p in made] == ["child.gguf", "child.gguf", "other.gguf"]


@pytest.mark.parametrize("qtype,bound", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_f16_and_q8_0_stay_close_and_shrink_the_file(tmp_path, bpe, qtype, bound):
    child = save_child(tmp_path, "llama-untied", bpe)
    f32 = export_gguf(child, tmp_path / "f32.gguf")
    small = export_gguf(child, tmp_path / f"{qtype}.gguf", qtype=qtype)
    check = verify_gguf(child, small.path)
    assert 0 < check["max_rel_logit_diff"] < bound, check
    assert small.bytes < 0.6 * f32.bytes
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(small.path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # vectors stay float32
    assert types["blk.0.ffn_up.weight"] == qtype.upper()


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    child = save_child(tmp_path, "llama", sentencepiece_bpe())
    path = export_gguf(child, tmp_path / "spm.gguf").path
    check = verify_gguf(child, path)
    assert check["same_token_ids"] and check["max_rel_logit_diff"] < 1e-5
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[3] == gguf.TokenType.BYTE  # <0x00>


def test_metadata_carries_the_manifest_chat_template_and_the_rope_layout(tmp_path, bpe):
    child = save_child(tmp_path, "llama", bpe)
    path = export_gguf(child, tmp_path / "c.gguf").path
    fields = gguf.GGUFReader(path).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == "llama"
    assert value["general.subclone.parent"] == "tiny-parent"
    assert value["general.subclone.strategy"] == "subclone"
    assert json.loads(value["general.subclone.removed_blocks"]) == [1]
    assert value["general.base_model.0.name"] == "tiny"
    assert value["tokenizer.chat_template"] == CHAT
    assert value["llama.attention.head_count_kv"] == 2 and value["llama.rope.dimension_count"] == 8
    # q rows interleaved per head for llama.cpp's rope: row 1 of the file is row 4 (= head_dim / 2) of HF's
    q_hf = AutoModelForCausalLM.from_pretrained(child).model.layers[0].self_attn.q_proj.weight.detach().numpy()
    q_gguf = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight").data
    np.testing.assert_array_equal(q_gguf[1], q_hf[4])
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}  # tied head


def test_each_family_table_names_its_gguf_export():
    """The GGUF tables live in the families' files: keyed by the family's own model_types, naming a
    llama.cpp architecture and metadata keys the gguf package knows; a refused family says why."""
    known_keys = {v for group in (gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope)
                  for k, v in vars(group).items() if k.isupper() and isinstance(v, str)}
    for model_type in supported_model_types():
        spec = arch_for(model_type)
        assert set(spec.gguf) <= set(spec.model_types), spec.name
        for table in spec.gguf.values():
            assert table.arch in gguf.MODEL_ARCH.__members__, table.arch
            assert set(table.metadata) | set(table.extra) <= known_keys, spec.name
    assert exportable_model_types() == sorted(mt for mt in supported_model_types() if mt in arch_for(mt).gguf)
    assert arch_for("olmo2").gguf_refused and not arch_for("olmo2").gguf


def test_refuses_unsupported_families_with_the_list(tmp_path, bpe):
    child = save_child(tmp_path, "llama", bpe)
    config = json.loads((child / "config.json").read_text())
    (child / "config.json").write_text(json.dumps({**config, "model_type": "olmo2"}))
    with pytest.raises(SubcloneError, match="cannot read it back.*exportable: gemma3_text, gpt2, llama"):
        export_gguf(child, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert exportable_model_types() == ["gemma3_text", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3"]


def test_cli_exports_verifies_and_refuses_to_overwrite(tmp_path, bpe):
    child = save_child(tmp_path, "mistral", bpe)
    out = tmp_path / "out" / "child.gguf"
    code, stdout, err = run_cli(["export", "--model", child, "--to", out, "--type", "q8_0", "--json"])
    assert code == 0, err
    result = json.loads(stdout)
    assert result["type"] == "q8_0" and result["verify"]["same_token_ids"] and out.stat().st_size == result["bytes"]
    before = out.read_bytes()
    code, _, err = run_cli(["export", "--model", child, "--to", out])
    assert code == 2 and err.strip().endswith("exists; choose a new path or pass --overwrite") and "\n" not in err.strip()
    assert out.read_bytes() == before
    assert run_cli(["export", "--model", child, "--to", out, "--overwrite", "--no-verify"])[0] == 0
    assert out.stat().st_size > len(before)  # f32 replaced q8_0
    assert [p.name for p in out.parent.iterdir()] == ["child.gguf"]  # no temporary file left behind


def test_cli_bad_input_exits_2_with_one_line(tmp_path, bpe):
    child = save_child(tmp_path, "llama", bpe)
    code, _, err = run_cli(["export", "--model", child, "--to", tmp_path / "child.bin"])
    assert code == 2 and err.strip().endswith("does not end in .gguf; give a path like child.gguf")
    code, _, err = run_cli(["export", "--model", tmp_path / "nowhere", "--to", tmp_path / "c.gguf"])
    assert code == 2 and "has no config.json" in err
    code, _, _ = run_cli(["export", "--model", child, "--to", tmp_path / "c.gguf", "--type", "q4_0"])
    assert code == 2 and not (tmp_path / "c.gguf").exists()  # argparse refuses an unknown type by itself


@pytest.mark.default_parent
@pytest.mark.slow
def test_default_parents_child_exports_f32_exactly_and_q8_0_closely(tmp_path):
    from subclone_core.core.strategies import plan_shape
    from subclone_core.sources import load_parent
    from subclone_core.workflow.children import make_child
    from subclone_core.workflow.children import save_child as save

    parent = load_parent("default")
    target = plan_shape(parent.model, layers=6, hidden=192, ffn=512)
    child_dir = save(make_child(parent, target, strategy="uniform"), tmp_path / "child", task=parent.task)
    for qtype, bound in (("f32", 1e-5), ("q8_0", 5e-2)):
        path = export_gguf(child_dir, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        check = verify_gguf(child_dir, path, text=SAMPLE_TEXT)
        assert check["max_rel_logit_diff"] < bound and check["same_token_ids"], (qtype, check)
