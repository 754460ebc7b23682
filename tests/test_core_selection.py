"""Selection rules and shape validation: GQA-valid heads, block policies, clear errors."""

from __future__ import annotations

import pytest
import torch

from subclone_core.core.errors import SubcloneError
from subclone_core.core.selection import pick, pick_blocks, pick_heads
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape
from tests import tiny_models as tm

PARENT = Shape(layers=4, hidden=64, heads=8, kv_heads=2, ffn=48, head_dim=8)


def test_pick_orders():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    assert pick(3, scores, "importance") == [1, 3, 2]
    assert pick(3, scores, "first") == [0, 1, 2]
    assert pick(3, scores, "uniform") == [0, 2, 4]


def test_heads_are_chosen_by_group_worth_and_stay_with_their_kv_head():
    # group 0 (heads 0-3) has one strong head; group 1 (heads 4-7) has two good heads
    scores = torch.tensor([9.0, 0.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0])
    child = Shape(4, 16, 2, 1, 48, 8)
    assert pick_heads(scores, PARENT, child, "importance") == ([4, 5], [1])
    assert pick_heads(scores, PARENT, Shape(4, 8, 1, 1, 48, 8), "importance") == ([0], [0])
    assert pick_heads(scores, PARENT, Shape(4, 32, 4, 2, 48, 8), "first") == ([0, 1, 4, 5], [0, 1])


def test_block_policies():
    rel = torch.tensor([0.9, 0.3, 0.1, 0.8, 0.2, 0.05, 0.7])  # block 6 is last: never dropped
    assert pick_blocks(7, 4, "middle") == [0, 1, 5, 6]
    assert pick_blocks(7, 4, "magnitude", rel) == [0, 1, 3, 6]
    assert pick_blocks(7, 4, "first") == [0, 1, 2, 3]
    assert pick_blocks(7, 5, [2, 3]) == [0, 1, 4, 5, 6]
    assert pick_blocks(7, 7, "magnitude", rel) == list(range(7))


@pytest.mark.parametrize("policy,layers,message", [
    ([9], 6, "out of range; valid blocks are 0..6"),
    ([2, 2], 5, "lists a block twice"),
    ([2, 3], 4, "use layers=5"),
    ("middle", 1, "use layers>=2"),
    ("magnitude", 3, "needs calibration data"),
    ("outer", 3, "valid: middle, magnitude, first"),
])
def test_bad_block_policies_are_refused(policy, layers, message):
    with pytest.raises(SubcloneError, match=message):
        pick_blocks(7, layers, policy)


@pytest.mark.parametrize("family,sizes,message", [
    ("llama", {"layers": 5}, "layers=5 is larger than the parent's 4; use at most 4"),
    ("llama", {"ffn": 0}, "ffn=0 must be a positive integer"),
    ("llama", {"hidden": -8}, "hidden=-8 must be a positive integer"),
    ("llama", {"heads": 6, "kv_heads": 4}, "kv_heads=4 is larger than the parent's 2"),
    ("llama", {"heads": 5, "kv_heads": 2}, "nearest valid heads=4"),
    ("llama", {"heads": 8, "kv_heads": 1}, "use kv_heads>=2 or heads<=4"),
    ("llama", {"hidden": 40, "heads": 6, "kv_heads": 2}, "not a multiple of heads=6"),
    ("gpt2", {"hidden": 20, "heads": 2}, "nearest valid: hidden=16, or heads=2"),
    ("gpt2", {"heads": 2, "kv_heads": 1}, "kv_heads=1 must equal heads=2"),
])
def test_invalid_shapes_name_the_value_and_a_valid_choice(family, sizes, message):
    with pytest.raises(SubcloneError, match=message):
        plan_shape(tm.make(family), **sizes)


def test_sizes_not_given_follow_the_parent():
    llama = tm.make("llama")  # 4 x 64, 8 heads / 2 KV, FFN 48
    assert plan_shape(llama, hidden=32) == Shape(4, 32, 4, 1, 48, 8)
    assert plan_shape(llama, heads=6) == Shape(4, 48, 6, 2, 48, 8)
    assert plan_shape(tm.make("gpt2"), hidden=16) == Shape(3, 16, 2, 2, 128, 8)
    assert plan_shape(tm.make("vit"), layers=2) == Shape(2, 32, 4, 4, 48, 8)
