"""Every page of the app under streamlit.testing.v1.AppTest, on a tiny local parent: the whole flow
parent -> importance -> blocks -> child -> train, bad inputs, and two sessions sharing one server."""

from __future__ import annotations

import base64
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 60


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A tiny Llama parent and a text file (words w3..w60) inside the only allowed root; outputs in tmp."""
    root = tmp_path / "allowed"
    tiny_models.save_parent_folder("llama", root / "parent")
    rng = random.Random(0)
    paragraphs = (" ".join(f"w{rng.randint(3, 60)}" for _ in range(60)) for _ in range(200))
    (root / "text.txt").write_text("\n\n".join(paragraphs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SUBCLONE_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("SUBCLONE_ALLOWED_ROOTS", str(root))
    monkeypatch.setenv("SUBCLONE_OPEN_PARENT", "none")  # the embedded default is not needed here
    return root


def run(at: AppTest) -> AppTest:
    """Rerun and fail on any uncaught exception."""
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def settle(at: AppTest, timeout: float = 120) -> AppTest:
    """Wait for the session's background page steps (calibration, ablation, child...), then rerun: the
    rerun applies their results, as the page's polling fragment would in a browser."""
    run(at)  # the run that handles the click and starts the step
    for job, _ in list(at.session_state["workspace"].steps.values()):
        assert job.wait(timeout), f"{job.name} still {job.status}"
    return run(at)


def errors(at: AppTest) -> list[str]:
    """The error messages as a visitor reads them (ui.plain's Markdown escapes and zero-width spaces removed)."""
    return [re.sub(r"\\(.)", r"\1", e.value).replace("\u200b", "") for e in at.error]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def decoded(value):
    """A Plotly JSON spec with its typed arrays ({"dtype", "bdata", "shape"}) decoded to nested lists."""
    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")] if shape else -1).tolist()
    if isinstance(value, dict):
        return {k: decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decoded(v) for v in value]
    return value


def chart_titles(at: AppTest) -> dict[str, dict]:
    """The page's Plotly chart specs (decoded) by their title."""
    specs = [decoded(json.loads(chart.proto.spec)) for chart in at.get("plotly_chart")]
    return {spec["layout"]["title"]["text"]: spec for spec in specs}


def load_parent(at: AppTest, parent_id: str) -> AppTest:
    at.radio(key="keep_parent_source").set_value("local")
    run(at)
    at.text_input(key="keep_parent_path").set_value(parent_id)
    run(at)
    at.button(key="load_parent").click()
    return run(at)


def use_data(at: AppTest, path: Path, task: str = "causal-lm") -> AppTest:
    at.radio(key=f"keep_data_kind_{task}").set_value("local")
    run(at)
    at.text_input(key=f"keep_data_path_{task}").set_value(str(path))
    run(at)
    at.button(key="use_path").click()
    return run(at)


def set_value(at: AppTest, key: str, value) -> AppTest:
    at.number_input(key=key).set_value(value)
    return run(at)


def start_app(path: Path, data: Path | None = None) -> AppTest:
    at = run(AppTest.from_file(APP, default_timeout=TIMEOUT))
    load_parent(at, str(path))
    if data is not None:
        use_data(at, data)
    return at


def wait_for_job(at: AppTest, timeout: float = 120):
    job = at.session_state["workspace"].job
    assert job.wait(timeout), f"job still {job.status}"
    return job


def train_on_page(at: AppTest, settings: dict[str, int]):
    """Open the Train page, set its inputs, start training and wait for the job to finish; the finished job."""
    at.switch_page("pages/train.py")
    run(at)
    for key, value in settings.items():
        set_value(at, key, value)
    at.button(key="start_training").click()
    run(at)
    job = wait_for_job(at)
    assert job.status == "done", job.error
    run(at)
    return job


