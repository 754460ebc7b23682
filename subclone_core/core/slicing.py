"""Slicing: a pure function from the parent's state dict and a selection to the child's state dict.

Every parent tensor is either mapped by the architecture table or named in an error; tensors of
removed blocks are the only ones left out, and the selection says which blocks those are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from subclone_core.core.archs.spec import ArchSpec, Param
from subclone_core.core.errors import SubcloneError
from subclone_core.core.selection import Selection
from subclone_core.core.shape import Shape

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
        heads, kv_heads = sel.heads[child_block], sel.kv_heads[child_block]
        q, kv = head_rows(heads, parent.head_dim), head_rows(kv_heads, parent.head_dim)
        q_width, kv_width = parent.heads * parent.head_dim, parent.kv_heads * parent.head_dim
        ffn = torch.tensor(sel.ffn[child_block], dtype=torch.long)
        idx.update(
            q=q,
            kv=kv,
            # fused rows [q (H x Dh); k (K x Dh); v (K x Dh)]
            qkv=torch.cat([q, q_width + kv, q_width + kv_width + kv]),
            # fused rows (H, [q; k; v], Dh): a head's run of 3 x Dh rows
            qkv_per_head=head_rows(heads, 3 * parent.head_dim),
            ffn=ffn,
            # fused rows [gate (F); up (F)]
            gate_up=torch.cat([ffn, parent.ffn + ffn]),
        )
    return idx


def slice_tensor(tensor: Tensor, param: Param, indices: dict[str, Tensor], scale: bool,
                 gram: Tensor | None = None, ridge: float = 0.0) -> Tensor:
    """Index every sliced axis of one tensor, then scale a linear weight whose fan-in shrank.

    With a ``gram`` (the Gram matrix of the linear layer's input in the parent), an input axis that lost
    entries is refit by least squares instead of indexed (refit_input), and not scaled: the refit already
    gives the outputs their size. An input axis that lost nothing is only reordered, so a full-size child
    stays exact.

    A tensor whose output the model multiplies by sqrt(width) from the config (Param.sqrt_width_gain) is
    multiplied by sqrt(parent width / child width) whatever `scale` says: the child's config gives a
    smaller multiplier, and this keeps the parent's outputs.
    """
    refit = gram is not None and param.fan_in is not None and \
        indices[param.axes[param.fan_in]].numel() < tensor.shape[param.fan_in]
    out = tensor
    for dim, axis in enumerate(param.axes):
        if axis != "keep" and not (refit and dim == param.fan_in):
            out = out.index_select(dim, indices[axis].to(out.device))
    factor = 1.0
    if refit:
        out = refit_input(out, param.fan_in, indices[param.axes[param.fan_in]], gram, ridge)
    elif scale and param.fan_in is not None:
        factor *= math.sqrt(tensor.shape[param.fan_in] / out.shape[param.fan_in])
    if param.sqrt_width_gain is not None:
        dim = param.axes.index(param.sqrt_width_gain)
        factor *= math.sqrt(tensor.shape[dim] / out.shape[dim])
    if factor != 1.0:
        out = out * factor
    # a tensor with nothing sliced must still be a copy: the child never shares storage with the parent
    return tensor.clone() if out is tensor else out.contiguous()


def refit_input(weight: Tensor, dim: int, kept: Tensor, gram: Tensor, ridge: float) -> Tensor:
    """The weight over the kept inputs that best reproduces the parent's outputs on the calibration data.

    With X the parent's inputs (tokens x in), G = X^T X / N and S the (in, k) matrix that selects the kept
    inputs, W' = argmin ||X W^T - X[:, k] W'^T||^2 + lam ||W' - W S||^2 = W (G[:, k] + lam S)(G[k, k] + lam I)^-1,
    lam = ridge * mean(diag G[k, k]): a removed input's part of the output is carried by the kept inputs it
    correlates with, instead of being dropped, while the penalty pulls W' towards the plain slice W S (lam -> 0:
    pure least squares, which overfits the calibration tokens and compounds over blocks; lam -> inf: the plain
    slice). Pulling towards the slice rather than towards zero keeps the weights' size (measured better on both
    real parents, docs/BENCHMARKS.md).

    Args:
        weight: the tensor with every other axis already sliced; ``dim`` is its input axis, still full.
        dim: the input (fan-in) axis.
        kept: the kept input indices, in the child's order.
        gram: (in, in) mean x^T x of the parent layer's input.
        ridge: the regularization, relative to the mean kept diagonal.
    """
    kept = kept.to(gram.device)
    g_kk = gram.index_select(0, kept).index_select(1, kept).double()  # (k, k)
    cross = gram.index_select(1, kept).double()  # (in, k), a copy
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-30))
    cross[kept, torch.arange(len(kept))] += lam  # G[:, k] + lam S
    mapping = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=torch.float64), cross.T).T  # (in, k)
    w = weight.double().movedim(dim, -1).to(mapping.device)  # (..., in)
    return (w @ mapping).movedim(-1, dim).to(weight.device, weight.dtype)


def _block_param(name: str, arch: ArchSpec) -> tuple[int, str] | None:
    """(block index, name inside the block) for a block tensor, None for a global one."""
    prefix = arch.blocks + "."
    if not name.startswith(prefix):
        return None
    index, _, inner = name[len(prefix):].partition(".")
    return int(index), inner


class TensorSlicer:
    """Maps one parent tensor at a time to the child's name and tensor: all that a builder streaming a
    checkpoint shard by shard needs (a child tensor depends only on its parent tensor and the selection).

    Args:
        arch: the family's table.
        parent: the parent's shape.
        sel: what to keep.
        scale: multiply each linear weight whose fan-in shrank by sqrt(fan_in_parent / fan_in_child).
        grams: module path -> Gram matrix of its input in the parent (Importance.grams): linear weights whose
            input shrank are refit by least squares (refit_input) instead of sliced and scaled.
        ridge: the refit's regularization (relative to the mean kept diagonal).
    """

    def __init__(self, arch: ArchSpec, parent: Shape, sel: Selection, *, scale: bool,
                 grams: Mapping[str, Tensor] | None = None, ridge: float = 0.0) -> None:
        self.arch, self.scale, self.grams, self.ridge = arch, scale, grams or {}, ridge
        self.child_of = {b: j for j, b in enumerate(sel.blocks)}
        self.globals_idx = _axis_indices(sel, None, parent)
        self.block_idx = {j: _axis_indices(sel, j, parent) for j in range(len(sel.blocks))}

    def _slice(self, name: str, tensor: Tensor, param: Param, indices: dict[str, Tensor]) -> Tensor:
        gram = self.grams.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        return slice_tensor(tensor, param, indices, self.scale, gram, self.ridge)

    def __call__(self, name: str, tensor: Tensor) -> tuple[str, Tensor] | None:
        """(child name, child tensor), or None for a tensor of a removed block.

        Raises:
            SubcloneError: the table has no rule for this tensor.
        """
        located = _block_param(name, self.arch)
        if located is None:
            param = _rule(self.arch.global_params, name, self.arch)
            return name, self._slice(name, tensor, param, self.globals_idx)
        block, inner = located
        param = _rule(self.arch.block_params, inner, self.arch, full_name=name)
        if block not in self.child_of:
            return None
        j = self.child_of[block]
        return f"{self.arch.blocks}.{j}.{inner}", self._slice(name, tensor, param, self.block_idx[j])


def slice_state_dict(
    parent_sd: Mapping[str, Tensor],
    arch: ArchSpec,
    parent: Shape,
    sel: Selection,
    *,
    scale: bool,
    untie_head: bool = False,
    grams: Mapping[str, Tensor] | None = None,
    ridge: float = 0.0,
) -> dict[str, Tensor]:
    """Build the child's state dict; the parent's tensors are read, never modified.

    Args:
        parent_sd: the parent's state_dict(), or its tensors streamed from its checkpoint files
            (streaming.CheckpointTensors): each is read once, sliced and let go.
        arch: the family's table.
        parent: the parent's shape.
        sel: what to keep.
        scale: multiply each linear weight whose fan-in shrank by sqrt(fan_in_parent / fan_in_child).
        untie_head: for a tied head, give the child its own (scaled) head instead of sharing the
            (unscaled) embedding. Ignored for untied parents, whose head is always sliced on its own.
        grams, ridge: refit linear weights whose input shrank by least squares (TensorSlicer).
    """
    slicer = TensorSlicer(arch, parent, sel, scale=scale, grams=grams, ridge=ridge)
    out = {}
    for name in parent_sd:
        # read by name inside the call: a streamed parent tensor is let go before the next one is read
        if (mapped := slicer(name, parent_sd[name])) is not None:
            out[mapped[0]] = mapped[1]
    if is_tied(parent_sd, arch) and not untie_head:
        head, embedding = arch.tied_head
        # one matrix for both: the head's refit where the head was refit (its logits suffer most from a
        # narrower stream; measured better than the sliced embedding), else the sliced embedding
        shared = out[head] if grams and head.removesuffix(".weight") in grams and len(sel.residual) < parent.hidden \
            else out[embedding]
        out[head] = out[embedding] = shared
    return out


def is_tied(state_dict: Mapping[str, Tensor], arch: ArchSpec) -> bool:
    """Whether the head and the embedding are one tensor (a tied head appears under both names)."""
    if arch.tied_head is None or not all(name in state_dict for name in arch.tied_head):
        return False
    declared = getattr(state_dict, "tied", None)  # tensors streamed from files (streaming.CheckpointTensors)
    if declared is not None:
        return bool(declared)
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
