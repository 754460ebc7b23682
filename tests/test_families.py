"""The modern families (Qwen3, Gemma 3, Phi-3, SmolLM3, OLMo 2, GPT-NeoX): what differs from Llama.

The exactness suite (test_core_exactness) runs every family in tiny_models.FAMILIES; these tests cover
the rest: buffers computed from the child's own config, the fused and per-head layouts, post-norm and
parallel-residual statistics, refusals, and real-shape checkpoints built on the meta device.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import transformers
from accelerate import init_empty_weights

from subclone_core.core.archs import arch_for, supported_model_types
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.slicing import head_rows
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.io.saving import save_model_folder
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm

NEW = ["qwen3", "gemma3", "phi3", "smollm3", "olmo2", "gpt_neox"]
LANGUAGE = [f for f in tm.FAMILIES if f != "vit"]


def narrow_child(family: str, dtype: torch.dtype = torch.float64):
    """A child of a tiny parent with every size shrunk, in importance order."""
    parent = tm.make(family, dtype=dtype)
    full = Shape.of(parent.config)
    imp = calibrate(parent, [tm.inputs(parent, seed=s) for s in range(2)])
    heads = full.heads // 2
    # where hidden is heads x head_dim it halves with the heads; elsewhere it shrinks on its own
    hidden = full.hidden // 2 if _ties_hidden(parent) else full.hidden * 3 // 4 // heads * heads
    target = plan_shape(parent, layers=full.layers - 1, heads=heads, hidden=hidden, ffn=full.ffn // 2)
    return parent, subclone_model(parent, target, importance=imp)


def _ties_hidden(model) -> bool:
    return "head_dim" not in arch_for(model.config.model_type).config_keys


@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_child_in_memory_is_the_child_reloaded_from_disk(family, tmp_path, one_thread):
    """Buffers that transformers computes from the config (rotary frequencies, Gemma 3's sqrt(hidden)
    embedding scale) are the child's own, not the parent's, so a reload gives the same model."""
    _, child = narrow_child(family)
    child.model.save_pretrained(tmp_path)
    auto = (transformers.AutoModelForImageClassification if family == "vit"
            else transformers.AutoModelForCausalLM)
    reloaded = auto.from_pretrained(tmp_path, dtype=torch.float64).eval()
    mine, theirs = dict(child.model.named_buffers()), dict(reloaded.named_buffers())
    assert mine.keys() == theirs.keys()
    for name, buf in mine.items():
        torch.testing.assert_close(buf.to(theirs[name].dtype), theirs[name], rtol=0, atol=0, msg=name)
    batch = tm.inputs(child.model)
    # float64: equal weights and buffers, but loaded tensors may sit at other memory alignments, which
    # changes vectorized summation order (1e-16); a wrong buffer would show at 1e-3 and above
    torch.testing.assert_close(tm.output(child.model, batch), tm.output(reloaded, batch), rtol=0, atol=1e-12)


def test_children_of_new_families_reload_in_a_fresh_interpreter(tmp_path):
    """One interpreter that imports transformers but not this project loads every family's child."""
    expected = {}
    for family in NEW:
        _, child = narrow_child(family, dtype=torch.float32)
        save_model_folder(child.model, tmp_path / family, manifest=child.manifest)
        batch = tm.inputs(child.model)
        torch.save(batch, tmp_path / f"{family}.batch.pt")
        expected[family] = tm.output(child.model, batch)
    code = ("import sys, torch, transformers; assert 'subclone_core' not in sys.modules\n"
            "root = sys.argv[1]\n"
            "for f in sys.argv[2:]:\n"
            "    m = transformers.AutoModelForCausalLM.from_pretrained(f'{root}/{f}').eval()\n"
            "    b = torch.load(f'{root}/{f}.batch.pt')\n"
            "    torch.save(m(**b).logits.detach(), f'{root}/{f}.y.pt')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), *NEW], check=True, cwd=tmp_path,
                   capture_output=True)
    for family in NEW:
        torch.testing.assert_close(torch.load(tmp_path / f"{family}.y.pt"), expected[family], rtol=0, atol=0)


