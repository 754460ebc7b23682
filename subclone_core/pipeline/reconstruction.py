"""The refit on the child's own inputs ("sequential reconstruction", as GPTQ and SparseGPT feed each layer):
each narrowed linear layer of the child is fit so that, on the child's inputs, it reproduces the parent layer's
outputs on the parent's inputs; the layers are fit in the order they run, so each one also corrects the error of
everything before it in the child.

Two streams of hidden states go block by block side by side: the parent's (pipeline.passes' pass over the
parent) and the child's (the same pass over a child built on the meta device from its config, whose tensors are
the slices made so far). In a kept block, the layers whose inputs shrink are grouped by the tensor they read (q, k
and v; gate and up), and each group in turn gets, per batch, the parent's input X (tokens x in) and the child's
input Y (tokens x k) of its first layer, summed as X^T Y and Y^T Y in float64; its layers are then refit
(core.slicing.refit_input with these moments) and loaded into the child's block before the next group runs.
pipeline.refitting's "parent" inputs are the special case Y = X[:, k]. Where every batch fits one forward of the
child's block (MERGED_BYTES), the child runs them as one batch and each group is fit by a pre-hook just before its
first layer runs, so the child's block runs once per block; else it runs again up to each group, batch by batch.

The parent's side does not depend on the child: for many children of one parent refit on the same batches (the
explorer's shapes), a ParentRecord keeps what the first child's pass ran through the parent, and every further
child reads it instead of running the parent's blocks again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import optional_submodule
from subclone_core.core.slicing import SharedMoments, TensorSlicer
from subclone_core.io.activations import ActivationStore
from subclone_core.pipeline.passes import (
    Pass,
    StopForward,
    block_inputs,
    forward_block,
    head_on,
    loaded_block,
    model_inputs,
    module_tensor,
    open_pass,
    token_rows,
)

Moments = tuple[Tensor, Tensor]
# the child runs every calibration batch at once (one batch of them all) where its block's temporaries over them
# stay within this and within the budget of its stored hidden states: about positions x 4 x the parent's widest layer
# x 4 bytes (4,096 positions of SmolLM2-135M: 0.1 GB; of a 1.5B Qwen2.5: 0.6 GB)
MERGED_BYTES = 2**30
# what a fit block's refit weights carry in place of their moments: the slicer already holds the solved weight
SOLVED = object()


def _capture(root: nn.Module, path: str, run: Callable[[], object]) -> Tensor:
    """The input of the module at ``path`` under ``root`` when ``run`` runs; the forward stops there."""
    seen: list[Tensor] = []

    def hook(module, args):
        seen.append(args[0])
        raise StopForward

    handle = root.get_submodule(path).register_forward_pre_hook(hook)
    try:
        with contextlib.suppress(StopForward):
            run()
    finally:
        handle.remove()
    return seen[0]


def _run_block(p: Pass, i: int, block: nn.Module, b: int) -> Callable[[], object]:
    """Block i on batch b of the pass's stream, its output dropped."""
    def run() -> object:
        args, kwargs = block_inputs(p, i, b, p.store[(0, b)])
        return block(*args, **kwargs)
    return run


def _parent_inputs(p: Pass, i: int, block: nn.Module, paths: list[str]) -> Callable[[int, int], Tensor]:
    """``(s, b) ->`` the input of layer ``paths[s - 1]`` of parent block i on batch b.

    The parent's inputs do not depend on the child, so for a parent in memory block i runs once per batch: each
    layer's input is kept in the pass's store as stream s (within its budget, as the hidden states are) and the
    parent's stream moves past the block here (running the block up to each stage's layer again took 60% more
    block forwards). For a parent read from its files memory comes first: the block runs up to the layer again
    for each stage, and the caller moves the stream on."""
    if p.reads_files:
        return lambda s, b: _capture(block, paths[s - 1], _run_block(p, i, block, b))
    for b in range(len(p.batches)):
        seen = _forward_seeing(p, i, block, b, paths)
        for s, path in enumerate(paths, start=1):
            p.store[(s, b)] = seen[path].to("cpu")
    return lambda s, b: p.store[(s, b)].to(p.device)


