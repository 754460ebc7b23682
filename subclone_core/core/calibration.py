"""Calibration: run the parent on data and measure neuron, head and block importance.

Hooks keep running sums only (never activations), so memory is O(layers x width) whatever the
number of tokens. Scores follow the paper: the mean |activation| over batch and tokens. Beside them, the
inputs of the output projections and of the layers that read the stream get the per-channel statistics that
other published methods score by (``INPUT_STATS``: Wanda-sp's and FLAP's moments, Minitron's per-sequence
means), a few reductions of tensors the hooks already hold.

The least-squares refit of a child needs second moments of the parent's layer inputs too; those are taken in a
second pass, block by block, once the selection is known (pipeline.refitting), never here for the whole
parent.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from subclone_core.core.archs import arch_of_model
from subclone_core.core.archs.spec import ArchSpec
from subclone_core.core.errors import SubcloneError
from subclone_core.core.rotation import stream_norms
from subclone_core.core.shape import Shape

Progress = Callable[[int, int], None]


@dataclass
class Importance:
    """Per-neuron, per-head and per-block statistics of a parent, from calibration.

    Attributes:
        residual_embed: (D,) mean |embedding output|, the input of the first block.
        residual_attn: (L, D) mean |attention output projection| per block.
        residual_ffn: (L, D) mean |FFN down projection| per block.
        residual_block: (L, D) mean |block output| per block.
        ffn: (L, F) mean |FFN hidden neuron| (input of the down projection).
        heads: (L, H) mean |head output| (input of the attention output projection, per head).
        rel_magnitude: (L,) mean over tokens of ||f(x)|| / ||x + f(x)||.
        one_minus_cos: (L,) mean over tokens of 1 - cos(x, x + f(x)).
        tokens: number of token positions measured.
        data: a description of the calibration data.
        residual_read: (D,) the residual stream as the model reads it: the mean |input| of every linear
            layer that reads the stream (after the pre-norms), summed. None in results saved before it existed.
        input_stats: per-channel statistics of layer inputs, by the names of INPUT_STATS (empty in results saved
            before they existed): "heads_*" over the attention output projection's input (L, H x Dh), "ffn_*"
            over the FFN down projection's (L, F), "read_seq" over the input of each sublayer's first reader of
            the stream (L, sublayers, D); "residual_cov" (RESIDUAL_COV), where asked, the stream's mean x^T x (D, D).
    """

    residual_embed: Tensor
    residual_attn: Tensor
    residual_ffn: Tensor
    residual_block: Tensor
    ffn: Tensor
    heads: Tensor
    rel_magnitude: Tensor
    one_minus_cos: Tensor
    tokens: int
    data: str = ""
    residual_read: Tensor | None = None
    input_stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def residual(self) -> Tensor:
        """(D,) the residual stream as written: the sum of the mean |x| of every output that joins the stream."""
        return self.residual_embed + self.residual_attn.sum(0) + self.residual_ffn.sum(0) + self.residual_block.sum(0)

    def residual_ranking(self, score: str) -> Tensor:
        """(D,) the one shared ranking score of the residual stream: "written" (the outputs that join it, the
        paper's), "read" (the inputs of the layers that read it, after the pre-norms) or "minitron" (NVIDIA
        ModelOpt's: per sublayer, the L2 norm over sequences of each sequence's mean |normed input|, summed)."""
        if score == "written":
            return self.residual
        if score == "minitron":
            return self.stat("read_seq").sum((0, 1))
        if score != "read":
            raise SubcloneError(f"unknown residual score {score!r}; valid: {', '.join(RESIDUAL_SCORES)}")
        if self.residual_read is None:
            raise SubcloneError("this importance has no 'read' residual scores (measured by an older version); "
                                "calibrate again, or use the residual score 'written'")
        return self.residual_read

    def stat(self, name: str) -> Tensor:
        """One of the input statistics (INPUT_STATS), or an error saying to calibrate again."""
        if name not in self.input_stats:
            raise SubcloneError(f"this importance has no input statistic {name!r} (measured by an older version, "
                                "or without input statistics); calibrate again with them")
        return self.input_stats[name]

    def to_json(self, *, input_stats: bool = False) -> dict:
        """A plain-JSON dict (lists of floats); the input statistics (per channel of every layer: large) only when
        asked, as save keeps them."""
        out = {name: getattr(self, name).tolist() for name in _TENSOR_FIELDS}
        out.update(residual=self.residual.tolist(), tokens=self.tokens, data=self.data)
        if self.residual_read is not None:
            out["residual_read"] = self.residual_read.tolist()
        if input_stats and self.input_stats:
            out["input_stats"] = {name: t.tolist() for name, t in self.input_stats.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Importance:
        tensors = {name: torch.tensor(obj[name], dtype=torch.float64) for name in _TENSOR_FIELDS}
        read = obj.get("residual_read")
        stats = {name: torch.tensor(v, dtype=torch.float64) for name, v in obj.get("input_stats", {}).items()}
        return cls(**tensors, tokens=int(obj["tokens"]), data=obj.get("data", ""),
                   residual_read=None if read is None else torch.tensor(read, dtype=torch.float64), input_stats=stats)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(input_stats=True)))

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        return cls.from_json(json.loads(Path(path).read_text()))


RESIDUAL_SCORES = ("read", "written", "minitron")
# name -> (the module whose input it is measured on: ArchSpec.attn_out or .ffn_down, the reduction over tokens):
# "sq" the mean x^2 and "mean" the mean x of each channel over real tokens (Wanda-sp's input norm, FLAP's
# fluctuation and baseline); "seq" the L2 norm over sequences of each sequence's mean |x| (Minitron's)
INPUT_STATS: dict[str, tuple[str, str]] = {
    "heads_sq": ("attn_out", "sq"), "heads_mean": ("attn_out", "mean"), "heads_seq": ("attn_out", "seq"),
    "ffn_sq": ("ffn_down", "sq"), "ffn_mean": ("ffn_down", "mean"), "ffn_seq": ("ffn_down", "seq"),
}
# the residual stream's second moment x^T x (D, D), over the input of every norm that reads it (each block's
# sublayers and the final norm): SliceGPT's PCA basis (core.rotation), recorded only on request
RESIDUAL_COV = "residual_cov"
# LLM-Pruner's first-order Taylor scores ("param_first"): for each channel of the heads (L, H x Dh) and of the FFN
# (L, F), the sum over the weights that write or read it of |W * dL/dW|, the gradient of the loss on the
# calibration data; recorded only on request (a backward pass: pipeline.calibration.taylor_scores)
TAYLOR_STATS = ("heads_taylor", "ffn_taylor")
_SEQ_STATS = ("heads_seq", "ffn_seq", "read_seq")  # sums of squares over sequences: their square roots
_TENSOR_FIELDS = ("residual_embed", "residual_attn", "residual_ffn", "residual_block", "ffn", "heads",
                  "rel_magnitude", "one_minus_cos")


@dataclass
class Sums:
    """Running sums, float64, on one accumulator device (the CPU), wherever the modules run: a parent spread
    over GPUs or offloaded to disk adds into the same sums, in the same order, as one on a single device."""

    shape: Shape
    device: torch.device
    tokens: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)  # the input statistics (INPUT_STATS, "read_seq")

    def __post_init__(self) -> None:
        s, z = self.shape, lambda *size: torch.zeros(*size, dtype=torch.float64, device=self.device)
        self.sums = {
            "residual_embed": z(s.hidden), "residual_read": z(s.hidden), "residual_attn": z(s.layers, s.hidden),
            "residual_ffn": z(s.layers, s.hidden), "residual_block": z(s.layers, s.hidden),
            "ffn": z(s.layers, s.ffn), "heads": z(s.layers, s.heads * s.head_dim),
            "rel_magnitude": z(s.layers), "one_minus_cos": z(s.layers),
        }
        widths = {"attn_out": s.heads * s.head_dim, "ffn_down": s.ffn}
        self.stats = {name: z(s.layers, widths[where]) for name, (where, _) in INPUT_STATS.items()}

    def add(self, name: str, layer: int | tuple[int, int] | None, value: Tensor) -> None:
        sums = self.stats if name in self.stats else self.sums
        target = sums[name] if layer is None else sums[name][layer]
        target += value.to(self.device, torch.float64)

    def add_read(self, layer: int, sublayer: int, sublayers: int, value: Tensor) -> None:
        """Add to the per-sublayer reader statistic, sized on first use (the recorder knows the sublayers)."""
        if "read_seq" not in self.stats:
            self.stats["read_seq"] = torch.zeros(self.shape.layers, sublayers, value.numel(), dtype=torch.float64,
                                                 device=self.device)
        self.add("read_seq", (layer, sublayer), value)

    def add_cov(self, value: Tensor) -> None:
        """Add to the residual stream's second moment, sized on first use (recorded only on request)."""
        if RESIDUAL_COV not in self.stats:
            d = value.shape[-1]
            self.stats[RESIDUAL_COV] = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.stats[RESIDUAL_COV] += value.to(self.device, torch.float64)

    def result(self, data: str) -> Importance:
        n = max(self.tokens, 1)
        mean = {k: (v / n).cpu() for k, v in self.sums.items()}
        heads = mean.pop("heads").view(self.shape.layers, self.shape.heads, self.shape.head_dim).mean(-1)
        stats = {k: (v.sqrt() if k in _SEQ_STATS else v / n).cpu() for k, v in self.stats.items()}
        return Importance(**mean, heads=heads, tokens=self.tokens, data=data, input_stats=stats)


