"""The neuron inspector: which calibration tokens (or image patches) activate a unit most.

A unit is a residual dimension at a block's output, an FFN neuron (the input of a block's down
projection) or an attention head (the input of its output projection, mean |value| over the head's
dimensions). A second pass over the calibration sample runs forward hooks that keep, per requested unit,
only a running top-k of |activation| with where it happened (and a few token ids around it): memory is
O(units x k), never the activations themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subclone_core.analysis.probes import exclusive
from subclone_core.core.archs import arch_for
from subclone_core.core.calibration import Importance, no_cache_kwargs, real_token_mask
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.sources import Parent, make_data
from subclone_core.workflow.children import CALIB_BATCH, CALIB_SEQ_LEN

Progress = Callable[[int, int], None]
KINDS = ("residual", "ffn", "head")


@dataclass(frozen=True)
class Unit:
    """One unit to inspect: kind ("residual", "ffn" or "head"), block, and index within the block."""

    kind: str
    block: int
    index: int


@dataclass(frozen=True)
class Hit:
    """One of a unit's strongest activations.

    Attributes:
        value: the activation (signed for residual and FFN units; a head's mean |value|).
        item: which sequence (or image) of the sample, counting from 0.
        position: the token position in it (for a ViT: 0 is the CLS token, patch p is position p + 1).
        context: token ids around the position (None for images); ``context[center]`` is the token itself.
        center: the index of the token itself in ``context``.
    """

    value: float
    item: int
    position: int
    context: tuple[int, ...] | None = None
    center: int = 0


def check_units(shape: Shape, units: Sequence[Unit]) -> None:
    """Refuse a unit outside the model, naming the valid range.

    Raises:
        SubcloneError: an unknown kind, or a block or index out of range.
    """
    sizes = {"residual": shape.hidden, "ffn": shape.ffn, "head": shape.heads}
    for unit in units:
        if unit.kind not in sizes:
            raise SubcloneError(f"unknown unit kind {unit.kind!r}; valid: {', '.join(KINDS)}")
        if not 0 <= unit.block < shape.layers:
            raise SubcloneError(f"block {unit.block} is out of range; valid blocks are 0..{shape.layers - 1}")
        if not 0 <= unit.index < sizes[unit.kind]:
            raise SubcloneError(f"{unit.kind} index {unit.index} is out of range; valid: 0..{sizes[unit.kind] - 1}")


class _TopK:
    """The k largest |values| seen so far, with their item, position and token context."""

    def __init__(self, k: int, width: int) -> None:
        self.k, self.width = k, width
        self.values = torch.empty(0, dtype=torch.float64)
        self.where = torch.empty(0, 2, dtype=torch.long)  # (n, 2): item, position
        self.context = torch.empty(0, width, dtype=torch.long)  # (n, width), -1 outside the sequence

    def add(self, values: Tensor, where: Tensor, context: Tensor) -> None:
        """Merge candidates (n,), (n, 2), (n, width) and keep the top k by |value|."""
        values = torch.cat([self.values, values.double().cpu()])
        where, context = torch.cat([self.where, where.cpu()]), torch.cat([self.context, context.cpu()])
        top = values.abs().topk(min(self.k, values.numel())).indices
        self.values, self.where, self.context = values[top], where[top], context[top]

    def hits(self, text: bool) -> list[Hit]:
        order = self.values.abs().argsort(descending=True, stable=True)
        center = self.width // 2
        return [Hit(float(self.values[i]), int(self.where[i, 0]), int(self.where[i, 1]),
                    tuple(int(t) for t in self.context[i]) if text else None, center) for i in order]


class _Watcher:
    """Forward hooks that feed the requested units' activations of each batch into running top-k."""

    def __init__(self, model: nn.Module, units: Sequence[Unit], k: int, context: int) -> None:
        self.model, self.arch = model, arch_for(model.config.model_type)
        self.shape, self.context = Shape.of(model.config), context
        self.tops = {unit: _TopK(k, 2 * context + 1) for unit in units}
        self.k, self.handles = k, []
        self.mask: Tensor | None = None  # (B, T) real tokens, None when all are real
        self.windows: Tensor | None = None  # (B, T, width) token ids around each position, or None
        self.items = 0  # sequences (or images) seen before this batch
        self.positions = 0  # real token positions (or patches and CLS tokens) of this batch

    def start_batch(self, batch: dict[str, Tensor], device: torch.device) -> None:
        mask = real_token_mask(batch)
        self.positions = 0
        self.mask = None if mask is None else mask.to(device)
        ids = batch.get("input_ids")
        self.windows = None if ids is None else nn.functional.pad(
            ids, (self.context, self.context), value=-1).unfold(1, 2 * self.context + 1, 1)  # (B, T, width)

    def attach(self) -> None:
        blocks = self.model.get_submodule(self.arch.blocks)
        places = {"residual": None, "ffn": self.arch.ffn_down, "head": self.arch.attn_out}
        for kind, block in sorted({(u.kind, u.block) for u in self.tops}):
            units = [u for u in self.tops if (u.kind, u.block) == (kind, block)]
            module = blocks[block] if places[kind] is None else blocks[block].get_submodule(places[kind])
            self.handles.append(module.register_forward_hook(self._hook(kind, units), with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, kind: str, units: list[Unit]):
        index = torch.tensor([u.index for u in units])

        def hook(module, args, kwargs, output):
            if kind == "residual":  # the block's output: the residual stream after it
                x = output[0] if isinstance(output, tuple) else output  # (B, T, D)
                values = x[..., index]
            else:
                x = args[0] if args else next(iter(kwargs.values()))  # (B, T, F) or (B, T, H * Dh)
                values = x[..., index] if kind == "ffn" else (
                    x.unflatten(-1, (self.shape.heads, self.shape.head_dim)).abs().mean(-1)[..., index])
            self._record(units, values.detach())  # (B, T, units)
        return hook

    def _record(self, units: list[Unit], values: Tensor) -> None:
        """Offer each unit this batch's k strongest real positions."""
        batch, length = values.shape[:2]
        grid = torch.stack(torch.meshgrid(torch.arange(batch), torch.arange(length), indexing="ij"), -1)
        grid = grid.to(values.device)  # (B, T, 2): item in batch, position
        valid = torch.ones(batch, length, dtype=torch.bool, device=values.device) if self.mask is None \
            else self.mask
        flat, where = values[valid], grid[valid]  # (N, units), (N, 2)
        self.positions = flat.shape[0]
        for column, unit in enumerate(units):
            top = flat[:, column].abs().topk(min(self.k, flat.shape[0])).indices
            chosen = where[top].cpu()
            context = (self.windows[chosen[:, 0], chosen[:, 1]] if self.windows is not None
                       else torch.full((len(top), 2 * self.context + 1), -1, dtype=torch.long))
            offset = torch.tensor([self.items, 0])
            self.tops[unit].add(flat[top, column], chosen + offset, context)


@contextlib.contextmanager
def watching(model: nn.Module, units: Sequence[Unit], k: int, context: int) -> Iterator[_Watcher]:
    """Attach the hooks for the duration of the block and always remove them."""
    watcher = _Watcher(model, units, k, context)
    try:
        watcher.attach()
        yield watcher
    finally:
        watcher.detach()


@torch.no_grad()
def top_activations(model: nn.Module, batches: Iterable[dict[str, Tensor]], units: Sequence[Unit], *,
                    k: int = 8, context: int = 4, max_tokens: int | None = None,
                    progress: Progress | None = None) -> dict[Unit, list[Hit]]:
    """The k strongest activations (by |value|) of each unit over the batches, strongest first.

    Args:
        model: the parent; not modified (hooks are removed on exit, even on error).
        batches: model inputs, as for calibration (input_ids and attention_mask, or pixel_values).
        units: what to inspect (see ``check_units``).
        k: activations kept per unit.
        context: token ids kept on each side of a text hit.
        max_tokens: stop once this many real token positions were seen.
        progress: called with (token positions done, max_tokens or 0) after each batch.
    """
    check_units(Shape.of(model.config), units)
    device, seen = next(model.parameters()).device, 0
    was_training = model.training
    model.eval()
    try:
        with exclusive(model), watching(model, units, k, context) as watcher:
            for batch in batches:
                inputs = {name: v.to(device) for name, v in batch.items() if name != "labels"}
                watcher.start_batch(inputs, device)
                model(**inputs, **no_cache_kwargs(model))
                watcher.items += next(iter(inputs.values())).shape[0]
                seen += watcher.positions
                if progress:
                    progress(seen, max_tokens or 0)
                if max_tokens and seen >= max_tokens:
                    break
    finally:
        model.train(was_training)
    text = watcher.windows is not None
    return {unit: top.hits(text) for unit, top in watcher.tops.items()}


def outsized_dimensions(importance: Importance, factor: float = 10.0, limit: int = 5) -> list[Unit]:
    """The residual dimensions whose shared score is over ``factor`` x the median (the "massive
    activations" that dominate the shared ranking), largest first, each at the block where it peaks."""
    shared = importance.residual
    order = shared.argsort(descending=True, stable=True)[:limit]
    median = float(shared.median())
    return [Unit("residual", int(importance.residual_block[:, d].argmax()), int(d))
            for d in order if float(shared[d]) > factor * median]


def inspect_units(parent: Parent, units: Sequence[Unit], data_id: str | None = None, *, tokens: int = 4096,
                  k: int = 8, progress: Progress | None = None) -> dict[Unit, list[Hit]]:
    """``top_activations`` over the calibration sample ``measure_importance`` uses (same data, split,
    sequence length and budget), so the hits are among the tokens that made the scores."""
    data = make_data(parent, data_id, "train", seq_len=CALIB_SEQ_LEN, max_tokens=tokens,
                     max_images=max(1, tokens // 2))
    return top_activations(parent.model, data.batches(CALIB_BATCH), units, k=k, max_tokens=tokens,
                           progress=progress)


def context_text(tokenizer, hit: Hit) -> tuple[str, str, str]:
    """(text before, the token itself, text after) of a text hit, decoded with the parent's tokenizer."""
    ids = hit.context or ()
    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode([t for t in part if t >= 0])
    return decode(ids[:hit.center]), decode(ids[hit.center:hit.center + 1]), decode(ids[hit.center + 1:])


def hit_rows(hits: Sequence[Hit], tokenizer=None) -> list[dict]:
    """Table rows of a unit's hits: value and where; for text also the token and its context (decoded)."""
    rows = []
    for rank, hit in enumerate(hits, start=1):
        row = {"rank": rank, "value": hit.value, "item": hit.item, "position": hit.position}
        if hit.context is not None and tokenizer is not None:
            row["before"], row["token"], row["after"] = context_text(tokenizer, hit)
        rows.append(row)
    return rows