def test_gemma3_narrow_child_embeds_as_the_parent_does():
    """Gemma 3 multiplies embeddings by sqrt(hidden) from the config: the child's sliced embedding makes up
    for its smaller multiplier, so its embedding output is the parent's on the kept dimensions."""
    parent = tm.make("gemma3")
    child = subclone_model(parent, plan_shape(parent, hidden=16), strategy="first-k", scale=False)
    ids = tm.inputs(parent)["input_ids"]
    kept = child.selection.residual
    with torch.no_grad():
        expected = parent.get_input_embeddings()(ids)[..., kept]
        got = child.model.get_input_embeddings()(ids)
    # rtol: the tiny parent was built in float32, so its own sqrt(24) is rounded to float32
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)
    assert child.model.model.embed_tokens.embed_scale.item() == pytest.approx(16 ** 0.5, rel=1e-15)


def test_gemma3_norm_offsets_are_sliced_not_shifted():
    """Norm weights stored as offsets from 1 are sliced like any norm: the kept entries, unchanged."""
    parent = tm.make("gemma3")
    child = subclone_model(parent, plan_shape(parent, hidden=16), strategy="first-k", scale=True).model
    kept = list(range(16))
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        torch.testing.assert_close(child.model.layers[0].get_submodule(name).weight,
                                   parent.model.layers[0].get_submodule(name).weight[kept])
    assert arch_for("gemma3_text").norm_offset == 1.0


@pytest.mark.parametrize("family,norm,attr", [("qwen3", "q_norm", "heads"), ("gemma3", "k_norm", "kv_heads"),
                                              ("olmo2", "q_norm", "heads"), ("olmo2", "k_norm", "kv_heads")])
def test_qk_norms_per_head_kept_whole_full_width_sliced_with_heads(family, norm, attr):
    parent = tm.make(family)
    imp = calibrate(parent, [tm.inputs(parent)])
    child = subclone_model(parent, plan_shape(parent, heads=2, kv_heads=1), importance=imp)
    head_dim = Shape.of(parent.config).head_dim
    for j, b in enumerate(child.selection.blocks):
        want = parent.model.layers[b].self_attn.get_submodule(norm).weight
        if want.numel() != head_dim:  # OLMo 2: one weight per projection row
            want = want[head_rows(getattr(child.selection, attr)[j], head_dim)]
        torch.testing.assert_close(child.model.model.layers[j].self_attn.get_submodule(norm).weight, want)


def test_phi3_fused_qkv_and_gate_up_keep_the_kept_heads_and_neurons():
    parent = tm.make("phi3")  # 4 heads, 2 KV heads, head_dim 8, FFN 40
    imp = calibrate(parent, [tm.inputs(parent)])
    child = subclone_model(parent, plan_shape(parent, heads=2, kv_heads=1, ffn=20), importance=imp, scale=False)
    sel = child.selection
    for j, b in enumerate(sel.blocks):
        w = parent.model.layers[b].self_attn.qkv_proj.weight[:, sel.residual]
        q, k, v = w[:32], w[32:48], w[48:]
        kv = head_rows(sel.kv_heads[j], 8)
        want = torch.cat([q[head_rows(sel.heads[j], 8)], k[kv], v[kv]])
        torch.testing.assert_close(child.model.model.layers[j].self_attn.qkv_proj.weight, want)
        gate, up = parent.model.layers[b].mlp.gate_up_proj.weight[:, sel.residual].chunk(2)
        torch.testing.assert_close(child.model.model.layers[j].mlp.gate_up_proj.weight,
                                   torch.cat([gate[sel.ffn[j]], up[sel.ffn[j]]]))


def test_gpt_neox_fused_qkv_keeps_each_heads_interleaved_run():
    parent = tm.make("gpt_neox")  # 4 heads of 8: rows (head, [q; k; v], 8)
    imp = calibrate(parent, [tm.inputs(parent)])
    child = subclone_model(parent, plan_shape(parent, hidden=16), importance=imp, scale=False)
    sel = child.selection
    for j, b in enumerate(sel.blocks):
        w = parent.gpt_neox.layers[b].attention.query_key_value.weight.view(4, 3 * 8, 32)  # (H, 3 Dh, D)
        want = w[sel.heads[j]][:, :, sel.residual].reshape(-1, 16)
        torch.testing.assert_close(child.model.gpt_neox.layers[j].attention.query_key_value.weight, want)
    assert not child.model.config.tie_word_embeddings


