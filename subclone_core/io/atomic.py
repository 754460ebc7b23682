"""Outputs that appear whole or not at all, one writer per path: the only module that renames files into place.

One helper serves every writer (model folders, run folders, the parent cache, JSON reports): a crash or an
error leaves only a hidden temporary sibling, and whatever already stood at the target is replaced only
once the new one is complete. Every temporary name records its owner, ``<pid>-<host>-<random>``
(``.<name>.tmp-<owner>`` next to a target; ``activations-<owner>``, ``parent-<owner>`` in a scratch folder),
so that what a killed process left can be told from what a live one is writing: later runs remove a
temporary whose owner is dead (same host, no such process), and never touch one whose owner is alive or
runs on another host.

Replacing a folder takes two renames: the old target moves aside to ``.<name>.old-<owner>.i<inode>`` (the
inode is the new folder's), then the new one moves in. A process killed between them leaves no target and
the old folder aside: the next run that looks (a claim, a cache build) renames it back into place. An old
folder is removed only once the target standing there is the very folder that replaced it (same inode).

Claiming an output path before any work: one writer per path, a doomed write fails in the first second.

``claim_output`` checks the path (a folder where a folder is expected, a file where a file is, nothing
replaced without overwrite), creates its parent folder, and takes ``.<name>.lock`` next to it: an exclusive
``flock`` (``filelock.FileLock``) held while the command runs, which the kernel releases when the process
ends, so a killed run never leaves a lock that blocks the next one. Writing the lock (a few bytes, flushed
to disk) also proves the folder is writable and not full. Under the claim, an orphaned old folder is
recovered and the temporaries that killed runs left behind are removed. ``staged_folder`` builds a whole run
folder in a hidden sibling and swaps it in only when the run succeeded, so that ``--overwrite`` never loses
the previous run to a run that fails, is interrupted or runs out of disk.

Fault injection: ``SUBCLONE_FAULT=<point>`` (one of FAULT_POINTS) makes the process die (exit status 137,
as under SIGKILL) at that step, so the tests can check that every step survives a kill.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from subclone_core.core.errors import SubcloneError

logger = logging.getLogger(__name__)

TMP_TAG = ".tmp-"  # hidden temporary siblings are named ".<name>.tmp-<owner>"
OLD_TAG = ".old-"  # a replaced target waits under ".<name>.old-<owner>.i<inode>" until the new one is in place
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"  # no "-" or "/": names stay parseable
_OWNER = re.compile(r"^(?P<pid>\d+)-(?P<host>[^-/]+)-[0-9a-f]{8}(?:\.i(?P<ino>\d+))?$")
_LEGACY_OWNER = re.compile(r"^(?P<pid>\d+)-[0-9a-f]+$")  # written before hosts were recorded

FAULT_ENV = "SUBCLONE_FAULT"
FAULT_POINTS = (
    "publish.after-move-old",  # a model folder (make, a trained candidate): old target moved aside
    "publish.after-move-new",  # ... the new folder moved in, the old one not yet removed
    "run.after-summary",  # a train/compare run complete in its staging folder, not yet swapped in
    "run.after-move-old",  # the run folder swap: the old run moved aside
    "run.after-move-new",  # ... the new run moved in, the old one not yet removed
    "export.after-header",  # a GGUF export's temporary file half written
    "export.before-rename",  # ... complete, not yet renamed over the destination
    "gguf-cache.after-convert",  # a GGUF parent converted into its temporary cache folder, no marker yet
    "gguf-cache.after-move-old",  # a stale cache folder moved aside
    "gguf-cache.after-move-new",  # ... the new conversion moved in, the stale one not yet removed
    "activations.after-create",  # a sequential pass's on-disk activation store created
    "offload.after-create",  # a parent's disk-offload folder created
)


def fault_point(name: str) -> None:
    """Die here, as under SIGKILL (no cleanup, no finally), when $SUBCLONE_FAULT names this step."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(137)


# --- owners of temporary names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """Who made a temporary name: a process id, its host (None in names written before hosts were recorded),
    and for an old folder the inode of the folder that replaced it."""

    pid: int
    host: str | None
    ino: int | None = None


def owner_token() -> str:
    """This process's mark for a new temporary name: ``<pid>-<host>-<random>``."""
    return f"{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}"


def parse_owner(token: str) -> Owner | None:
    """The owner recorded in a temporary name's suffix, or None when it records none."""
    match = _OWNER.match(token)
    if match:
        ino = match.group("ino")
        return Owner(int(match.group("pid")), match.group("host"), int(ino) if ino else None)
    match = _LEGACY_OWNER.match(token)
    return Owner(int(match.group("pid")), None) if match else None


def owner_dead(owner: Owner | None, *, legacy: bool = False) -> bool:
    """Whether what ``owner`` made was abandoned: it ran on this host and has ended. A name without a host or
    without any owner counts as abandoned only when ``legacy`` (the caller holds the target's claim)."""
    if owner is None:
        return legacy
    if owner.host is None:
        return legacy and not process_alive(owner.pid)
    return owner.host == HOST and not process_alive(owner.pid)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sibling_name(target: Path, tag: str, suffix: str = "") -> Path:
    """A new hidden name next to ``target`` that records this process as its owner."""
    return target.parent / f".{target.name}{tag}{owner_token()}{suffix}"


def temporary_sibling(target: Path) -> Path:
    """A new, empty hidden folder next to ``target`` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = sibling_name(target, TMP_TAG)
    tmp.mkdir()
    return tmp


def owned_folder(root: str | Path, prefix: str) -> Path:
    """A new folder ``<root>/<prefix><owner>`` for scratch data (removed by its user when done); the folders
    of this prefix that dead processes left under ``root`` are removed first."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root, prefix)
    folder = root / f"{prefix}{owner_token()}"
    folder.mkdir()
    return folder


def remove_abandoned(root: Path, prefix: str) -> list[Path]:
    """Remove ``<root>/<prefix><owner>`` entries whose owner is dead; names without an owner are left alone."""
    removed = []
    for path in Path(root).glob(f"{glob_escape(prefix)}*"):
        owner = parse_owner(path.name[len(prefix):])
        if owner is not None and owner.host is not None and owner_dead(owner):
            _remove(path)
            removed.append(path)
    return removed


# --- leftovers next to a target ----------------------------------------------------------------------------


def remove_stale_siblings(target: Path, *, legacy: bool = False) -> list[Path]:
    """Tidy what killed runs left next to ``target``: put an orphaned old folder back when the target is
    missing, remove an old folder once its replacement stands at the target, and remove abandoned temporaries.

    Args:
        target: the folder or file whose siblings to check.
        legacy: also treat names written before owners (or hosts) were recorded as abandoned; only safe while
            holding the target's claim, so nothing else writes it.

    Returns:
        The paths removed or put back.
    """
    touched = []
    for path in sorted(target.parent.glob(f".{glob_escape(target.name)}{OLD_TAG}*"), key=_mtime, reverse=True):
        if _settle_old(path, target, parse_owner(path.name[len(target.name) + 1 + len(OLD_TAG):]), legacy):
            touched.append(path)
    for path in target.parent.glob(f".{glob_escape(target.name)}{TMP_TAG}*"):
        if owner_dead(parse_owner(path.name[len(target.name) + 1 + len(TMP_TAG):]), legacy=legacy):
            _remove(path)
            touched.append(path)
    return touched


def _settle_old(old: Path, target: Path, owner: Owner | None, legacy: bool) -> bool:
    """Recover or remove one old folder whose owner is dead; whether it did either."""
    if not owner_dead(owner, legacy=legacy):
        return False
    if not target.exists() and not target.is_symlink():
        try:
            old.rename(target)
        except OSError:
            return False  # another process recovered it, or the target appeared meanwhile
        logger.warning("put back %s: a run killed while replacing it had left it at %s", target, old.name)
        return True
    if owner is not None and owner.ino is not None and _inode(target) == owner.ino:
        _remove(old)  # its replacement stands at the target: the killed run had finished replacing it
        return True
    return False  # a target we cannot tell from another writer's: keep the old folder, never guess


def remove_stale_in(folder: Path) -> list[Path]:
    """``remove_stale_siblings`` for every target in ``folder`` with hidden leftovers (a cache folder)."""
    targets = {folder / _target_of(p.name) for p in Path(folder).glob(".*") if _target_of(p.name)}
    return [path for target in sorted(targets) for path in remove_stale_siblings(target)]


def _target_of(name: str) -> str | None:
    """The target a hidden ``.<name>.tmp-...`` or ``.<name>.old-...`` belongs to, or None."""
    at = max(name.rfind(TMP_TAG), name.rfind(OLD_TAG))
    return name[1:at] if name.startswith(".") and at > 1 else None


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters made literal."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- renaming into place -----------------------------------------------------------------------------------


def publish(new: Path, target: Path, *, keep_theirs: bool = False, replace: bool = True,
            step: str = "publish") -> None:
    """Rename the finished folder ``new`` to ``target``; an existing target is moved aside first and
    removed only afterwards, and put back if the rename fails.

    Args:
        new: the complete folder.
        target: where it goes.
        keep_theirs: when another process published the same target at the same moment, keep its folder
            and drop ours (for caches, where both are equally good) instead of raising.
        replace: replace a non-empty target; when False, a target that appeared meanwhile is an error and
            is left alone.
        step: the name of this kind of publish in FAULT_POINTS ("publish", "run", "gguf-cache").

    Raises:
        SubcloneError: replace is off and a non-empty target appeared while ``new`` was built.
    """
    old = None
    if replace and target.exists():
        # the new folder's inode in the old one's name tells a later run that the replace finished
        old = sibling_name(target, OLD_TAG, f".i{new.lstat().st_ino}")
        target.rename(old)
        fault_point(f"{step}.after-move-old")
    try:
        new.rename(target)
    except OSError as err:
        _undo_publish(new, target, old, keep_theirs=keep_theirs, replace=replace, err=err)
        return
    if old is not None:
        fault_point(f"{step}.after-move-new")
        _remove(old)


def _undo_publish(new: Path, target: Path, old: Path | None, *, keep_theirs: bool, replace: bool,
                  err: OSError) -> None:
    """After a failed final rename: keep another process's equal folder, or put the old target back."""
    if keep_theirs and target.exists():
        shutil.rmtree(new, ignore_errors=True)
        if old is not None:
            _remove(old)
        return
    if old is not None and not target.exists():
        old.rename(target)
    if not replace and target.exists():
        raise SubcloneError(f"{target} appeared while this ran (another run?) and was left alone; "
                            "choose another output or pass --overwrite") from err
    raise err


class building:
    """Context manager: yields a temporary folder and publishes it to ``target`` when the block succeeds.

    On an exception (or Ctrl-C) the temporary folder is removed and ``target`` is left as it was.
    """

    def __init__(self, target: str | Path, *, keep_theirs: bool = False, replace: bool = True,
                 step: str = "publish") -> None:
        self.target = Path(target)
        self.keep_theirs, self.replace, self.step = keep_theirs, replace, step

    def __enter__(self) -> Path:
        self.tmp = temporary_sibling(self.target)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            publish(self.tmp, self.target, keep_theirs=self.keep_theirs, replace=self.replace, step=self.step)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


@contextmanager
def building_file(target: str | Path, *, replace: bool = True, step: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``target``; on success it becomes ``target`` in one rename,
    on an exception it is removed and ``target`` is left as it was.

    Args:
        target: the file to write.
        replace: replace an existing ``target``; when False, one that appeared meanwhile is an error.
        step: the name of this write in FAULT_POINTS (its "<step>.before-rename"), or None.

    Raises:
        SubcloneError: replace is off and ``target`` exists by the end.
    """
    target = Path(target)
    tmp = sibling_name(target, TMP_TAG)
    try:
        yield tmp
        if step is not None:
            fault_point(f"{step}.before-rename")
        _move_file(tmp, target, replace=replace)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _move_file(tmp: Path, target: Path, *, replace: bool) -> None:
    """Rename ``tmp`` to ``target``; without replace, a hard link that fails on an existing target."""
    if replace:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise SubcloneError(f"{target} appeared while this ran (another run?) and was left alone; "
                            "choose another path or pass --overwrite") from None
    except OSError:  # a filesystem without hard links: check, then rename (a narrow race remains)
        if target.exists():
            raise SubcloneError(f"{target} appeared while this ran (another run?) and was left alone; "
                                "choose another path or pass --overwrite") from None
        os.replace(tmp, target)


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
    claim = _Claim(target, flag)
    claim.acquire()
    try:
        if remove_stale_siblings(target, legacy=True):  # an old folder put back counts as existing
            check_target(target, overwrite=overwrite, kind=kind, flag=flag, hint=hint)
        yield target
    finally:
        claim.release()


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


class _Claim:
    """The claim on a target: filelock's flock on ``.<name>.lock``, taken without waiting (a second writer is
    refused, not queued); the holder's pid and host written in it for that refusal; the file removed when
    released, so that a finished run leaves nothing beside its output."""

    def __init__(self, target: Path, flag: str) -> None:
        self.target, self.flag, self.path = target, flag, lock_path(target)
        self.inode: int | None = None  # the locked file's, so that release never removes another run's file
        self.lock = FileLock(self.path, timeout=0, thread_local=False, on_acquired=self._write_owner)

    def acquire(self) -> None:
        """Take the lock; refuse (one line) when another process holds it or the place takes no writes."""
        try:
            while True:
                try:
                    self.lock.acquire()
                except Timeout:
                    if self.path.exists():
                        raise
                    continue  # its holder removed the file just as we tried it: lock the new one
                if self._holds_the_file():
                    break
                self.lock.release()  # locked a file its holder unlinked on release: the claim is the new one
        except Timeout:
            raise SubcloneError(f"{self.flag} {str(self.target)!r} is being written by another subclone run"
                                f"{self._holder()}; wait for it to finish or choose another path") from None
        except OSError as err:
            raise SubcloneError(f"{self.flag} {str(self.target)!r}: cannot write in "
                                f"{str(self.target.parent)!r} ({err.strerror}); free some space or choose a "
                                "writable place") from None

    def _write_owner(self, fd: int) -> None:
        """Record who holds the claim (filelock calls this holding the lock); writing and syncing it also
        proves the disk takes writes."""
        self.inode = os.fstat(fd).st_ino
        payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "target": str(self.target)})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload.encode(), 0)
            os.fsync(fd)
        except OSError:
            self._remove_file()  # still held, so surely ours; filelock then unlocks it
            raise

    def _holds_the_file(self) -> bool:
        try:
            return self.path.stat().st_ino == self.inode
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_bytes() or b"{}")
            return f" (pid {int(info['pid'])} on {info['host']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def release(self) -> None:
        """Remove the lock file while still holding it (a run that opened it meanwhile finds it unlinked and
        locks a new one), then let go."""
        try:
            self._remove_file()
        finally:
            self.lock.release()

    def _remove_file(self) -> None:
        with contextlib.suppress(OSError):  # one that cannot be removed is harmless: it is free once released
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()


@contextmanager
def staged_folder(path: str | Path, *, overwrite: bool = False, flag: str = "--out",
                  keep_partial: Callable[[Path], bool] = lambda work: False) -> Iterator[Path]:
    """Claim ``path`` and yield a work folder of the same name inside a hidden sibling; only when the block
    succeeds does the work folder replace ``path`` whole (an old run's leftovers never mix with the new one).

    Args:
        path: the run folder.
        overwrite: replace a non-empty folder.
        flag: the option that named it, for messages.
        keep_partial: on an error or Ctrl-C, whether the work folder holds something worth keeping (e.g.
            the metrics of a run that stopped mid-way): it goes to ``path`` when nothing is there yet, else
            beside it (see ``interrupted_name``), so that it never replaces a previous run.
    """
    with claim_output(path, overwrite=overwrite, flag=flag) as target:
        tmp = temporary_sibling(target)
        work = tmp / target.name
        work.mkdir()
        try:
            yield work
        except BaseException:
            if keep_partial(work):
                _keep_interrupted(work, target)
            raise
        else:
            publish(work, target, step="run")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def interrupted_name(target: Path) -> Path:
    """Where an interrupted run's partial output goes when a previous run stands at ``target``:
    ``<name>.interrupted-<date>-<time>`` beside it."""
    return target.parent / f"{target.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"


def _keep_interrupted(work: Path, target: Path) -> None:
    """Publish a failed run's partial output where it replaces nothing; a failure to do so must not hide the
    original error."""
    holds_data = target.is_dir() and any(target.iterdir())
    destination = interrupted_name(target) if holds_data else target
    try:
        publish(work, destination, replace=not holds_data, step="run")
    except (OSError, SubcloneError):
        return
    if holds_data:
        logger.warning("the interrupted run's output is in %s; the previous run in %s is untouched",
                       destination, target)