def test_whole_flow_parent_importance_blocks_child_train(workdir, tmp_path):
    at = start_app(workdir / "parent", workdir / "text.txt")
    # 1. Parent: architecture, validation perplexity on the chosen data, a generation
    shown = metrics(at)
    sizes = [shown[label] for label in ("Blocks", "Hidden", "Heads", "KV heads", "FFN")]
    assert sizes == ["4", "64", "8", "2", "48"]
    assert shown["Vocabulary"] == "61" and float(shown["Perplexity"]) > 1
    assert at.session_state["workspace"].data_id == str((workdir / "text.txt").resolve())
    at.text_input(key="keep_prompt").set_value("w5 w6 w7")
    at.button(key="parent_generate").click()
    run(at)
    (shown,) = [h.proto.body for h in at.get("html")]  # the prompt, then the continuation in bold
    assert shown.split("</blockquote>")[0].split(">", 1)[1].startswith("w5 w6 w7<b> w")

    # 2. Importance: calibration with a budget, heatmaps, score curve, ranking consistency
    at.switch_page("pages/importance.py")
    run(at)
    set_value(at, "keep_calib_tokens", 512)
    at.button(key="run_calibration").click()
    settle(at)
    importance = at.session_state["workspace"].importance
    assert importance is not None and importance.tokens >= 512, (errors(at), at.session_state["workspace"].notes)
    specs = chart_titles(at)
    curve = specs["Shared residual ranking"]["data"]
    width = at.slider(key="keep_cut_width").value
    assert len(curve[0]["x"]) == width and len(curve[0]["x"]) + len(curve[1]["x"]) == 64
    residual = next(s for t, s in specs.items() if t.startswith("Residual neurons"))["data"][0]
    assert len(residual["z"]) == 4 and len(residual["z"][0]) == 64
    assert residual["customdata"][0][0][0] == int(importance.residual.argmax())  # hover: the neuron's index
    assert len(specs["FFN neurons, sorted within each block"]["data"][0]["z"][0]) == 48
    assert len(specs["Attention heads"]["data"][0]["z"][0]) == 8
    assert len(specs["Rank correlation of residual scores between blocks"]["data"][0]["z"]) == 4
    assert "Mean rank correlation between two blocks" in metrics(at)

    # 3. Blocks: bars with the removed blocks highlighted, a manual pick, the single-block ablation
    at.switch_page("pages/blocks.py")
    run(at)
    at.radio(key="keep_block_policy").set_value("manual")
    run(at)
    at.multiselect(key="keep_manual_drop").set_value([1, 2])
    run(at)
    bars = chart_titles(at)["Block statistics (2 removed, in red)"]["data"][0]
    assert bars["marker"]["color"][1] == bars["marker"]["color"][2] != bars["marker"]["color"][0]
    set_value(at, "keep_ablation_tokens", 256)
    at.button(key="run_ablation").click()
    settle(at)
    assert len(chart_titles(at)["Parent loss with one block removed"]["data"][0]["y"]) == 4

    # 4. Child: validation as you type, the nearest valid shape, generate, compare, save, download
    at.switch_page("pages/child.py")
    run(at)
    assert at.number_input(key="keep_shape_layers").value == 2  # from the Blocks page
    set_value(at, "keep_shape_hidden", 20)
    set_value(at, "keep_shape_heads", 3)
    assert any("not valid" in e and "Nearest valid shape" in e for e in errors(at))
    at.button(key="use_nearest").click()
    run(at)
    assert not errors(at)
    shape = {r: at.number_input(key=f"keep_shape_{r}").value for r in ("layers", "hidden", "heads")}
    assert shape["hidden"] % shape["heads"] == 0 and shape["layers"] == 2
    assert float(metrics(at)["Share of the parent"].rstrip("%")) < 100
    at.button(key="generate_child").click()
    settle(at)
    assert not errors(at)
    shown = metrics(at)
    for name in ("subclone", "random", "parent"):
        assert float(shown[f"{name}: validation loss"]) > 0 and float(shown[f"{name}: perplexity"]) > 1
    step0 = chart_titles(at)["Validation loss before any training"]["data"][0]
    assert step0["x"] == ["subclone", "random", "parent"]
    assert {"parent", "subclone", "random", "prompt"} <= set(at.session_state["workspace"].samples)
    at.text_input(key="keep_save_name").set_value("../escape")
    run(at)
    at.button(key="save_child").click()
    run(at)
    assert any("path separator" in e for e in errors(at))
    at.text_input(key="keep_save_name").set_value("my-child")
    run(at)
    at.button(key="save_child").click()
    run(at)
    saved = tmp_path / "outputs" / "children" / "my-child"
    assert {"config.json", "model.safetensors", "subclone.json", "README.md", "tokenizer.json"} <= {
        p.name for p in saved.iterdir()}
    manifest = json.loads((saved / "subclone.json").read_text())
    assert manifest["removed_blocks"] == [1, 2] and manifest["child"]["shape"]["hidden"] == shape["hidden"]
    assert at.get("download_button")

    # 5. Train: a few steps in a background job; live chart, summary, metrics; the first settings sized from the
    # child's speed, timed when Generate scored it
    assert at.session_state["workspace"].step0["subclone"]["forward_rate"] > 0
    train_on_page(at, {"keep_steps": 4, "keep_batch": 2, "keep_seq_len": 16, "keep_eval_every": 2})
    assert any("forward speed, measured when it was scored" in c.value for c in at.caption)
    loss = chart_titles(at)["Training and validation loss"]["data"]
    names = {"subclone train", "subclone validation", "random train", "random validation"}
    assert {t["name"] for t in loss} == names
    validation = next(t for t in loss if t["name"] == "subclone validation")
    assert validation["x"] == [0, 2, 4]
    summary = at.dataframe[0].value
    assert list(summary["model"]) == ["subclone", "random"] and list(summary["step"]) == [4, 4]
    assert (tmp_path / "outputs" / "runs" / "run" / "random" / "model.safetensors").exists()
    assert any("Training done" in s.value for s in at.success)


def test_bad_inputs_show_an_error_and_the_app_goes_on(workdir, tmp_path):
    (workdir / "empty").mkdir()
    outside = tmp_path / "outside"
    tiny_models.save_parent_folder("llama", outside)
    at = run(AppTest.from_file(APP, default_timeout=TIMEOUT))
    for parent_id, message in ((str(workdir / "empty"), "not a model folder"),
                               (str(outside), "outside the folders this server allows"),
                               (str(workdir / "text.txt"), "not a .gguf"),
                               ("", "type a folder path")):
        load_parent(at, parent_id)
        assert any(message in e for e in errors(at)), (message, errors(at))
        assert at.session_state["workspace"].parent_id is None
    at.radio(key="keep_parent_source").set_value("hub")
    run(at)
    at.text_input(key="keep_parent_hub").set_value("nobody/no-such-model")
    run(at)
    at.button(key="load_parent").click()
    run(at)
    assert any("offline" in e for e in errors(at)), errors(at)
    load_parent(at, str(workdir / "parent"))
    assert not errors(at) and at.session_state["workspace"].parent_id is not None
    use_data(at, tmp_path / "outside.txt")
    assert any("outside the folders" in e for e in errors(at))
    (workdir / "empty.txt").write_text("")
    use_data(at, workdir / "empty.txt")
    assert any("empty" in e for e in errors(at)), errors(at)


def test_pages_without_a_parent_point_to_the_parent_page(workdir):
    at = run(AppTest.from_file(APP, default_timeout=TIMEOUT))
    for page in ("importance", "blocks", "child", "train"):
        at.switch_page(f"pages/{page}.py")
        run(at)
        assert any("Choose a parent" in i.value for i in at.info), page
        assert not at.get("plotly_chart")


def test_the_picker_offers_the_embedded_parents_and_a_gemma_childs_licence_is_shown(workdir):
    from subclone_core.sources.embedded import EMBEDDED

    at = run(AppTest.from_file(APP, default_timeout=TIMEOUT))
    picker = at.radio(key="keep_parent_source")
    assert "Gemma 3 270M (embedded, Gemma licence)" in picker.options
    assert [o for o in picker.options if "embedded" in o] == [e.label for e in EMBEDDED.values()]
    child = workdir / "gemma-child"  # a local folder whose subclone.json names gemma3-270m as its parent
    tiny_models.save_parent_folder("llama", child)
    (child / "subclone.json").write_text(json.dumps({"parent": {"id": "gemma3-270m"}}))
    load_parent(at, str(child))
    licence = [c.value for c in at.caption if c.value.startswith("Licence:")]
    assert licence and "Gemma Terms of Use" in licence[0] and "provided under and subject to" in licence[0]


def test_two_sessions_are_isolated_and_share_one_queue(workdir, monkeypatch):
    monkeypatch.setenv("SUBCLONE_MAX_JOBS", "1")
    monkeypatch.setenv("SUBCLONE_MAX_QUEUE", "3")  # a limiter of its own, apart from other tests'
    sessions = []
    for _ in range(2):
        at = start_app(workdir / "parent", workdir / "text.txt")
        at.switch_page("pages/child.py")
        run(at)
        at.button(key="generate_child").click()
        settle(at)
        at.switch_page("pages/train.py")
        run(at)
        for key, value in (("keep_steps", 100_000), ("keep_batch", 1), ("keep_seq_len", 8)):
            set_value(at, key, value)
        at.checkbox(key="keep_save_trained").uncheck()
        run(at)
        sessions.append(at)
    first, second = sessions
    first.button(key="start_training").click()
    run(first)
    job_a = first.session_state["workspace"].job
    deadline = time.time() + 30
    while job_a.status != "running":
        assert time.time() < deadline, job_a.status
        time.sleep(0.05)
    second.button(key="start_training").click()
    run(second)
    job_b = second.session_state["workspace"].job
    assert job_a is not job_b and job_b.status == "queued" and job_b.position == 1
    assert any("place 1 in the server's queue" in w.value for w in second.warning)
    second.button(key="stop_job").click()
    run(second)
    assert job_b.wait(10) and job_b.status == "cancelled"
    assert job_a.status == "running"  # one session's Stop never stops another's run
    first.button(key="stop_job").click()
    run(first)
    assert job_a.wait(30) and job_a.status == "cancelled"
    run(first)
    assert any("Training cancelled" in s.value for s in first.success)


def test_an_image_parent_goes_through_the_pages(tiny_vit_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SUBCLONE_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("SUBCLONE_ALLOWED_ROOTS", raising=False)
    monkeypatch.setenv("SUBCLONE_OPEN_PARENT", "none")
    at = start_app(tiny_vit_dir)
    at.radio(key="keep_data_kind_image-classification").set_value("digits")
    run(at)
    assert at.session_state["workspace"].data_id == "digits"
    assert "Accuracy" in metrics(at) and "Classes" in metrics(at)
    at.switch_page("pages/importance.py")
    run(at)
    set_value(at, "keep_calib_tokens", 256)
    at.button(key="run_calibration").click()
    settle(at)
    assert "Attention heads" in chart_titles(at)
    at.switch_page("pages/child.py")
    run(at)
    at.button(key="generate_child").click()
    settle(at)
    assert not errors(at)
    assert "subclone: accuracy" in metrics(at) and not at.session_state["workspace"].samples
    train_on_page(at, {"keep_steps": 2, "keep_batch": 4, "keep_eval_every": 1})
    assert "Training and validation loss" in chart_titles(at)