@pytest.mark.parametrize("family", ["olmo2", "gemma3", "gpt_neox"])
def test_block_statistics_measure_what_the_block_adds_to_the_residual(family):
    """Post-norm (OLMo 2, Gemma 3) and parallel-residual (GPT-NeoX) blocks: f(x) = block(x) - x."""
    model = tm.make(family)
    batch = tm.inputs(model)
    imp = calibrate(model, [batch])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each block
    for i in range(len(hidden) - 2):  # the last entry has the final norm applied
        x, y = hidden[i].reshape(-1, hidden[i].shape[-1]), hidden[i + 1].reshape(-1, hidden[i].shape[-1])
        rel = ((y - x).norm(dim=-1) / y.norm(dim=-1)).mean()
        torch.testing.assert_close(imp.rel_magnitude[i], rel.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["olmo2", "gemma3"])
def test_post_norm_outputs_are_the_residual_scores(family):
    """Where a post-norm scales the attention and FFN outputs, its output is what joins the residual
    stream, so it (not the projection's output) is what residual importance sums."""
    model = tm.make(family)
    arch = arch_for(model.config.model_type)
    seen = {}
    handles = [model.model.layers[0].get_submodule(path).register_forward_hook(
        lambda m, a, out, key=key: seen.__setitem__(key, out.abs().reshape(-1, out.shape[-1]).mean(0)))
        for key, path in (("attn", arch.attn_post_norm), ("ffn", arch.ffn_post_norm))]
    batch = tm.inputs(model)
    try:
        imp = calibrate(model, [batch])
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(imp.residual_attn[0], seen["attn"].double())
    torch.testing.assert_close(imp.residual_ffn[0], seen["ffn"].double())


def test_multimodal_gemma3_is_refused_with_the_reason_and_the_list():
    with pytest.raises(SubcloneError, match=r"model_type='gemma3' \(multimodal Gemma 3.*'gemma3_text'.*"
                                            r"\); supported: .*gemma3_text.*gpt_neox"):
        arch_for("gemma3")
    with pytest.raises(SubcloneError, match=r"unsupported architecture model_type='bert'; supported: "):
        arch_for("bert")
    assert {"qwen3", "gemma3_text", "phi3", "smollm3", "olmo2", "gpt_neox"} <= set(supported_model_types())


# --- real shapes, random weights, never downloaded -------------------------------------------------------

REAL = {
    "gemma-3-270m": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {
        "vocab_size": 262_144, "hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 2048, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "max_position_embeddings": 32_768}),
    "qwen3-0.6b": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {
        "vocab_size": 151_936, "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "tie_word_embeddings": True,
        "max_position_embeddings": 40_960}),
}


def random_checkpoint(name: str) -> torch.nn.Module:
    """A real-shape model built on the meta device, then materialized in bf16 with random weights.

    Buffers are computed from the config as from_pretrained would; norm weights sit around their
    identity value, which the table's norm_offset says (0 for Gemma's offsets from 1, else 1).
    """
    config_class, model_class, sizes = REAL[name]
    with init_empty_weights(include_buffers=False):
        model = model_class(config_class(**sizes, bos_token_id=2, eos_token_id=1, pad_token_id=0))
    identity = 1.0 - arch_for(model.config.model_type).norm_offset
    gen = torch.Generator().manual_seed(0)
    for pname, p in list(model.named_parameters()):
        owner, _, leaf = pname.rpartition(".")
        real = torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
        if p.dim() == 1:
            real = real * 5 + identity
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(real))
    model.tie_weights()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_shape_child_loads_in_stock_transformers(name, tmp_path):
    start = time.perf_counter()
    parent = random_checkpoint(name)
    shape = Shape.of(parent.config)
    target = plan_shape(parent, layers=3, hidden=shape.hidden // 4, heads=2, kv_heads=1, ffn=shape.ffn // 8)
    child = subclone_model(parent, target, strategy="first-k", drop="middle")  # no calibration data here
    assert next(child.model.parameters()).dtype == torch.bfloat16
    folder = save_model_folder(child.model, tmp_path / "child", manifest=child.manifest)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, theirs = child.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.isfinite(mine).all() and mine.shape == (1, 12, parent.config.vocab_size)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert Shape.of(reloaded.config) == target
    assert time.perf_counter() - start < 120
