"""Llama-layout decoders: separate q/k/v/o, grouped-query attention, RMSNorm, gated FFN, rotary positions."""

from subclone_core.core.archs.gguf_tables import LLAMA_ROTARY, ROTARY_DECODER, GgufSpec
from subclone_core.core.archs.spec import ArchSpec, linear, plain

ARCH = ArchSpec(
    name="Llama family",
    model_types=("llama", "mistral", "qwen2"),
    task="causal-lm",
    blocks="model.layers",
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    global_params={
        "model.embed_tokens.weight": plain("keep", "residual"),
        "model.norm.weight": plain("residual"),
        "lm_head.weight": linear("keep", "residual"),
    },
    block_params={
        "self_attn.q_proj.weight": linear("q", "residual"),
        "self_attn.q_proj.bias": plain("q"),
        "self_attn.k_proj.weight": linear("kv", "residual"),
        "self_attn.k_proj.bias": plain("kv"),
        "self_attn.v_proj.weight": linear("kv", "residual"),
        "self_attn.v_proj.bias": plain("kv"),
        "self_attn.o_proj.weight": linear("residual", "q"),
        "self_attn.o_proj.bias": plain("residual"),
        "mlp.gate_proj.weight": linear("ffn", "residual"),
        "mlp.up_proj.weight": linear("ffn", "residual"),
        "mlp.down_proj.weight": linear("residual", "ffn"),
        "input_layernorm.weight": plain("residual"),
        "post_attention_layernorm.weight": plain("residual"),
    },
    config_keys={
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
        "head_dim": "head_dim",
    },
    tied_head=("lm_head.weight", "model.embed_tokens.weight"),
    per_layer_config_keys=("layer_types",),
    scale_default=False,
    head="lm_head",
    # a sequence classifier (LlamaForSequenceClassification): one score per label from the residual stream
    task_heads={"sequence-classification": {"score.weight": linear("keep", "residual")}},
    gguf={
        "llama": GgufSpec("LLAMA", ROTARY_DECODER, rotary_interleave=LLAMA_ROTARY),
        # llama.cpp runs Mistral as "llama" (its sliding window equals full attention up to the window)
        "mistral": GgufSpec("LLAMA", ROTARY_DECODER, rotary_interleave=LLAMA_ROTARY),
        "qwen2": GgufSpec("QWEN2", ROTARY_DECODER),
    },
)