def _forward_seeing(p: Pass, i: int, block: nn.Module, b: int, paths: list[str]) -> dict[str, Tensor]:
    """Batch b of the pass's stream through block i (the stream moved past it), with the input each layer at
    ``paths`` read (held until the block ends: no later input can reuse their memory, so equal data_ptr means one
    tensor)."""
    seen: dict[str, Tensor] = {}
    handles = [block.get_submodule(path).register_forward_pre_hook(
        lambda module, args, path=path: seen.setdefault(path, args[0])) for path in paths]
    try:
        forward_block(p, i, block, b, 0)
    finally:
        for handle in handles:
            handle.remove()
    return seen


class ParentRecord:
    """The parent's side of the refit on the child's inputs, kept for further children of the same parent refit on
    the same batches: for every block (kept by the first child or not), each distinct input of its linear layers
    (q, k and v read one tensor; gate and up another) per batch, and the stream after the last block. A child
    refit from a complete record runs only its own stream, which is the same child as from a pass of its own
    (the parent's blocks would compute the same tensors again). For a parent in memory only (a parent read from
    its files runs a block up to each layer instead: memory first). Memory: every block's distinct layer inputs
    over the batches, in the blocks' dtype (pipeline.refitting.record_bytes); the caller decides whether that fits."""

    def __init__(self) -> None:
        self.store = ActivationStore()  # in memory: the caller checked record_bytes
        self.streams: dict[tuple[int, str], int] = {}  # (block, layer path) -> its input's stream in the store
        self.complete = False

    def record_block(self, p: Pass, i: int, block: nn.Module) -> None:
        """Parent block i on every batch, its stream moved past the block, each distinct layer input kept."""
        paths = [path for path in arch_of_model(p.model).linear_modules[1]
                 if optional_submodule(block, path) is not None]
        for b in range(len(p.batches)):
            seen = _forward_seeing(p, i, block, b, paths)
            owners: dict[int, str] = {}
            for path in paths:
                owner = owners.setdefault(seen[path].data_ptr(), path)
                stream = self.streams.setdefault((i, owner), 1 + len(set(self.streams.values())))
                self.streams[(i, path)] = stream
                if owner == path:
                    self.store[(stream, b)] = seen[path].to("cpu")

    def inputs(self, p: Pass, i: int, paths: list[str]) -> Callable[[int, int], Tensor]:
        """``(s, b) ->`` the recorded input of layer ``paths[s - 1]`` of parent block i on batch b."""
        return lambda s, b: self.store[(self.streams[(i, paths[s - 1])], b)].to(p.device)

    def end(self, p: Pass) -> None:
        """After the last block: record the parent's stream (the first child) or hand it back (further ones)."""
        for b in range(len(p.batches)):
            if self.complete:
                p.store[(0, b)] = self.store[(0, b)]
            else:
                self.store[(0, b)] = p.store[(0, b)]
        self.complete = True


def _moments(p: Pass, pairs: Iterable[tuple[Tensor, Tensor]]) -> Moments:
    """(X^T Y, Y^T Y) / tokens over every batch, from each batch's (parent input X, child input Y), in batch
    order."""
    cross = inner = None
    for b, pair in enumerate(pairs):
        x, y = (token_rows(t, p.masks[b]) for t in pair)
        xy, yy = x.T @ y, y.T @ y  # summed in place: a float64 copy of each product would double the peak
        if cross is None:
            cross, inner = xy.double(), yy.double()
        else:
            cross.add_(xy)
            inner.add_(yy)
    return cross.div_(max(p.tokens, 1)), inner.div_(max(p.tokens, 1))


def _stages(c: Pass, j: int, block: nn.Module, paths: list[str]) -> list[list[str]]:
    """The narrowed layers of child block j grouped by the tensor they read, in the order they run."""
    order: list[tuple[str, Tensor]] = []  # the inputs are held, so no later one can reuse their memory
    handles = [block.get_submodule(path).register_forward_pre_hook(
        lambda m, args, path=path: order.append((path, args[0]))) for path in paths]
    try:
        _run_block(c, j, block, 0)()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for path, x in order:
        groups.setdefault(x.data_ptr(), []).append(path)
    return list(groups.values())


