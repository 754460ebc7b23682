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
        # present where the config's mlp_bias is on (Llama, SmolLM3)
        "mlp.gate_proj.bias": plain("ffn"),
        "mlp.up_proj.bias": plain("ffn"),
        "mlp.down_proj.bias": plain("residual"),
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
    # Llama's attention_bias / mlp_bias add biases to q, k, v, o / gate, up, down; Mistral and Qwen2 have no such
    # switch for o_proj and down_proj (Qwen2's q, k, v biases are fixed on, its o_proj's off)
    bias_switches={"llama": {"attn_out": "attention_bias", "ffn_down": "mlp_bias"}},
    # a sequence classifier (LlamaForSequenceClassification): one score per label from the residual stream
    task_heads={"sequence-classification": {"score.weight": linear("keep", "residual")}},
    gguf={
        "llama": GgufSpec("LLAMA", ROTARY_DECODER, rotary_interleave=LLAMA_ROTARY),
        # llama.cpp runs Mistral as "llama" (its sliding window equals full attention up to the window)
        "mistral": GgufSpec("LLAMA", ROTARY_DECODER, rotary_interleave=LLAMA_ROTARY),
        "qwen2": GgufSpec("QWEN2", ROTARY_DECODER),
    },
)
