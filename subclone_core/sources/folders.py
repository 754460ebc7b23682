"""Load a local Hugging Face folder (config, safetensors weights, tokenizer or image processor)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from subclone_core.core.building import check_loading_info
from subclone_core.core.errors import SubcloneError
from subclone_core.sources.checks import check_config_fits_weights
from subclone_core.tasks import TaskSpec, task_of_config


def load_folder(
    folder: Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    placement: dict | None = None,
) -> tuple[transformers.PreTrainedModel, Any, str]:
    """Load (model in eval mode, tokenizer or image processor, task) from a Hugging Face folder.

    Args:
        folder: the model folder.
        allow_pickle: accept pickle (.bin) weights.
        trust_remote_code: let transformers run the folder's own code.
        dtype: a torch dtype, or "auto" for the checkpoint's own.
        placement: from_pretrained's device_map, max_memory and offload_folder (placement.Placement.load_kwargs).

    Raises:
        SubcloneError: not a model folder, unsupported architecture, pickle-only weights without
            allow_pickle, sizes the weight files cannot hold (checked before anything is allocated),
            tensors missing, unexpected or of another shape than the config says, or no tokenizer/image
            processor.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SubcloneError(
            f"{folder} is not a model folder: no config.json (expected a Hugging Face folder with "
            "config.json and model.safetensors)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - a malformed value fails in many ways (TypeError, ZeroDivisionError...)
        raise SubcloneError(
            f"{folder}/config.json is not a usable model config: {first_line(err)}"
        ) from None
    task = task_of_config(config)
    use_safetensors = _check_weights(folder, allow_pickle)
    check_config_fits_weights(folder, config, weight_files(folder))  # before transformers allocates anything
    model = _load_model(folder, config, task, dtype=dtype, use_safetensors=use_safetensors,
                        trust_remote_code=trust_remote_code, placement=placement)
    model.eval()
    return model, _load_preprocessor(folder, task, trust_remote_code), task.name


def _load_model(folder: Path, config, task: TaskSpec, *, placement: dict | None, **kwargs) -> transformers.PreTrainedModel:
    """from_pretrained, with every tensor the config expects found in the files by name and shape."""
    try:
        # mismatched shapes come back by name in the loading info (checked below) rather than as a report
        model, info = task.auto_model().from_pretrained(folder, config=config, output_loading_info=True,
                                                        ignore_mismatched_sizes=True, **kwargs, **(placement or {}))
    except Exception as err:  # noqa: BLE001 - damaged weights fail in many ways (SafetensorError, UnpicklingError...)
        names = ", ".join(p.name for p in weight_files(folder)) or "no weight files"
        raise SubcloneError(f"cannot load the model in {folder} ({names}): {first_line(err)}; "
                            "the files may be damaged or incomplete: copy or save them again") from None
    check_loading_info(info, folder)  # a missing block would otherwise be silently random
    return model


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a folder, or else its pickle (.bin) ones, sorted by name."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return files or sorted(Path(folder).glob("pytorch_model*.bin"))


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """Whether to load safetensors (True) or pickles (False); refuse pickles unless allowed."""
    if any(folder.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if not pickles:
        raise SubcloneError(f"{folder} has no weights: expected model.safetensors (or pytorch_model.bin)")
    if not allow_pickle:
        raise SubcloneError(
            f"{folder} has only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "pass --allow-pickle (allow_pickle=True) if you trust it, or convert it to safetensors"
        )
    warnings.warn(
        f"loading pickle weights from {folder}: pickles can run arbitrary code", UserWarning, stacklevel=4
    )
    return False


def _load_preprocessor(folder: Path, task: TaskSpec, trust_remote_code: bool) -> Any:
    if not any((folder / name).is_file() for name in task.preprocessor_files):
        raise SubcloneError(f"{folder} has no {task.preprocessor_name} (expected "
                            f"{' or '.join(task.preprocessor_files[:2])})")
    try:
        return task.auto_preprocessor().from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - a structurally wrong tokenizer.json raises a bare Exception
        raise SubcloneError(f"cannot load the {task.preprocessor_name} in {folder}: {first_line(err)}") from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
