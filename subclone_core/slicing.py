"""Slicing: a pure function from the parent's state dict and a selection to the child's state dict.

Every parent tensor is either mapped by the architecture table or named in an error; tensors of
removed blocks are the only ones left out, and the selection says which blocks those are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from subclone_core.archs.spec import ArchSpec, Param
from subclone_core.errors import SubcloneError
from subclone_core.selection import Selection
from subclone_core.shape import Shape

# Config entries describing where a config came from, not the model: never copied into a child.
_CONFIG_METADATA = ("_name_or_path", "transformers_version", "_commit_hash", "quantization_config",
                    "torch_dtype", "dtype", "auto_map")


def head_rows(heads: list[int], head_dim: int) -> Tensor:
    """Row indices of whole heads in a (heads x head_dim) axis, in the given head order."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _axis_indices(sel: Selection, child_block: int | None, parent: Shape) -> dict[str, Tensor]:
    """Index tensors along each axis kind, for one child block (None for tensors outside blocks)."""
    idx = {"residual": torch.tensor(sel.residual, dtype=torch.long)}
    if child_block is not None:
        q = head_rows(sel.heads[child_block], parent.head_dim)
        q_width = parent.heads * parent.head_dim
        idx.update(
            q=q,
            kv=head_rows(sel.kv_heads[child_block], parent.head_dim),
            # fused [q; k; v] of a multi-head attention: each third is sliced like q
            qkv=torch.cat([q, q + q_width, q + 2 * q_width]),
            ffn=torch.tensor(sel.ffn[child_block], dtype=torch.long),
        )
    return idx


def slice_tensor(tensor: Tensor, param: Param, indices: dict[str, Tensor], scale: bool) -> Tensor:
    """Index every sliced axis of one tensor, then scale a linear weight whose fan-in shrank."""
    out = tensor
    for dim, axis in enumerate(param.axes):
        if axis != "keep":
            out = out.index_select(dim, indices[axis].to(out.device))
    if scale and param.fan_in is not None:
        ratio = tensor.shape[param.fan_in] / out.shape[param.fan_in]
        if ratio > 1:
            out = out * math.sqrt(ratio)
    # a tensor with nothing sliced must still be a copy: the child never shares storage with the parent
    return tensor.clone() if out is tensor else out.contiguous()


def _block_param(name: str, arch: ArchSpec) -> tuple[int, str] | None:
    """(block index, name inside the block) for a block tensor, None for a global one."""
    prefix = arch.blocks + "."
    if not name.startswith(prefix):
        return None
    index, _, inner = name[len(prefix):].partition(".")
    return int(index), inner


def slice_state_dict(
    parent_sd: dict[str, Tensor],
    arch: ArchSpec,
    parent: Shape,
    sel: Selection,
    *,
    scale: bool,
    untie_head: bool = False,
) -> dict[str, Tensor]:
    """Build the child's state dict; the parent's tensors are read, never modified.

    Args:
        parent_sd: the parent's state_dict().
        arch: the family's table.
        parent: the parent's shape.
        sel: what to keep.
        scale: multiply each linear weight whose fan-in shrank by sqrt(fan_in_parent / fan_in_child).
        untie_head: for a tied head, give the child its own (scaled) head instead of sharing the
            (unscaled) embedding. Ignored for untied parents, whose head is always sliced on its own.
    """
    child_of = {b: j for j, b in enumerate(sel.blocks)}
    globals_idx = _axis_indices(sel, None, parent)
    block_idx = {j: _axis_indices(sel, j, parent) for j in range(len(sel.blocks))}
    out: dict[str, Tensor] = {}
    for name, tensor in parent_sd.items():
        located = _block_param(name, arch)
        if located is None:
            param = _rule(arch.global_params, name, arch)
            out[name] = slice_tensor(tensor, param, globals_idx, scale)
            continue
        block, inner = located
        param = _rule(arch.block_params, inner, arch, full_name=name)
        if block in child_of:
            j = child_of[block]
            out[f"{arch.blocks}.{j}.{inner}"] = slice_tensor(tensor, param, block_idx[j], scale)
    if is_tied(parent_sd, arch) and not untie_head:
        head, embedding = arch.tied_head
        out[head] = out[embedding]
    return out


def is_tied(state_dict: dict[str, Tensor], arch: ArchSpec) -> bool:
    """Whether the head and the embedding are one tensor (a tied head appears under both names)."""
    if arch.tied_head is None or not all(name in state_dict for name in arch.tied_head):
        return False
    head, embedding = (state_dict[name] for name in arch.tied_head)
    return head.data_ptr() == embedding.data_ptr()


def _rule(table: dict[str, Param], key: str, arch: ArchSpec, full_name: str | None = None) -> Param:
    try:
        return table[key]
    except KeyError:
        raise SubcloneError(
            f"parent tensor {full_name or key!r} has no slicing rule in the {arch.name} table; "
            "this checkpoint has a layout the table does not describe"
        ) from None


def child_config_dict(parent_config, arch: ArchSpec, child: Shape, sel: Selection, *,
                      tie_head: bool) -> dict:
    """The child's config as a dict: the parent's, with the shrunk sizes written explicitly."""
    cfg = {k: v for k, v in parent_config.to_dict().items() if k not in _CONFIG_METADATA}
    for role, key in arch.config_keys.items():
        cfg[key] = getattr(child, role)
    for key in arch.per_layer_config_keys:
        if isinstance(cfg.get(key), list):
            cfg[key] = [cfg[key][b] for b in sel.blocks]
    if arch.tied_head and "tie_word_embeddings" in cfg:
        cfg["tie_word_embeddings"] = bool(cfg["tie_word_embeddings"]) and tie_head
    return cfg
