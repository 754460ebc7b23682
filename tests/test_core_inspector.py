"""The neuron inspector on tiny models: its running top-k equals a brute-force top-k over every
activation, padding is skipped, hooks are removed, and the massive-activation finder."""

from __future__ import annotations

import pytest
import torch

from subclone_core.analysis.inspector import Unit, context_text, outsized_dimensions, top_activations
from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")
UNITS = [Unit("residual", 1, 5), Unit("ffn", 2, 7), Unit("head", 0, 3), Unit("residual", 1, 9)]


def all_activations(model, batches, unit: Unit) -> list[tuple[float, int, int]]:
    """Every (value, item, position) of a unit, by storing every activation (what the inspector avoids)."""
    arch = arch_for(model.config.model_type)
    block = model.get_submodule(arch.blocks)[unit.block]
    module = {"residual": block, "ffn": block.get_submodule(arch.ffn_down),
              "head": block.get_submodule(arch.attn_out)}[unit.kind]
    seen = []

    def hook(mod, args, output):
        x = (output[0] if isinstance(output, tuple) else output) if unit.kind == "residual" else args[0]
        if unit.kind == "head":
            x = x.unflatten(-1, (model.config.num_attention_heads, -1)).abs().mean(-1)
        seen.append(x[..., unit.index])  # (B, T)

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    out, item = [], 0
    for batch, values in zip(batches, seen):
        mask = batch.get("attention_mask", torch.ones(values.shape, dtype=torch.long))
        out += [(float(values[b, t]), item + b, t) for b in range(values.shape[0])
                for t in range(values.shape[1]) if mask[b, t]]
        item += values.shape[0]
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_top_k_equals_brute_force(family):
    model = tm.make(family)
    batches = [tm.inputs(model, batch=3, seq=9, seed=s, pad=3) for s in range(3)]
    units = [u for u in UNITS if u.block < model.config.num_hidden_layers]
    found = top_activations(model, batches, units, k=5, context=2)
    for unit in units:
        brute = sorted(all_activations(model, batches, unit), key=lambda v: -abs(v[0]))[:5]
        hits = found[unit]
        assert [(h.item, h.position) for h in hits] == [(i, t) for _, i, t in brute], unit
        assert [h.value for h in hits] == pytest.approx([v for v, _, _ in brute], rel=1e-9)
    assert not any(m._forward_hooks for m in model.modules())


def test_text_hits_carry_their_token_context():
    model = tm.make("llama")
    batches = [tm.inputs(model, batch=2, seq=8, seed=4)]
    hit = top_activations(model, batches, [Unit("ffn", 0, 1)], k=3, context=2)[Unit("ffn", 0, 1)][0]
    ids = batches[0]["input_ids"][hit.item]
    expected = [int(ids[p]) if 0 <= p < len(ids) else -1 for p in range(hit.position - 2, hit.position + 3)]
    assert list(hit.context) == expected and hit.center == 2
    before, token, after = context_text(tm.tokenizer(), hit)
    assert token == f"w{int(ids[hit.position])}"
    assert before.split() == [f"w{t}" for t in expected[:2] if t >= 0]
    assert after.split() == [f"w{t}" for t in expected[3:] if t >= 0]


def test_image_hits_have_no_token_context_and_count_patches():
    model = tm.make("vit")
    seen = []
    found = top_activations(model, [tm.inputs(model, batch=4)], [Unit("head", 1, 0)], k=3,
                            progress=lambda done, total: seen.append(done))
    assert seen == [4 * 5]  # 4 images x (4 patches + CLS)
    assert all(h.context is None and 0 <= h.position < 5 for h in found[Unit("head", 1, 0)])


@pytest.mark.parametrize("unit,message", [(Unit("ffn", 9, 0), "valid blocks are 0..3"),
                                          (Unit("head", 0, 8), "valid: 0..7"), (Unit("attn", 0, 0), "unknown")])
def test_units_outside_the_model_are_refused(unit, message):
    with pytest.raises(SubcloneError, match=message):
        top_activations(tm.make("llama"), [], [unit])


def test_outsized_dimensions_find_a_planted_massive_activation():
    model = tm.make("llama")
    importance = calibrate(model, [tm.inputs(model, batch=2, seq=8)])
    importance.residual_block[2, 11] = 1e4  # one dimension far above the rest, peaking at block 2
    assert outsized_dimensions(importance) == [Unit("residual", 2, 11)]
