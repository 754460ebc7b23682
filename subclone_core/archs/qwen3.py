"""Qwen3: the Llama layout plus per-head RMSNorms on queries and keys (sized head_dim, kept whole)."""

from subclone_core.archs.llama import ARCH as LLAMA
from subclone_core.archs.spec import ArchSpec, plain

ARCH = ArchSpec(
    name="Qwen3",
    model_types=("qwen3",),
    task="causal-lm",
    blocks="model.layers",
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    global_params=LLAMA.global_params,
    block_params={
        **LLAMA.block_params,
        # normalizes each head's vector over head_dim, which never shrinks: every entry stays
        "self_attn.q_norm.weight": plain("keep"),
        "self_attn.k_norm.weight": plain("keep"),
    },
    config_keys=LLAMA.config_keys,
    tied_head=LLAMA.tied_head,
    per_layer_config_keys=("layer_types",),
    scale_default=False,
)
