"""Export a child folder to one GGUF file for llama.cpp, Ollama and LM Studio, and check it reads back.

Everything GGUF-specific comes from the `gguf` package (llama.cpp's own Python library): the writer, the
tensor-name maps, the metadata key names, the special-token reader and the Q8_0 quantizer. This module
adds generic code that reads each family's GGUF table (`ArchSpec.gguf`, a `GgufSpec` per model_type in the
family's file under core/archs: the llama.cpp architecture, which config value goes under which metadata
key, and the few tensor layout changes llama.cpp expects).

A family is exportable when the gguf package maps its tensors AND transformers' GGUF loader can read the
file back, so that every export can be verified without llama.cpp (`verify_gguf`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from subclone_core.core.archs import REGISTRY, arch_for
from subclone_core.core.archs.gguf_tables import GgufSpec
from subclone_core.core.building import check_loading_info
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest, ParentRecord
from subclone_core.io.atomic import building_file, fault_point
from subclone_core.io.saving import read_manifest
from subclone_core.tasks import task_of_config

QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


@dataclass
class ExportResult:
    """What `export_gguf` wrote."""

    path: Path
    arch: str
    qtype: str
    bytes: int
    tensors: int
    seconds: float
    fallback_f16: list[str] = field(default_factory=list)  # q8_0 tensors whose rows are not 32-aligned

    def as_dict(self) -> dict:
        return {"path": str(self.path), "arch": self.arch, "type": self.qtype, "bytes": self.bytes,
                "tensors": self.tensors, "seconds": round(self.seconds, 2), "fallback_f16": self.fallback_f16}


def exportable_model_types() -> list[str]:
    """The config.model_type values `export_gguf` writes."""
    return sorted(mt for mt, spec in REGISTRY.items() if mt in spec.gguf)


def family_for(model_type: str, task: str | None = None) -> GgufSpec:
    """The family's GGUF table for a model_type (its models of ``task``; None: of its default task), or a one-line
    error listing the exportable ones."""
    spec = REGISTRY.get(model_type)
    if spec is not None and task is not None:
        spec = spec.for_task(task)  # another task's head has no GGUF layout
    if spec is not None and model_type in spec.gguf:
        return spec.gguf[model_type]
    why = f" ({spec.gguf_refused})" if spec is not None and spec.gguf_refused else ""
    raise SubcloneError(f"cannot export model_type={model_type!r} to GGUF{why}; "
                        f"exportable: {', '.join(exportable_model_types())}")


def export_gguf(model_dir: str | Path, out_path: str | Path, *, qtype: str = "f32",
                overwrite: bool = False) -> ExportResult:
    """Write a child folder as one GGUF file, atomically.

    Args:
        model_dir: a Hugging Face causal-LM folder (config.json, model.safetensors, tokenizer.json).
        out_path: the `.gguf` file to write.
        qtype: "f32", "f16" or "q8_0" for the matrices (norms and biases stay float32, as llama.cpp does).
        overwrite: replace an existing file.

    Returns:
        What was written: path, size, tensor count, seconds.

    Raises:
        SubcloneError: unknown type, unsupported family or tokenizer, or an existing output without overwrite.
    """
    start = time.perf_counter()
    if qtype not in QTYPES:
        raise SubcloneError(f"type={qtype!r} is not a GGUF export type; use one of {', '.join(QTYPES)}")
    out = _check_output_path(out_path, overwrite=overwrite)
    model, family = load_child(model_dir)
    writer_ref: dict = {}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
        writer_ref["fallback"] = _write_model(writer, family, model, Path(model_dir), qtype)
        writer_ref["tensors"] = len(writer.tensors[0])
        writer.write_header_to_file()
        fault_point("export.after-header")
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_atomically(out, write, overwrite=overwrite)
    return ExportResult(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]], qtype, out.stat().st_size,
                        writer_ref["tensors"], time.perf_counter() - start, writer_ref["fallback"])


def load_child(model_dir: str | Path):
    """The child in float32 and its family table; never runs code shipped with the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise SubcloneError(f"model folder {str(path)!r} has no config.json; give a folder saved by "
                            "`subclone make` or `save_pretrained`")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    family = family_for(config.model_type, task_of_config(config).name)
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":  # scaled rope needs extra tensors and keys this exporter does not write
        raise SubcloneError(f"cannot export rope_type={rope_type!r} to GGUF; only rope_type='default' is supported")
    for rule, holds in family.requires.items():
        if not holds(config):
            raise SubcloneError(f"cannot export this {config.model_type} child to GGUF: llama.cpp assumes {rule}")
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False,
                                                       use_safetensors=True, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)
    check_loading_info(info, path)  # a damaged child would export random tensors in place of the missing ones
    return model.eval(), family


