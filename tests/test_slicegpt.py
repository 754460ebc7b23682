"""SliceGPT (Ashkboos et al., ICLR 2024) as strategy ``slicegpt``: norms folded, the residual stream rotated into
its PCA basis by one Q shared by every block, the first dimensions kept. A full-size child is the parent; a
stream planted in a low-rank subspace is kept whole by a child as wide as that rank, which no slicing of the
parent's own coordinates does; what cannot be rotated into a plain model is refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import RESIDUAL_COV
from subclone_core.core.errors import SubcloneError
from subclone_core.core.rotation import pca_basis, stream_norms
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import (
    STRATEGY_SPECS,
    needs_calibration,
    needs_input_stats,
    needs_residual_cov,
    subclone_model,
)
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")
ROTATABLE = ("llama", "llama-untied", "mistral", "qwen2", "qwen3", "smollm3")


def batches(model) -> list[dict[str, Tensor]]:
    """Two calibration batches, the first left-padded: padding must be left out of the covariance."""
    return [tm.inputs(model, seed=1, pad=2), tm.inputs(model, seed=2)]


def slicegpt(parent, importance=None, **sizes):
    """SliceGPT's child of ``parent`` at the parent's shape with ``sizes`` replaced."""
    importance = importance or calibrate(parent, batches(parent), residual_cov=True)
    target = dataclasses.replace(Shape.of(parent.config), **sizes)
    return subclone_model(parent, target, strategy="slicegpt", importance=importance)


def gap(child, parent, seed: int = 5) -> float:
    """The largest logit difference on held-out tokens."""
    batch = tm.inputs(parent, seed=seed)
    return float((tm.output(child, batch) - tm.output(parent, batch)).abs().max())


@pytest.mark.parametrize("family", ROTATABLE)
def test_a_full_size_child_is_the_parent(family):
    parent = tm.make(family)
    child = slicegpt(parent)
    # HF's RMSNorm normalizes in float32 even in a float64 model: that is the tolerance
    assert gap(child.model, parent) < 1e-5
    assert child.manifest.strategy == "slicegpt" and child.manifest.order == "rotate"
    assert not any("norm" in n and not torch.allclose(p, torch.ones_like(p))
                   for n, p in child.model.named_parameters() if "q_norm" not in n and "k_norm" not in n)


def test_a_full_size_float32_child_is_the_parent():
    parent = tm.make("llama", dtype=torch.float32)
    child = slicegpt(parent)
    assert next(child.model.parameters()).dtype == torch.float32
    assert gap(child.model, parent) < 1e-4


def test_the_covariance_is_the_streams_second_moment_at_every_norm():
    """Recomputed with plain hooks on the input of every norm over the stream (each sublayer's, the final)."""
    parent = tm.make("llama")
    arch, seen = arch_of_model(parent), []
    norms = [f"{arch.blocks}.{i}.{n}" for i in range(parent.config.num_hidden_layers)
             for n, _ in stream_norms(arch).block] + [stream_norms(arch).outside[0]]
    hooks = [parent.get_submodule(p).register_forward_hook(lambda m, a, o: seen.append(a[0])) for p in norms]
    total, tokens = torch.zeros(64, 64, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches(parent):
            seen.clear()
            parent(**batch)
            mask = batch["attention_mask"].bool()
            total += sum(x[mask].T @ x[mask] for x in seen)
            tokens += int(mask.sum())
    for h in hooks:
        h.remove()
    importance = calibrate(parent, batches(parent), residual_cov=True)
    assert len(norms) == 2 * 4 + 1
    torch.testing.assert_close(importance.stat(RESIDUAL_COV), total / tokens)


def planted(rank: int = 16):
    """A tiny Llama whose residual stream lives in a random ``rank``-dimensional subspace U, in no coordinate's
    direction: the embedding and every writer of the stream are projected onto U."""
    parent = tm.make("llama-untied")
    # the stream of a random tiny model is small (mean x^2 ~ 1e-4): the norms' eps, which a child k wide adds
    # to a mean over k entries instead of D, would be the only difference left
    parent.config.rms_norm_eps = 1e-12
    for name, module in parent.named_modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12
    u = torch.linalg.qr(torch.randn(64, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    onto = u @ u.T
    arch = arch_of_model(parent)
    with torch.no_grad():
        parent.get_submodule("model.embed_tokens").weight.copy_(parent.model.embed_tokens.weight @ onto)
        for block in parent.get_submodule(arch.blocks):
            for path in (arch.attn_out, arch.ffn_down):
                w = block.get_submodule(path).weight
                w.copy_(onto @ w)
    return parent, u


def test_a_child_as_wide_as_a_planted_rank_keeps_the_whole_stream():
    """k = 32 of 64 dimensions hold a rank-16 stream whole after the rotation (the sliced norms divide by the
    parent's width, SliceGPT's RMSN): the parent's logits; slicing the parent's own coordinates, first ones or
    by importance, loses most of it."""
    parent, u = planted()
    importance = calibrate(parent, batches(parent), residual_cov=True)
    q = pca_basis(importance.stat(RESIDUAL_COV))
    assert torch.linalg.matrix_norm(u.T @ q[:, :16]) ** 2 == pytest.approx(16)  # the top directions are U
    target = dataclasses.replace(Shape.of(parent.config), hidden=32)
    child = subclone_model(parent, target, strategy="slicegpt", importance=importance)
    assert child.model.config.hidden_size == 32
    assert gap(child.model, parent) < 1e-4
    for strategy in ("first-k", "subclone"):
        other = subclone_model(parent, target, strategy=strategy, importance=importance)
        assert gap(other.model, parent) > 1e3 * max(gap(child.model, parent), 1e-7), strategy


def test_a_narrower_child_of_a_real_stream_beats_first_k_slicing():
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), residual_cov=True)
    target = dataclasses.replace(Shape.of(parent.config), hidden=32)
    rotated = subclone_model(parent, target, strategy="slicegpt", importance=importance)
    plain = subclone_model(parent, target, strategy="first-k", importance=importance)
    assert gap(rotated.model, parent) < gap(plain.model, parent)


def test_a_shallower_child_is_the_rotated_parent_without_those_blocks():
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), residual_cov=True)
    target = dataclasses.replace(Shape.of(parent.config), layers=3)
    child = subclone_model(parent, target, strategy="slicegpt", importance=importance, drop=[2])
    shortgpt = subclone_model(parent, target, strategy="shortgpt", importance=importance, drop=[2])
    assert child.manifest.kept_blocks == [0, 1, 3]
    assert gap(child.model, shortgpt.model) < 1e-5


