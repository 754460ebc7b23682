"""Registry of architecture tables, keyed by `config.model_type`."""

from __future__ import annotations

from subclone_core.archs import gpt2, llama, vit
from subclone_core.archs.spec import ArchSpec
from subclone_core.errors import SubcloneError

_FAMILIES: tuple[ArchSpec, ...] = (llama.ARCH, gpt2.ARCH, vit.ARCH)
REGISTRY: dict[str, ArchSpec] = {mt: spec for spec in _FAMILIES for mt in spec.model_types}


def supported_model_types() -> list[str]:
    """The model_type values that have an architecture table."""
    return sorted(REGISTRY)


def arch_for(model_type: str) -> ArchSpec:
    """The architecture table for a config.model_type, or an error listing the supported ones."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise SubcloneError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from None
