"""The cache of converted parents and the pretrained ViT: where it lives, and completion markers.

A cache folder is published whole (subclone_core.io.atomic) with a marker written last that records what it
was built from and every file's size, modification time and sha256. A folder whose marker is missing,
names another source, or disagrees with its files is rebuilt rather than trusted; a file whose time
changed is hashed again, so an edit of the same size is caught without hashing on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import transformers

logger = logging.getLogger(__name__)

MARKER = "subclone-cache.json"  # written last: a cache folder without it is half-written


def cache_dir() -> Path:
    """Where converted parents and the pretrained ViT live: $SUBCLONE_CACHE or ~/.cache/subclone."""
    env = os.environ.get("SUBCLONE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "subclone"


def write_marker(folder: Path, source: dict, info: dict | None = None) -> None:
    """Write the completion marker: the source it was built from and each file's size, mtime and sha256."""
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    payload = {"source": source, "files": files, "info": info or {}, "transformers": transformers.__version__}
    (folder / MARKER).write_text(json.dumps(payload, indent=1))


def file_record(path: Path) -> dict:
    """What the marker remembers of a file: size, modification time (ns) and sha256."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def read_marker(folder: Path) -> dict | None:
    """The completion marker of a cache folder, or None when missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def cache_is_valid(folder: Path, source: dict) -> bool:
    """Whether a cache folder is complete, built from `source`, and its files are intact.

    Cheap on every load: a file whose size and modification time match the marker is trusted; any other
    is hashed again, and a sha256 that differs (an edit or a flipped byte of the same size) rebuilds the
    cache. Safetensors headers are checked too (a parseable header whose tensors end at the file's end).
    """
    marker = read_marker(folder)
    if marker is None or marker.get("source") != source or not marker.get("files"):
        return False
    rehashed = False
    for name, meta in marker["files"].items():
        path = Path(folder) / name
        state = _file_state(path, meta)
        if state == "damaged":
            logger.warning("cache %s is damaged (%s changed); rebuilding it", folder, name)
            return False
        rehashed |= state == "rehashed"
    if rehashed:  # same content under a new time (e.g. copied or touched): remember it, so the next load is cheap
        _refresh_times(folder, marker)
    return True


def _file_state(path: Path, meta: dict) -> str:
    """"trusted" (size and mtime as recorded), "rehashed" (same sha256 under a new mtime) or "damaged"."""
    try:
        stat = path.stat()
    except OSError:
        return "damaged"
    if not path.is_file() or stat.st_size != meta.get("size"):
        return "damaged"
    if path.suffix == ".safetensors" and not safetensors_intact(path):
        return "damaged"
    if stat.st_mtime_ns == meta.get("mtime_ns"):
        return "trusted"
    return "rehashed" if file_sha256(path) == meta.get("sha256") else "damaged"


def _refresh_times(folder: Path, marker: dict) -> None:
    for name, meta in marker["files"].items():
        meta["mtime_ns"] = (Path(folder) / name).stat().st_mtime_ns
    try:
        (Path(folder) / MARKER).write_text(json.dumps(marker, indent=1))
    except OSError:
        pass  # a read-only cache still works; it is just hashed again next time


def safetensors_intact(path: Path) -> bool:
    """Whether a safetensors file has a valid header and exactly the data its header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return False
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0) == size


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