def _check_output_path(out_path: str | Path, *, overwrite: bool) -> Path:
    out = Path(out_path)
    if out.suffix != ".gguf":
        raise SubcloneError(f"output {str(out)!r} does not end in .gguf; give a path like child.gguf")
    if out.is_dir():
        raise SubcloneError(f"output {str(out)!r} is a folder; give a file path like {out / 'child.gguf'}")
    if out.exists() and not overwrite:
        raise SubcloneError(f"output {str(out)!r} exists; choose a new path or pass --overwrite")
    return out


def _write_atomically(out: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    """Write `out` whole through a hidden temporary file (io.atomic.building_file): nothing stands at `out`
    until the file is complete, so a killed export leaves no placeholder. One writer per file is the
    caller's claim (the command line's claim_output lock); without overwrite, a file that appeared
    meanwhile is never replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise SubcloneError(f"output {str(out)!r} exists; choose a new path or pass --overwrite")
    with building_file(out, replace=overwrite, step="export") as tmp:
        write(tmp)


def _write_model(writer: gguf.GGUFWriter, family: GgufSpec, model, model_dir: Path, qtype: str) -> list[str]:
    """Metadata, tokenizer and tensors into the writer; returns the tensors that fell back to f16."""
    _add_metadata(writer, family, model.config)
    _add_general(writer, model_dir, qtype)
    add_tokenizer(writer, model_dir, model.config.vocab_size)
    return _add_tensors(writer, family, model, qtype)


def _add_metadata(writer: gguf.GGUFWriter, family: GgufSpec, config) -> None:
    """The family's config values under llama.cpp's key names; a value the config lacks is left out."""
    arch = writer.arch
    for template, getter in {**family.metadata, **family.extra}.items():
        try:
            value = getter(config)
        except AttributeError:
            continue
        if value is None:
            continue
        key = template.format(arch=arch)
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))


def _add_general(writer: gguf.GGUFWriter, model_dir: Path, qtype: str) -> None:
    """Name, file type and the subclone manifest's key facts (parent, strategy, shape) in general.*."""
    # never a bare word: transformers' reader takes a general.name of exactly "mistral" as an architecture
    writer.add_name(f"{model_dir.resolve().name} (subclone export)")
    writer.add_file_type(FILE_TYPES[qtype])
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    manifest = read_manifest(model_dir)
    if manifest is None:
        return
    for key, value in manifest_facts(manifest).items():
        writer.add_string(f"general.subclone.{key}", value)
    parent = manifest.parent or ParentRecord()
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, str(parent.label or parent.id or "unknown"))
    writer.add_description(f"Subcloned from {parent.id or '?'} ({manifest.strategy or '?'}) "
                           f"by subclone {manifest.library_version or '?'}")


def manifest_facts(manifest: Manifest) -> dict[str, str]:
    """The manifest's key facts as strings (the kept-index lists stay in subclone.json: too long)."""
    parent = manifest.parent or ParentRecord()
    facts = {"parent": parent.id, "parent_label": parent.label, "parent_sha256": parent.weights_sha256,
             "strategy": manifest.strategy, "order": manifest.order, "drop": manifest.drop,
             "scale": manifest.scale, "removed_blocks": manifest.removed_blocks,
             "child_shape": manifest.child_shape,
             "calibration": asdict(manifest.calibration) if manifest.calibration else None,
             "library_version": manifest.library_version, "created": manifest.created}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items() if v is not None}


# ---- tensors ---------------------------------------------------------------------------------------