class Recorder:
    """Forward hooks that add each batch's statistics to running sums; the mask marks real tokens."""

    def __init__(self, model: nn.Module, arch: ArchSpec, sums: Sums, *, input_stats: bool = False,
                 residual_cov: bool = False) -> None:
        self.model, self.arch, self.sums, self.input_stats = model, arch, sums, input_stats
        self.residual_cov = residual_cov
        if not input_stats:
            sums.stats.clear()  # none measured: the result has none, and a strategy reading them says so
        self.mask: Tensor | None = None  # (B, T) bool, None when every position is a real token
        self.handles: list = []

    def valid(self, x: Tensor) -> Tensor:
        """Flatten (B, T, ...) to (N, ...) real-token rows."""
        return x.reshape(-1, x.shape[-1]) if self.mask is None else x[self.mask.to(x.device)]

    def abs_sum(self, x: Tensor) -> Tensor:
        return self.valid(x).abs().sum(0, dtype=torch.float32)

    def channel_stats(self, x: Tensor) -> dict[str, Tensor]:
        """The INPUT_STATS reductions of (B, T, C) inputs, each (C,): over the real tokens the sum of x^2 ("sq")
        and of x ("mean"), and over the sequences the sum of (mean |x| over the sequence)^2 ("seq"). Computed in
        float32 at least, where the hook holds the tensor (the float64 sums add the batches)."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        rows = self.valid(x)  # (N, C)
        return {"sq": (rows * rows).sum(0), "mean": rows.sum(0), "seq": self.seq_means(x).square().sum(0)}

    def seq_means(self, x: Tensor) -> Tensor:
        """(B, C) each sequence's mean |x| over its real tokens."""
        x = x.reshape(-1, *x.shape[-2:]).abs()  # (B, T, C)
        if self.mask is None:
            return x.mean(1)
        mask = self.mask.to(x.device, x.dtype)[..., None]  # (B, T, 1)
        return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def attach(self) -> None:
        blocks = self.model.get_submodule(self.arch.blocks)
        for i, block in enumerate(blocks):
            self.attach_block(i, block)
        self.attach_globals()

    def attach_block(self, i: int, block: nn.Module) -> None:
        """The hooks of one block (pipeline.calibration.calibrate_sequential attaches one block at a time)."""
        _, block_readers = self.arch.residual_readers
        self.handles.append(block.register_forward_hook(self._block_hook(i), with_kwargs=True))
        # heads and FFN neurons are the inputs of the output projections; the residual outputs are
        # what joins the residual stream (after a post-norm where the family has one)
        for path, name in ((self.arch.attn_out, "heads"), (self.arch.ffn_down, "ffn")):
            self._hook(block.get_submodule(path), self._input_hook(i, name))
        for path, name in ((self.arch.attn_residual, "residual_attn"), (self.arch.ffn_residual, "residual_ffn")):
            self._hook(block.get_submodule(path), self._output_hook(i, name))
        for path in block_readers:
            self._hook(block.get_submodule(path), self._input_hook(None, "residual_read"))
        if self.residual_cov:
            for norm, _ in stream_norms(self.arch).block:
                self._hook(block.get_submodule(norm), self._cov_hook())
        if not self.input_stats:
            return
        for role in dict.fromkeys(role for role, _ in INPUT_STATS.values()):
            self._hook(block.get_submodule(getattr(self.arch, role)), self._stat_hook(i, role))
        readers = sublayer_readers(self.arch)
        for j, path in enumerate(readers):
            self._hook(block.get_submodule(path), self._read_hook(i, j, len(readers)))

    def attach_globals(self) -> None:
        """The hooks of the layers outside the blocks that read the residual stream (the output head)."""
        for path in self.arch.residual_readers[0]:
            if (module := optional_submodule(self.model, path)) is not None:
                self._hook(module, self._input_hook(None, "residual_read"))
        final = stream_norms(self.arch).outside
        if self.residual_cov and final and (module := optional_submodule(self.model, final[0])) is not None:
            self._hook(module, self._cov_hook())

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module: nn.Module, hook) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def _input_hook(self, layer: int | None, name: str):
        def hook(module, args, output):
            self.sums.add(name, layer, self.abs_sum(args[0]))
        return hook

    def _stat_hook(self, layer: int, role: str):
        def hook(module, args, output):
            stats = self.channel_stats(args[0])
            for name, (where, how) in INPUT_STATS.items():
                if where == role:
                    self.sums.add(name, layer, stats[how])
        return hook

    def _cov_hook(self):
        # x^T x of the stream entering a norm, in float64 where the hook holds it: the PCA's eigenvectors of
        # small directions would drown in float32 rounding of sums over many tokens
        def hook(module, args, output):
            x = self.valid(args[0]).double()  # (N, D)
            self.sums.add_cov(x.T @ x)
        return hook

    def _read_hook(self, layer: int, sublayer: int, sublayers: int):
        def hook(module, args, output):
            x = args[0].to(torch.promote_types(args[0].dtype, torch.float32))
            self.sums.add_read(layer, sublayer, sublayers, self.seq_means(x).square().sum(0))
        return hook

    def _output_hook(self, layer: int, name: str):
        def hook(module, args, output):
            self.sums.add(name, layer, self.abs_sum(output))
        return hook

    def _block_hook(self, layer: int):
        # f(x) = block(x) - x is what the block adds to the residual stream, whatever happens inside it
        # (pre-norms, post-norms as in OLMo 2 and Gemma 3, or GPT-NeoX's parallel attention and FFN)
        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            # the hook sees the input as the caller passed it: under a device map, before accelerate moved it
            x = (args[0] if args else kwargs["hidden_states"]).to(y.device)
            if layer == 0:
                self.sums.add("residual_embed", None, self.abs_sum(x))
                self.sums.tokens += self.valid(x).shape[0]
            self.sums.add("residual_block", layer, self.abs_sum(y))
            x, y = self.valid(x).float(), self.valid(y).float()  # (N, D)
            rel = (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
            cos = nn.functional.cosine_similarity(x, y, dim=-1)
            self.sums.add("rel_magnitude", layer, rel.sum())
            self.sums.add("one_minus_cos", layer, (1 - cos).sum())
        return hook


def taylor_channels(arch: ArchSpec, shape: Shape, block: nn.Module) -> dict[str, Tensor]:
    """One block's LLM-Pruner scores from its weights' gradients (.grad): {"heads_taylor": (H x Dh,), "ffn_taylor":
    (F,)}, float64. Every linear weight of the family's table adds |W * grad| summed over its other axes to the
    channels along its head or FFN axis: a head channel gets its q row, its k and v rows (those of the KV head its
    group reads, under grouped-query attention) and its o column; an FFN neuron its gate and up rows and its down
    column (LLM-Pruner's dependency group, reduced by "sum")."""
    out = {"heads": torch.zeros(shape.heads * shape.head_dim, dtype=torch.float64),
           "ffn": torch.zeros(shape.ffn, dtype=torch.float64)}
    for name, param in arch.block_params.items():
        weight = optional_parameter(block, name)
        if param.fan_in is None or weight is None or weight.grad is None:
            continue
        salience = (weight.detach().double() * weight.grad.double()).abs().cpu()
        for dim, axis in enumerate(param.axes):
            if axis in _CHANNEL_AXES:
                other = tuple(d for d in range(salience.dim()) if d != dim)
                kind, channels = _CHANNEL_AXES[axis](salience.sum(other), shape)
                out[kind] += channels
    return {f"{kind}_taylor": scores for kind, scores in out.items()}


def _kv_to_heads(v: Tensor, s: Shape) -> Tensor:
    """(K x Dh,) per KV channel -> (H x Dh,): each query head reads its group's KV head (consecutive groups)."""
    return v.view(s.kv_heads, 1, s.head_dim).expand(s.kv_heads, s.queries_per_kv, s.head_dim).reshape(-1)


def _fused_qkv(v: Tensor, s: Shape) -> Tensor:
    """[q (H x Dh); k (K x Dh); v (K x Dh)] -> (H x Dh,)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return v[:q] + _kv_to_heads(v[q:q + kv], s) + _kv_to_heads(v[q + kv:], s)


# an axis kind of the family tables (archs.spec) -> (its channels' kind, the map of its sums onto those channels)
_CHANNEL_AXES: dict[str, Callable[[Tensor, Shape], tuple[str, Tensor]]] = {
    "q": lambda v, s: ("heads", v),
    "kv": lambda v, s: ("heads", _kv_to_heads(v, s)),
    "qkv": lambda v, s: ("heads", _fused_qkv(v, s)),
    "qkv_per_head": lambda v, s: ("heads", v.view(s.heads, 3, s.head_dim).sum(1).reshape(-1)),
    "ffn": lambda v, s: ("ffn", v),
    "gate_up": lambda v, s: ("ffn", v[:s.ffn] + v[s.ffn:]),
}


def optional_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter at a dotted name inside a module, or None where this model has none (a bias switched off)."""
    owner = optional_submodule(module, name.rpartition(".")[0]) if "." in name else module
    return None if owner is None else getattr(owner, name.rpartition(".")[2], None)


def sublayer_readers(arch: ArchSpec) -> tuple[str, ...]:
    """Inside a block, the first linear layer reading the stream in each sublayer (q of the attention, gate or
    up of the FFN): its input is that sublayer's normed stream, the one Minitron scores the hidden size by
    (the other readers of a sublayer read the same tensor)."""
    first: dict[str, str] = {}
    for path in arch.residual_readers[1]:
        first.setdefault(path.rpartition(".")[0], path)
    return tuple(first.values())


def optional_submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path, or None where this model has none (a table lists every variant's modules)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@contextlib.contextmanager
def recording(model: nn.Module, sums: Sums, *, input_stats: bool = False,
              residual_cov: bool = False) -> Iterator[Recorder]:
    """Attach the hooks for the duration of the block and always remove them."""
    recorder = Recorder(model, arch_of_model(model), sums, input_stats=input_stats, residual_cov=residual_cov)
    try:
        recorder.attach()
        yield recorder
    finally:
        recorder.detach()


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its first placed module when accelerate spread it over
    devices (hf_device_map; "disk" runs on the CPU), else the device of its first parameter."""
    placement = getattr(model, "hf_device_map", None)
    if placement:
        first = next(iter(placement.values()))
        return torch.device("cpu" if first == "disk" else f"cuda:{first}" if isinstance(first, int) else first)
    return next(model.parameters()).device


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """Forward kwargs that turn off the KV cache where the model's forward takes `use_cache`.

    A forward pass over whole sequences (calibration, evaluation, training) never reuses keys and values,
    and building the cache costs memory; image models have no such argument.
    """
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def real_token_mask(batch: dict[str, Tensor]) -> Tensor | None:
    """The (B, T) bool mask of real tokens, or None when every position is real (image models, no padding)."""
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()
