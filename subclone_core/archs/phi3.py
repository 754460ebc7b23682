"""Phi-3 and Phi-4-mini: fused qkv_proj ([q; k; v] under grouped-query attention), fused gate_up_proj
([gate; up]), partial rotary positions, untied head."""

from subclone_core.archs.spec import ArchSpec, linear, plain

ARCH = ArchSpec(
    name="Phi-3",
    model_types=("phi3",),
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
        "self_attn.qkv_proj.weight": linear("qkv", "residual"),
        "self_attn.o_proj.weight": linear("residual", "q"),
        "mlp.gate_up_proj.weight": linear("gate_up", "residual"),
        "mlp.down_proj.weight": linear("residual", "ffn"),
        "input_layernorm.weight": plain("residual"),
        "post_attention_layernorm.weight": plain("residual"),
    },
    # No head_dim key: the config has none and longrope checks its factors against hidden / heads,
    # so a child keeps hidden = heads x head_dim.
    config_keys={
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
    },
    tied_head=("lm_head.weight", "model.embed_tokens.weight"),
    scale_default=False,
)
