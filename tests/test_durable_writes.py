"""Nothing lost under a kill, Ctrl-C or a full disk (issue 30): durable writes, one test per fault point.

Each fault point (io.atomic.FAULT_POINTS) is a step of a write: a rename of publish, the run-folder swap, the
GGUF export, the cached GGUF conversion, the activation store and offload folders. ``SUBCLONE_FAULT=<point>``
makes the real command line die there (exit 137, no cleanup, as under SIGKILL). Then a later run that claims
the output and fails on bad input must find the old result intact (put back when it had been moved aside)
or the new one complete, and after one more normal run nothing temporary is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from subclone_core.core.errors import SubcloneError
from subclone_core.io import atomic
from subclone_core.io.atomic import FAULT_POINTS, HOST, OLD_TAG, TMP_TAG
from subclone_core.sources.cache import MARKER
from tests.cli_runner import run_cli
from tests.test_adversarial import FAST, dead_pid

ROOT = Path(__file__).resolve().parents[1]
TEMPORARY = (TMP_TAG, OLD_TAG, ".lock", "activations-", "parent-")  # names only a write in progress carries


def run_killed(args: list, point: str, cache: Path) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess with the fault armed at ``point``."""
    env = {**os.environ, "SUBCLONE_FAULT": point, "SUBCLONE_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "subclone_core.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def leftovers(*folders: Path) -> list[str]:
    """Names of temporaries in ``folders`` (missing folders hold none), except this live test process's own
    (e.g. the offload folder of a parent the in-process run still holds)."""
    mine = f"{os.getpid()}-{HOST}-"
    return sorted(p.name for folder in folders if folder.is_dir() for p in folder.iterdir()
                  if any(tag in p.name for tag in TEMPORARY) and mine not in p.name)


def old_folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


@dataclass
class Case:
    """One scenario: the command to kill, a later run that claims the output and fails on bad input (exit 2;
    None for a cache or scratch folder, which has no claim), one more normal run, what must hold after each
    (the old result intact or the new one complete), and the folders that must end with no temporaries."""

    killed: list
    failing: list | None
    normal: list
    intact_or_complete: Callable[[], bool]
    scratch: list[Path] = field(default_factory=list)


def make_case(tmp: Path, assets: dict) -> Case:
    child = old_folder(tmp / "child", {"old.txt": "the old child"})
    cmd = ["make", "--parent", assets["parent"], "--data", assets["text"], "--calib-tokens", 256, "--out", child,
           "--overwrite", "--seed", 1]
    failing = [*cmd[:2], tmp / "no-such-parent", *cmd[3:]]
    return Case(cmd, failing, cmd, lambda: _is_old(child, "old.txt") or _is_model(child), [tmp])


def train_case(tmp: Path, assets: dict) -> Case:
    run = old_folder(tmp / "run", {"summary.json": '{"old": true}', "metrics.jsonl": "{}\n",
                                   "subclone/config.json": "{}"})
    cmd = ["train", "--model", assets["parent"], "--data", assets["text"], "--out", run, "--overwrite", *FAST]
    failing = [*cmd[:4], assets["empty"], *cmd[5:]]

    def intact_or_complete() -> bool:
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        return summary == {"old": True} or (bool(summary.get("rows")) and _is_model(run / "subclone"))

    return Case(cmd, failing, cmd, intact_or_complete, [tmp])


def export_case(tmp: Path, assets: dict) -> Case:
    gguf = tmp / "child.gguf"
    gguf.write_text("the old export")
    cmd = ["export", "--model", assets["exportable"], "--to", gguf, "--overwrite", "--no-verify"]
    failing = [*cmd[:2], tmp / "no-such-model", *cmd[3:]]
    return Case(cmd, failing, cmd, lambda: gguf.read_bytes()[:4] in (b"the ", b"GGUF"), [tmp])


def gguf_cache_case(tmp: Path, assets: dict) -> Case:
    parents = assets["cache"] / "parents"
    cmd = ["info", "--parent", assets["gguf"]]
    assert run_cli(cmd)[0] == 0  # a conversion in the cache, then made stale: the killed run rebuilds it
    for folder in parents.iterdir():
        (folder / MARKER).write_text('{"files": {}}')
    return Case(cmd, None, cmd, lambda: _cached(parents), [parents])


def activations_case(tmp: Path, assets: dict) -> Case:
    cmd = ["make", "--parent", assets["parent"], "--data", assets["text"], "--calib-tokens", 256, "--sequential",
           "--activation-memory", 1, "--out", tmp / "child", "--overwrite"]
    return Case(cmd, None, cmd, lambda: True, [tmp, assets["cache"] / "activations"])


def offload_case(tmp: Path, assets: dict) -> Case:
    cmd = ["info", "--parent", assets["parent"], "--max-memory", "1KB"]
    return Case(cmd, None, cmd, lambda: True, [assets["cache"] / "offload"])


CASES = {"publish": make_case, "run": train_case, "export": export_case, "gguf-cache": gguf_cache_case,
         "activations": activations_case, "offload": offload_case}


def _is_old(folder: Path, name: str) -> bool:
    return (folder / name).is_file()


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _cached(parents: Path) -> bool:
    return any((folder / MARKER).is_file() and json.loads((folder / MARKER).read_text())["files"]
               for folder in parents.iterdir())


@pytest.fixture(scope="module")
def exportable(tmp_path_factory) -> Path:
    """A tiny Llama child whose byte-level BPE tokenizer GGUF can hold."""
    from tests.test_export_gguf import byte_level_bpe, save_child

    return save_child(tmp_path_factory.mktemp("exportable"), "llama", byte_level_bpe())


@pytest.fixture(scope="module")
def gguf_file(exportable, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"  # cached as tiny-<key>, not a parent-* name
    code, _, err = run_cli(["export", "--model", exportable, "--to", path, "--no-verify"])
    assert code == 0, err
    return path


@pytest.fixture
def assets(llama_dir, counting_text_file, exportable, gguf_file, tmp_path, monkeypatch) -> dict:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUBCLONE_CACHE", str(cache))
    (tmp_path / "empty.txt").write_text("")
    return {"parent": llama_dir, "text": counting_text_file, "exportable": exportable, "gguf": gguf_file,
            "cache": cache, "empty": tmp_path / "empty.txt"}


def test_every_fault_point_has_a_scenario():
    assert set(FAULT_POINTS) and {p.split(".")[0] for p in FAULT_POINTS} <= set(CASES)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_kill_at_each_step_loses_nothing_and_the_next_run_leaves_nothing(point, assets, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    case = CASES[point.split(".")[0]](work, assets)
    killed = run_killed(case.killed, point, assets["cache"])
    assert killed.returncode == 137, (point, killed.returncode, killed.stderr[-3000:])
    if case.failing is not None:  # an output with a claim: the claim puts an old result moved aside back
        code, _, err = run_cli(case.failing)
        assert code == 2, err
        assert case.intact_or_complete(), (point, sorted(p.name for p in work.iterdir()))
    code, _, err = run_cli(case.normal)
    assert code == 0, err
    assert case.intact_or_complete()
    assert leftovers(*case.scratch) == []


# --- the rules behind them, one defect each ------------------------------------------------------------------


def test_a_failing_overwrite_puts_back_the_old_child_a_killed_publish_left_aside(tmp_path):
    """Issue 30, defect 1: a run killed between the two renames left the old child only in a hidden folder,
    and the next --overwrite deleted it."""
    target = tmp_path / "child"
    old = tmp_path / f".child{OLD_TAG}{dead_pid()}-{HOST}-0badf00d.i12345"
    old_folder(old, {"config.json": "{}"})
    with atomic.claim_output(target, overwrite=True):
        assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]


def test_an_old_child_is_put_back_before_a_claim_without_overwrite_is_checked(tmp_path):
    old_folder(tmp_path / f".child{OLD_TAG}{dead_pid()}-{HOST}-0badf00d.i1", {"config.json": "{}"})
    with pytest.raises(SubcloneError, match="exists"), atomic.claim_output(tmp_path / "child"):
        pass
    assert (tmp_path / "child" / "config.json").is_file()


def test_an_old_folder_beside_a_target_that_did_not_replace_it_is_kept(tmp_path):
    target = old_folder(tmp_path / "child", {"config.json": "someone else's"})
    old = old_folder(tmp_path / f".child{OLD_TAG}{dead_pid()}-{HOST}-0badf00d.i1", {"config.json": "{}"})
    atomic.remove_stale_siblings(target, legacy=True)
    assert old.is_dir() and (target / "config.json").read_text() == "someone else's"


def test_a_second_claim_is_refused_naming_the_holder_and_the_lock_goes_with_the_first(tmp_path):
    with atomic.claim_output(tmp_path / "child"):
        assert json.loads((tmp_path / ".child.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(SubcloneError, match=f"another subclone run \\(pid {os.getpid()} on "), \
                atomic.claim_output(tmp_path / "child"):
            pass
    assert list(tmp_path.iterdir()) == []
    with atomic.claim_output(tmp_path / "child"):  # free again
        pass


def test_a_lock_that_cannot_be_written_is_one_line_and_leaves_no_lock_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(SubcloneError, match="No space left on device.*free some space"), \
            atomic.claim_output(tmp_path / "child"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_only_temporaries_of_dead_owners_on_this_host_are_removed(tmp_path):
    pid = dead_pid()
    names = {"alive": f".child{TMP_TAG}{os.getpid()}-{HOST}-0badf00d",
             "elsewhere": f".child{TMP_TAG}{pid}-another.host-0badf00d",
             "dead": f".child{TMP_TAG}{pid}-{HOST}-0badf00d"}
    for name in names.values():
        (tmp_path / name).mkdir()
    atomic.remove_stale_siblings(tmp_path / "child")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["elsewhere"]])


def test_scratch_folders_carry_their_owner_and_a_dead_ones_are_collected(tmp_path):
    """Issue 30, defect 4: activations-* and parent-* folders of killed passes stayed forever."""
    from subclone_core.io.activations import ActivationStore
    from subclone_core.io.placement import offload_folder

    pid = dead_pid()
    for name in (f"parent-{pid}-{HOST}-0badf00d", f"parent-{pid}-another.host-0badf00d", "parent-x1y2"):
        (tmp_path / name).mkdir()
    folder = offload_folder(tmp_path)
    assert atomic.parse_owner(folder.name[len("parent-"):]).pid == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [folder.name, f"parent-{pid}-another.host-0badf00d", "parent-x1y2"])
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / f"activations-{pid}-{HOST}-0badf00d").mkdir()
    import torch

    with ActivationStore(budget=0, root=tmp_path / "spill") as store:
        store[(0, 0)] = torch.zeros(2)
        assert [p.name.startswith(f"activations-{os.getpid()}-{HOST}-") for p in (tmp_path / "spill").iterdir()] \
            == [True]


def test_an_interrupted_overwrite_keeps_the_old_run_and_puts_the_partial_one_beside_it(tmp_path):
    """Issue 30, defect 2: Ctrl-C (or a full disk, or a crashed rank) replaced a whole run with partial metrics."""
    run = old_folder(tmp_path / "run", {"summary.json": "old", "subclone/config.json": "{}"})
    staged = atomic.staged_folder(run, overwrite=True, keep_partial=lambda work: True)
    with pytest.raises(KeyboardInterrupt), staged as work:
        (work / "metrics.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    assert (run / "summary.json").read_text() == "old" and (run / "subclone" / "config.json").is_file()
    [partial] = [p for p in tmp_path.iterdir() if p.name.startswith("run.interrupted-")]
    assert (partial / "metrics.jsonl").is_file()
    assert leftovers(tmp_path) == []


def test_a_failed_first_run_still_keeps_its_metrics_in_the_run_folder(tmp_path):
    staged = atomic.staged_folder(tmp_path / "run", keep_partial=lambda work: True)
    with pytest.raises(OSError), staged as work:
        (work / "metrics.jsonl").write_text("{}\n")
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_export_leaves_no_placeholder_and_a_normal_file_mode(exportable, tmp_path):
    """Issue 30, defect 3: a killed export left a 0-byte file (mode 755) that refused the rerun."""
    out = tmp_path / "child.gguf"
    killed = run_killed(["export", "--model", exportable, "--to", out, "--no-verify"], "export.after-header",
                        tmp_path / "cache")
    assert killed.returncode == 137 and not out.exists()
    code, _, err = run_cli(["export", "--model", exportable, "--to", out, "--no-verify"])
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert leftovers(tmp_path) == []


def test_a_file_written_without_replace_never_replaces_one_that_appeared(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(SubcloneError, match="appeared"), atomic.building_file(target, replace=False) as tmp:
        tmp.write_text("new")
        target.write_text("theirs")
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_fault_points_are_inert_unless_named(monkeypatch):
    exits = []
    monkeypatch.setattr(atomic.os, "_exit", exits.append)  # recorded instead of ending the test process
    monkeypatch.setenv("SUBCLONE_FAULT", "some.other-step")
    for point in FAULT_POINTS:
        atomic.fault_point(point)
    assert exits == []
    named = FAULT_POINTS[0]
    monkeypatch.setenv("SUBCLONE_FAULT", named)
    for point in FAULT_POINTS:
        atomic.fault_point(point)
    assert exits == [137]  # only the named step dies, as under SIGKILL