@pytest.mark.parametrize("final_gain, tied", [(None, False), (1.0, True)])
def test_a_tied_head_stays_tied_only_where_no_norm_was_folded_into_it(final_gain, tied):
    parent = tm.make("llama")
    if final_gain is not None:
        with torch.no_grad():
            parent.model.norm.weight.fill_(final_gain)
    child = slicegpt(parent, hidden=32)
    assert child.model.config.tie_word_embeddings is tied
    assert (child.model.lm_head.weight.data_ptr() == child.model.model.embed_tokens.weight.data_ptr()) is tied


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_child_saves_and_reloads_as_a_plain_model(family, tmp_path):
    parent = tm.make(family)
    child = slicegpt(parent, hidden=Shape.of(parent.config).hidden // 2)
    child.model.save_pretrained(tmp_path)
    again, info = type(parent).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    assert type(again) is type(parent) and again.config.hidden_size == child.model.config.hidden_size
    again = again.to(torch.float64).eval()
    batch = tm.inputs(parent, seed=5)
    torch.testing.assert_close(tm.output(again, batch), tm.output(child.model, batch))


# family -> what its table says that a rotation cannot pass
REFUSED = {
    "gemma3": "post-norms", "olmo2": "post-norms", "gpt2": "LayerNorms with a bias",
    "gpt_neox": "LayerNorms with a bias", "vit": "LayerNorms with a bias", "phi3": "head_dim derived",
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_family_whose_stream_cannot_be_rotated_is_refused_in_one_line(family):
    parent = tm.make(family)
    importance = calibrate(parent, batches(parent), residual_cov=True)
    with pytest.raises(SubcloneError, match=REFUSED[family]) as err:
        subclone_model(parent, Shape.of(parent.config), strategy="slicegpt", importance=importance)
    assert "\n" not in str(err.value)
    assert "valid families: llama, mistral, qwen2, qwen3, smollm3" in str(err.value)


@pytest.mark.parametrize("sizes, named", [({"heads": 4, "kv_heads": 1}, "heads=4, kv_heads=1"),
                                          ({"ffn": 24}, "ffn=24")])
def test_width_cuts_other_than_the_hidden_size_are_refused(sizes, named):
    parent = tm.make("llama")
    with pytest.raises(SubcloneError, match=f"hidden size only .* not {named}; keep heads=8, kv_heads=2, ffn=48"):
        slicegpt(parent, **sizes)


def test_a_calibration_without_the_covariance_is_refused():
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent))
    assert RESIDUAL_COV not in importance.input_stats  # the default records none: other strategies pay nothing
    with pytest.raises(SubcloneError, match="calibrate with residual_cov=True"):
        slicegpt(parent, importance=importance, hidden=32)


def test_only_slicegpt_asks_for_the_covariance():
    assert [name for name in STRATEGY_SPECS if needs_residual_cov(name)] == ["slicegpt"]
    assert not needs_input_stats("slicegpt") and needs_calibration("slicegpt", None)


def test_a_saved_importance_keeps_the_covariance(tmp_path):
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), residual_cov=True)
    importance.save(tmp_path / "importance.json")
    again = type(importance).load(tmp_path / "importance.json")
    torch.testing.assert_close(again.stat(RESIDUAL_COV), importance.stat(RESIDUAL_COV))


def test_make_builds_a_slicegpt_child_from_the_hidden_size_alone(llama_dir, counting_text_file, tmp_path):
    """`make --strategy slicegpt --hidden N`: calibration records the covariance, the heads and FFN stay the
    parent's (they do not follow the hidden size as for the other strategies), the plan says the rotation, and
    the child reloads as a plain model."""
    from transformers import AutoModelForCausalLM

    from tests.cli_runner import run_cli

    parent = AutoModelForCausalLM.from_pretrained(llama_dir)
    hidden = parent.config.hidden_size // 2
    code, out, err = run_cli(["make", "--parent", llama_dir, "--out", tmp_path / "c", "--strategy", "slicegpt",
                              "--hidden", hidden, "--data", counting_text_file, "--calib-tokens", 256])
    assert code == 0, err
    assert "slicegpt, drop magnitude, one PCA rotation of the stream, slice only" in out.splitlines()[0]
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert child.config.hidden_size == hidden
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers"):
        assert getattr(child.config, key) == getattr(parent.config, key), key
