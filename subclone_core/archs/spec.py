"""The schema of an architecture table: what generic code needs to know about a model family.

Each family file fills one `ArchSpec` with data only. Axis names say how a tensor dimension is sliced:

- ``keep``: untouched (vocabulary, classes, positions, image channels, kernel sizes).
- ``residual``: the hidden (embedding) dimension, one ranking shared by every block.
- ``q``: query heads x head_dim (rows of q, columns of o); ``kv``: KV heads x head_dim.
- ``qkv``: a fused [q; k; v] projection (GPT-2's ``c_attn``), each third sliced as ``q``.
- ``ffn``: the FFN hidden neurons of the block.
"""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("keep", "residual", "q", "kv", "qkv", "ffn")


@dataclass(frozen=True)
class Param:
    """How one parameter tensor is sliced.

    Attributes:
        axes: one axis name per tensor dimension, in storage order.
        fan_in: index of the dimension that is the linear layer's input (scaled when it shrinks),
            or None for tensors that are not linear weights (norms, biases, embeddings).
    """

    axes: tuple[str, ...]
    fan_in: int | None = None


def linear(out_axis: str, in_axis: str) -> Param:
    """An nn.Linear weight, stored (out, in)."""
    return Param((out_axis, in_axis), fan_in=1)


def conv1d(in_axis: str, out_axis: str) -> Param:
    """A GPT-2 Conv1D weight, stored (in, out)."""
    return Param((in_axis, out_axis), fan_in=0)


def plain(*axes: str) -> Param:
    """A tensor that is not a linear weight (norm, bias, embedding, cls token): sliced, never scaled."""
    return Param(tuple(axes))


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific that the generic code reads.

    Attributes:
        name: family name shown to users.
        model_types: the `config.model_type` values this table serves.
        task: "causal-lm" or "image-classification".
        blocks: dotted path of the ModuleList of transformer blocks.
        attn_out: path, inside a block, of the attention output projection (its input holds the heads).
        ffn_down: path, inside a block, of the FFN down projection (its input holds the FFN neurons).
        global_params: parameter name -> Param for tensors outside the blocks.
        block_params: parameter name inside a block -> Param.
        config_keys: role -> config attribute (layers, hidden, heads, kv_heads, ffn, head_dim).
            A role missing here is derived: kv_heads = heads, head_dim = hidden / heads.
        ffn_default_multiple: when the ffn config value is None, ffn = multiple x hidden (GPT-2).
        tied_head: (head weight, embedding weight) names when the config may tie them.
        per_layer_config_keys: config entries that hold one value per block (sliced like the blocks).
        scale_default: whether slicing scales weights by sqrt(fan_in ratio) unless told otherwise,
            chosen by measurement per family (docs/BENCHMARKS.md).
    """

    name: str
    model_types: tuple[str, ...]
    task: str
    blocks: str
    attn_out: str
    ffn_down: str
    global_params: dict[str, Param]
    block_params: dict[str, Param]
    config_keys: dict[str, str]
    ffn_default_multiple: int | None = None
    tied_head: tuple[str, str] | None = None
    per_layer_config_keys: tuple[str, ...] = ()
    scale_default: bool = True
