"""What a process does with freed CPU memory (io.devices): `make run` starts the app keeping it for the next
allocation; a pass over an offloaded parent (bounded memory) gives it back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subclone_core.io import devices
from subclone_core.pipeline import passes
from tests import tiny_models as tm

ROOT = Path(__file__).resolve().parents[1]

# buffers of about 64 MiB allocated, filled and freed BUFFERS times (their sizes vary, as a pass's and a training
# step's do): the page faults of all of them. Which kept buffers fault in afresh depends on where glibc's memalign
# leaves the last one: 5-6 of 12 and 7-10 of 36 in repeated runs, so enough of them are counted to tell "fewer than
# half" reliably
BUFFERS = 36
FAULTS = """
import resource, sys, torch
from subclone_core.io import devices
modes = {"keep": devices.keep_freed_memory, "return": devices.return_freed_memory, "as is": lambda: None,
         "keep, then return": lambda: devices.keep_freed_memory() and devices.return_freed_memory()}
kept = modes[sys.argv[1]]()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(int(sys.argv[2])):
    x = torch.empty((16 << 20) + (i % 3) * 1000)
    x.fill_(1.0)
    del x
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, devices.keeps_freed_memory())
"""
PAGES = 16384  # 4 KiB pages in 64 MiB
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # "[always]": big mappings fault in 2 MiB at a time


def faults(mode: str, env: dict[str, str]) -> tuple[str, int, str]:
    """(what the mode's call returned, FAULTS's page faults, whether the process then keeps freed memory)."""
    out = subprocess.run([sys.executable, "-c", FAULTS, mode, str(BUFFERS)], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()
    return out[0], int(out[1]), out[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.skipif(THP.exists() and "[always]" in THP.read_text(), reason="counts 4 KiB page faults")
def test_kept_freed_memory_is_reused_and_returned_memory_faults_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    kept, kept_faults, keeps = faults("keep", env)
    returned, returned_faults, _ = faults("return", env)
    assert (kept, keeps, returned) == ("True", "True", "True")
    assert returned_faults >= BUFFERS * PAGES  # every buffer faulted in afresh
    assert kept_faults < BUFFERS // 2 * PAGES  # most buffers reuse the memory of the one before
    # a process started with the same settings in its environment (`make run`) keeps freed memory too
    as_is, started_faults, keeps = faults("as is", {**env, **devices.KEEP_FREED})
    assert (as_is, keeps, started_faults < BUFFERS // 2 * PAGES) == ("None", "True", True)
    # one that kept freed memory and then reads an offloaded parent (return_freed_memory) gives it back as before
    both, left_faults, keeps = faults("keep, then return", env)
    assert (both, keeps, left_faults >= BUFFERS * PAGES) == ("True", "False", True)
    # one whose user set a malloc variable of their own is left alone
    refused, _, keeps = faults("keep", {**env, "MALLOC_ARENA_MAX": "4"})
    assert (refused, keeps) == ("False", "False")


def test_make_run_starts_the_app_with_the_settings_keep_freed_memory_sets():
    makefile = (ROOT / "Makefile").read_text()
    line = re.search(r"^KEEP_FREED := (.*)$", makefile, re.MULTILINE)[1]
    assert dict(item.split("=") for item in line.split()) == devices.KEEP_FREED
    assert re.search(r"^run:.*\n\t.*\$\(KEEP_FREED\) exec .*streamlit run app\.py", makefile, re.MULTILINE)


def test_a_user_malloc_setting_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "_mallopt", lambda *settings: calls.append(settings) or True)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    assert devices.keep_freed_memory() is False and calls == []


def open_a_pass(source, parent) -> None:
    with passes.activation_store(None, None) as store:
        passes.open_pass(source, [tm.inputs(parent)], store, config=parent.config, model_class=type(parent),
                         device="cpu", dtype=torch.float32, max_tokens=None)


def test_a_pass_gives_freed_memory_back_only_where_memory_is_bounded(monkeypatch, tmp_path):
    """In a process that keeps freed memory a pass over a parent in memory keeps it; one that reads an offloaded
    parent's files gives it back; in any other process every pass gives it back, as before."""
    parent = tm.make("llama")
    parent.save_pretrained(tmp_path)
    returned = []
    monkeypatch.setattr(passes, "return_freed_memory", lambda: returned.append(True))
    for name, value in devices.KEEP_FREED.items():
        monkeypatch.setenv(name, value)
    open_a_pass(parent.state_dict(), parent)
    assert returned == []
    open_a_pass(tmp_path, parent)
    assert returned == [True]
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    open_a_pass(parent.state_dict(), parent)
    assert returned == [True, True]
