"""GPT-2: Conv1D weights stored (in, out), fused c_attn, learned positions, LayerNorm with bias, tied head."""

from subclone_core.core.archs.spec import ArchSpec, conv1d, linear, plain

ARCH = ArchSpec(
    name="GPT-2",
    model_types=("gpt2",),
    task="causal-lm",
    blocks="transformer.h",
    attn_out="attn.c_proj",
    ffn_down="mlp.c_proj",
    global_params={
        "transformer.wte.weight": plain("keep", "residual"),
        "transformer.wpe.weight": plain("keep", "residual"),
        "transformer.ln_f.weight": plain("residual"),
        "transformer.ln_f.bias": plain("residual"),
        "lm_head.weight": linear("keep", "residual"),
    },
    block_params={
        "ln_1.weight": plain("residual"),
        "ln_1.bias": plain("residual"),
        "attn.c_attn.weight": conv1d("residual", "qkv"),
        "attn.c_attn.bias": plain("qkv"),
        "attn.c_proj.weight": conv1d("q", "residual"),
        "attn.c_proj.bias": plain("residual"),
        "ln_2.weight": plain("residual"),
        "ln_2.bias": plain("residual"),
        "mlp.c_fc.weight": conv1d("residual", "ffn"),
        "mlp.c_fc.bias": plain("ffn"),
        "mlp.c_proj.weight": conv1d("ffn", "residual"),
        "mlp.c_proj.bias": plain("residual"),
    },
    config_keys={"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn": "n_inner"},
    ffn_default_multiple=4,
    tied_head=("lm_head.weight", "transformer.wte.weight"),
)
