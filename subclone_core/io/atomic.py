"""Outputs that appear whole or not at all, one writer per path: the only module that renames files into place.

One helper serves every writer (model folders, run folders, the parent cache, JSON reports): a crash or an
error leaves only a hidden temporary sibling, and whatever already stood at the target is replaced only
once the new one is complete. Temporary names carry the writer's process id,
``.<name>.tmp-<pid>-<random>``, so that a sibling left by a killed process can be told from one still
being written, and removed (see ``remove_stale_siblings``).

Claiming an output path before any work: one writer per path, a doomed write fails in the first second.

``claim_output`` checks the path (a folder where a folder is expected, a file where a file is, nothing
replaced without overwrite), creates its parent folder, and takes ``.<name>.lock`` next to it: an
exclusive ``flock`` held while the command runs, which the kernel releases when the process ends, so a
killed run never leaves a lock that blocks the next one. Writing the lock (a few bytes, flushed to disk)
also proves the folder is writable and not full. Under the claim, the hidden temporary siblings that
killed runs left behind are removed. ``staged_folder`` builds a whole run folder in a hidden sibling and
swaps it in at the end, so that ``--overwrite`` never loses the previous run to a run that then fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
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
            only safe while holding the target's claim (subclone_core.io.atomic), so nothing else writes it.

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



def write_text(target: str | Path, text: str) -> None:
    """Write a text file whole (its folder created): readers see the old file or the new one, never half."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with building_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")

# --- claimed outputs ---------------------------------------------------------------------------------------

FOLDER, FILE = "folder", "file"


@contextmanager
def claim_output(path: str | Path, *, overwrite: bool = False, kind: str = FOLDER, flag: str = "--out",
                 hint: str = "pass --overwrite") -> Iterator[Path]:
    """Hold the claim on an output path for the duration of the block.

    Args:
        path: the folder or file the command will write.
        overwrite: whether an existing non-empty folder (or an existing file) may be replaced.
        kind: FOLDER or FILE.
        flag: the option that named the path, for the messages.
        hint: how the user allows replacing (the app has a checkbox, not a flag).

    Yields:
        The path.

    Raises:
        SubcloneError: the path is of the wrong kind, would be replaced without overwrite, cannot be
            written (no such place, read-only, full, a file in the way), or another run holds it.
    """
    target = Path(path).expanduser()
    check_target(target, overwrite=overwrite, kind=kind, flag=flag, hint=hint)
    make_parent(target, flag)
    lock = _acquire(target, flag)
    try:
        remove_stale_siblings(target, legacy=True)
        yield target
    finally:
        _release(lock, target)


def check_target(target: Path, *, overwrite: bool, kind: str, flag: str, hint: str = "pass --overwrite") -> None:
    """Refuse a target of the wrong kind, or one that holds data and overwrite is off."""
    if kind == FOLDER:
        if target.exists() and not target.is_dir():
            raise SubcloneError(f"{flag} {str(target)!r} is a file; give a folder path that does not exist")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise SubcloneError(f"output folder {str(target)!r} exists and is not empty; "
                                f"choose a new folder or {hint}")
        return
    if target.is_dir():
        raise SubcloneError(f"{flag} {str(target)!r} is a folder; give a file path, e.g. {target / 'out.json'}")
    if target.exists() and not target.is_file():
        raise SubcloneError(f"{flag} {str(target)!r} is not a regular file; give a file path in a folder")
    if target.exists() and not overwrite:
        raise SubcloneError(f"{flag} {str(target)!r} exists; choose a new path or {hint}")


def make_parent(target: Path, flag: str) -> None:
    """Create the folder the target goes in, naming what is in the way when that fails."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), parent)
        raise SubcloneError(f"{flag} {str(target)!r}: {str(blocker)!r} is a file, not a folder; "
                            "choose a path under a folder") from None
    except OSError as err:
        raise SubcloneError(f"{flag} {str(target)!r}: cannot create the folder {str(parent)!r} "
                            f"({err.strerror}); choose a writable place") from None
    if not parent.is_dir():
        raise SubcloneError(f"{flag} {str(target)!r}: {str(parent)!r} is not a folder; choose a path under a folder")


def lock_path(target: Path) -> Path:
    """Where the claim on ``target`` is kept: ``.<name>.lock`` next to it."""
    return target.parent / f".{target.name}.lock"


def _acquire(target: Path, flag: str) -> int:
    """Open and flock the target's lock file; refuse when another process holds it."""
    path = lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise SubcloneError(f"{flag} {str(target)!r}: cannot write in {str(target.parent)!r} "
                                f"({err.strerror}); choose a writable place") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise SubcloneError(f"{flag} {str(target)!r} is being written by another subclone run{owner}; "
                                "wait for it to finish or choose another path") from None
        if _same_file(fd, path):  # else the holder removed it meanwhile: lock the new one
            break
        os.close(fd)
    _write_owner(fd, target, flag)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {int(info['pid'])} on {info['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _write_owner(fd: int, target: Path, flag: str) -> None:
    """Record who holds the claim; writing and syncing it also proves the disk takes writes."""
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "target": str(target)}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
    except OSError as err:
        _release(fd, target)
        raise SubcloneError(f"{flag} {str(target)!r}: cannot write in {str(target.parent)!r} "
                            f"({err.strerror}); free some space or choose another place") from None


def _release(fd: int, target: Path) -> None:
    """Remove the lock file while still holding it (a waiting process then re-checks), and let go."""
    try:
        if _same_file(fd, lock_path(target)):
            lock_path(target).unlink()
    except OSError:
        pass  # a lock file that cannot be removed is harmless: it is free once closed
    finally:
        os.close(fd)


@contextmanager
def staged_folder(path: str | Path, *, overwrite: bool = False, flag: str = "--out",
                  keep_partial: Callable[[Path], bool] = lambda work: False) -> Iterator[Path]:
    """Claim ``path`` and yield a work folder of the same name inside a hidden sibling; at the end the work
    folder replaces ``path`` whole (an old run's leftovers never mix with the new one).

    Args:
        path: the run folder.
        overwrite: replace a non-empty folder.
        flag: the option that named it, for messages.
        keep_partial: on an error, whether the work folder holds something worth publishing anyway (e.g.
            the metrics of a run that crashed mid-way); otherwise the old folder is kept untouched.
    """
    with claim_output(path, overwrite=overwrite, flag=flag) as target:
        tmp = temporary_sibling(target)
        work = tmp / target.name
        work.mkdir()
        try:
            yield work
        except BaseException:
            if keep_partial(work):
                _publish_quietly(work, target)
            raise
        else:
            publish(work, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_quietly(work: Path, target: Path) -> None:
    """Publish a failed run's partial output; a failure to do so must not hide the original error."""
    try:
        publish(work, target)
    except OSError:
        pass
