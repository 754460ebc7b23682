"""GPT-2: Conv1D weights stored (in, out), fused c_attn, learned positions, LayerNorm with bias, tied head."""

from subclone_core.core.archs.gguf_tables import GgufSpec
from subclone_core.core.archs.spec import ArchSpec, conv1d, linear, plain

GPT2_METADATA = {
    "{arch}.context_length": lambda c: c.n_positions,
    "{arch}.embedding_length": lambda c: c.n_embd,
    "{arch}.block_count": lambda c: c.n_layer,
    "{arch}.feed_forward_length": lambda c: c.n_inner or 4 * c.n_embd,  # None means 4 x width in GPT-2
    "{arch}.vocab_size": lambda c: c.vocab_size,
    "{arch}.attention.head_count": lambda c: c.n_head,
    "{arch}.attention.layer_norm_epsilon": lambda c: c.layer_norm_epsilon,
}

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
    gguf={"gpt2": GgufSpec("GPT2", GPT2_METADATA,
                           transposed=("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"))},
)
