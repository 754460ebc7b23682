"""Where parents and data come from: `load_parent` for models, `make_data` for the matching data."""

from __future__ import annotations

from subclone_core.data.images import ImageData
from subclone_core.data.text import TokenData
from subclone_core.sources.cache import cache_dir
from subclone_core.sources.parents import Parent, load_parent
from subclone_core.tasks import task_spec

__all__ = ["ImageData", "Parent", "TokenData", "cache_dir", "default_data_id", "load_parent", "make_data"]


def default_data_id(task: str) -> str:
    """The data a task uses when none is given: Wikipedia text, or Fashion-MNIST."""
    return task_spec(task).default_data


def make_data(
    parent: Parent,
    data_id: str | None,
    split: str,
    *,
    seq_len: int = 128,
    max_tokens: int | None = None,
    max_images: int | None = None,
    examples: int | None = None,
) -> TokenData | ImageData:
    """The data of one split, prepared for a parent's task and preprocessor.

    Args:
        parent: the model the data is for (its task picks text or images; its preprocessor prepares it).
        data_id: a data id valid for the task; None for the task's default.
        split: "train" or "validation".
        seq_len: tokens per sequence (text).
        max_tokens: stop after this many tokens (text; None for all).
        max_images: at most this many images (images; None for all).
        examples: at most this many sequences or images, whichever the task has (overrides the two above).

    Raises:
        SubcloneError: the data id does not fit the task, or the data cannot be read.
    """
    task = parent.task_spec
    if examples is not None:  # one budget for both tasks: sequences of seq_len tokens, or images
        max_tokens, max_images = examples * seq_len, examples
    return task.make_data(parent, data_id or task.default_data, split, seq_len=seq_len, max_tokens=max_tokens,
                          max_images=max_images)