class Reconstruction:
    """The child's stream beside the parent's, and the child's tensors made so far (by child name)."""

    def __init__(self, p: Pass, slicer: TensorSlicer, child_config, store, record: ParentRecord | None) -> None:
        self.p, self.slicer, self.record = p, slicer, record
        self.blocks_path = arch_of_model(p.model).blocks
        self.tensors: dict[str, Tensor] = {}
        self.stages: dict[tuple, list[list[str]]] = {}  # (block class, narrowed layers) -> their groups
        for name in p.global_names:  # sliced (the head is refit at the end)
            self._put(name, module_tensor(p.model, name), None)
        shapes = [p.store[(0, b)].shape for b in range(len(p.batches))]  # each batch's stream, read once
        self.sizes = [shape[0] for shape in shapes]  # sequences (or images) per batch
        limit = MERGED_BYTES if store.budget is None else min(MERGED_BYTES, store.budget)  # the hidden states' too
        positions = sum(shape[:-1].numel() for shape in shapes)
        merged = _merged(p, positions, limit) if len(p.batches) > 1 else None
        self.c = open_pass(self.tensors, [merged] if merged else p.batches, store, config=child_config,
                           model_class=type(p.model), device=p.device,
                           dtype=next(iter(self.tensors.values())).dtype, max_tokens=None, block_dtype=p.block_dtype)
        self.inline = len(self.c.batches) == 1  # one forward of the child's block sees every token

    def _put(self, name: str, tensor: Tensor, moments: Moments | None) -> str:
        child_name, child = self.slicer(name, tensor, moments, keep=True)  # slice_items takes it, not a 2nd solve
        self.tensors[child_name] = child
        return child_name

    def fit_block(self, i: int, block: nn.Module) -> dict[str, object]:
        """Child block j = the kept parent block i, its narrowed layers fit group by group on the child's
        inputs; then both streams move past the block. Returns SOLVED for each refit weight's name."""
        p, c, j = self.p, self.c, self.slicer.child_of[i]
        for name in p.block_names[i]:
            self._put(name, module_tensor(p.model, name), None)
        c.loader.load(c.block_names[j])
        child = c.blocks[j]
        paths = [path for path in arch_of_model(p.model).linear_modules[1] if self.slicer.kept_inputs(
            f"{self.blocks_path}.{i}.{path}.weight", block.get_submodule(path).weight) is not None]
        fitted: dict[str, object] = {}
        stages = self._stages_of(j, child, paths)
        parent_input = self._parent_inputs(i, block, [stage[0] for stage in stages])

        def fit(s: int, child_inputs: Iterable[Tensor]) -> None:
            """Stage s's layers refit on the child's inputs, batch by batch, and loaded into the child's block."""
            moments = _moments(p, zip((parent_input(s, b) for b in range(len(p.batches))), child_inputs))
            if len(stages[s - 1]) > 1:  # q, k and v (or gate and up): one Cholesky factor for them all
                moments = SharedMoments(*moments)
            p.store.discard_stream(s)
            for path in stages[s - 1]:
                name = f"{self.blocks_path}.{i}.{path}.weight"
                fitted[name] = SOLVED  # the slicer keeps the child's weight: the moments can go now
                c.loader.load([self._put(name, module_tensor(p.model, name), moments)])

        if self.inline:
            self._fit_inline(j, child, stages, fit)
        else:
            for s, stage in enumerate(stages, start=1):
                fit(s, (_capture(child, stage[0], _run_block(c, j, child, b)) for b in range(len(p.batches))))
            for b in range(len(p.batches)):
                forward_block(c, j, child, b, 0)
        if p.reads_files:
            for b in range(len(p.batches)):
                forward_block(p, i, block, b, 0)
        c.loader.free(c.block_names[j])
        for name in c.block_names[j]:
            self.tensors.pop(name)
        return fitted

    def _fit_inline(self, j: int, child: nn.Module, stages: list[list[str]],
                    fit: Callable[[int, Iterable[Tensor]], None]) -> None:
        """Child block j run once on every batch at once, each stage fit as its first layer is about to read its
        input (a pre-hook, which loads the stage's weights before they run): the stream moves past the block in
        the same forward. Where the batches run one by one, each stage needs the block run again up to it."""
        handles = [child.get_submodule(stage[0]).register_forward_pre_hook(
            lambda module, args, s=s: fit(s, args[0].split(self.sizes))) for s, stage in enumerate(stages, start=1)]
        try:
            forward_block(self.c, j, child, 0, 0)
        finally:
            for handle in handles:
                handle.remove()

    def _parent_inputs(self, i: int, block: nn.Module, paths: list[str]) -> Callable[[int, int], Tensor]:
        """_parent_inputs, or the record's (block i recorded first where the record is not complete yet)."""
        if self.record is None:
            return _parent_inputs(self.p, i, block, paths)
        if not self.record.complete:
            self.record.record_block(self.p, i, block)
        return self.record.inputs(self.p, i, paths)

    def parent_past(self, i: int, block: nn.Module) -> None:
        """The parent's stream past block i, which the child drops (recorded where a record is being made)."""
        if self.record is not None:
            self.record.record_block(self.p, i, block)
            return
        for b in range(len(self.p.batches)):
            forward_block(self.p, i, block, b, 0)

    def _stages_of(self, j: int, child: nn.Module, paths: list[str]) -> list[list[str]]:
        """_stages, found once per block class: every block of one class groups its layers alike."""
        key = (type(child), tuple(paths))
        if key not in self.stages:
            self.stages[key] = _stages(self.c, j, child, paths)
        return self.stages[key]

    def fit_head(self, paths: list[str]) -> dict[str, Moments]:
        """The head's moments: its input after each model's final norm, on the parent's and the child's stream
        (both streams' batches replayed side by side)."""
        return {f"{path}.weight": _moments(self.p, self._head_inputs(path)) for path in paths}

    def _head_inputs(self, path: str) -> Iterator[tuple[Tensor, Tensor]]:
        """Per batch, the head's input in the parent and in the child (split from the batches run at once), both
        streams replayed side by side: batches run one by one hold one batch's inputs at a time."""
        with head_on(self.p, 0) as parent_order, head_on(self.c, 0) as child_order:
            child = (y for b in child_order for y in _split(_head_input(self.c, path, b), self.sizes, self.inline))
            for b, y in zip(parent_order, child):
                yield _head_input(self.p, path, b), y


def _head_input(run: Pass, path: str, b: int) -> Tensor:
    """The input of the head at ``path`` on batch b of a pass whose stream has passed the last block."""
    return _capture(run.model, path, lambda: run.model(**model_inputs(run.batches[b]), **run.extra))


def _split(x: Tensor, sizes: list[int], merged: bool) -> tuple[Tensor, ...]:
    """A merged batch's tensor cut back into its batches (a batch run alone: as it is)."""
    return x.split(sizes) if merged else (x,)


def _merged(p: Pass, positions: int, limit: int) -> dict[str, Tensor] | None:
    """The pass's batches as one (every tensor concatenated along the batch axis), where they line up and the
    child's block over all of their ``positions`` stays within ``limit`` bytes; else None."""
    keys = set(p.batches[0])
    if any(set(batch) != keys for batch in p.batches) or any(
            batch[k].shape[1:] != p.batches[0][k].shape[1:] for batch in p.batches for k in keys):
        return None
    widest = max((max(m.weight.shape) for m in p.blocks[0].modules()
                  if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2), default=0)
    if positions * 4 * widest * 4 > limit:
        return None
    return {k: torch.cat([batch[k] for batch in p.batches]) for k in keys}


def reconstruct(p: Pass, slicer: TensorSlicer, child_config, store, record: ParentRecord | None = None,
                progress: Callable[[int, int], None] | None = None):
    """(parent name, parent tensor, moments or None) block by block, each kept block fit on the child's inputs;
    the parent's side recorded into ``record``, or read from it where it is complete (a parent in memory only);
    ``progress`` called with (blocks done, blocks + 1) after each block."""
    record = None if p.reads_files else record
    rec = Reconstruction(p, slicer, child_config, store, record)
    for i in range(len(p.blocks)):
        if i in slicer.child_of or record is None or not record.complete:  # else the record holds what follows
            with loaded_block(p, i) as block:
                if i not in slicer.child_of:
                    rec.parent_past(i, block)
                else:
                    fitted = rec.fit_block(i, block)
                    for name in p.block_names[i]:
                        yield name, module_tensor(p.model, name), fitted.get(name)
        if progress:
            progress(i + 1, len(p.blocks) + 1)
    if record is not None:
        record.end(p)
    heads = [path for path in arch_of_model(p.model).linear_modules[0]
             if (module := optional_submodule(p.model, path)) is not None and
             slicer.kept_inputs(f"{path}.weight", module.weight) is not None]
    fitted = rec.fit_head(heads)
    for name in p.global_names:
        yield name, module_tensor(p.model, name), fitted.get(name)
