"""One plan per child, resolved before any work and said out loud: `make` prints it first, --json and
subclone.json hold it, a default that turns off what a user would expect warns and names the flag, and the
app's Child page shows it."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_app_pages import run, start_app, workdir  # noqa: F401 (workdir: a fixture)

from subclone_core.core.errors import SubcloneError
from subclone_core.core.strategies import plan_shape
from subclone_core.io.saving import read_manifest
from subclone_core.sources.parents import load_parent
from subclone_core.workflow import plan as plan_module
from subclone_core.workflow.plan import resolve_plan
from tests import tiny_models as tm
from tests.cli_runner import REFIT_IN, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = ["--layers", 3, "--hidden", 16]
SCALE_WARNING = "Warning: weight scaling is off"


def make(llama_dir, text_file, out, *flags):
    return run_cli(["make", "--parent", llama_dir, "--out", out, *SHAPE, "--data", text_file,
                    "--calib-tokens", 256, *flags])


def test_make_prints_the_plan_first_and_records_it(llama_dir, counting_text_file, tmp_path):
    code, out, err = make(llama_dir, counting_text_file, tmp_path / "child")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith(f"plan: subclone, drop magnitude, read ranking, refit on child inputs, block by block{REFIT_IN}, "
                            "no scaling | ")
    assert "calibration in memory, 256 tokens of corpus.txt" in first and "parent on cpu, float32" in first
    assert out.splitlines()[1].startswith("saved ")
    manifest = read_manifest(tmp_path / "child")
    assert manifest.plan["line"] == first
    assert manifest.plan["refit"] is True and manifest.plan["residual_score"] == "read"
    assert manifest.plan["sequential"] is False and manifest.plan["device"] == "cpu"
    assert manifest.refit is True and manifest.scale is False  # the child was made as the plan says
    assert first.removeprefix("plan: ") in (tmp_path / "child" / "README.md").read_text()
    reread = json.loads((tmp_path / "child" / "subclone.json").read_text())
    assert reread["plan"]["warnings"] == manifest.plan["warnings"]


def test_json_holds_the_plan_and_its_warnings(llama_dir, counting_text_file, tmp_path):
    code, out, err = make(llama_dir, counting_text_file, tmp_path / "child", "--no-refit", "--json")
    assert code == 0, err
    summary = json.loads(out)  # one object: the line is not printed on its own
    plan = summary["plan"]
    assert plan["refit"] is False and plan["changed"] == ["refit", "data_id"]
    assert "no refit (asked)" in plan["line"] and summary["warnings"] == plan["warnings"]
    assert summary["warnings"] and SCALE_WARNING in err  # warnings still go to stderr


def test_a_default_that_turns_off_what_the_paper_does_warns_and_names_the_flag(llama_dir, counting_text_file,
                                                                              tmp_path):
    code, out, err = make(llama_dir, counting_text_file, tmp_path / "default")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(SCALE_WARNING) and "--scale turns it on" in warnings[0]
    assert "--scale" not in out  # warnings never mix into the output
    for flag, said in (("--scale", ", scaling (asked) |"), ("--no-scale", ", no scaling |")):
        code, out, err = make(llama_dir, counting_text_file, tmp_path / flag, flag)
        assert code == 0 and "Warning" not in err, err  # the user's own choice: no warning either way
        assert said in out.splitlines()[0]  # marked only where it differs from the default


def test_a_refit_turned_off_by_the_family_warns_and_names_refit(monkeypatch, tmp_path):
    tm.save_parent_folder("llama", tmp_path)
    parent = load_parent(str(tmp_path))
    real = plan_module.arch_of_model
    monkeypatch.setattr(plan_module, "arch_of_model", lambda m: dataclasses.replace(real(m), refit_default=False))
    plan = resolve_plan(parent)
    assert plan.refit is False and "no refit" in plan.line()
    assert any("refit is off" in w and "--refit turns it on" in w for w in plan.warnings())
    assert not any("refit" in w for w in resolve_plan(parent, refit=False).warnings())


def test_strategies_without_an_order_or_data_plan_only_what_they_use(llama_dir):
    parent = load_parent(str(llama_dir))
    random = resolve_plan(parent, strategy="random", drop="magnitude", scale=True)
    assert not random.calibrate and random.drop is None and not random.scale and random.activation_memory is None
    assert random.line() == "plan: random (fresh init, seed 0) | parent on cpu, float32" and random.warnings() == []
    uniform = resolve_plan(parent, strategy="uniform")
    assert uniform.line().startswith("plan: uniform, drop first, no scaling | parent on cpu")
    assert uniform.residual_score is None and not uniform.refit and uniform.warnings() == []  # not the paper's
    with pytest.raises(SubcloneError, match="out of range"):
        resolve_plan(parent, drop=[1, 9], target=plan_shape(parent.model, layers=2))  # before any calibration


def test_compare_says_one_plan_per_strategy(llama_dir, counting_text_file):
    code, out, err = run_cli(["compare", "--parent", llama_dir, *SHAPE, "--data", counting_text_file,
                              "--calib-tokens", 256, "--strategies", "subclone,first-k,random", "--steps", 2,
                              "--eval-every", 1, "--batch-size", 2, "--seq-len", 16, "--eval-tokens", 64, "--quiet"])
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(",")[0].split(" ")[1] for line in lines[:3]] == ["subclone", "first-k", "random"]
    assert err.count(SCALE_WARNING) == 1  # said once for the two strategies it applies to


def test_refit_or_ranking_asked_of_a_strategy_without_them_is_an_error(llama_dir, counting_text_file, tmp_path):
    for flags, named in ((["--strategy", "first-k", "--refit"], "--refit"),
                         (["--strategy", "uniform", "--residual-score", "written"], "--residual-score")):
        code, out, err = make(llama_dir, counting_text_file, tmp_path / "c", *flags)
        assert code == 2 and out == "" and named in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "c").exists()


@pytest.fixture
def pickled_parent(tmp_path):
    """A tiny Llama whose weights are only a pickle: no safetensors file to read block by block."""
    folder = tmp_path / "pickled"
    tm.save_parent_folder("llama", folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    os.remove(weights)
    return folder


@pytest.mark.filterwarnings("ignore:loading pickle weights")
def test_an_offloaded_parent_that_cannot_be_read_block_by_block(pickled_parent, counting_text_file, tmp_path):
    parent = load_parent(str(pickled_parent), allow_pickle=True, max_memory="24KB")
    plan = resolve_plan(parent, builds=False)  # a caller that only calibrates
    assert plan.offloaded and plan.block_readable is False and not plan.sequential
    assert "calibration per batch through the offload" in plan.line() and "under --max-memory 24KB" in plan.line()
    offload = [w for w in plan.warnings() if "offloaded" in w]
    assert len(offload) == 1 and "--sequential is impossible" in offload[0]
    assert not any("offloaded" in w for w in resolve_plan(parent, builds=False, sequential=False).warnings())
    with pytest.raises(SubcloneError, match="cannot be read from its files"):
        resolve_plan(parent)  # make reads a child from the files: refused before any calibration
    code, out, err = run_cli(["make", "--parent", pickled_parent, "--allow-pickle", "--max-memory", "24KB",
                              "--out", tmp_path / "c", *SHAPE, "--data", counting_text_file])
    assert code == 2 and out == "" and "cannot be read from its files" in err


def test_an_offloaded_readable_parent_plans_block_by_block(llama_dir, counting_text_file, tmp_path):
    code, out, err = make(llama_dir, counting_text_file, tmp_path / "c", "--max-memory", "24KB",
                          "--activation-memory", "4KiB")
    assert code == 0, err
    first = out.splitlines()[0]
    assert "calibration block by block" in first and "parent on disk under --max-memory 24KB" in first
    assert "hidden states up to 4.0KiB in RAM (asked)" in first
    assert read_manifest(tmp_path / "c").plan["sequential"] is True
    assert not any("offloaded" in line for line in err.splitlines())


def test_explore_says_its_plan(llama_dir, counting_text_file):
    code, out, err = run_cli(["explore", "--parent", llama_dir, "--params", "20k", "--data", counting_text_file,
                              "--calib-tokens", 256, "--eval-tokens", 128, "--json"])
    assert code == 0, err
    plan = json.loads(out)["plan"]  # the shapes are made as make makes them; explore has no flags to warn about
    assert plan["refit"] is True and plan["warnings"] == []
    assert f"read ranking, refit on child inputs, block by block{REFIT_IN}, no scaling" in plan["line"]


def captions(at) -> list[str]:
    """The page's captions as a visitor reads them (ui.plain's Markdown escapes and zero-width spaces removed)."""
    return [c.value.replace("\\", "").replace("\u200b", "") for c in at.caption]


def test_the_child_page_shows_the_plan(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    shown = captions(at)
    line = f"plan: subclone, drop magnitude, read ranking, refit on child inputs, block by block{REFIT_IN}, no scaling"
    assert any(c.startswith(line) for c in shown), shown
    at.toggle(key="keep_refit").set_value(False)
    run(at)
    shown = captions(at)
    assert any(c.startswith("plan: subclone") and "no refit (asked)" in c for c in shown), shown
    assert not at.warning  # every choice is on the page: nothing is turned off unseen
    at.button(key="generate_child").click()
    run(at)
    for job, _ in list(at.session_state["workspace"].steps.values()):
        assert job.wait(120), f"{job.name} still {job.status}"
    run(at)
    child = at.session_state["workspace"].child
    assert child is not None and child.manifest.plan["refit"] is False and child.manifest.refit is False
    assert f"Built by the {child.manifest.plan['line']}" in captions(at)
