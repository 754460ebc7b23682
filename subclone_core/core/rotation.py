"""SliceGPT's change of basis of the residual stream (Ashkboos et al., ICLR 2024, arXiv:2401.15024), as a pure
function of the parent's tensors: fold the norms' weights into the layers that read them, rotate every residual
axis by one orthogonal Q (the PCA basis of the stream on calibration data), and the first k dimensions of the
rotated stream are the k that carry the most variance. Slicing them is then first-k slicing (core.slicing).

One Q for every block, where SliceGPT rotates each block's input by its own Q_l: a per-block basis needs a
Q_l^T Q_(l+1) matrix on every residual connection, an extra layer that a plain model of the family cannot hold,
and the child must stay one (saved and reloaded by from_pretrained, exported, trained as any other).

Why it is exact at full size: an RMSNorm of weight 1 commutes with an orthogonal Q (||x Q|| = ||x||), so once
each norm's weight is folded into its readers (W diag(w)), the model on the stream x Q, with E Q, W Q for every
reader and Q^T W, Q^T b for every writer, computes the parent's function. Sliced to k < D dimensions the norm
divides by the RMS over k entries, not D: its weight becomes sqrt(D / k), which makes it SliceGPT's RMSN (the
squared norm of what is kept, divided by D), the parent's own norm wherever the dropped dimensions held nothing.

Only families whose tables say that this holds are rotated (rotation_refusal): pre-norm blocks whose norms
feed linear layers directly. Post-norms (their output, not the stream, is added), a LayerNorm with a bias (it
centres, and the bias is added after the rotation would have to happen), an embedding multiplied by sqrt(width)
and a head_dim derived from hidden / heads (the hidden size could not shrink alone) are refused. A parallel
residual (x + attn(n1 x) + ffn(n2 x)) would rotate like any pre-norm block; the one family with it (GPT-NeoX)
is refused for its LayerNorm biases.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from subclone_core.core.archs import REGISTRY
from subclone_core.core.archs.spec import ArchSpec, Param
from subclone_core.core.errors import SubcloneError


@dataclass(frozen=True)
class StreamNorms:
    """The residual stream's norms and the linear layers each one feeds, read from a family's table.

    Attributes:
        block: (norm path, reader paths) inside a block, one per sublayer.
        outside: (final norm path, paths of the head(s) reading it), or None where no norm precedes the head.
    """

    block: tuple[tuple[str, tuple[str, ...]], ...]
    outside: tuple[str, tuple[str, ...]] | None


def _norm_paths(table: dict[str, Param]) -> list[str]:
    """Module paths of the norms over the stream: 1-d residual weights that are not a linear layer's bias, in
    the table's order."""
    return [name.removesuffix(".weight") for name, p in table.items()
            if p.axes == ("residual",) and name.endswith(".weight")]


