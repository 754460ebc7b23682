"""Save a model as a plain Hugging Face folder, atomically: a temporary folder renamed into place."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import Tensor, nn
from transformers.core_model_loading import revert_weight_conversion

from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest, json_safe
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
        write_model_files(model, tmp, preprocessor=preprocessor, manifest=manifest, model_card=model_card,
                          max_shard_size=max_shard_size)
    log.info("saved %s", out)
    return out


def write_model_files(model: nn.Module, folder: Path, *, preprocessor=None, manifest: Manifest | None = None,
                      model_card: str | None = None, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
                      weights_written: bool = False) -> None:
    """Every file of a model folder: its weights and configs by save_pretrained, or, with weights_written (its
    weights already written by StreamedWeights, its model on the meta device), config.json and
    generation_config.json as save_pretrained writes them; then the preprocessor, the card and the manifest."""
    if not weights_written:
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size(max_shard_size))
    else:
        model.config.dtype = str(model.dtype).removeprefix("torch.")  # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    if preprocessor is not None:
        preprocessor.save_pretrained(folder)
    if manifest is not None:
        (folder / MANIFEST_NAME).write_text(json.dumps(json_safe(manifest.to_json()), indent=1, allow_nan=False))
    if model_card is not None:
        (folder / "README.md").write_text(model_card)
    _weights_like_config(folder)


def _weights_like_config(folder: Path) -> None:
    """Give the weight files config.json's permissions: safetensors creates them 0600 whatever the umask, so a
    child saved for a group or a class would be unreadable to everyone but its writer."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.glob("*.safetensors"):
        path.chmod(mode)


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


# safetensors' dtype codes (its format's header names them)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def saved_tensors(model: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """Model name -> (name in the saved files, tensor) of what save_pretrained writes: the state dict without the
    second name of a tied parameter (the first, e.g. the embedding, stays), under the checkpoint names transformers
    renames back to on saving (GPT-NeoX's head is embed_out on disk, ViT's layers have their old names).

    Raises:
        SubcloneError: saving this family converts more than names (merged or split tensors).
    """
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    dupes = names - {n for n, _ in model.named_parameters()}
    state = {n: t for n, t in model.state_dict().items() if n not in dupes}
    reverted = revert_weight_conversion(model, dict(state))
    by_id = {id(t): n for n, t in state.items()}
    if len(reverted) != len(state) or any(id(t) not in by_id for t in reverted.values()):
        raise SubcloneError(f"{type(model).__name__} is saved with converted tensors; its child cannot be written "
                            "tensor by tensor")
    return {by_id[id(t)]: (saved, t) for saved, t in reverted.items()}


class StreamedWeights:
    """A model's safetensors files (shards and index as save_pretrained writes them), written one tensor at a
    time as each is made, in any order: every header is written first from the empty model's shapes, and each
    tensor goes straight to its offset, so no more than one tensor of the model is ever held in memory.
    Call it with (name, tensor); close() checks that every tensor came."""

    def __init__(self, folder: Path, model: nn.Module, max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> None:
        self.saved = saved_tensors(model)
        self.specs = dict(self.saved.values())
        split = split_torch_state_dict_into_shards(self.specs, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=shard_size(max_shard_size))
        self._files, self._where = [], {}
        for filename, names in split.filename_to_tensors.items():
            handle = open(folder / filename, "wb")  # noqa: SIM115 (closed by close())
            self._files.append(handle)
            for name, offset in _write_header(handle, {n: self.specs[n] for n in names}).items():
                self._where[name] = (handle, offset)
        if split.is_sharded:
            metadata = {**split.metadata, "total_parameters": sum(t.numel() for t in self.specs.values())}
            index = {"metadata": metadata, "weight_map": split.tensor_to_filename}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    def __call__(self, name: str, tensor: Tensor) -> None:
        saved = self.saved[name][0] if name in self.saved else None
        if saved not in self._where:
            raise SubcloneError(f"tensor {name!r} is not one of the model's, or came twice")
        spec = self.specs[saved]
        if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
            raise SubcloneError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}; the model's is "
                                f"{tuple(spec.shape)} {spec.dtype}")
        handle, offset = self._where.pop(saved)
        handle.seek(offset)
        handle.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        """Close the files.

        Raises:
            SubcloneError: some tensor never came (the files would hold zeros for it).
        """
        for handle in self._files:
            handle.close()
        if self._where:
            raise SubcloneError(f"{len(self._where)} tensors of the model were never written, e.g. "
                                f"{next(iter(self._where))!r}")


def _write_header(handle, specs: dict[str, Tensor]) -> dict[str, int]:
    """Write a safetensors header for these tensors (contiguous, in this order) and size the file; returns each
    tensor's absolute offset in the file."""
    header, begin = {"__metadata__": {"format": "pt"}}, 0
    for name, spec in specs.items():
        end = begin + spec.numel() * spec.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    handle.write(struct.pack("<Q", len(text)) + text)
    start = 8 + len(text)
    handle.truncate(start + begin)
    return {name: start + header[name]["data_offsets"][0] for name in specs}
