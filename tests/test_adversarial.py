"""Adversarial cases: what broke when people tried to break the CLI and the app (issue 12), one test each.

Nothing lost (a failed run keeps the previous one), nothing leaked (no read outside the allowed roots, no
user text rendered as Markdown), never a traceback (every bad input is one line, exit status 2). A new
defect found by trying to break the workbench gets its case here; README's Tests section lists the groups.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

from subclone_core.core.errors import SubcloneError
from tests import tiny_models as tm
from tests.cli_runner import run_cli  # also imported from here by test_damaged_input

FAST = ["--steps", 2, "--eval-every", 1, "--batch-size", 2, "--seq-len", 16, "--eval-tokens", 64, "--quiet"]


def assert_one_line_error(args, *needles: str) -> str:
    """The CLI refuses ``args`` with exit status 2 and one line on stderr that contains every needle."""
    code, _, err = run_cli(args)
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parents") / "gpt2"
    tm.save_parent_folder("gpt2", path)
    return path


@pytest.fixture(scope="module")
def text_file(counting_text_file) -> Path:
    return counting_text_file


def damaged_copy(source: Path, folder: Path, damage) -> Path:
    """A copy of a model folder with one file damaged by ``damage(folder)``."""
    import shutil

    shutil.copytree(source, folder)
    damage(folder)
    return folder


def edit_json(folder: Path, name: str, **changes) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- 1. --overwrite never loses the previous run ------------------------------------------------------


def old_run(folder: Path, candidates=("subclone", "random")) -> Path:
    """A previous run's folder: metrics, summary and one model folder per candidate."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"event": "start"}\n')
    (folder / "summary.json").write_text('{"old": true}')
    for name in candidates:
        (folder / name).mkdir()
        (folder / name / "config.json").write_text("{}")
    return folder


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_on_bad_input(llama_dir, tmp_path):
    run = old_run(tmp_path / "run")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(["train", "--model", llama_dir, "--data", empty, "--out", run, "--overwrite", *FAST], "empty")
    assert (run / "summary.json").read_text() == '{"old": true}'
    assert (run / "metrics.jsonl").exists() and (run / "random" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_with_fewer_candidates_leaves_no_stale_model_folder(llama_dir, text_file, tmp_path):
    run = old_run(tmp_path / "run")
    code, stdout, err = run_cli(["train", "--model", llama_dir, "--data", text_file, "--out", run, "--overwrite",
                                 "--json", *FAST])
    assert code == 0, err
    summary = json.loads(stdout)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "subclone", "summary.json"]
    assert summary["out"] == str(run) and summary["rows"][0]["saved_to"] == str(run / "subclone")
    assert json.loads((run / "summary.json").read_text())["rows"][0]["saved_to"] == str(run / "subclone")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- 2. the app's queue limit holds when requests arrive together --------------------------------------


def test_job_queue_limit_holds_for_simultaneous_requests():
    from subclone_core.app.jobs import JobLimiter, ServerBusy

    for _trial in range(5):
        limiter = JobLimiter(max_running=1, max_queued=4)
        barrier, accepted = threading.Barrier(20), []

        def submit(i: int, limiter=limiter, barrier=barrier, accepted=accepted) -> None:
            barrier.wait()
            with contextlib.suppress(ServerBusy):
                limiter.submit(f"job-{i}")
                accepted.append(i)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(accepted) == 5  # one to run, four to wait


# --- 3. two app sessions never collide on a name ------------------------------------------------------


def test_two_sessions_asking_for_the_same_run_name_get_different_folders(tmp_path):
    from subclone_core.app.steps import fresh_folder

    first, second = fresh_folder(tmp_path / "runs" / "run"), fresh_folder(tmp_path / "runs" / "run")
    assert first != second and first.is_dir() and second.is_dir()


