"""Server settings of the app, and the path rules that keep visitors inside them.

Settings come from environment variables first, then from a ``[subclone]`` table in
``.streamlit/secrets.toml``, then from the defaults below:

- ``SUBCLONE_OUTPUT_DIR`` (``output_dir``): the one folder the app writes to (default ``outputs``).
- ``SUBCLONE_ALLOWED_ROOTS`` (``allowed_roots``): folders that local parents and data must lie under,
  separated by ``os.pathsep`` (a list in secrets.toml). Empty (the default): any local path.
- ``SUBCLONE_MAX_JOBS`` (``max_jobs``): training jobs running at once on this server (default 1).
- ``SUBCLONE_MAX_QUEUE`` (``max_queue``): training jobs waiting at most; more are refused (default 4).
- ``SUBCLONE_ALLOW_HUB`` (``allow_hub``): whether Hub ids may be downloaded (default on).
- ``SUBCLONE_MAX_UPLOAD_MB`` (``max_upload_mb``): the largest text upload accepted (default 50).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subclone_core.errors import SubcloneError

ENV_PREFIX = "SUBCLONE_"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AppSettings:
    """What a server operator can set; see the module docstring for the variables.

    Attributes:
        output_dir: every file the app writes goes under this folder.
        allowed_roots: local parents and data must lie under one of these; empty allows any path.
        max_jobs: training jobs running at once on this server.
        max_queue: training jobs allowed to wait; further requests are refused with a message.
        allow_hub: accept Hugging Face Hub ids as parents.
        max_upload_mb: the largest uploaded text file accepted.
    """

    output_dir: Path = Path("outputs")
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)
    max_jobs: int = 1
    max_queue: int = 4
    allow_hub: bool = True
    max_upload_mb: int = 50

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
            allow_hub=_boolean(raw("allow_hub"), defaults.allow_hub),
            max_upload_mb=_positive_int("max_upload_mb", raw("max_upload_mb"), defaults.max_upload_mb),
        )

    def output_path(self, name: str, *parts: str) -> Path:
        """A path under the output folder for a user-given name (see safe_name), e.g. outputs/children/name.

        Args:
            name: the user's name for the thing (checked).
            parts: fixed sub-folders chosen by the app, put between the output folder and the name.
        """
        return self.output_dir.joinpath(*parts, safe_name(name))

    def check_local_path(self, path: str | Path, what: str = "path") -> Path:
        """The resolved path, if it lies under an allowed root (any path when no roots are set).

        Raises:
            SubcloneError: the path is outside every allowed root; the message lists them.
        """
        resolved = Path(path).expanduser().resolve()
        if not self.allowed_roots:
            return resolved
        for root in self.allowed_roots:
            if resolved == root or root in resolved.parents:
                return resolved
        roots = ", ".join(str(r) for r in self.allowed_roots)
        raise SubcloneError(
            f"{what} {str(path)!r} is outside the folders this server allows ({roots}); "
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


def _roots(value: Any) -> tuple[Path, ...]:
    if not value:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(os.pathsep)
    return tuple(Path(str(item)).expanduser().resolve() for item in items if str(item).strip())


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


def _boolean(value: Any, default: bool) -> bool:
    if value in (None, ""):
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE
