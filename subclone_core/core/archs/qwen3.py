"""Qwen3: the Llama layout plus per-head RMSNorms on queries and keys (sized head_dim, kept whole)."""

from dataclasses import replace

from subclone_core.core.archs.gguf_tables import ROTARY_DECODER, GgufSpec
from subclone_core.core.archs.llama import ARCH as LLAMA
from subclone_core.core.archs.spec import plain

ARCH = replace(
    LLAMA,
    name="Qwen3",
    model_types=("qwen3",),
    block_params={
        **LLAMA.block_params,
        # normalizes each head's vector over head_dim, which never shrinks: every entry stays
        "self_attn.q_norm.weight": plain("keep"),
        "self_attn.k_norm.weight": plain("keep"),
    },
    bias_switches={"qwen3": {"attn_out": "attention_bias"}},  # its FFN has no bias switch
    gguf={"qwen3": GgufSpec("QWEN3", ROTARY_DECODER)},
)
