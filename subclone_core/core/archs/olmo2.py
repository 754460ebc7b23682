"""OLMo 2: post-norms only (x + norm(attn(x)), then x + norm(ffn(x))), and q/k RMSNorms over the whole
projection width (all heads at once), sliced with the kept heads."""

from dataclasses import replace

from subclone_core.core.archs.gguf_tables import READ_BACK_REFUSAL
from subclone_core.core.archs.llama import ARCH as LLAMA
from subclone_core.core.archs.spec import plain

_LLAMA_BLOCK = {k: v for k, v in LLAMA.block_params.items() if k != "input_layernorm.weight"}

ARCH = replace(
    LLAMA,
    name="OLMo 2",
    model_types=("olmo2",),
    block_params={
        **_LLAMA_BLOCK,
        "self_attn.q_norm.weight": plain("q"),
        "self_attn.k_norm.weight": plain("kv"),
        "post_feedforward_layernorm.weight": plain("residual"),
    },
    per_layer_config_keys=(),
    bias_switches={"olmo2": {"attn_out": "attention_bias"}},  # its FFN has no bias switch
    attn_post_norm="post_attention_layernorm",
    ffn_post_norm="post_feedforward_layernorm",
    gguf={},
    gguf_refused=READ_BACK_REFUSAL,
)
