"""Folders and files that appear whole or not at all: built in a hidden temporary sibling, then renamed into place.

One helper serves every writer (model folders, run folders, the parent cache, JSON reports): a crash or an
error leaves only a hidden temporary sibling, and whatever already stood at the target is replaced only
once the new one is complete. Temporary names carry the writer's process id,
``.<name>.tmp-<pid>-<random>``, so that a sibling left by a killed process can be told from one still
being written, and removed (see ``remove_stale_siblings``).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from subclone_core.core.errors import SubcloneError

TMP_TAG = ".tmp-"  # hidden temporary folders are named ".<name>.tmp-<pid>-<random>"
OLD_TAG = ".old-"  # a replaced target waits under ".<name>.old-<pid>-<random>" until the new one is in place
_OWNER = re.compile(r"^(\d+)-[0-9a-f]+$")


def sibling_name(target: Path, tag: str) -> Path:
    """A new hidden name next to ``target`` that records this process as its owner."""
    return target.parent / f".{target.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_sibling(target: Path) -> Path:
    """A new, empty hidden folder next to ``target`` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = sibling_name(target, TMP_TAG)
    tmp.mkdir()
    return tmp


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(target: Path, *, legacy: bool = False) -> list[Path]:
    """Remove the temporary and replaced siblings of ``target`` whose owner process has ended.

    Args:
        target: the folder or file whose siblings to check.
        legacy: also remove siblings whose name records no owner (written before owners were recorded);
            only safe while holding the target's claim (subclone_core.io.outputs), so nothing else writes it.

    Returns:
        The paths removed.
    """
    removed = []
    for tag in (TMP_TAG, OLD_TAG):
        for path in target.parent.glob(f".{glob_escape(target.name)}{tag}*"):
            owner = _OWNER.match(path.name[len(target.name) + 1 + len(tag):])
            stale = (not process_alive(int(owner.group(1)))) if owner else legacy
            if stale:
                _remove(path)
                removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters made literal."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(new: Path, target: Path, *, keep_theirs: bool = False, replace: bool = True) -> None:
    """Rename the finished folder ``new`` to ``target``; an existing target is moved aside first and
    removed only afterwards, and put back if the rename fails.

    Args:
        new: the complete folder.
        target: where it goes.
        keep_theirs: when another process published the same target at the same moment, keep its folder
            and drop ours (for caches, where both are equally good) instead of raising.
        replace: replace a non-empty target; when False, a target that appeared meanwhile is an error and
            is left alone.

    Raises:
        SubcloneError: replace is off and a non-empty target appeared while ``new`` was built.
    """
    old = None
    if replace and target.exists():
        old = sibling_name(target, OLD_TAG)
        target.rename(old)
    try:
        new.rename(target)
    except OSError as err:
        if keep_theirs and target.exists():
            shutil.rmtree(new, ignore_errors=True)
            return
        if old is not None and not target.exists():
            old.rename(target)
            old = None
        if not replace and target.exists():
            raise SubcloneError(f"{target} appeared while this ran (another run?) and was left alone; "
                                "choose another output or pass --overwrite") from err
        raise
    if old is not None:
        _remove(old)


class building:
    """Context manager: yields a temporary folder and publishes it to ``target`` when the block succeeds.

    On an exception (or Ctrl-C) the temporary folder is removed and ``target`` is left as it was.
    """

    def __init__(self, target: str | Path, *, keep_theirs: bool = False, replace: bool = True) -> None:
        self.target = Path(target)
        self.keep_theirs, self.replace = keep_theirs, replace

    def __enter__(self) -> Path:
        self.tmp = temporary_sibling(self.target)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            publish(self.tmp, self.target, keep_theirs=self.keep_theirs, replace=self.replace)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


@contextmanager
def building_file(target: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``target``; on success it replaces ``target`` in one rename,
    on an exception it is removed and ``target`` is left as it was."""
    target = Path(target)
    tmp = sibling_name(target, TMP_TAG)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
