"""Build a model from a config and a state dict, strictly, without paying for random initialization."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers.initialization import no_init_weights

from subclone_core.core.errors import SubcloneError


def build_model(model_class: type, config, state_dict: dict[str, Tensor]) -> nn.Module:
    """Instantiate `model_class(config)` and load `state_dict` with strict=True.

    Parameters are created on the meta device (no random init: that alone takes seconds for a 135M model)
    and the tensors are assigned. Buffers are created for real, from `config`: those that transformers
    computes from the config and does not save (rotary frequencies, Gemma 3's embedding scale sqrt(hidden))
    must be the child's own, or the model in memory would differ from the same model reloaded from disk.
    They are created under the weights' dtype as the default, as from_pretrained does (a float64 child's
    sqrt(hidden) is then computed in float64, not rounded to float32 first).
    """
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
    model = empty_model(model_class, config, dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one Parameter for head and embedding, as from_pretrained would give
    return model.eval()


def empty_model(model_class: type, config, dtype: torch.dtype | None) -> nn.Module:
    """`model_class(config)` with its parameters on the meta device (shapes and dtype only, no memory) and its
    buffers computed from the config (see build_model). Initialization is skipped: run on meta tensors it draws
    nothing, yet costs more than building the model (torch decomposes each init op in Python on meta)."""
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = model_class._from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one Parameter for head and embedding: a saved tied model holds it once
    return model


def check_loading_info(info: dict, folder) -> None:
    """Refuse a load where the files lack tensors the config expects, hold extra ones, or differ in shape.

    ``info`` is what transformers' ``from_pretrained(..., output_loading_info=True)`` returns; it loads
    with ``ignore_mismatched_sizes=True`` so that mismatched shapes arrive here by name instead of as a
    multi-line report.

    Raises:
        SubcloneError: any tensor missing, unexpected or mis-shaped, the first few by name.
    """
    problems = [_names("missing", info.get("missing_keys")), _names("unexpected", info.get("unexpected_keys")),
                _mismatches(info.get("mismatched_keys"))]
    problems = [p for p in problems if p]
    if problems:
        raise SubcloneError(f"the weights in {folder} do not match its config.json: {'; '.join(problems)}; the "
                            "files may be damaged, incomplete or from another model: copy or save them again")


def _names(kind: str, keys: Iterable[str] | None, shown: int = 3) -> str:
    keys = sorted(keys or ())
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{kind} tensors {', '.join(keys[:shown])}{more}"


def _mismatches(items: Iterable[tuple] | None, shown: int = 3) -> str:
    items = sorted(items or ())
    if not items:
        return ""
    text = ", ".join(f"{name} is {tuple(ckpt)} in the files but {tuple(model)} by the config"
                     for name, ckpt, model in items[:shown])
    return f"{text}{f' and {len(items) - shown} more' if len(items) > shown else ''}"
