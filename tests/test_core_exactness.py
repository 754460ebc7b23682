"""Exact equivalences of slicing: what a child computes, stated as what the parent computes."""

from __future__ import annotations

import pytest
import torch

from subclone_core.core.archs import arch_for
from subclone_core.core.selection import Selection
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm

ALL = list(tm.FAMILIES)
ATOL = 1e-5  # RMSNorm computes in float32 even for float64 models


def importance_of(model):
    return calibrate(model, [tm.inputs(model, seed=s) for s in range(3)])


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("strategy", ["first-k", "subclone"])
def test_full_size_child_reproduces_parent(family, strategy):
    parent = tm.make(family)
    imp = importance_of(parent) if strategy == "subclone" else None
    child = subclone_model(parent, plan_shape(parent), strategy=strategy, importance=imp, scale=False)
    batch = tm.inputs(parent)
    torch.testing.assert_close(tm.output(child.model, batch), tm.output(parent, batch), atol=ATOL, rtol=0)
    if strategy == "subclone":  # a real permutation, not the identity
        assert child.selection.residual != sorted(child.selection.residual)


def zero_inputs_hook(channels):
    def hook(module, args):
        x = args[0].clone()
        x[..., channels] = 0
        return (x,)
    return hook


def parent_with_zeroed_inputs(parent, module_path: str, dropped: dict[int, list[int]]):
    """Hooks on each block's module that zero the given input channels; returns the handles."""
    arch = arch_for(parent.config.model_type)
    blocks = parent.get_submodule(arch.blocks)
    return [blocks[b].get_submodule(module_path).register_forward_pre_hook(zero_inputs_hook(ch))
            for b, ch in dropped.items()]


def assert_matches_parent_with_hooks(parent, child, handles):
    batch = tm.inputs(parent)
    try:
        expected = tm.output(parent, batch)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(tm.output(child.model, batch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ALL)
def test_removing_ffn_neurons_equals_zeroing_down_inputs(family):
    parent = tm.make(family)
    full = Shape.of(parent.config)
    child = subclone_model(parent, plan_shape(parent, ffn=full.ffn // 2), importance=importance_of(parent),
                           scale=False)
    dropped = {b: sorted(set(range(full.ffn)) - set(kept)) for b, kept in enumerate(child.selection.ffn)}
    arch = arch_for(parent.config.model_type)
    assert_matches_parent_with_hooks(parent, child, parent_with_zeroed_inputs(parent, arch.ffn_down, dropped))


# Only families whose config carries head_dim can drop heads and keep the whole residual stream;
# GPT-2, ViT, GPT-NeoX and Phi-3 derive head_dim = hidden / heads, so fewer heads always means a narrower
# residual. OLMo 2 is left out on purpose: its q/k norms normalize over all heads at once, so a child
# without some heads is not the parent with those heads zeroed (the norm's denominator changes);
# test_families checks its q/k norms are sliced with the kept heads.
@pytest.mark.parametrize("family,heads,kv_heads", [("llama", 4, 2), ("llama", 4, 1), ("qwen2", 2, 2),
                                                   ("mistral", 2, 1), ("qwen3", 2, 1), ("gemma3", 2, 1),
                                                   ("gemma3", 2, 2), ("smollm3", 2, 2)])
def test_removing_heads_equals_zeroing_output_projection_inputs(family, heads, kv_heads):
    parent = tm.make(family)
    full = Shape.of(parent.config)
    # keep the full residual: only heads go
    target = Shape(full.layers, full.hidden, heads, kv_heads, full.ffn, full.head_dim)
    arch = arch_for(parent.config.model_type)
    child = subclone_model(parent, target, importance=importance_of(parent), scale=False)
    dropped = {}
    for b, kept in enumerate(child.selection.heads):
        gone = sorted(set(range(full.heads)) - set(kept))
        dropped[b] = [h * full.head_dim + d for h in gone for d in range(full.head_dim)]
    assert_matches_parent_with_hooks(parent, child, parent_with_zeroed_inputs(parent, arch.attn_out, dropped))
    assert Shape.of(child.model.config).heads == heads


@pytest.mark.parametrize("family", ALL)
def test_removing_a_block_equals_skipping_it(family):
    parent = tm.make(family)
    full = Shape.of(parent.config)
    child = subclone_model(parent, plan_shape(parent, layers=full.layers - 1), strategy="first-k",
                           drop=[1], scale=False)
    arch = arch_for(parent.config.model_type)
    block = parent.get_submodule(arch.blocks)[1]
    handle = block.register_forward_hook(lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"],
                                         with_kwargs=True)
    assert_matches_parent_with_hooks(parent, child, [handle])
    assert child.manifest.removed_blocks == [1]


def test_scaling_multiplies_linear_weights_by_sqrt_fan_in_ratio():
    parent = tm.make("llama-untied")
    full = Shape.of(parent.config)
    target = plan_shape(parent, heads=4, kv_heads=1, ffn=24)
    plain = subclone_model(parent, target, strategy="first-k", scale=False).model
    scaled = subclone_model(parent, target, strategy="first-k", scale=True).model
    ratio_residual = (full.hidden / target.hidden) ** 0.5
    blk_plain, blk_scaled = plain.model.layers[0], scaled.model.layers[0]
    torch.testing.assert_close(blk_scaled.self_attn.q_proj.weight, blk_plain.self_attn.q_proj.weight * ratio_residual)
    torch.testing.assert_close(blk_scaled.mlp.down_proj.weight, blk_plain.mlp.down_proj.weight * (48 / 24) ** 0.5)
    torch.testing.assert_close(scaled.lm_head.weight, plain.lm_head.weight * ratio_residual)
    # norms and embeddings are not linear layers: never scaled
    torch.testing.assert_close(scaled.model.norm.weight, plain.model.norm.weight)
    torch.testing.assert_close(scaled.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def test_tied_head_stays_tied_unscaled_unless_untied():
    parent = tm.make("llama")
    target = plan_shape(parent, heads=4, kv_heads=1)
    tied = subclone_model(parent, target, strategy="first-k", scale=True).model
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = subclone_model(parent, target, strategy="first-k", scale=True, untie_head=True).model
    assert not untied.config.tie_word_embeddings
    torch.testing.assert_close(untied.lm_head.weight, tied.model.embed_tokens.weight * (64 / 32) ** 0.5)


@pytest.mark.parametrize("family", ALL)
def test_parent_is_never_modified_and_shares_no_storage(family):
    parent = tm.make(family)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = subclone_model(parent, plan_shape(parent), importance=importance_of(parent), scale=True)
    with torch.no_grad():
        for p in child.model.parameters():
            p.add_(1.0)
    for k, v in parent.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in child.model.parameters())


def test_gqa_children_keep_each_query_head_with_its_kv_head():
    parent = tm.make("llama")  # 8 heads, 2 KV heads: query heads 0-3 use KV 0, 4-7 use KV 1
    imp = importance_of(parent)
    for heads, kv in [(4, 1), (6, 2), (2, 2)]:
        child = subclone_model(parent, plan_shape(parent, heads=heads, kv_heads=kv), importance=imp)
        sel: Selection = child.selection
        for q_heads, kv_heads in zip(sel.heads, sel.kv_heads):
            ratio = heads // kv
            for h, parent_head in enumerate(q_heads):
                assert parent_head // 4 == kv_heads[h // ratio]
        out = tm.output(child.model, tm.inputs(parent))
        assert out.shape[-1] == tm.VOCAB and torch.isfinite(out).all()
