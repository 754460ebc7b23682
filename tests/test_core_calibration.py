"""Calibration: the paper's mean |activation| scores, padding, token budget, and O(width) memory."""

from __future__ import annotations

import pytest
import torch

from subclone_core.core.calibration import Importance
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm


def test_scores_are_mean_absolute_activations():
    model = tm.make("llama")
    batch = tm.inputs(model)
    seen = {}
    down = model.model.layers[1].mlp.down_proj
    o_proj = model.model.layers[2].self_attn.o_proj
    hooks = [down.register_forward_pre_hook(lambda m, a: seen.__setitem__("ffn", a[0].clone())),
             o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("heads", a[0].clone())),
             o_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("attn_out", o.clone()))]
    tm.output(model, batch)
    for h in hooks:
        h.remove()
    imp = calibrate(model, [batch])
    torch.testing.assert_close(imp.ffn[1], seen["ffn"].abs().mean((0, 1)))
    per_head = seen["heads"].abs().mean((0, 1)).view(8, 8).mean(-1)  # (H, Dh) -> (H,)
    torch.testing.assert_close(imp.heads[2], per_head)
    torch.testing.assert_close(imp.residual_attn[2], seen["attn_out"].abs().mean((0, 1)))
    assert imp.tokens == batch["input_ids"].numel()
    shared = imp.residual_embed + imp.residual_attn.sum(0) + imp.residual_ffn.sum(0) + imp.residual_block.sum(0)
    torch.testing.assert_close(imp.residual, shared)


def test_block_statistics_match_their_definition():
    model = tm.make("gpt2")
    batch = tm.inputs(model)
    io = {}
    block = model.transformer.h[1]
    h = block.register_forward_hook(
        lambda m, a, kw, o: io.update(x=(a[0] if a else kw["hidden_states"]).clone(), y=o.clone()), with_kwargs=True)
    tm.output(model, batch)
    h.remove()
    imp = calibrate(model, [batch])
    x, y = io["x"], io["y"]
    rel = ((y - x).norm(dim=-1) / y.norm(dim=-1)).mean()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
    torch.testing.assert_close(imp.rel_magnitude[1], rel.to(torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.one_minus_cos[1], (1 - cos).to(torch.float64), rtol=1e-5, atol=1e-6)


def test_padding_positions_are_not_counted():
    model = tm.make("llama")
    real = tm.inputs(model, batch=1, seq=6)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), real["input_ids"]], dim=1)  # 3 left pads
    padded = {"input_ids": ids, "attention_mask": torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()}
    a, b = calibrate(model, [real]), calibrate(model, [padded])
    assert a.tokens == b.tokens == 6
    torch.testing.assert_close(b.ffn, a.ffn, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.residual, a.residual, rtol=1e-4, atol=1e-6)


def _state_numel(imp: Importance) -> int:
    return sum(getattr(imp, f).numel() for f in ("residual_embed", "residual_attn", "residual_ffn",
                                                  "residual_block", "ffn", "heads", "rel_magnitude"))


def test_memory_does_not_grow_with_tokens_and_budget_stops_early():
    model = tm.make("llama", dtype=torch.float32)
    batches = [tm.inputs(model, batch=8, seq=125, seed=s) for s in range(10)]  # 1,000 tokens each
    small = calibrate(model, batches[:1])
    large = calibrate(model, batches)
    assert (small.tokens, large.tokens) == (1_000, 10_000)
    assert _state_numel(small) == _state_numel(large)
    calls = []
    budget = calibrate(model, iter(batches), max_tokens=2_500, progress=lambda done, total: calls.append(done))
    assert budget.tokens == 3_000 and calls == [1_000, 2_000, 3_000]


def test_hooks_are_removed_even_when_the_forward_fails():
    model = tm.make("llama")
    bad = {"input_ids": torch.full((1, 4), 10_000), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises((IndexError, RuntimeError)):
        calibrate(model, [bad])
    hooks = sum(len(m._forward_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules())
    assert hooks == 0


def test_vit_counts_every_patch_position_and_round_trips_json(tmp_path):
    model = tm.make("vit")
    batch = tm.inputs(model, batch=4)
    imp = calibrate(model, [batch], data="digits")
    assert imp.tokens == 4 * (1 + (8 // 4) ** 2)  # cls + 4 patches per image
    path = tmp_path / "imp.json"
    imp.save(path)
    again = Importance.load(path)
    for f in ("residual", "ffn", "heads", "rel_magnitude", "one_minus_cos"):
        torch.testing.assert_close(getattr(again, f), getattr(imp, f))
    assert (again.tokens, again.data) == (imp.tokens, "digits")