def test_replace_existing_never_replaces_another_sessions_child(llama_dir, tmp_path):
    from subclone_core.app.settings import AppSettings
    from subclone_core.app.steps import save_child_folder
    from subclone_core.core.shape import Shape
    from subclone_core.core.strategies import subclone_model

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    child = subclone_model(model, Shape.of(model.config), strategy="random", seed=0)
    settings = AppSettings(output_dir=tmp_path)
    saved = save_child_folder(child, settings, "child", "causal-lm", owner="session-a")
    before = (saved / "model.safetensors").read_bytes()
    with pytest.raises(SubcloneError, match="another session"):
        save_child_folder(child, settings, "child", "causal-lm", overwrite=True, owner="session-b")
    assert (saved / "model.safetensors").read_bytes() == before
    save_child_folder(child, settings, "child", "causal-lm", overwrite=True, owner="session-a")  # its own: fine


# --- 4. inspect --out ----------------------------------------------------------------------------------


def test_inspect_refuses_to_replace_an_existing_file_without_overwrite(llama_dir, text_file, tmp_path):
    out = tmp_path / "importance.json"
    out.write_text("mine")
    assert_one_line_error(["inspect", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 256, "--out", out],
                   str(out), "--overwrite")
    assert out.read_text() == "mine"


def test_inspect_with_a_folder_as_out_is_one_line_and_leaves_nothing(llama_dir, text_file, tmp_path):
    out = tmp_path / "folder"
    out.mkdir()
    assert_one_line_error(["inspect", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 256, "--out", out],
                   "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


# --- 5. the parent cache checks what it trusts ----------------------------------------------------------


def marked_folder(folder: Path) -> Path:
    from subclone_core.sources.cache import write_marker

    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 30}')
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 64)
    write_marker(folder, {"kind": "test"})
    return folder


@pytest.mark.parametrize("name, edit", [
    ("config.json", lambda data: data.replace(b"30", b"03")),
    ("weights.bin", lambda data: data[:1000] + bytes(255 - b for b in data[1000:1010]) + data[1010:]),
])
def test_same_size_corruption_of_a_cached_file_invalidates_the_cache(tmp_path, name, edit):
    from subclone_core.sources.cache import cache_is_valid

    folder = marked_folder(tmp_path / "cached")
    path = folder / name
    time.sleep(0.01)  # a later modification time, as any edit has
    path.write_bytes(edit(path.read_bytes()))
    assert not cache_is_valid(folder, {"kind": "test"})


def test_unchanged_cache_files_are_trusted_without_hashing(tmp_path, monkeypatch):
    from subclone_core.sources import cache

    folder = marked_folder(tmp_path / "cached")
    monkeypatch.setattr(cache, "file_sha256", lambda path: pytest.fail(f"hashed {path}"))
    assert cache.cache_is_valid(folder, {"kind": "test"})
    assert all("mtime_ns" in meta for meta in cache.read_marker(folder)["files"].values())


def test_flipped_bytes_in_the_converted_default_are_rebuilt(tmp_path, monkeypatch):
    from subclone_core.sources import load_parent
    from tests.test_sources_parents import fake_embedded, write_tiny_gguf

    monkeypatch.setenv("SUBCLONE_CACHE", str(tmp_path / "cache"))
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    fake_embedded(monkeypatch, tmp_path / "packages", "default", [tiny.read_bytes()])
    first = load_parent("default")
    weights = first.source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64  # NaNs in the last tensor, header intact, same size
    weights.write_bytes(bytes(data))
    again = load_parent("default")
    assert all(torch.isfinite(p).all() for p in again.model.parameters())


# --- 6. allowed roots cannot be escaped through symlinks ------------------------------------------------


