"""Resolve a parent id (`default`, `gemma3-270m`, `default-vit`, a folder, a `.gguf` file, a Hub id) to a
loaded model.

One resolver serves the CLI, the app and the library. Everything ends as a local Hugging Face folder
(config.json + safetensors + tokenizer or image processor) that is loaded the same way; the embedded
GGUF parents (the table in sources.embedded) and any other GGUF file are converted once into such a
folder under `cache_dir()`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.io.placement import Placement, memory_by_device, remove_with
from subclone_core.io.saving import read_manifest
from subclone_core.sources.cache import cache_dir, cache_is_valid, file_sha256
from subclone_core.sources.embedded import EMBEDDED, Licence, licence_of
from subclone_core.sources.folders import load_folder, weight_files
from subclone_core.sources.gguf import embedded_folder, gguf_folder
from subclone_core.sources.hub import SPECIAL_IDS, VIT_ID, hub_folder
from subclone_core.tasks import TaskSpec, task_spec

logger = logging.getLogger(__name__)

DEFAULT_LABEL = EMBEDDED["default"].label
DEFAULT_VIT_LABEL = "ViT (self-pretrained on Fashion-MNIST)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Parent:
    """A loaded parent model. Shared between callers (the app caches one per id): never modify it.

    Attributes:
        id: the id as given ("default", "gemma3-270m", "default-vit", a path, a Hub id).
        model: the model, in eval mode.
        preprocessor: a tokenizer (causal-lm) or an image processor (image-classification).
        task: the name of the task (subclone_core.tasks), from the architecture table.
        source: the local folder the model was loaded from.
        label: a human label, e.g. "SmolLM2-135M-Instruct (embedded default)".
        placement: the device, dtype and memory budget it was loaded with.
        licence: the terms its weights come under, where known (the embedded parents and their children).
    """

    id: str
    model: transformers.PreTrainedModel
    preprocessor: Any
    task: str
    source: Path | None
    label: str
    placement: Placement = field(default_factory=Placement)
    licence: Licence | None = None
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parent's weights as loaded (a child keeps it unless told otherwise)."""
        return next(self.model.parameters()).dtype

    @property
    def task_spec(self) -> TaskSpec:
        """The spec of the parent's task (data, loss, metric, unit)."""
        return task_spec(self.task)

    def weights_sha256(self) -> str:
        """sha256 of the weight file(s), computed once.

        One safetensors file: its sha256. Several (sharded, or pickles when allowed): sha256 of their
        "name sha256" lines. No file on disk: sha256 of the state_dict tensors in name order.
        """
        if self._sha256 is None:
            files = weight_files(self.source) if self.source else []
            if len(files) == 1:
                self._sha256 = file_sha256(files[0])
            elif files:
                lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in files)
                self._sha256 = hashlib.sha256(lines.encode()).hexdigest()
            else:
                self._sha256 = _state_dict_sha256(self.model)
        return self._sha256


def load_parent(
    parent_id: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    max_memory: str | None = None,
) -> Parent:
    """Load a parent by id, placed by accelerate when a GPU or a memory budget is asked for.

    Args:
        parent_id: "default" (embedded SmolLM2-135M-Instruct), "gemma3-270m" (embedded Gemma 3 270M),
            "default-vit" (the self-pretrained ViT), a local Hugging Face folder, a `.gguf` file, or a Hub
            id ("gpt2", "org/name").
        allow_pickle: also accept pytorch_model.bin weights (pickles can run code when loaded).
        trust_remote_code: passed to transformers; only for folders whose code you trust.
        device: "auto" (every visible GPU, else the CPU), "cpu" (the default), "cuda" or "cuda:N".
        dtype: "auto" (the checkpoint's own; float32 for a GGUF), "float32", "bfloat16", "float16",
            or a torch dtype.
        max_memory: the most memory the parent may hold ("12GiB", or "cuda:0=20GiB,cpu=30GiB"); modules
            that do not fit are offloaded to disk and read back during each forward pass.

    Returns:
        The loaded Parent, model in eval mode.

    Raises:
        SubcloneError: the id names nothing loadable, or a bad device, dtype or budget; the message says
            what would be valid.
    """
    placement = Placement(device=str(device or "cpu"), dtype=dtype, max_memory=max_memory).validate()
    folder, label, licence = _resolve(parent_id, allow_pickle=allow_pickle)
    kwargs = placement.load_kwargs(cache_dir() / "offload")
    model, preprocessor, task = load_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                            dtype=placement.torch_dtype, placement=kwargs)
    if "offload_folder" in kwargs:
        remove_with(model, kwargs["offload_folder"])
    return Parent(id=parent_id, model=model, preprocessor=preprocessor, task=task, source=folder, label=label,
                  placement=placement, licence=licence)


