"""Server settings of the app, and the path rules that keep visitors inside them.

Settings come from environment variables first, then from a ``[subclone]`` table in
``.streamlit/secrets.toml``, then from the defaults below:

- ``SUBCLONE_OUTPUT_DIR`` (``output_dir``): the one folder the app writes to (default ``outputs``).
- ``SUBCLONE_ALLOWED_ROOTS`` (``allowed_roots``): folders that local parents and data must lie under,
  separated by ``os.pathsep`` (a list in secrets.toml). Empty (the default): any local path.
- ``SUBCLONE_MAX_JOBS`` (``max_jobs``): jobs (training and long page steps) running at once on this server
  (default 1).
- ``SUBCLONE_MAX_QUEUE`` (``max_queue``): jobs waiting at most; more are refused (default 20: a class).
- ``SUBCLONE_ALLOW_HUB`` (``allow_hub``): whether Hub ids may be downloaded (default on).
- ``SUBCLONE_MAX_UPLOAD_MB`` (``max_upload_mb``): the largest text upload accepted (default 10).
- ``SUBCLONE_OPEN_PARENT`` (``open_parent``): the parent a new session opens with (default ``default``;
  ``none``: open with no parent).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subclone_core.core.errors import SubcloneError

ENV_PREFIX = "SUBCLONE_"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class AppSettings:
    """What a server operator can set; see the module docstring for the variables.

    Attributes:
        output_dir: every file the app writes goes under this folder.
        allowed_roots: local parents and data must lie under one of these; empty allows any path.
        max_jobs: jobs (training and long page steps) running at once on this server.
        max_queue: jobs allowed to wait; further requests are refused with a message.
        allow_hub: accept Hugging Face Hub ids as parents.
        max_upload_mb: the largest uploaded text file accepted.
        open_parent: the parent id a new session loads on its first run ("" for none).
    """

    output_dir: Path = Path("outputs")
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)
    max_jobs: int = 1
    max_queue: int = 20
    allow_hub: bool = True
    max_upload_mb: int = 10  # about 2.5M tokens of text, more than the default corpus; reading stops at the budget
    open_parent: str = "default"

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             secrets: Mapping[str, Any] | None = None) -> AppSettings:
        """Read the settings: environment variables win over secrets, which win over the defaults.

        Raises:
            SubcloneError: a value that is not a valid number or boolean, naming the variable.
        """
        env = os.environ if environ is None else environ
        table = dict(secrets or {})

        def raw(key: str) -> Any:
            value = env.get(ENV_PREFIX + key.upper())
            return table.get(key) if value in (None, "") else value

        defaults = cls()
        return cls(
            output_dir=Path(str(raw("output_dir") or defaults.output_dir)).expanduser(),
            allowed_roots=_roots(raw("allowed_roots")),
            max_jobs=_positive_int("max_jobs", raw("max_jobs"), defaults.max_jobs),
            max_queue=_positive_int("max_queue", raw("max_queue"), defaults.max_queue, minimum=0),
            allow_hub=_boolean("allow_hub", raw("allow_hub"), defaults.allow_hub),
            max_upload_mb=_positive_int("max_upload_mb", raw("max_upload_mb"), defaults.max_upload_mb),
            open_parent=_open_parent(raw("open_parent"), defaults.open_parent),
        )

    def output_path(self, name: str, *parts: str) -> Path:
        """A path under the output folder for a user-given name (see safe_name), e.g. outputs/children/name.

        Args:
            name: the user's name for the thing (checked).
            parts: fixed sub-folders chosen by the app, put between the output folder and the name.
        """
        return self.output_dir.joinpath(*parts, safe_name(name))

    def check_local_path(self, path: str | Path, what: str = "path") -> Path:
        """The resolved path, if it and everything it reads lie under an allowed root (any path when no
        roots are set). Symlinks are resolved first, and for a folder every file and folder inside it is
        checked too, so a link inside an allowed folder cannot reach outside.

        Raises:
            SubcloneError: the path, or a link inside it, leads outside every allowed root; the message
                names it and lists the roots.
        """
        resolved = Path(path).expanduser().resolve()
        if not self.allowed_roots:
            return resolved
        self._check_inside(resolved, path, what)
        if resolved.is_dir():
            for inner in _links_within(resolved):
                self._check_inside(inner.resolve(), inner, f"{what} {str(path)!r}: the link")
        return resolved

    def _check_inside(self, resolved: Path, shown: str | Path, what: str) -> None:
        if any(resolved == root or root in resolved.parents for root in self.allowed_roots):
            return
        roots = ", ".join(str(r) for r in self.allowed_roots)
        raise SubcloneError(
            f"{what} {str(shown)!r} is outside the folders this server allows ({roots}); "
            "put it under one of them, or ask the operator to add its folder to SUBCLONE_ALLOWED_ROOTS"
        )


def safe_name(name: str) -> str:
    """A user-given file or folder name, refused when it could leave its folder.

    Raises:
        SubcloneError: empty, a path separator, "..", a leading dot or dash, or characters other than
            letters, digits and ``._-`` (at most 100).
    """
    text = (name or "").strip()
    if not text:
        raise SubcloneError("the name is empty; give a name such as 'child-6x192'")
    if "/" in text or "\\" in text or os.sep in text or ".." in text:
        raise SubcloneError(f"name {text!r} contains a path separator or '..'; "
                            "give a plain name like 'child-6x192'")
    if not _SAFE_NAME.match(text):
        raise SubcloneError(
            f"name {text!r} must start with a letter or digit and use only letters, digits and . _ - "
            "(at most 100 characters), e.g. 'child-6x192'"
        )
    return text


def _links_within(folder: Path) -> list[Path]:
    """Every symlink under ``folder`` (links to folders are not followed, only checked themselves)."""
    links = []
    for current, dirs, files in os.walk(folder, followlinks=False):
        links += [Path(current, name) for name in (*dirs, *files) if Path(current, name).is_symlink()]
    return links


def _roots(value: Any) -> tuple[Path, ...]:
    """The allowed roots; a value that names no folder at all (e.g. ":::") is refused, never read as none."""
    if value in (None, "", [], ()):
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(os.pathsep)
    roots = tuple(Path(str(item)).expanduser().resolve() for item in items if str(item).strip())
    if not roots:
        raise SubcloneError(f"setting {ENV_PREFIX}ALLOWED_ROOTS={value!r} names no folder; give folders "
                            f"separated by {os.pathsep!r}, or leave it unset to allow any path")
    return roots


def _positive_int(key: str, value: Any, default: int, minimum: int = 1) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum:
        raise SubcloneError(f"setting {ENV_PREFIX}{key.upper()}={value!r} must be a whole number "
                            f">= {minimum}")
    return number


def _open_parent(value: Any, default: str) -> str:
    if value in (None, ""):
        return default
    text = str(value).strip()
    return "" if text.lower() in ("none", "off", "no", "false", "0") else text


def _boolean(key: str, value: Any, default: bool) -> bool:
    """A yes/no setting; anything but the usual spellings of yes and no is refused, never read as no."""
    if value in (None, ""):
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE | _FALSE:
        raise SubcloneError(f"setting {ENV_PREFIX}{key.upper()}={value!r} must be one of "
                            f"{', '.join(sorted(_TRUE))} or {', '.join(sorted(_FALSE))}")
    return text in _TRUE
