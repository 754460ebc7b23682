"""A child folder is a plain Hugging Face model: reload with transformers alone, manifest round-trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest, ParentRecord
from subclone_core.core.selection import Selection
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.io.model_card import model_card
from subclone_core.io.saving import read_manifest, save_model_folder
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm

AUTO = {"vit": "AutoModelForImageClassification"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "vit"])
def test_saved_child_reloads_with_transformers_alone(family, tmp_path):
    parent = tm.make(family, dtype=torch.float32)
    imp = calibrate(parent, [tm.inputs(parent)])
    child = subclone_model(parent, plan_shape(parent, layers=2), importance=imp)
    out = save_model_folder(child.model, tmp_path / "child", preprocessor=None, manifest=child.manifest,
                            model_card=model_card(child.manifest, "causal-lm"))
    files = {"README.md", "config.json", "model.safetensors", "subclone.json"}
    if family != "vit":
        files.add("generation_config.json")
    assert {p.name for p in out.iterdir()} == files
    batch = tm.inputs(parent)
    expected = tm.output(child.model, batch)
    # a fresh interpreter that imports transformers but not this project
    auto = AUTO.get(family, "AutoModelForCausalLM")
    code = (f"import sys, torch, transformers; assert 'subclone_core' not in sys.modules\n"
            f"m = transformers.{auto}.from_pretrained(sys.argv[1]).eval()\n"
            f"b = torch.load(sys.argv[2])\n"
            f"torch.save(m(**b).logits.detach(), sys.argv[3])")
    torch.save(batch, tmp_path / "batch.pt")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_manifest_round_trips(tmp_path):
    parent = tm.make("llama", dtype=torch.float32)
    child = subclone_model(parent, plan_shape(parent, heads=4, kv_heads=1, ffn=24, layers=3),
                           importance=calibrate(parent, [tm.inputs(parent)]))
    save_model_folder(child.model, tmp_path / "c", manifest=child.manifest)
    manifest = read_manifest(tmp_path / "c")
    assert manifest.to_json() == json.loads(json.dumps(child.manifest.to_json()))
    assert json.loads((tmp_path / "c" / "subclone.json").read_text()) == manifest.to_json()
    assert Selection.from_json(manifest.selection) == child.selection
    assert manifest.removed_blocks == child.selection.removed_blocks(4) and len(manifest.removed_blocks) == 1
    assert manifest.child_shape == {"layers": 3, "hidden": 32, "heads": 4, "kv_heads": 1, "ffn": 24, "head_dim": 8}
    assert manifest.calibration.tokens == 21 and manifest.strategy == "subclone"


class Boom(RuntimeError):
    pass


def test_failed_save_leaves_nothing_and_keeps_an_existing_folder(tmp_path):
    parent = tm.make("gpt2", dtype=torch.float32)

    class FailingPreprocessor:
        def save_pretrained(self, path):
            raise Boom("disk full")

    with pytest.raises(Boom):
        save_model_folder(parent, tmp_path / "new", preprocessor=FailingPreprocessor())
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    save_model_folder(parent, old, manifest=Manifest(note="n"))
    with pytest.raises(Boom):
        save_model_folder(parent, old, preprocessor=FailingPreprocessor(), overwrite=True)
    assert read_manifest(old) == Manifest(note="n") and [p.name for p in tmp_path.iterdir()] == ["old"]


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    parent = tm.make("gpt2", dtype=torch.float32)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(SubcloneError, match="exists and is not empty; choose a new folder or pass --overwrite"):
        save_model_folder(parent, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"
    save_model_folder(parent, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "notes.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_a_child_card_names_its_parents_licence_and_how_it_was_built():
    from subclone_core.sources.embedded import EMBEDDED

    gemma = EMBEDDED["gemma3-270m"]
    shape = dict.fromkeys(("layers", "hidden", "heads", "kv_heads", "ffn", "head_dim"), 1)
    licence = {"name": gemma.licence.name, "url": gemma.licence.url, "notice": gemma.licence.notice}
    manifest = Manifest(parent=ParentRecord(shape=shape, id="gemma3-270m", licence=licence), child_shape=shape,
                        strategy="subclone", residual_score="read", refit=True)
    card = model_card(manifest, "causal-lm")
    assert f"Licence: [{gemma.licence.name}]({gemma.licence.url})" in card and gemma.licence.notice in card
    assert "Residual ranking: read; least-squares refit: on" in card
    manifest.parent.licence = None
    assert "Licence:" not in model_card(manifest, "causal-lm")


def test_saved_weights_take_the_permissions_of_the_other_files(tmp_path):
    """safetensors creates its files 0600 whatever the umask: a child saved for a class would be unreadable to
    everyone but the one who made it, while its config.json is readable."""
    parent = tm.make("llama", dtype=torch.float32)
    out = save_model_folder(parent, tmp_path / "child", max_shard_size=20_000)
    weights = sorted(out.glob("*.safetensors"))
    assert len(weights) > 1
    want = (out / "config.json").stat().st_mode & 0o777
    assert want & 0o044  # the umask here lets others read
    assert [(p.name, p.stat().st_mode & 0o777) for p in weights] == [(p.name, want) for p in weights]