def test_a_symlink_inside_an_allowed_data_folder_cannot_reach_outside(tmp_path):
    from subclone_core.app.settings import AppSettings

    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    (allowed / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("the password")
    (allowed / "data" / "ok.txt").write_text("fine text")
    (allowed / "data" / "leak.txt").symlink_to(elsewhere / "secret.txt")
    settings = AppSettings(allowed_roots=(allowed.resolve(),))
    with pytest.raises(SubcloneError, match="leak.txt"):
        settings.check_local_path(allowed / "data", "data")


def test_a_model_folder_whose_files_link_outside_is_refused(llama_dir, tmp_path):
    from subclone_core.app.settings import AppSettings

    allowed = tmp_path / "allowed" / "model"
    allowed.mkdir(parents=True)
    for item in llama_dir.iterdir():
        (allowed / item.name).symlink_to(item)
    settings = AppSettings(allowed_roots=(allowed.parent.resolve(),))
    with pytest.raises(SubcloneError, match="outside"):
        settings.check_local_path(allowed, "parent")


# --- 7. bad files and values: one line, never a traceback -----------------------------------------------


def truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-200])


def empty_weights(folder):
    (folder / "model.safetensors").write_bytes(b"")


def bad_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:30] = b"x" * 22
    path.write_bytes(bytes(data))


def bad_tokenizer(folder):
    edit_json(folder, "tokenizer.json", model={"type": "WordLevel", "vocab": 5})


@pytest.mark.parametrize("damage, needle", [
    (truncate, "model.safetensors"),
    (empty_weights, "model.safetensors"),
    (bad_header, "model.safetensors"),
    (lambda f: edit_json(f, "config.json", num_hidden_layers="two"), "config.json"),
    (lambda f: edit_json(f, "config.json", num_attention_heads=0), "config.json"),
    (bad_tokenizer, "tokenizer"),
])
def test_damaged_model_folders_are_one_line(llama_dir, tmp_path, damage, needle):
    folder = damaged_copy(llama_dir, tmp_path / "model", damage)
    assert_one_line_error(["info", "--parent", folder], needle)


def test_a_rejected_pickle_under_allow_pickle_is_one_line(llama_dir, tmp_path):
    folder = damaged_copy(llama_dir, tmp_path / "model", lambda f: (f / "model.safetensors").unlink())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that is no pickle")
    assert_one_line_error(["info", "--parent", folder, "--allow-pickle"], "pytorch_model.bin")


def test_gpt2_seq_len_beyond_its_position_table_is_one_line(gpt2_dir, text_file, tmp_path):
    limit = transformers.AutoConfig.from_pretrained(gpt2_dir).n_positions
    assert_one_line_error(["compare", "--parent", gpt2_dir, "--data", text_file, "--calib-tokens", 256,
                    *FAST, "--seq-len", limit + 1, "--eval-tokens", 4 * limit], "--seq-len", str(limit))


@pytest.mark.parametrize("flag, value", [("--warmup", "nan"), ("--warmup", "inf"), ("--wd", "nan"),
                                         ("--wd", "inf"), ("--target", "nan"), ("--target", "-inf")])
def test_non_finite_numbers_are_refused(llama_dir, tmp_path, flag, value):
    assert_one_line_error(["compare", "--parent", llama_dir, *FAST, f"{flag}={value}"], flag)


def test_a_malformed_subclone_json_given_to_train_is_one_line(llama_dir, text_file, tmp_path):
    for text in ("{not json", '["a list"]'):
        folder = tmp_path / f"model-{len(text)}"
        damaged_copy(llama_dir, folder, lambda f, text=text: (f / "subclone.json").write_text(text))
        assert_one_line_error(["train", "--model", folder, "--data", text_file, "--out", tmp_path / "run", *FAST],
                       "subclone.json")


def refuse_loading(monkeypatch):
    """Make any parent load fail the test: output checks must come first."""
    for module in ("make", "inspect"):
        monkeypatch.setattr(f"subclone_core.cli.commands.{module}.load_parent",
                            lambda *a, **k: pytest.fail("loaded the parent before checking the output"))


