"""The published methods on the app's Child and Train pages: each builds the shape it can (a depth-only method
keeps every width, SliceGPT's rotation keeps the heads and FFN), and a method reading statistics that the
Importance page's calibration did not record calibrates again instead of failing."""

from __future__ import annotations

import pytest
import torch

from subclone_core.app.steps import STRATEGY_LABELS, child_settings, extra_strategies, make_children
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import STRATEGY_SPECS, plan_shape, strategy_shape
from subclone_core.sources import load_parent
from subclone_core.workflow.children import has_statistics, measure_importance


def test_every_published_method_is_offered_on_the_child_page():
    published = {"minitron", "shortgpt", "flap", "wanda-sp", "slicegpt", "grail", "llm-pruner"}
    assert published <= set(STRATEGY_LABELS) <= set(STRATEGY_SPECS)


def test_each_strategy_builds_the_shape_it_can(tiny_llama_dir):
    parent = load_parent(str(tiny_llama_dir))
    full = Shape.of(parent.model.config)
    target = plan_shape(parent.model, layers=1, hidden=16, heads=2, kv_heads=1, ffn=24)
    assert strategy_shape(parent.model, "subclone", target) == target
    depth_only = strategy_shape(parent.model, "shortgpt", target)
    assert depth_only.layers == 1 and depth_only == plan_shape(parent.model, layers=1)
    rotated = strategy_shape(parent.model, "slicegpt", target)
    assert (rotated.layers, rotated.hidden) == (1, 16)
    assert (rotated.heads, rotated.kv_heads, rotated.ffn) == (full.heads, full.kv_heads, full.ffn)


def test_a_method_reading_statistics_the_pages_calibration_lacks_calibrates_again(tiny_llama_dir,
                                                                                   counting_text_file):
    parent, data = load_parent(str(tiny_llama_dir)), str(counting_text_file)
    paper = measure_importance(parent, data, tokens=256)  # what the Importance page measures
    assert has_statistics(paper, ["subclone"]) and not has_statistics(paper, ["flap"])
    target = plan_shape(parent.model, layers=2, hidden=16, heads=2, kv_heads=1, ffn=24)
    settings = child_settings("flap", None, None, data, 256)
    child, _ = make_children(parent, target, settings, importance=paper)  # raised before: no input statistics
    fresh, _ = make_children(parent, target, settings, importance=None)
    assert has_statistics(child.importance, ["flap"])
    for (name, mine), theirs in zip(child.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_the_train_page_offers_the_strategies_that_build_the_childs_shape():
    import tiny_models as tm

    llama, gemma = tm.make("llama", dtype=torch.float32), tm.make("gemma3", dtype=torch.float32)
    narrow = plan_shape(llama, layers=2, hidden=Shape.of(llama.config).hidden // 2)
    assert "shortgpt" not in extra_strategies(llama, narrow) and "flap" in extra_strategies(llama, narrow)
    assert {"shortgpt", "slicegpt"} <= set(extra_strategies(llama, plan_shape(llama, layers=2)))
    with pytest.raises(SubcloneError, match="slicegpt"):  # Gemma 3's post-norms do not fold
        strategy_shape(gemma, "slicegpt", plan_shape(gemma, layers=2))
    assert "slicegpt" not in extra_strategies(gemma, plan_shape(gemma, layers=2))
