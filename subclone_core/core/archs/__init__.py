"""Registry of architecture tables, keyed by `config.model_type`; a model's task picks the table's head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from subclone_core.core.archs import gemma3, gpt2, gpt_neox, llama, olmo2, phi3, qwen3, smollm3, vit
from subclone_core.core.archs.spec import ArchSpec
from subclone_core.core.errors import SubcloneError

if TYPE_CHECKING:
    from torch import nn

_FAMILIES: tuple[ArchSpec, ...] = (llama.ARCH, qwen3.ARCH, gemma3.ARCH, phi3.ARCH, smollm3.ARCH, olmo2.ARCH,
                                   gpt_neox.ARCH, gpt2.ARCH, vit.ARCH)
REGISTRY: dict[str, ArchSpec] = {mt: spec for spec in _FAMILIES for mt in spec.model_types}

# model_types that are refused with a reason of their own, beyond "no table".
REFUSED: dict[str, str] = {
    "gemma3": "multimodal Gemma 3 checkpoints (a vision tower, a projector, and the text model's sizes under "
              "text_config) are not supported; the text-only Gemma 3 (model_type 'gemma3_text', e.g. "
              "gemma-3-270m and gemma-3-1b, or Gemma3ForCausalLM saved from a multimodal checkpoint's "
              "language model) is",
}


def supported_model_types() -> list[str]:
    """The model_type values that have an architecture table."""
    return sorted(REGISTRY)


def arch_for(model_type: str) -> ArchSpec:
    """The architecture table for a config.model_type, or an error listing the supported ones."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        reason = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise SubcloneError(f"unsupported architecture model_type={model_type!r}{reason}; "
                            f"supported: {', '.join(supported_model_types())}") from None


def arch_for_task(model_type: str, task: str) -> ArchSpec:
    """The architecture table for a model_type's models of one task (the task's head in place of the default's)."""
    return arch_for(model_type).for_task(task)


def arch_of_model(model: nn.Module) -> ArchSpec:
    """The architecture table of a model (loaded, or built on the meta device), read from its structure: its
    family's table with the head of the task whose head parameters the model has, else the default task's."""
    arch = arch_for(model.config.model_type)
    for task, head in arch.task_heads.items():
        if all(_has_parameter(model, name) for name in head):
            return arch.for_task(task)
    return arch


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True
