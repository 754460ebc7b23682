"""What a family's GGUF file for llama.cpp says and how its tensors differ from the Hugging Face checkpoint.

Data only, read by io.gguf_export (the core never imports the gguf package): each family's table names its
llama.cpp architecture (a `gguf.MODEL_ARCH` member name) per model_type, which config value goes under which
metadata key (gguf's key templates, "{arch}" filled in by the writer) and the few layout changes llama.cpp
expects. A family the gguf package maps but transformers' GGUF loader cannot read back (so an export could
not be verified) names that in ArchSpec.gguf_refused instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Getter = Callable[[object], "int | float | None"]
READ_BACK_REFUSAL = "llama.cpp reads it, but transformers' GGUF loader cannot read it back to verify the file"


@dataclass(frozen=True)
class GgufSpec:
    """What llama.cpp calls a family and how its file differs from the Hugging Face checkpoint.

    Attributes:
        arch: llama.cpp's architecture, a `gguf.MODEL_ARCH` member name ("LLAMA", "QWEN2", ...).
        metadata: GGUF key template ("{arch}.context_length") -> the config value written under it.
        rotary_interleave: llama.cpp's LLAMA rope rotates adjacent pairs (2i, 2i+1), HF rotates halves (i,
            i + d/2): these tensors' rows are interleaved per head (tensor role -> its head count).
        transposed: tensors stored (in, out), as GPT-2's Conv1D does; GGUF wants (out, in).
        extra: more metadata, as `metadata`.
        requires: what llama.cpp assumes and the file cannot say: {description: check}; a child that
            breaks one is refused.
    """

    arch: str
    metadata: dict[str, Getter]
    rotary_interleave: dict[str, Callable[[object], int]] = field(default_factory=dict)
    transposed: tuple[str, ...] = ()
    extra: dict[str, Getter] = field(default_factory=dict)
    requires: dict[str, Callable[[object], bool]] = field(default_factory=dict)


def rope_theta(config) -> float:
    """The rotary base, from `rope_parameters` (transformers 5) or a flat `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:  # per-layer-type settings (Gemma 3): the global layers' base
        params = params["full_attention"]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dims(config) -> int:
    """Rotated dimensions per head: all of them unless a partial rotary factor says otherwise."""
    params = getattr(config, "rope_parameters", None) or {}
    return int(head_dim(config) * params.get("partial_rotary_factor", 1.0))


# config values every rotary decoder family states the same way (GGUF key template -> value)
ROTARY_DECODER: dict[str, Getter] = {
    "{arch}.context_length": lambda c: c.max_position_embeddings,
    "{arch}.embedding_length": lambda c: c.hidden_size,
    "{arch}.block_count": lambda c: c.num_hidden_layers,
    "{arch}.feed_forward_length": lambda c: c.intermediate_size,
    "{arch}.vocab_size": lambda c: c.vocab_size,
    "{arch}.attention.head_count": lambda c: c.num_attention_heads,
    "{arch}.attention.head_count_kv": lambda c: c.num_key_value_heads,
    "{arch}.attention.key_length": head_dim,
    "{arch}.attention.value_length": head_dim,
    "{arch}.attention.layer_norm_rms_epsilon": lambda c: c.rms_norm_eps,
    "{arch}.rope.freq_base": rope_theta,
    "{arch}.rope.dimension_count": rotary_dims,
}
SLIDING_WINDOW: dict[str, Getter] = {"{arch}.attention.sliding_window": lambda c: c.sliding_window}
LLAMA_ROTARY = {"attn_q": lambda c: c.num_attention_heads, "attn_k": lambda c: c.num_key_value_heads}