def _add_tensors(writer: gguf.GGUFWriter, family: GgufSpec, model, qtype: str) -> list[str]:
    """Every parameter under its GGUF name, in the requested type; returns the q8_0 -> f16 fallbacks."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], _block_count(config))
    state = model.state_dict()
    fallback = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        name = _gguf_name(name_map, hf_name)
        data = _to_llama_cpp_layout(family, config, name, tensor.detach().to(torch.float32).numpy())
        data, raw_type, fell_back = _encode(data, qtype)
        if fell_back:
            fallback.append(name)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    return fallback


def _block_count(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, or an error naming the tensor."""
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:  # nothing is dropped silently: a tensor the map does not know stops the export
        raise SubcloneError(f"tensor {hf_name!r} has no GGUF name in the gguf package's map for this family")
    return name


def _to_llama_cpp_layout(family: GgufSpec, config, name: str, data: np.ndarray) -> np.ndarray:
    """The family's layout changes: Conv1D transposed, rotary rows interleaved, norms stored as offsets
    (Gemma's (offset + w) x, from its architecture table) written as the factor llama.cpp multiplies by."""
    leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if leaf in family.transposed:
        data = np.ascontiguousarray(data.T)
    role = leaf.rsplit(".", 1)[0]
    if role in family.rotary_interleave:
        data = interleave_rotary_halves(data, family.rotary_interleave[role](config))
    offset = arch_for(config.model_type).norm_offset
    if offset and leaf.endswith("norm.weight"):
        data = data + np.float32(offset)
    return data


def interleave_rotary_halves(data: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from (first half, second half) to interleaved pairs.

    HF's rotary embedding pairs dimension i with i + d/2; llama.cpp's LLAMA rope pairs 2i with 2i+1.
    Row j of half h goes to row 2j + h, so the same rotation applies to the same pair of values.
    """
    shape = data.shape
    head_dim = shape[0] // heads
    halves = data.reshape(heads, 2, head_dim // 2, *shape[1:])  # (H, half, Dh/2, in)
    return np.ascontiguousarray(halves.swapaxes(1, 2).reshape(shape))  # (H, Dh/2, half, in) -> rows


def _encode(data: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType, bool]:
    """(bytes or values, GGML type, fell back to f16): vectors stay float32, as llama.cpp's converter does."""
    if data.ndim == 1 or qtype == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32, False
    if qtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16, False
    try:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q8), q8, False
    except gguf.QuantError:  # rows not a multiple of Q8_0's 32-value block
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16, True


# ---- tokenizer -------------------------------------------------------------------------------------

