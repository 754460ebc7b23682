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
pipeline.refitting's "parent" inputs are the special case Y = X[:, k].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import optional_submodule
from subclone_core.core.slicing import TensorSlicer
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
        seen: dict[str, Tensor] = {}
        handles = [block.get_submodule(path).register_forward_pre_hook(
            lambda module, args, path=path, seen=seen: seen.setdefault(path, args[0])) for path in paths]
        try:
            forward_block(p, i, block, b, 0)
        finally:
            for handle in handles:
                handle.remove()
        for s, path in enumerate(paths, start=1):
            p.store[(s, b)] = seen[path].to("cpu")
    return lambda s, b: p.store[(s, b)].to(p.device)


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

    def __init__(self, p: Pass, slicer: TensorSlicer, child_config, store) -> None:
        self.p, self.slicer = p, slicer
        self.blocks_path = arch_of_model(p.model).blocks
        self.tensors: dict[str, Tensor] = {}
        self.stages: dict[tuple, list[list[str]]] = {}  # (block class, narrowed layers) -> their groups
        for name in p.global_names:  # sliced (the head is refit at the end)
            self._put(name, module_tensor(p.model, name), None)
        self.c = open_pass(self.tensors, p.batches, store, config=child_config, model_class=type(p.model),
                           device=p.device, dtype=next(iter(self.tensors.values())).dtype, max_tokens=None,
                           block_dtype=p.block_dtype)

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
        parent_input = _parent_inputs(p, i, block, [stage[0] for stage in stages])
        for s, stage in enumerate(stages, start=1):
            moments = _moments(p, ((parent_input(s, b), _capture(child, stage[0], _run_block(c, j, child, b)))
                                   for b in range(len(p.batches))))
            p.store.discard_stream(s)
            for path in stage:
                name = f"{self.blocks_path}.{i}.{path}.weight"
                fitted[name] = SOLVED  # the slicer keeps the child's weight: the moments can go now
                c.loader.load([self._put(name, module_tensor(p.model, name), moments)])
        for b in range(len(p.batches)):
            if p.reads_files:
                forward_block(p, i, block, b, 0)
            forward_block(c, j, child, b, 0)
        c.loader.free(c.block_names[j])
        for name in c.block_names[j]:
            self.tensors.pop(name)
        return fitted

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
        """Per batch, the head's input in the parent and in the child."""
        with head_on(self.p, 0) as parent_order, head_on(self.c, 0) as child_order:
            for b, _ in zip(parent_order, child_order):
                yield tuple(_capture(run.model, path, lambda r=run, b=b: r.model(**model_inputs(r.batches[b]), **r.extra))
                            for run in (self.p, self.c))


def reconstruct(p: Pass, slicer: TensorSlicer, child_config, store):
    """(parent name, parent tensor, moments or None) block by block, each kept block fit on the child's inputs."""
    rec = Reconstruction(p, slicer, child_config, store)
    for i in range(len(p.blocks)):
        with loaded_block(p, i) as block:
            if i not in slicer.child_of:
                for b in range(len(p.batches)):
                    forward_block(p, i, block, b, 0)
                continue
            fitted = rec.fit_block(i, block)
            for name in p.block_names[i]:
                yield name, module_tensor(p.model, name), fitted.get(name)
    heads = [path for path in arch_of_model(p.model).linear_modules[0]
             if (module := optional_submodule(p.model, path)) is not None and
             slicer.kept_inputs(f"{path}.weight", module.weight) is not None]
    fitted = rec.fit_head(heads)
    for name in p.global_names:
        yield name, module_tensor(p.model, name), fitted.get(name)
