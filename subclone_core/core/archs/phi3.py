"""Phi-3 and Phi-4-mini: fused qkv_proj ([q; k; v] under grouped-query attention), fused gate_up_proj
([gate; up]), partial rotary positions, untied head."""

from dataclasses import replace

from subclone_core.core.archs.gguf_tables import ROTARY_DECODER, SLIDING_WINDOW, GgufSpec
from subclone_core.core.archs.llama import ARCH as LLAMA
from subclone_core.core.archs.spec import linear, plain

ARCH = replace(
    LLAMA,
    name="Phi-3",
    model_types=("phi3",),
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
    config_keys={k: v for k, v in LLAMA.config_keys.items() if k != "head_dim"},
    per_layer_config_keys=(),
    bias_switches={},  # no bias switch for o_proj or down_proj: FLAP's compensation is refused
    gguf={"phi3": GgufSpec("PHI3", ROTARY_DECODER, extra=SLIDING_WINDOW)},
)
