"""Slicing: a pure function from the parent's state dict and a selection to the child's state dict.

Every parent tensor is either mapped by the architecture table or named in an error; tensors of
removed blocks are the only ones left out, and the selection says which blocks those are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Self

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


Gram = Tensor | tuple[Tensor, Tensor]  # G[:, k] (or all of G), or (cross-moments (in, k), child Gram (k, k))


def slice_tensor(tensor: Tensor, param: Param, indices: dict[str, Tensor], scale: bool,
                 gram: Gram | None = None, ridge: float = 0.0, toward: str = "slice") -> Tensor:
    """Index every sliced axis of one tensor, then scale a linear weight whose fan-in shrank.

    With a ``gram`` (the Gram matrix of the linear layer's input in the parent: (in, in), or only its kept
    columns (in, k)), an input axis that lost entries is refit by least squares instead of indexed
    (refit_input), and not scaled: the refit already gives the outputs their size. An input axis that lost
    nothing is only reordered, so a full-size child stays exact.

    A tensor whose output the model multiplies by sqrt(width) from the config (Param.sqrt_width_gain) is
    multiplied by sqrt(parent width / child width) whatever `scale` says: the child's config gives a
    smaller multiplier, and this keeps the parent's outputs.
    """
    kept_in = refit_axis(tensor, param, indices)
    refit = gram is not None and kept_in is not None
    out = tensor
    for dim, axis in enumerate(param.axes):
        if axis != "keep" and not (refit and dim == param.fan_in):
            out = out.index_select(dim, indices[axis].to(out.device))
    factor = 1.0
    if refit:
        out = refit_input(out, param.fan_in, kept_in, gram, ridge, toward)
    elif scale and param.fan_in is not None:
        factor *= math.sqrt(tensor.shape[param.fan_in] / out.shape[param.fan_in])
    if param.sqrt_width_gain is not None:
        dim = param.axes.index(param.sqrt_width_gain)
        factor *= math.sqrt(tensor.shape[dim] / out.shape[dim])
    if factor != 1.0:
        out = out * factor
    # a tensor with nothing sliced must still be a copy: the child never shares storage with the parent
    return tensor.clone() if out is tensor else out.contiguous()


def refit_axis(tensor: Tensor, param: Param, indices: dict[str, Tensor]) -> Tensor | None:
    """The kept input indices of a linear weight whose input lost entries (what a refit compensates), else
    None: not a linear weight, or an input that is only reordered."""
    if param.fan_in is None:
        return None
    kept = indices[param.axes[param.fan_in]]
    return kept if kept.numel() < tensor.shape[param.fan_in] else None


def refit_input(weight: Tensor, dim: int, kept: Tensor, gram: Gram, ridge: float, toward: str = "slice") -> Tensor:
    """The weight over the kept inputs that best reproduces the parent's outputs on the calibration data.

    With X the parent's inputs (tokens x in), G = X^T X / N and S the (in, k) matrix that selects the kept
    inputs, W' = argmin ||X W^T - X[:, k] W'^T||^2 + lam ||W' - W S||^2 = W (G[:, k] + lam S)(G[k, k] + lam I)^-1,
    lam = ridge * mean(diag G[k, k]): a removed input's part of the output is carried by the kept inputs it
    correlates with, instead of being dropped, while the penalty pulls W' towards the plain slice W S (lam -> 0:
    pure least squares, which overfits the calibration tokens and compounds over blocks; lam -> inf: the plain
    slice). ``toward="zero"`` penalizes ||W'||^2 instead (a plain ridge, as GRAIL does): W G[:, k] (G[k, k] +
    lam I)^-1. When the child's own inputs Y (tokens x k) stand for X[:, k] (pipeline.refitting's "child"
    inputs), ``gram`` is (X^T Y / N, Y^T Y / N) and the same formula fits the parent's outputs from the child's
    inputs.

    Args:
        weight: the tensor with every other axis already sliced; ``dim`` is its input axis, still full.
        dim: the input (fan-in) axis.
        kept: the kept input indices, in the child's order.
        gram: the mean x^T x of the parent layer's input: (in, in), or only the kept columns G[:, k] (in, k),
            which is all the refit reads (G[k, k] is its kept rows); or (cross-moments, child Gram).
        ridge: the regularization, relative to the mean kept diagonal.
        toward: what the penalty pulls towards, "slice" or "zero" (REFIT_TARGETS).
    """
    w = weight.movedim(dim, -1)  # (..., in)
    rows = w.reshape(-1, w.shape[-1])
    if rows.shape[0] < rows.shape[1]:  # fewer outputs than inputs: solving for W' itself is the smaller solve
        fitted = _refit_rows(rows, *_moments(gram, kept), kept, ridge, toward, _factors(gram)).to(weight.dtype)
        return fitted.reshape(*w.shape[:-1], len(kept)).movedim(-1, dim)
    # solved in float64, applied in the weight's precision or float32: one product, off by a few float32 ulps at
    # most, where applying it in float64 to a head over a big vocabulary took a tenth of a make's time
    mapping_t = _refit_mapping(*_moments(gram, kept), kept, ridge, toward, _factors(gram))  # (k, in)
    mapping_t = mapping_t.to(torch.promote_types(weight.dtype, torch.float32))
    out = torch.empty(rows.shape[0], mapping_t.shape[0], dtype=weight.dtype, device=weight.device)
    for start in range(0, rows.shape[0], _REFIT_ROWS):  # a slab of output rows at a time
        slab = rows[start:start + _REFIT_ROWS].to(mapping_t.device, mapping_t.dtype)
        out[start:start + _REFIT_ROWS] = (slab @ mapping_t.T).to(out.device, out.dtype)
    return out.reshape(*w.shape[:-1], mapping_t.shape[0]).movedim(-1, dim)


def _refit_mapping(cross: Tensor, g_kk: Tensor, kept: Tensor, ridge: float, toward: str,
                   factors: dict | None = None) -> Tensor:
    """The refit's (G[k, k] + lam I)^-1 (G[:, k] + lam S)^T, (k, in) float64, built in place where it can be
    (the moments of a wide FFN are hundreds of MB in float64: no identity matrix, no second copy of them)."""
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-30))
    rhs = cross.T.contiguous()  # (k, in): (G[:, k] + lam S)^T, S^T's ones at (j, kept[j])
    if toward == "slice":
        rhs[torch.arange(len(kept), device=rhs.device), kept.to(rhs.device)] += lam
    return _spd_solve(g_kk, lam, rhs, factors)


def _refit_rows(rows: Tensor, cross: Tensor, g_kk: Tensor, kept: Tensor, ridge: float, toward: str,
               factors: dict | None = None) -> Tensor:
    """W' = W (G[:, k] + lam S) (G[k, k] + lam I)^-1 solved for W' (out, k) directly, float64: the same weight as
    through the mapping, with out instead of in right-hand sides (an FFN down projection has 3-4x fewer)."""
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-30))
    w = rows.to(cross.device, torch.float64)
    rhs = w @ cross  # (out, k)
    if toward == "slice":
        rhs += lam * w.index_select(1, kept.to(w.device))
    return _spd_solve(g_kk, lam, rhs.T, factors).T.to(rows.device)


def _plus_ridge(g_kk: Tensor, lam: float) -> Tensor:
    matrix = g_kk.clone()
    matrix.diagonal().add_(lam)
    return matrix


REFIT_TARGETS = ("slice", "zero")
# output rows refit at once: a head over a 150k-token vocabulary in float64 alone would take GBs (1.9 GB for a
# 1.5B parent's), a slab of 4,096 rows of a 2,048-wide input 64 MB
_REFIT_ROWS = 4096


class SharedMoments(tuple):
    """Moments (cross-moments, child Gram) that several layers are refit with (q, k and v read one input): the
    Cholesky factor of each ridge is kept with them, so the layers after the first solve without factoring."""

    def __new__(cls, cross: Tensor, inner: Tensor) -> Self:
        moments = super().__new__(cls, (cross, inner))
        moments.factors = {}  # ridge -> Cholesky factor of G[k, k] + ridge I
        return moments


def _factors(gram: Gram) -> dict | None:
    return getattr(gram, "factors", None)


def _spd_solve(g_kk: Tensor, lam: float, rhs: Tensor, factors: dict | None = None) -> Tensor:
    """(G[k, k] + lam I)^-1 rhs, G[k, k] + lam I symmetric positive definite: by Cholesky, about twice as fast as
    a general solve (the factor taken from ``factors`` where it is there, kept there where it is new); a general
    solve where rounding left the matrix not positive definite."""
    factor = None if factors is None else factors.get(lam)
    if factor is None:
        matrix = _plus_ridge(g_kk, lam)
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) != 0:
            return torch.linalg.solve(matrix, rhs)
        del matrix  # the factor is all the solve needs
        if factors is not None:
            factors[lam] = factor
    return torch.cholesky_solve(rhs, factor)


def _moments(gram: Gram, kept: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-moments (in, k), Gram of the kept inputs (k, k)), float64."""
    if isinstance(gram, tuple):
        return gram[0].double(), gram[1].double()
    kept = kept.to(gram.device)
    cross = (gram if gram.shape[1] == len(kept) else gram.index_select(1, kept)).double()  # (in, k)
    return cross, cross.index_select(0, kept)


