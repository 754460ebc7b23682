"""Save a model as a plain Hugging Face folder, atomically: a temporary folder renamed into place."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest
from subclone_core.io.atomic import building
from subclone_core.io.placement import parse_size

log = logging.getLogger(__name__)
MANIFEST_NAME = "subclone.json"
DEFAULT_SHARD_SIZE = "5GB"  # transformers' own default: a larger model is written in shards with an index


def shard_size(text: str | int) -> int:
    """Bytes in a --max-shard-size value ("5GB", "500MiB", a number of bytes).

    Raises:
        SubcloneError: not a positive size.
    """
    return text if isinstance(text, int) and text > 0 else parse_size(str(text), "--max-shard-size")


def check_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an output folder that would lose data, before any work is done.

    Raises:
        SubcloneError: the path is a file, or a folder that is not empty and overwrite is off.
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise SubcloneError(f"output {str(path)!r} is a file; give a folder path that does not exist")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SubcloneError(f"output folder {str(path)!r} exists and is not empty; "
                            "choose a new folder or pass --overwrite")
    return path


def save_model_folder(
    model: nn.Module,
    out_dir: str | Path,
    *,
    preprocessor=None,
    manifest: Manifest | None = None,
    model_card: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write config.json, model.safetensors, the preprocessor, README.md and subclone.json.

    Weights larger than ``max_shard_size`` are written as model-0000i-of-0000n.safetensors shards with
    model.safetensors.index.json, as transformers does; from_pretrained reads either.

    Everything is written to a hidden sibling folder first and renamed into place only when complete,
    so a failure or interruption never leaves a half-written model under `out_dir`.

    Returns:
        The output folder.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    with building(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_size(max_shard_size))
        if preprocessor is not None:
            preprocessor.save_pretrained(tmp)
        if manifest is not None:
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1))
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
    log.info("saved %s", out)
    return out


def read_manifest(model_dir: str | Path) -> Manifest | None:
    """The subclone.json of a model folder, or None for a folder without one.

    Raises:
        SubcloneError: the file is not valid JSON, or holds something other than a JSON object.
    """
    path = Path(model_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise SubcloneError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise SubcloneError(f"{path} must hold a JSON object, not {type(data).__name__}; fix or remove it")
    try:
        return Manifest.from_json(data)
    except (TypeError, AttributeError) as err:  # an entry of the wrong type, e.g. "calibration": 3
        raise SubcloneError(f"{path} is not a subclone manifest ({err}); fix or remove it") from None
