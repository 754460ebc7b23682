"""SmolLM3: the Llama layout; some layers use no rotary positions (`no_rope_layers`, one flag per layer)."""

from subclone_core.archs.llama import ARCH as LLAMA
from subclone_core.archs.spec import ArchSpec

ARCH = ArchSpec(
    name="SmolLM3",
    model_types=("smollm3",),
    task="causal-lm",
    blocks="model.layers",
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    global_params=LLAMA.global_params,
    block_params=LLAMA.block_params,
    # the config has no head_dim field, but the model reads one when present: the child writes it
    config_keys=LLAMA.config_keys,
    tied_head=LLAMA.tied_head,
    per_layer_config_keys=("no_rope_layers", "layer_types"),
    scale_default=False,
)
