"""The cache of converted parents and the pretrained ViT: where it lives, and completion markers.

A cache folder is published whole (subclone_core.atomic) with a marker written last that records what it
was built from and every file's size, modification time and sha256. A folder whose marker is missing,
names another source, or disagrees with its files is rebuilt rather than trusted.
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
    """Write the completion marker: the source it was built from and each file's size and sha256."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER
    }
    payload = {"source": source, "files": files, "info": info or {}, "transformers": transformers.__version__}
    (folder / MARKER).write_text(json.dumps(payload, indent=1))


def read_marker(folder: Path) -> dict | None:
    """The completion marker of a cache folder, or None when missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def cache_is_valid(folder: Path, source: dict) -> bool:
    """Whether a cache folder is complete, built from `source`, and its files are intact.

    Cheap enough for every load (no full hashing): every listed file exists with its recorded size,
    and every safetensors file has a parseable header whose tensors end exactly at the file's end.
    """
    marker = read_marker(folder)
    if marker is None or marker.get("source") != source or not marker.get("files"):
        return False
    for name, meta in marker["files"].items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != meta.get("size"):
            logger.warning("cache %s is damaged (%s); rebuilding it", folder, name)
            return False
        if path.suffix == ".safetensors" and not safetensors_intact(path):
            logger.warning("cache %s is damaged (%s has a bad header); rebuilding it", folder, name)
            return False
    return True


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
