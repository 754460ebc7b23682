"""Gemma 3 (text): per-head q/k norms, norms stored as offsets from 1, pre- and post-norms around attention
and the FFN, an embedding multiplied by sqrt(hidden), sliding-window and full layers listed per layer."""

from dataclasses import replace

from subclone_core.core.archs.gguf_tables import ROTARY_DECODER, SLIDING_WINDOW, GgufSpec, head_dim
from subclone_core.core.archs.llama import ARCH as LLAMA
from subclone_core.core.archs.spec import plain, scaled_embedding

# head_dim is a setting of its own (256 in every size), not hidden / heads: LLAMA's config keys name it
ARCH = replace(
    LLAMA,
    name="Gemma 3",
    model_types=("gemma3_text",),
    global_params={**LLAMA.global_params, "model.embed_tokens.weight": scaled_embedding()},
    block_params={
        **LLAMA.block_params,
        "self_attn.q_norm.weight": plain("keep"),
        "self_attn.k_norm.weight": plain("keep"),
        # post_attention_layernorm is a post-norm here: it scales the attention output, not the FFN input
        "pre_feedforward_layernorm.weight": plain("residual"),
        "post_feedforward_layernorm.weight": plain("residual"),
    },
    attn_post_norm="post_attention_layernorm",
    ffn_post_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    bias_switches={"gemma3_text": {"attn_out": "attention_bias"}},  # its FFN has no bias switch
    # measured (docs/BENCHMARKS.md, refit variants): on the child's inputs Gemma 3 270M's children start 0.25 nats
    # higher than on the parent's, where SmolLM2's start 1.0-1.3 nats lower; why is not known
    refit_inputs="parent",
    gguf={"gemma3_text": GgufSpec("GEMMA3", ROTARY_DECODER, extra=SLIDING_WINDOW,
                                  requires={"query_pre_attn_scalar == head_dim":
                                            lambda c: c.query_pre_attn_scalar == head_dim(c)})},
)