def _sublayers(readers: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The readers of the stream grouped by sublayer (the module above them: self_attn, mlp), in table order."""
    groups: dict[str, list[str]] = {}
    for path in readers:
        groups.setdefault(path.rpartition(".")[0], []).append(path)
    return [tuple(g) for g in groups.values()]


def stream_norms(arch: ArchSpec) -> StreamNorms:
    """Which norm feeds which readers: a pre-norm table lists a block's norms in the order of the sublayers
    they feed (input_layernorm before post_attention_layernorm, as q, k, v before gate and up), and the one
    norm outside the blocks feeds the head. A table that does not pair up is refused by rotation_refusal."""
    outside_readers, block_readers = arch.residual_readers
    norms, outside = _norm_paths(arch.block_params), _norm_paths(arch.global_params)
    block = tuple(zip(norms, _sublayers(block_readers)))
    return StreamNorms(block=block, outside=(outside[0], outside_readers) if len(outside) == 1 else None)


def rotation_refusal(arch: ArchSpec) -> str | None:
    """Why the stream of this family cannot be rotated into a plain model of the same family, or None. Data
    only: the table's post-norms, norm biases, embedding scales, head_dim setting and norm layout."""
    tables = {**arch.global_params, **arch.block_params}
    biased = [name for name in _norm_paths(arch.block_params) + _norm_paths(arch.global_params)
              if f"{name}.bias" in tables]
    checks = (
        (arch.attn_post_norm or arch.ffn_post_norm, (f"post-norms ({arch.attn_post_norm or arch.ffn_post_norm}) "
                                                     "whose outputs, not the stream, join the residual")),
        (biased, f"LayerNorms with a bias ({', '.join(biased[:2])})"),
        (any(p.sqrt_width_gain for p in tables.values()), "an embedding multiplied by sqrt(hidden)"),
        ("head_dim" not in arch.config_keys, ("head_dim derived from hidden / heads, so the hidden size cannot "
                                              "shrink with every head kept")),
        (len(_norm_paths(arch.block_params)) != len(_sublayers(arch.residual_readers[1])),
         "block norms that do not pair with the sublayers reading the stream"),
        (len(_norm_paths(arch.global_params)) > 1, "more than one norm outside the blocks"),
    )
    return next((why for failed, why in checks if failed), None)


def check_rotatable(arch: ArchSpec, model_type: str) -> None:
    """Refuse, in one line naming the families that would do, a family whose stream cannot be rotated."""
    why = rotation_refusal(arch)
    if why is not None:
        valid = sorted(mt for mt, a in REGISTRY.items() if rotation_refusal(a) is None)
        raise SubcloneError(f"strategy 'slicegpt' rotates the residual stream, and {arch.name} ({model_type}) has "
                            f"{why}; valid families: {', '.join(valid)}")


def pca_basis(covariance: Tensor) -> Tensor:
    """(D, D) float64 orthogonal Q whose columns are the eigenvectors of the stream's second moment, by
    decreasing eigenvalue: x Q's first k entries carry the most energy any k orthonormal directions can."""
    cov = covariance.double()
    _, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # symmetrized: rounding in the sums breaks it slightly
    return vectors.flip(-1)


def _rotate_axes(tensor: Tensor, param: Param, q: Tensor) -> Tensor:
    """Every residual axis of a tensor multiplied by Q: a reader's input W -> W Q, a writer's output
    W -> Q^T W (and its bias), the embedding E -> E Q, whatever the layout stores first (Conv1D: (in, out))."""
    out = tensor
    for dim, axis in enumerate(param.axes):
        if axis == "residual":
            out = (out.movedim(dim, -1) @ q).movedim(-1, dim)
    return out


class RotatedTensors(Mapping):
    """The parent's tensors with the norms folded and the stream rotated, each made when read (a streamed
    parent stays streamed); the norms' weights are those of a child k dimensions wide (sqrt(D / k), less the
    family's norm offset), so that first-k slicing of these tensors is SliceGPT's child.

    Attributes:
        tied: whether the head and the embedding are still one matrix (the final norm's weight was 1), read by
            slicing.is_tied: a head with a norm folded into it becomes the child's own.
    """

    def __init__(self, tensors: Mapping[str, Tensor], arch: ArchSpec, q: Tensor, k: int, *, tied: bool) -> None:
        self.tensors, self.arch, self.q, self.k = tensors, arch, q, k
        self.feeds = _Feeds(arch)
        head = arch.tied_head[0] if arch.tied_head else None
        norm = self.feeds.norm_of(head) if head else None
        # a tied head stays tied only where folding left it the embedding: its norm's gain is exactly 1
        self.tied = tied and (norm is None or bool((self._gain(norm) == 1).all()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:  # without making the tensor (Mapping's default would)
        return name in self.tensors

    def __getitem__(self, name: str) -> Tensor:
        tensor = self.tensors[name]
        if self.feeds.is_norm(name):  # folded into its readers: what remains is the k-wide child's RMSN
            return torch.full_like(tensor, math.sqrt(tensor.shape[0] / self.k) - self.arch.norm_offset)
        param, work = _param(self.arch, name), tensor.double()
        if (norm := self.feeds.norm_of(name)) is not None:
            work = _fold(work, param, self._gain(norm))
        return _rotate_axes(work, param, self.q.to(work.device)).to(tensor.dtype)

    def _gain(self, norm_name: str) -> Tensor:
        """What a norm multiplies its normalized input by (offset + weight)."""
        return self.tensors[norm_name].double() + self.arch.norm_offset


class _Feeds:
    """Full parameter names of norms and of the readers they feed, in any block (``model.layers.7.…``)."""

    def __init__(self, arch: ArchSpec) -> None:
        pairs = stream_norms(arch)
        self.blocks = f"{arch.blocks}."
        self.inside = {f"{r}.weight": f"{norm}.weight" for norm, readers in pairs.block for r in readers}
        self.outside = {} if pairs.outside is None else {
            f"{r}.weight": f"{pairs.outside[0]}.weight" for r in pairs.outside[1]}

    def _split(self, name: str) -> tuple[str, str]:
        """(the block's prefix, or "" outside the blocks; the name inside it)."""
        if not name.startswith(self.blocks):
            return "", name
        index, _, inner = name[len(self.blocks):].partition(".")
        return f"{self.blocks}{index}.", inner

    def is_norm(self, name: str) -> bool:
        prefix, inner = self._split(name)
        return inner in (self.inside if prefix else self.outside).values()

    def norm_of(self, name: str) -> str | None:
        """The weight name of the norm feeding this reader weight, in the same block; None for other tensors."""
        prefix, inner = self._split(name)
        norm = (self.inside if prefix else self.outside).get(inner)
        return None if norm is None else prefix + norm


def _param(arch: ArchSpec, name: str) -> Param:
    """The table's rule of a parameter (every tensor reaching here was already named by the slicer's table)."""
    inside = name.startswith(f"{arch.blocks}.")
    table, key = (arch.block_params, name[len(arch.blocks) + 1:].partition(".")[2]) if inside else \
        (arch.global_params, name)
    if key not in table:
        raise SubcloneError(f"parent tensor {name!r} has no slicing rule in the {arch.name} table; this checkpoint "
                            "has a layout the table does not describe")
    return table[key]


def _fold(weight: Tensor, param: Param, gain: Tensor) -> Tensor:
    """A reader's weight times its norm's gain along its input, W diag(w): the norm itself can then be 1."""
    shape = [1] * weight.dim()
    shape[param.fan_in] = -1
    return weight * gain.to(weight.device).view(shape)