def _block_param(name: str, arch: ArchSpec) -> tuple[int, str] | None:
    """(block index, name inside the block) for a block tensor, None for a global one."""
    prefix = arch.blocks + "."
    if not name.startswith(prefix):
        return None
    index, _, inner = name[len(prefix):].partition(".")
    return int(index), inner


class TensorSlicer:
    """Maps one parent tensor at a time to the child's name and tensor: all that a builder streaming a
    checkpoint shard by shard, or a refit pass going block by block, needs (a child tensor depends only on its
    parent tensor, the selection and, when refit, the Gram matrix of its layer's input).

    Args:
        arch: the family's table.
        parent: the parent's shape.
        sel: what to keep.
        scale: multiply each linear weight whose fan-in shrank by sqrt(fan_in_parent / fan_in_child).
        ridge: the refit's regularization (relative to the mean kept diagonal).
    """

    def __init__(self, arch: ArchSpec, parent: Shape, sel: Selection, *, scale: bool, ridge: float = 0.0) -> None:
        self.arch, self.scale, self.ridge = arch, scale, ridge
        self.child_of = {b: j for j, b in enumerate(sel.blocks)}
        self.globals_idx = _axis_indices(sel, None, parent)
        self.block_idx = {j: _axis_indices(sel, j, parent) for j in range(len(sel.blocks))}
        self._kept: dict[str, tuple[str, Tensor]] = {}
        self._earlier: Mapping[tuple, Tensor] = {}
        self._made: dict[tuple, Tensor] | None = None

    def reuse(self, earlier: Mapping[tuple, Tensor], made: dict[tuple, Tensor]) -> None:
        """Take a refit from ``earlier`` (another child's ``made``) where that child refit the same parent tensor
        (the same object) from the same Gram matrix (the same object) onto the same kept indices, as children of
        one width do in every block they share (pipeline.refitting.SharedGrams); put each refit of this child
        into ``made``. The caller keeps the parent tensors, the Gram matrices and the earlier child unchanged."""
        self._earlier, self._made = earlier, made

    def _locate(self, name: str) -> tuple[str, Param, dict[str, Tensor]] | None:
        """(child name, rule, indices) of a parent tensor; None for a tensor of a removed block."""
        located = _block_param(name, self.arch)
        if located is None:
            return name, _rule(self.arch.global_params, name, self.arch), self.globals_idx
        block, inner = located
        param = _rule(self.arch.block_params, inner, self.arch, full_name=name)
        if block not in self.child_of:
            return None
        j = self.child_of[block]
        return f"{self.arch.blocks}.{j}.{inner}", param, self.block_idx[j]

    def kept_inputs(self, name: str, weight: Tensor) -> Tensor | None:
        """The kept input indices of a parent linear weight whose input loses entries in the child (the Gram
        columns its refit reads), None where nothing is refit (a removed block, an intact input, no weight)."""
        located = self._locate(name)
        return None if located is None else refit_axis(weight, located[1], located[2])

    def __call__(self, name: str, tensor: Tensor, gram: Gram | None = None, *,
                 keep: bool = False) -> tuple[str, Tensor] | None:
        """(child name, child tensor), or None for a tensor of a removed block; ``gram`` refits a linear weight
        whose input shrank (slice_tensor). With ``keep``, a refit result is also kept until the same name is
        asked for once more with any ``gram`` (a pass that needs the child's weights before slice_items does: the
        solve runs once, and the moments can go before slice_items asks).

        Raises:
            SubcloneError: the table has no rule for this tensor.
        """
        if gram is not None and name in self._kept:
            return self._kept.pop(name)
        located = self._locate(name)
        if located is None:
            return None
        child_name, param, indices = located
        out = child_name, self._refit_once(tensor, param, indices, gram)
        if keep and gram is not None:
            self._kept[name] = out
        return out

    def _refit_once(self, tensor: Tensor, param: Param, indices: dict[str, Tensor], gram: Gram | None) -> Tensor:
        """slice_tensor, or a copy of the same refit made for an earlier child (reuse)."""
        if self._made is None or gram is None or isinstance(gram, tuple):
            return slice_tensor(tensor, param, indices, self.scale, gram, self.ridge, self.arch.refit_toward)
        kept = tuple(tuple(indices[axis].tolist()) for axis in param.axes if axis != "keep")
        key = (id(tensor), id(gram), kept, self.scale, self.ridge, self.arch.refit_toward)
        if key in self._earlier:
            self._made[key] = self._earlier[key]
            return self._earlier[key].clone()  # the child never shares storage with another
        self._made[key] = slice_tensor(tensor, param, indices, self.scale, gram, self.ridge, self.arch.refit_toward)
        return self._made[key]


ChildTensors = Iterable[tuple[str, Tensor, "Tensor | None"]]  # (parent name, parent tensor, Gram or None)
TensorSink = Callable[[str, Tensor], None]  # takes each finished child tensor, by its name


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
    sink: TensorSink | None = None,
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
        grams, ridge: module path -> Gram matrix of its input ((in, in) or its kept columns): refit linear
            weights whose input shrank by least squares (TensorSlicer).
        sink: each child tensor goes to it as it is made instead of into the returned dict (slice_items).
    """
    grams = grams or {}
    # read by name inside the generator: a streamed parent tensor is let go before the next one is read
    items = ((name, parent_sd[name], grams.get(name.removesuffix(".weight")) if name.endswith(".weight") else None)
             for name in parent_sd)
    slicer = TensorSlicer(arch, parent, sel, scale=scale, ridge=ridge)
    return slice_items(items, slicer, arch, parent, sel, tied=is_tied(parent_sd, arch), untie_head=untie_head,
                       sink=sink)


def slice_items(items: ChildTensors, slicer: TensorSlicer, arch: ArchSpec, parent: Shape, sel: Selection, *,
                tied: bool, untie_head: bool, sink: TensorSink | None = None) -> dict[str, Tensor]:
    """The child's state dict from (name, parent tensor, Gram or None) items as they come: each is sliced (or
    refit) at once, so a producer going block by block can let a block go before the next
    (pipeline.refitting).

    Args:
        sink: if given, each finished child tensor goes to it at once instead of into the returned dict (a
            writer to disk: the child never exists whole in memory); a tied head and embedding are held until
            both are known and go to it once, under the embedding's name (as a saved tied model has them).
    """
    out, refit = {}, set()
    held = set(arch.tied_head) if tied and not untie_head else set()
    for name, tensor, gram in items:
        if (mapped := slicer(name, tensor, gram)) is not None:
            if gram is not None:
                refit.add(mapped[0])
            if sink is None or mapped[0] in held:
                out[mapped[0]] = mapped[1]
            else:
                sink(*mapped)
        del tensor, gram  # let the parent tensor go before the next one is read
    if held:
        head, embedding = arch.tied_head
        # one matrix for both: the head's refit where the head was refit (its logits suffer most from a
        # narrower stream; measured better than the sliced embedding), else the sliced embedding
        shared = out[head] if head in refit and len(sel.residual) < parent.hidden else out[embedding]
        out[head] = out[embedding] = shared
        if sink is not None:
            sink(embedding, shared)
            return {}
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