# llama.cpp names the pre-tokenizer (the regex split before BPE); the key is the tokenizer.json
# pre_tokenizer with its irrelevant flags removed. Unknown ones are refused rather than guessed.
_GPT2_REGEX = {"type": "ByteLevel", "use_regex": True}
PRE_TOKENIZERS: dict[str, str] = {
    json.dumps(_GPT2_REGEX, sort_keys=True): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      _GPT2_REGEX]}, sort_keys=True): "smollm",
}
_SPLIT_NAMES = {"llama-bpe": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}",
                "qwen2": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"}


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Vocabulary, merges, special tokens and chat template from the child's tokenizer.json.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) becomes llama.cpp's "gpt2" model; BPE with byte
    fallback (Llama 2, Mistral, Gemma: SentencePiece converted by transformers) becomes its "llama" model.
    """
    tok_json = _read_tokenizer_json(model_dir)
    kind = _tokenizer_kind(tok_json)
    tokens, types = _token_table(tok_json, vocab_size, byte_tokens=kind == "llama")
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json) if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(_merge_rank_scores(tok_json, tokens))
        writer.add_add_space_prefix(_prepends_space(tok_json))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.update(_adds_special(model_dir))
    special.add_to_gguf(writer, quiet=True)


def _read_tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise SubcloneError(f"model folder {str(model_dir)!r} has no tokenizer.json; GGUF export needs the "
                            "fast tokenizer that `subclone make` saves with the child")
    return json.loads(path.read_text(encoding="utf-8"))


def _tokenizer_kind(tok_json: dict) -> str:
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise SubcloneError(f"tokenizer model {model.get('type')!r} cannot be exported to GGUF; "
                            "supported: BPE (byte-level or with byte fallback)")
    if model.get("byte_fallback"):
        return "llama"
    if (tok_json.get("decoder") or {}).get("type") == "ByteLevel":
        if not model.get("merges"):  # llama.cpp's "gpt2" model needs merges; GGUF cannot store an empty list
            raise SubcloneError("the byte-level BPE tokenizer in tokenizer.json has no merges, which a GGUF "
                                "file cannot hold (llama.cpp reads merges for byte-level BPE); export a model "
                                "whose tokenizer has at least one merge")
        return "gpt2"
    raise SubcloneError("BPE tokenizer is neither byte-level nor byte-fallback; cannot export it to GGUF")


def _pre_tokenizer_name(tok_json: dict) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    key = json.dumps(_strip_flags(pre), sort_keys=True)
    if key in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[key]
    text = json.dumps(pre)
    for name, regex_start in _SPLIT_NAMES.items():
        if json.dumps(regex_start)[1:-1] in text:
            return name
    raise SubcloneError(f"pre-tokenizer {text[:120]} has no llama.cpp name known here; "
                        f"known: {', '.join(sorted({*PRE_TOKENIZERS.values(), *_SPLIT_NAMES}))}")


def _strip_flags(node):
    """Keep what changes the split (types, regexes, digit rules); drop offset and prefix-space flags."""
    if isinstance(node, list):
        return [_strip_flags(n) for n in node]
    if isinstance(node, dict):
        return {k: _strip_flags(v) for k, v in node.items()
                if k not in ("add_prefix_space", "trim_offsets", "prepend_scheme")}
    return node


# Not gguf.vocab's BpeVocab / LlamaHfVocab (gguf 0.19.0; measured on tests/test_export_gguf.py's tokenizers):
# neither pads to the model's vocab_size (llama.cpp needs one token per embedding row); BpeVocab types special
# tokens that sit in the base vocab (<|endoftext|>, <|im_start|>, ...) NORMAL, not CONTROL, and refuses added
# ids that do not follow the vocab; LlamaHfVocab scores every token -1000 (a placeholder), while llama.cpp's
# "llama" tokenizer merges by score (our _merge_rank_scores). gguf.SpecialVocab does serve add_tokenizer.
def _token_table(tok_json: dict, vocab_size: int, *, byte_tokens: bool) -> tuple[list[str], list[int]]:
    """Tokens by id (model vocab + added tokens, padded to the model's vocab size) and their GGUF types."""
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in tok_json["model"]["vocab"].items()}
    for added in tok_json.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= vocab_size:
        raise SubcloneError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))  # llama.cpp's filler name
        if byte_tokens and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = gguf.TokenType.BYTE
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def _merge_rank_scores(tok_json: dict, tokens: list[str]) -> list[float]:
    """SentencePiece scores from BPE merge order: llama.cpp's "llama" tokenizer merges highest score first."""
    rank = {}
    for i, merge in enumerate(tok_json["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(tok_json: dict) -> bool:
    """Whether the tokenizer adds a leading "▁" (Metaspace or a Prepend normalizer)."""
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _adds_special(model_dir: Path) -> dict[str, bool]:
    """Whether the child's own tokenizer adds BOS/EOS, measured rather than parsed from its files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return {"bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
            "eos": tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]}


# ---- verification without llama.cpp ----------------------------------------------------------------

SAMPLE_TEXT = ("The river rises in the hills north of the town and flows 42 km to the sea. In 1887 a stone "
               "bridge replaced the old ferry; it still carries the main road today. Fishing, farming and, "
               "since the 1990s, tourism are the local economy's mainstays.")


# The largest max |logit difference| / max |logit| a read-back may show: f32 is exact up to summation order
# (measured < 1e-5); f16 and q8_0 round the matrices (measured < 2e-3 and < 5e-2 on tiny and real children).
TOLERANCES = {"f32": 1e-4, "f16": 1e-2, "q8_0": 1e-1}


def verify_gguf(model_dir: str | Path, gguf_path: str | Path, *, text: str = SAMPLE_TEXT) -> dict:
    """Read the file back with transformers' own GGUF loader and compare it with the child.

    Returns:
        `max_rel_logit_diff`: max |logits_gguf - logits_child| / max |logits_child| on `text`;
        `max_abs_logit_diff`; `tolerance`: the most `max_rel_logit_diff` the file's type allows;
        `tokens`: how many tokens `text` encodes to; `same_token_ids`: whether the tokenizer rebuilt from
        the GGUF encodes `text` to the child tokenizer's ids.

    Raises:
        SubcloneError: the read-back logits are not finite, differ by more than the tolerance, or the token
            ids differ (the file is written but does not stand for the child).
    """
    from transformers import AutoTokenizer

    model, _ = load_child(model_dir)
    child_tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    with parsed_once(gguf_path):
        gguf_tok = _load_gguf(AutoTokenizer, gguf_path)
        back = _load_gguf(_causal_lm_class(), gguf_path, dtype=torch.float32).eval()
        qtype = _file_qtype(gguf_path)
    ids = child_tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = back(input_ids=ids).logits
    diff = (got - expected).abs().max().item()
    check = {"max_rel_logit_diff": diff / expected.abs().max().item(), "max_abs_logit_diff": diff,
             "tolerance": TOLERANCES[qtype], "tokens": ids.shape[1],
             "same_token_ids": gguf_tok(text)["input_ids"] == ids[0].tolist()}
    require_verified(check, gguf_path)
    return check


def require_verified(check: dict, gguf_path: str | Path) -> None:
    """Refuse a read-back that is not finite, not within its tolerance, or tokenizes differently."""
    rel, tolerance = check["max_rel_logit_diff"], check["tolerance"]
    if not math.isfinite(rel):
        why = f"its logits are not finite (relative difference {rel})"
    elif rel > tolerance:
        why = f"its logits differ from the child's by {rel:.2e} relative, more than the {tolerance:g} its type allows"
    elif not check["same_token_ids"]:
        why = "its tokenizer encodes the sample text to other token ids than the child's"
    else:
        return
    raise SubcloneError(f"verification failed: {gguf_path} was written but does not read back as the child: {why}; "
                        "do not use it (export again; --no-verify skips this check)")


_READER_PATCH = threading.Lock()


@contextlib.contextmanager
def parsed_once(gguf_path: str | Path) -> Iterator[None]:
    """Parse the file's header once while transformers reads it back. transformers builds a new gguf.GGUFReader
    for the config, the tokenizer and the weights (each `from_pretrained` parses the config again), and each
    parse walks every field value in Python: for a SmolLM2 child's 49,152-token vocabulary and merges, 4 parses
    took 38 of a read-back's 50 s on 2 cores. While this runs, a reader of this path is made once and shared;
    readers of any other path are made as usual (one patch at a time: the lock)."""
    path = Path(gguf_path).resolve()
    with _READER_PATCH:
        original = gguf.GGUFReader
        made: list[gguf.GGUFReader] = []

        def reader(where, *args, **kwargs):
            if Path(where).resolve() != path or args or kwargs:
                return original(where, *args, **kwargs)
            if not made:
                made.append(original(where))
            return made[0]

        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = original


def _file_qtype(gguf_path: str | Path) -> str:
    """The export type recorded in a GGUF's general.file_type ("q8_0", the loosest, when it is missing)."""
    field = gguf.GGUFReader(gguf_path).fields.get("general.file_type")
    by_value = {int(v): name for name, v in FILE_TYPES.items()}
    return by_value.get(field.contents() if field is not None else None, "q8_0")


def _causal_lm_class():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _load_gguf(auto_class, gguf_path: str | Path, **kwargs):
    """`from_pretrained(folder, gguf_file=name)`, with transformers' refusal turned into a one-line error."""
    path = Path(gguf_path).resolve()
    try:
        with hidden_gguf_bar():
            return auto_class.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except (ValueError, NotImplementedError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SubcloneError(f"transformers could not read {str(path)!r} back: {first}") from err


@contextlib.contextmanager
def hidden_gguf_bar() -> Iterator[None]:
    """Hide transformers' GGUF reader's progress bar while transformers' own bars are hidden (without
    --verbose): the reader draws it with tqdm directly, which transformers' disable_progress_bar does not reach."""
    from transformers import modeling_gguf_pytorch_utils as reader
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar
