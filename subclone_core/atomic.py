"""Folders that appear whole or not at all: built in a hidden temporary sibling, then renamed into place.

One helper serves every writer of folders (model folders, the parent cache): a crash or an error leaves
only a hidden temporary folder, and a folder that already stood at the target is replaced only once the
new one is complete.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

TMP_TAG = ".tmp-"  # hidden temporary folders are named ".<name>.tmp-<random>"


def temporary_sibling(target: Path) -> Path:
    """A new, empty hidden folder next to ``target`` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{TMP_TAG}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(new: Path, target: Path, *, keep_theirs: bool = False) -> None:
    """Rename the finished folder ``new`` to ``target``; an existing target is moved aside first and
    removed only afterwards, and put back if the rename fails.

    Args:
        new: the complete folder.
        target: where it goes.
        keep_theirs: when another process published the same target at the same moment, keep its folder
            and drop ours (for caches, where both are equally good) instead of raising.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if keep_theirs and target.exists():
            shutil.rmtree(new, ignore_errors=True)
        else:
            if old is not None and not target.exists():
                old.rename(target)
                old = None
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class building:
    """Context manager: yields a temporary folder and publishes it to ``target`` when the block succeeds.

    On an exception (or Ctrl-C) the temporary folder is removed and ``target`` is left as it was.
    """

    def __init__(self, target: str | Path, *, keep_theirs: bool = False) -> None:
        self.target = Path(target)
        self.keep_theirs = keep_theirs

    def __enter__(self) -> Path:
        self.tmp = temporary_sibling(self.target)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            publish(self.tmp, self.target, keep_theirs=self.keep_theirs)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
