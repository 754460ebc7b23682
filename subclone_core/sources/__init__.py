"""Where parents and data come from: `load_parent` for models, `make_data` for the matching data."""

from __future__ import annotations

from pathlib import Path

from subclone_core.errors import SubcloneError
from subclone_core.sources.images import IMAGE_IDS, VALID_IMAGE_IDS, ImageData
from subclone_core.sources.parents import Parent, cache_dir, load_parent
from subclone_core.sources.text import VALID_TEXT_IDS, TokenData

__all__ = ["ImageData", "Parent", "TokenData", "cache_dir", "default_data_id", "load_parent", "make_data"]

DEFAULT_DATA = {"causal-lm": "default", "image-classification": "fashion-mnist"}


def default_data_id(task: str) -> str:
    """The data a task uses when none is given: Wikipedia text, or Fashion-MNIST."""
    return DEFAULT_DATA[task]


def make_data(
    parent: Parent,
    data_id: str | None,
    split: str,
    *,
    seq_len: int = 128,
    max_tokens: int | None = None,
    max_images: int | None = None,
) -> TokenData | ImageData:
    """The data of one split, prepared for a parent's task and preprocessor.

    Args:
        parent: the model the data is for (its task picks text or images; its preprocessor prepares it).
        data_id: a data id valid for the task; None for the task's default.
        split: "train" or "validation".
        seq_len: tokens per sequence (text).
        max_tokens: stop after this many tokens (text; None for all).
        max_images: at most this many images (images; None for all).

    Raises:
        SubcloneError: the data id does not fit the task, or the data cannot be read.
    """
    data_id = data_id or default_data_id(parent.task)
    if parent.task == "causal-lm":
        if data_id in IMAGE_IDS:
            raise SubcloneError(
                f"data {data_id!r} is image data, but {parent.id!r} is a text model; valid: {VALID_TEXT_IDS}"
            )
        return TokenData(parent.preprocessor, data_id, split, seq_len=seq_len, max_tokens=max_tokens)
    if data_id == "default" or Path(data_id).expanduser().is_file():
        raise SubcloneError(
            f"data {data_id!r} is text data, but {parent.id!r} is an image model; valid: {VALID_IMAGE_IDS}"
        )
    config = parent.model.config
    data = ImageData(
        parent.preprocessor, data_id, split, max_images, num_channels=getattr(config, "num_channels", None)
    )
    if data.num_labels > config.num_labels:
        raise SubcloneError(
            f"data {data_id!r} has {data.num_labels} classes but {parent.id!r} predicts only "
            f"{config.num_labels}"
        )
    return data