@pytest.mark.parametrize("out", ["/proc/subclone-adversarial/child", "FILE/child"])
def test_unwritable_outputs_fail_before_any_work(llama_dir, tmp_path, monkeypatch, out):
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = out.replace("FILE", str(tmp_path / "FILE"))
    refuse_loading(monkeypatch)
    assert_one_line_error(["make", "--parent", llama_dir, "--out", out], out.rsplit("/", 1)[0])
    assert_one_line_error(["inspect", "--parent", llama_dir, "--out", out + ".json"], out.rsplit("/", 1)[0])


def test_a_full_disk_at_the_final_write_is_one_line_and_leaves_nothing(llama_dir, text_file, tmp_path,
                                                                       monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # make writes a sliced child tensor by tensor (io.saving.StreamedWeights), a random-init one by save_pretrained
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    monkeypatch.setattr("subclone_core.io.saving.StreamedWeights.__call__", full)
    for strategy in ("subclone", "random"):
        out = tmp_path / "child"
        assert_one_line_error(["make", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 256, "--out", out,
                               "--strategy", strategy], "No space left")
        assert list(tmp_path.iterdir()) == []


def test_an_unexpected_bug_is_one_line_but_shows_its_traceback_with_debug(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("subclone_core.cli.commands.info.load_parent",
                        lambda *a, **k: (_ for _ in ()).throw(KeyError("bug")))
    code, _, err = run_cli(["info", "--parent", llama_dir])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--debug" in err
    with pytest.raises(KeyError):
        run_cli(["--debug", "info", "--parent", llama_dir])


# --- 8. one output, one writer ------------------------------------------------------------------------


def test_make_refuses_an_output_another_live_run_is_writing(llama_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "child"
    holder = subprocess.Popen(  # another run holding the claim: an flock on .child.lock, as claim_output takes
        [sys.executable, "-c", ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                                "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"),
         tmp_path / ".child.lock"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refuse_loading(monkeypatch)
        assert_one_line_error(["make", "--parent", llama_dir, "--data", text_file, "--out", out], "another", str(out))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_two_claims_on_one_output_exactly_one_wins(tmp_path):
    from subclone_core.io.atomic import claim_output

    results, barrier = [], threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        try:
            with claim_output(tmp_path / "child"):
                results.append("won")
                time.sleep(0.2)
        except SubcloneError:
            results.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count("won") == 1 and results.count("refused") == 7
    assert list(tmp_path.iterdir()) == []  # the lock is gone once released


def test_a_lock_left_by_a_dead_run_and_its_temporary_folders_are_cleaned(llama_dir, text_file, tmp_path):
    pid = dead_pid()
    (tmp_path / ".child.lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    for stale in (f".child.tmp-{pid}-abcd1234", ".child.tmp-0badf00d"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"0" * 1000)
    code, _, err = run_cli(["make", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 256,
                            "--out", tmp_path / "child"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]


# --- 9. reading text stops at the token budget ----------------------------------------------------------


def test_one_huge_line_is_tokenized_only_as_far_as_the_budget(tmp_path):
    from subclone_core.data.text import tokenize_documents

    tokenizer = tm.tokenizer()
    longest = []

    class Spy:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kwargs):
            longest.append(max(len(t) for t in texts))
            return tokenizer(texts, **kwargs)

    huge = " ".join(f"w{3 + i % 50}" for i in range(2_000_000))  # one 8 MB line
    start = time.perf_counter()
    ids = tokenize_documents(Spy(), [huge], max_tokens=256)
    assert len(ids) == 256 and ids[0] == 3 and ids[1] == 4
    assert max(longest) < 100_000 and time.perf_counter() - start < 5


def test_uploads_are_capped_at_a_size_worth_reading(tmp_path):
    from subclone_core.app.settings import AppSettings
    from subclone_core.app.steps import store_upload

    settings = AppSettings(output_dir=tmp_path)
    assert settings.max_upload_mb <= 10
    with pytest.raises(SubcloneError, match="limit"):
        store_upload(settings, "session", "big.txt", b"word " * (3 * 2**20))


# --- 10. user text is shown as plain text ---------------------------------------------------------------


@pytest.mark.parametrize("text, forbidden", [
    ("[click](https://evil.example)", ["](", "https://"]),
    ("![x](http://tracker.example/p.png)", ["![", "](", "http://"]),
    (":red[alarm] :rainbow[x]", [":red[", ":rainbow["]),
    (":smile: :material/home:", [":smile:", ":material/"]),
])
def test_plain_leaves_no_markdown_link_image_colour_emoji_or_icon(text, forbidden):
    from subclone_core.app.ui import plain

    shown = plain(text)
    for bad in forbidden:
        assert bad not in shown, shown


def test_errors_naming_user_paths_are_shown_as_plain_text():
    from streamlit.testing.v1 import AppTest

    def page():
        from subclone_core.app import ui
        from subclone_core.core.errors import SubcloneError

        with ui.errors_shown("loading the parent"):
            raise SubcloneError("parent '[x](http://evil.example) :smile:' is no folder")

    at = AppTest.from_function(page).run(timeout=60)
    shown = at.error[0].value
    assert "](http" not in shown and ":smile:" not in shown and "no folder" in shown


# --- 11. smaller: numbers, wording, leftovers, settings -------------------------------------------------


def test_json_output_is_strict_json(llama_dir, text_file):
    code, stdout, err = run_cli(["compare", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 256,
                                 "--lr", "subclone=1e6", "--json", *FAST])
    assert code == 0, err
    json.loads(stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))


@pytest.mark.parametrize("flags, needles, refused", [
    (["--heads", 0], ["--heads", "'0' is not a positive integer"], "hidden"),
    (["--calib-tokens", 0], ["--calib-tokens"], "max_tokens"),
    (["--calib-tokens", 1], ["--calib-tokens"], "--seq-len"),
])
def test_make_names_the_flag_the_user_gave(llama_dir, text_file, tmp_path, flags, needles, refused):
    line = assert_one_line_error(["make", "--parent", llama_dir, "--data", text_file, "--out", tmp_path / "c", *flags],
                          *needles)
    assert refused is None or refused not in line


def test_a_drop_list_that_names_no_block_is_refused(llama_dir, tmp_path):
    code, _, err = run_cli(["make", "--parent", llama_dir, "--out", tmp_path / "c", "--drop", ","])
    assert code == 2 and "--drop" in err  # argparse refuses it, as every malformed --drop
    assert not (tmp_path / "c").exists()


def test_eval_names_its_token_flag_not_an_internal_name(llama_dir, text_file):
    line = assert_one_line_error(["eval", "--parent", llama_dir, "--data", text_file, "--tokens", 0], "--tokens")
    assert "max_tokens" not in line


@pytest.mark.parametrize("name", ["résumé.txt", "x.TXT"])
def test_uploads_keep_the_visitors_name_and_never_overwrite_another(tmp_path, name):
    from subclone_core.app.settings import AppSettings
    from subclone_core.app.steps import store_upload

    settings = AppSettings(output_dir=tmp_path)
    text = b"one paragraph\n\nanother paragraph"
    first = store_upload(settings, "session", "x.txt", text)
    path = store_upload(settings, "session", name, b"different\n\ntext")
    assert path != first and first.read_bytes() == text


@pytest.mark.parametrize("env, needle", [({"SUBCLONE_ALLOW_HUB": "nope"}, "SUBCLONE_ALLOW_HUB"),
                                         ({"SUBCLONE_ALLOWED_ROOTS": ":::"}, "SUBCLONE_ALLOWED_ROOTS")])
def test_settings_that_mean_nothing_are_refused(env, needle):
    from subclone_core.app.settings import AppSettings

    with pytest.raises(SubcloneError, match=needle):
        AppSettings.load(environ=env, secrets={})
