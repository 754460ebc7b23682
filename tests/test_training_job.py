"""One training path: the app's Train page and `subclone compare` build the same candidates for the same
request, by one block rule, and read one data budget."""

from __future__ import annotations

import pytest

from subclone_core.app.steps import (
    STRATEGY_LABELS,
    TrainRequest,
    build_request_candidates,
    child_settings,
    make_children,
)
from subclone_core.cli.commands.compare import calibrate_with_progress, candidate_settings
from subclone_core.cli.main import build_parser
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest
from subclone_core.core.strategies import STRATEGY_SPECS, plan_shape, strategy_shape
from subclone_core.sources import load_parent
from subclone_core.training import TrainConfig
from subclone_core.workflow.jobs import (
    CandidateSettings,
    block_policy,
    block_policy_text,
    build_candidates,
    training_data,
    training_examples,
)

NAMES = ("subclone", "random", "first-k", "uniform")


def _without_time(manifest: Manifest) -> dict:
    return {k: v for k, v in manifest.to_json().items() if k != "created"}


def _cli_manifests(parent_dir: str, text_file: str, drop: list[str]) -> dict[str, Manifest]:
    """What `subclone compare` builds, through its own flag parsing and calibration."""
    args = build_parser().parse_args(
        ["compare", "--parent", parent_dir, "--layers", "2", "--hidden", "16", "--heads", "2", "--kv-heads", "1",
         "--ffn", "24", "--strategies", ",".join(NAMES), "--data", text_file, "--calib-tokens", "256", "--quiet",
         *drop])
    settings = candidate_settings(args)
    parent = load_parent(args.parent)
    target = plan_shape(parent.model, layers=2, hidden=16, heads=2, kv_heads=1, ffn=24)
    importance = calibrate_with_progress(parent, settings, quiet=True)
    return build_candidates(parent, target, settings, importance=importance)[1]


def _app_manifests(parent_dir: str, text_file: str, drop: str | None) -> dict[str, Manifest]:
    """What the Child page makes and the Train page adds to it (first-k and uniform)."""
    parent = load_parent(parent_dir)
    target = plan_shape(parent.model, layers=2, hidden=16, heads=2, kv_heads=1, ffn=24)
    settings = child_settings("subclone", drop, None, text_file, 256)
    child, twin = make_children(parent, target, settings, importance=None)
    request = TrainRequest(parent=parent, data_id=text_file, child=child, twin=twin, settings=settings,
                           extra=("first-k", "uniform"))
    return build_request_candidates(request)[1]


@pytest.mark.parametrize("drop", [None, "middle"])
def test_app_and_cli_build_identical_candidates(tiny_llama_dir, counting_text_file, drop):
    cli = _cli_manifests(str(tiny_llama_dir), str(counting_text_file), [] if drop is None else ["--drop", drop])
    app = _app_manifests(str(tiny_llama_dir), str(counting_text_file), drop)
    assert list(cli) == list(app) == list(NAMES)
    for name in NAMES:
        assert _without_time(cli[name]) == _without_time(app[name]), name
    # the block rule: first-k takes subclone's blocks; uniform keeps its own default unless told
    assert cli["first-k"].removed_blocks == cli["subclone"].removed_blocks
    assert cli["uniform"].drop == (drop or STRATEGY_SPECS["uniform"].default_drop)


def test_block_rule():
    assert block_policy("random", "middle") is None
    assert block_policy("first-k", None) == STRATEGY_SPECS["subclone"].default_drop
    assert block_policy("first-k", [1, 2]) == [1, 2]
    assert block_policy("uniform", None) == "first"  # its own default, the first N blocks
    assert block_policy("subclone+distill", None) == STRATEGY_SPECS["subclone"].default_drop


@pytest.mark.parametrize("drop", [None, "middle"])
def test_the_child_pages_block_caption_states_the_policy_the_child_is_built_with(tiny_llama_dir,
                                                                                  counting_text_file, drop):
    parent = load_parent(str(tiny_llama_dir))
    target = plan_shape(parent.model, layers=2, hidden=16, heads=2, kv_heads=1, ffn=24)
    for name in STRATEGY_LABELS:
        settings = child_settings(name, drop, None, str(counting_text_file), 256)
        child, _ = make_children(parent, strategy_shape(parent.model, name, target), settings, importance=None)
        caption = block_policy_text(name, drop)
        assert caption.split(" (")[0] == str(child.manifest.drop), (name, caption, child.manifest.drop)
        assert caption.endswith("(the default)") == (drop is None)


def test_settings_refuse_bad_names_before_any_work():
    with pytest.raises(SubcloneError, match="unknown strategy 'magic'"):
        CandidateSettings(names=("subclone", "magic")).validate()
    with pytest.raises(SubcloneError, match="listed twice"):
        CandidateSettings(names=("random", "random")).validate()
    with pytest.raises(SubcloneError, match="'uniform' is not a candidate"):
        CandidateSettings(names=("subclone",), lr={"uniform": 1e-3}).validate()


def test_one_data_budget_for_text_and_images(tiny_llama_dir, tiny_vit_dir, counting_text_file):
    config = TrainConfig(steps=3, batch_size=2, grad_accum=2)
    assert training_examples(config) == 12  # sequences or images the run consumes
    text = load_parent(str(tiny_llama_dir))
    train, _, _ = training_data(text, str(counting_text_file), config, seq_len=8, eval_tokens=16, eval_images=4)
    assert len(train) == 12  # sequences of 8 tokens
    images = load_parent(str(tiny_vit_dir))
    train, val, sized = training_data(images, "digits", config, seq_len=8, eval_tokens=16, eval_images=4)
    assert len(train) == 12 and len(val) == 4 and sized.eval_batches == 2


def test_a_bf16_child_trains_with_float32_weights(tiny_llama_dir, counting_text_file, tmp_path):
    """Children keep a bf16 parent's dtype when made; training upcasts them (AdamW state in bf16 loses the
    small updates) and bf16 speed comes from autocast instead."""
    import torch

    from subclone_core.training import train_candidates

    parent = load_parent(str(tiny_llama_dir), dtype=torch.bfloat16)
    target = plan_shape(parent.model, layers=2, hidden=16, heads=2, kv_heads=1, ffn=24)
    settings = CandidateSettings(names=("uniform", "random"), seed=0)
    candidates, _ = build_candidates(parent, target, settings)
    assert {next(c.model.parameters()).dtype for c in candidates} == {torch.bfloat16}
    config = TrainConfig(steps=2, batch_size=2, eval_every=1)
    train, val, config = training_data(parent, str(counting_text_file), config, seq_len=8, eval_tokens=16,
                                       eval_images=4)
    results = train_candidates(candidates, train, val, config)
    assert all(r.status == "done" for r in results.values())
    assert {p.dtype for r in results.values() for p in r.model.parameters()} == {torch.float32}