def _resolve(parent_id: str, *, allow_pickle: bool) -> tuple[Path, str, Licence | None]:
    """The local folder a parent id stands for (converting or downloading first), its label and licence."""
    if parent_id in EMBEDDED:
        entry = EMBEDDED[parent_id]
        return embedded_folder(entry), entry.label, entry.licence
    if parent_id == VIT_ID:
        return default_vit_folder(), DEFAULT_VIT_LABEL, None
    path = Path(parent_id).expanduser()
    if path.is_dir():
        return path, *_folder_origin(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SubcloneError(
                f"parent {parent_id!r} is a file but not a .gguf; give a model folder, a .gguf file, "
                f"a Hub id, or one of {', '.join(SPECIAL_IDS)}"
            )
        return gguf_folder(path), f"{path.name} (GGUF)", None
    if _looks_like_path(parent_id):
        raise SubcloneError(
            f"parent {parent_id!r}: no such file or folder; valid: {', '.join(SPECIAL_IDS)}, "
            "a model folder, a .gguf file, or a Hub id"
        )
    return hub_folder(parent_id, allow_pickle=allow_pickle), f"{parent_id} (Hugging Face Hub)", None


def _looks_like_path(text: str) -> bool:
    return not _HUB_ID.match(text) or text.lower().endswith(".gguf") or text.startswith((".", "~"))


def _folder_origin(folder: Path) -> tuple[str, Licence | None]:
    """A local folder's label and, for a child of an embedded parent (its subclone.json says), that licence."""
    try:
        manifest = read_manifest(folder)
    except (OSError, SubcloneError):
        manifest = None
    if manifest is None:
        return f"{folder.name} (local folder)", None
    parent = manifest.parent.id if manifest.parent is not None else None
    return f"{folder.name} (subcloned from {parent})", licence_of(parent)


def default_vit_built() -> bool:
    """Whether the self-pretrained ViT is in the cache already (else loading it first trains it: minutes)."""
    from subclone_core.sources import vit_pretrain  # late: the training code is needed only once

    return cache_is_valid(cache_dir() / VIT_ID, vit_pretrain.default_source())


def default_vit_folder() -> Path:
    """The self-pretrained ViT parent, pretrained on Fashion-MNIST on first use (minutes)."""
    from subclone_core.sources import vit_pretrain  # late: the training code is needed only once

    target = cache_dir() / VIT_ID
    if cache_is_valid(target, vit_pretrain.default_source()):
        return target
    logger.warning(
        "building default-vit: pretraining a ViT on Fashion-MNIST into %s (several minutes, once)", target
    )
    return vit_pretrain.pretrain_vit(target)


def _state_dict_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe(parent: Parent) -> dict[str, Any]:
    """The facts `subclone info` and the app's Parent page show, as a flat dict."""
    config = parent.model.config
    arch = arch_for(config.model_type)
    params = sum(p.numel() for p in parent.model.parameters())  # parameters() counts a tied head once
    out = {
        "parent": parent.id,
        "label": parent.label,
        "licence": parent.licence.name if parent.licence else None,
        "licence_url": parent.licence.url if parent.licence else None,
        "model_type": config.model_type,
        "family": arch.name,
        "task": parent.task,
        **_shape(config),
    }
    out.update(parent.task_spec.config_facts(config))
    places = memory_by_device(parent.model)
    out.update(
        parameters=params,
        float32_mb=round(params * 4 / 1e6, 1),
        dtype=str(parent.dtype).removeprefix("torch."),
        memory_mb=round(sum(places.values()) / 1e6, 1),
        placement={place: round(size / 1e6, 1) for place, size in sorted(places.items())},
        source=str(parent.source) if parent.source else None,
    )
    return out


def _shape(config) -> dict:
    shape = Shape.of(config)
    return {
        "blocks": shape.layers,
        "hidden": shape.hidden,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "ffn": shape.ffn,
    }
