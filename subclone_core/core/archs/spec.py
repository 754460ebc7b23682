"""The schema of an architecture table: what generic code needs to know about a model family.

Each family file fills one `ArchSpec` with data only. Axis names say how a tensor dimension is sliced:

- ``keep``: untouched (vocabulary, classes, positions, image channels, kernel sizes).
- ``residual``: the hidden (embedding) dimension, one ranking shared by every block.
- ``q``: query heads x head_dim (rows of q, columns of o); ``kv``: KV heads x head_dim.
- ``qkv``: a fused [q; k; v] projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` under grouped-query
  attention): the q part sliced as ``q``, the k and v parts as ``kv``.
- ``qkv_per_head``: a fused projection interleaved per head, [q_h; k_h; v_h] for each head h
  (GPT-NeoX's ``query_key_value``): whole 3 x head_dim runs of the kept heads.
- ``ffn``: the FFN hidden neurons of the block; ``gate_up``: a fused [gate; up] (Phi-3's
  ``gate_up_proj``), each half sliced as ``ffn``.

Behaviour that is not a tensor layout is data too (litgpt's Config is the model): a norm offset, post-norms
whose outputs join the residual stream, an embedding multiplied by sqrt(hidden). Generic code reads these
fields; it never asks which family it holds. A parallel residual (GPT-NeoX: x + attn(ln1 x) + ffn(ln2 x))
needs no field: block statistics are taken at the block boundary, f(x) = block(x) - x, which covers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from subclone_core.core.archs.gguf_tables import GgufSpec
from subclone_core.core.errors import SubcloneError

AXES = ("keep", "residual", "q", "kv", "qkv", "qkv_per_head", "ffn", "gate_up")


@dataclass(frozen=True)
class Param:
    """How one parameter tensor is sliced.

    Attributes:
        axes: one axis name per tensor dimension, in storage order.
        fan_in: index of the dimension that is the linear layer's input (scaled when it shrinks),
            or None for tensors that are not linear weights (norms, biases, embeddings).
        sqrt_width_gain: an axis whose width w the model multiplies this tensor's output by, as sqrt(w),
            computed from the config (Gemma 3's embedding scale sqrt(hidden)). The child computes
            sqrt(w') from its own config, so the slice is multiplied by sqrt(w / w') to keep the parent's
            outputs on the kept dimensions; applied whether or not weights are scaled.
    """

    axes: tuple[str, ...]
    fan_in: int | None = None
    sqrt_width_gain: str | None = None


def linear(out_axis: str, in_axis: str) -> Param:
    """An nn.Linear weight, stored (out, in)."""
    return Param((out_axis, in_axis), fan_in=1)


def conv1d(in_axis: str, out_axis: str) -> Param:
    """A GPT-2 Conv1D weight, stored (in, out)."""
    return Param((in_axis, out_axis), fan_in=0)


def scaled_embedding() -> Param:
    """A token embedding whose output the model multiplies by sqrt(hidden) (Gemma 3)."""
    return Param(("keep", "residual"), sqrt_width_gain="residual")


def plain(*axes: str) -> Param:
    """A tensor that is not a linear weight (norm, bias, embedding, cls token): sliced, never scaled."""
    return Param(tuple(axes))


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific that the generic code reads.

    Attributes:
        name: family name shown to users.
        model_types: the `config.model_type` values this table serves.
        task: the family's default task ("causal-lm" or "image-classification"), whose head global_params holds.
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
        attn_post_norm: path, inside a block, of a norm applied to the attention output before it joins
            the residual stream (Gemma 3, OLMo 2); its output, not attn_out's, is what the block adds.
        ffn_post_norm: the same for the FFN output.
        norm_offset: the norms compute (norm_offset + weight) x x_hat: 1.0 where weights are stored as
            offsets from 1 (Gemma 3), so a weight of 0 is the identity scale. Slicing is unaffected; code
            that writes or converts norm weights (exporters, synthetic parents) must read it.
        residual_score: how the residual stream is ranked by default: "read" (the mean |input| of the layers
            that read it, after the pre-norms) or "written" (the outputs that join it, the paper's), chosen by
            measurement (docs/BENCHMARKS.md, real-parent quality).
        refit_default: whether linear weights whose input shrank are refit by least squares on the
            calibration data by default (slicing.refit_input), chosen by measurement.
        refit_ridge: how strongly the refit is pulled towards the plain slice, relative to the mean kept
            diagonal of the Gram matrix (slicing.refit_input), chosen by measurement.
        refit_toward: what the refit's penalty pulls towards: "slice" (the plain slice) or "zero" (a plain ridge),
            chosen by measurement (docs/BENCHMARKS.md, refit variants).
        refit_inputs: whose inputs each refit layer is fit on: "parent" (the parent's own, on the parent's
            stream) or "child" (the child's, so each layer also corrects the blocks before it, as sequential
            reconstruction does), chosen by measurement (pipeline.refitting).
        gguf: model_type -> how llama.cpp names and lays out the family (io.gguf_export).
        gguf_refused: why the family has no GGUF layout, where it has none.
        head: module path of the default task's head (its parameters are the global_params under it).
        task_heads: task -> the parameters of that task's head (e.g. a sequence classifier's ``score.weight``),
            which replace the default head's in that task's table (for_task).
        bias_switches: model_type -> {"attn_out" or "ffn_down": the config key that gives that output projection a
            bias} (``attention_bias``, ``mlp_bias``): where FLAP's bias compensation can add one the parent lacks.
            A projection that always has a bias needs none; one that can have none refuses the compensation.
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
    attn_post_norm: str | None = None
    ffn_post_norm: str | None = None
    norm_offset: float = 0.0
    residual_score: str = "read"
    refit_default: bool = True
    refit_ridge: float = 0.1
    refit_toward: str = "slice"
    # measured on the real parents (docs/BENCHMARKS.md, refit variants): the child's inputs start SmolLM2's
    # children 1.0-1.3 nats lower; families with no real checkpoint here keep this Llama default
    refit_inputs: str = "child"
    gguf: dict[str, GgufSpec] = field(default_factory=dict)
    gguf_refused: str | None = None
    head: str | None = None
    task_heads: dict[str, dict[str, Param]] = field(default_factory=dict)
    bias_switches: dict[str, dict[str, str]] = field(default_factory=dict)

    def for_task(self, task: str) -> ArchSpec:
        """The table of this family's models of one task: this table for the default task; for another, the
        default head's parameters replaced by that task's head (tied to the embedding only where the head's
        parameters include the tied one's name; no GGUF layout)."""
        if task == self.task:
            return self
        if task not in self.task_heads or self.head is None:
            raise SubcloneError(f"the {self.name} table has no head for task {task!r}; "
                                f"known: {', '.join([self.task, *self.task_heads])}")
        head = self.task_heads[task]
        body = {name: p for name, p in self.global_params.items() if not name.startswith(f"{self.head}.")}
        tied = self.tied_head if self.tied_head and self.tied_head[0] in head else None
        return replace(self, task=task, global_params={**body, **head}, tied_head=tied, gguf={},
                       gguf_refused=f"a {task} head has no GGUF layout")

    @property
    def linear_modules(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Module paths of the linear layers, (outside the blocks, inside a block): their input axes are what a
        least-squares refit of a child compensates (pipeline.refitting sums the Gram columns of each one's
        input)."""
        def paths(table: dict[str, Param]) -> tuple[str, ...]:
            return tuple(name.removesuffix(".weight") for name, p in table.items() if p.fan_in is not None)
        return paths(self.global_params), paths(self.block_params)

    @property
    def residual_readers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Module paths of the linear layers that read the residual stream, (outside, inside a block):
        their inputs are the stream as the model consumes it (after the pre-norms)."""
        def paths(table: dict[str, Param]) -> tuple[str, ...]:
            return tuple(name.removesuffix(".weight") for name, p in table.items()
                         if p.fan_in is not None and p.axes[p.fan_in] == "residual")
        return paths(self.global_params), paths(self.block_params)

    @property
    def attn_residual(self) -> str:
        """Path, inside a block, of the module whose output the attention adds to the residual stream."""
        return self.attn_post_norm or self.attn_out

    @property
    def ffn_residual(self) -> str:
        """Path, inside a block, of the module whose output the FFN adds to the residual stream."""
        return self.ffn_post_norm or self.ffn_down
