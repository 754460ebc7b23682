"""Build a model from a config and a state dict, strictly, without paying for random initialization."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def build_model(model_class: type, config, state_dict: dict[str, Tensor], *,
                buffers_from: nn.Module | None = None) -> nn.Module:
    """Instantiate `model_class(config)` and load `state_dict` with strict=True.

    The model is created on the meta device (no random init: that alone takes seconds for a 135M
    model) and the tensors are assigned. Non-persistent buffers (rotary frequencies) are not in a
    state dict: they are copied from `buffers_from` when it has the same buffer with the same shape
    (they depend only on settings a child keeps), otherwise the model is built the ordinary way.
    """
    with torch.device("meta"):
        model = model_class(config)
    missing_buffers = _meta_buffers(model)
    if any(not _same_buffer(buffers_from, name, buf) for name, buf in missing_buffers.items()):
        model = model_class(config)  # slow path: real init, then overwritten by the load
        model.load_state_dict(state_dict, strict=True)
        return model.eval()
    model.load_state_dict(state_dict, strict=True, assign=True)
    for name in missing_buffers:
        owner, _, leaf = name.rpartition(".")
        source = buffers_from.get_buffer(name)
        model.get_submodule(owner).register_buffer(leaf, source.detach().clone(), persistent=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one Parameter for head and embedding, as from_pretrained would give
    return model.eval()


def _meta_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: buf for name, buf in model.named_buffers() if buf.is_meta}


def _same_buffer(source: nn.Module | None, name: str, buf: Tensor) -> bool:
    if source is None:
        return False
    try:
        other = source.get_buffer(name)
    except AttributeError:
        return False
    return other.shape == buf.shape
