"""ViT for image classification: patch projection, cls token, learned positions, LayerNorm, classifier."""

from subclone_core.core.archs.spec import ArchSpec, Param, linear, plain

ARCH = ArchSpec(
    name="ViT",
    model_types=("vit",),
    task="image-classification",
    blocks="vit.layers",
    attn_out="attention.o_proj",
    ffn_down="mlp.fc2",
    global_params={
        "vit.embeddings.cls_token": plain("keep", "keep", "residual"),
        "vit.embeddings.mask_token": plain("keep", "keep", "residual"),
        "vit.embeddings.position_embeddings": plain("keep", "keep", "residual"),
        # Conv2d (out, channels, kh, kw): the input channels never shrink, so it is never scaled.
        "vit.embeddings.patch_embeddings.projection.weight": Param(("residual", "keep", "keep", "keep")),
        "vit.embeddings.patch_embeddings.projection.bias": plain("residual"),
        "vit.layernorm.weight": plain("residual"),
        "vit.layernorm.bias": plain("residual"),
        "classifier.weight": linear("keep", "residual"),
        "classifier.bias": plain("keep"),
    },
    block_params={
        "attention.q_proj.weight": linear("q", "residual"),
        "attention.q_proj.bias": plain("q"),
        "attention.k_proj.weight": linear("q", "residual"),
        "attention.k_proj.bias": plain("q"),
        "attention.v_proj.weight": linear("q", "residual"),
        "attention.v_proj.bias": plain("q"),
        "attention.o_proj.weight": linear("residual", "q"),
        "attention.o_proj.bias": plain("residual"),
        "layernorm_before.weight": plain("residual"),
        "layernorm_before.bias": plain("residual"),
        "layernorm_after.weight": plain("residual"),
        "layernorm_after.bias": plain("residual"),
        "mlp.fc1.weight": linear("ffn", "residual"),
        "mlp.fc1.bias": plain("ffn"),
        "mlp.fc2.weight": linear("residual", "ffn"),
        "mlp.fc2.bias": plain("residual"),
    },
    config_keys={"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                 "ffn": "intermediate_size"},
)
