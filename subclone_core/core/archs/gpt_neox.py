"""GPT-NeoX (Pythia): fused query_key_value interleaved per head, partial rotary positions, LayerNorm with
bias, parallel attention and FFN (x + attn(ln1 x) + mlp(ln2 x)), untied head by default."""

from subclone_core.core.archs.gguf_tables import READ_BACK_REFUSAL
from subclone_core.core.archs.spec import ArchSpec, linear, plain

ARCH = ArchSpec(
    name="GPT-NeoX",
    model_types=("gpt_neox",),
    task="causal-lm",
    blocks="gpt_neox.layers",
    attn_out="attention.dense",
    ffn_down="mlp.dense_4h_to_h",
    global_params={
        "gpt_neox.embed_in.weight": plain("keep", "residual"),
        "gpt_neox.final_layer_norm.weight": plain("residual"),
        "gpt_neox.final_layer_norm.bias": plain("residual"),
        "lm_head.weight": linear("keep", "residual"),
    },
    block_params={
        "input_layernorm.weight": plain("residual"),
        "input_layernorm.bias": plain("residual"),
        "post_attention_layernorm.weight": plain("residual"),
        "post_attention_layernorm.bias": plain("residual"),
        # rows (heads, [q; k; v], head_dim): a kept head keeps its whole 3 x head_dim run
        "attention.query_key_value.weight": linear("qkv_per_head", "residual"),
        "attention.query_key_value.bias": plain("qkv_per_head"),
        "attention.dense.weight": linear("residual", "q"),
        "attention.dense.bias": plain("residual"),
        "mlp.dense_h_to_4h.weight": linear("ffn", "residual"),
        "mlp.dense_h_to_4h.bias": plain("ffn"),
        "mlp.dense_4h_to_h.weight": linear("residual", "ffn"),
        "mlp.dense_4h_to_h.bias": plain("residual"),
    },
    # head_dim is hidden / heads (no setting of its own); one KV head per query head
    config_keys={"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                 "ffn": "intermediate_size"},
    tied_head=("lm_head.weight", "gpt_neox.embed_in.weight"),
    scale_default=False,
    bias_switches={"gpt_neox": {"attn_out": "attention_bias"}},  # dense_4h_to_h always has a bias
    gguf_refused=READ_BACK_REFUSAL,
)
