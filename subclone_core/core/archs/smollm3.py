"""SmolLM3: the Llama layout; some layers use no rotary positions (`no_rope_layers`, one flag per layer).

The config has no head_dim field, but the model reads one when present: the child writes it.
"""

from dataclasses import replace

from subclone_core.core.archs.gguf_tables import READ_BACK_REFUSAL
from subclone_core.core.archs.llama import ARCH as LLAMA

ARCH = replace(
    LLAMA,
    name="SmolLM3",
    model_types=("smollm3",),
    per_layer_config_keys=("no_rope_layers", "layer_types"),
    bias_switches={"smollm3": {"attn_out": "attention_bias", "ffn_down": "mlp_bias"}},
    gguf={},
    gguf_refused=READ_BACK_REFUSAL,
)
