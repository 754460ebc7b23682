"""Analyses of a loaded model that are not model surgery: greedy generation, ranking consistency between
blocks, the loss with one block removed, and a lock for models that several callers share.

A parent model may be shared (the app caches one per server process for every browser session), so
anything here that attaches hooks or runs it goes through ``exclusive(model)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import scipy.stats
import torch
from torch import Tensor, nn

from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.pipeline.calibration import ablate_sequential
from subclone_core.sources import Parent, make_data
from subclone_core.tasks import task_of_model
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import needs_sequential, sequential_kwargs
from subclone_core.workflow.locks import exclusive

Progress = Callable[[int, int], None]
EVAL_SEQ_LEN, EVAL_BATCH = 128, 8
# validation tokens per removed block: on both embedded parents 128 rank the blocks as well as 256 (rank
# correlation with the losses on 2,048 tokens 0.915 against 0.917 on SmolLM2-135M, 0.946 against 0.957 on Gemma 3
# 270M; both find the reference's 3 most important blocks, and 3 (SmolLM2) and 4 (Gemma 3) of its 5 least
# important), in half the time (bench_app --only ablation, docs/BENCHMARKS.md)
ABLATION_TOKENS = 128

def first_batches(batches: Iterator[dict], n: int) -> list[dict]:
    """The first n batches as a list (reused for several evaluations)."""
    return list(islice(batches, n))


def validation_sample(parent: Parent, data_id: str | None, tokens: int) -> list[dict]:
    """Fixed validation batches of about ``tokens`` tokens (for images: tokens / 64 images, at least one
    batch) of a data set (None: the parent task's default), to compare models on."""
    images = max(EVAL_BATCH, tokens // 64)
    data = make_data(parent, data_id, "validation", seq_len=EVAL_SEQ_LEN, max_tokens=tokens, max_images=images)
    return first_batches(data.batches(EVAL_BATCH), max(1, -(-len(data) // EVAL_BATCH)))


# --- generation and evaluation ----------------------------------------------------------------------


class _TokenCounter:
    """A transformers streamer that only counts: ``put`` gets the prompt once, then each new token."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.calls = progress, total, -1

    def put(self, value: Tensor) -> None:
        self.calls += 1
        if self.calls:
            self.progress(self.calls, self.total)

    def end(self) -> None:
        pass


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 30,
                  progress: Progress | None = None) -> str:
    """Greedy continuation of a prompt (the new text only, with its leading space if it has one);
    ``progress(tokens, total)`` after each token.

    Raises:
        SubcloneError: an empty prompt, or one longer than the model's context.
    """
    encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"]
    if ids.shape[1] == 0:
        raise SubcloneError("the prompt is empty (or has no known tokens); type a few words")
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    new = max_new_tokens if context is None else min(max_new_tokens, context - ids.shape[1])
    if new < 1:
        raise SubcloneError(f"the prompt has {ids.shape[1]} tokens, as many as the model's context "
                            f"({context}); shorten it")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with exclusive(model), torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=encoded["attention_mask"].to(device),
                             max_new_tokens=new, do_sample=False, pad_token_id=pad,
                             streamer=_TokenCounter(progress, new) if progress else None)
    # the new text is the full decode minus the prompt's: decoding the new tokens alone loses or invents
    # the space between the prompt and them ("city 's")
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    head = tokenizer.decode(out[0, :ids.shape[1]], skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_shared(model: nn.Module, batches: Iterable[dict], max_batches: int | None = None) -> dict:
    """``evaluate`` under the model's lock (for a shared parent)."""
    with exclusive(model):
        return evaluate(model, batches, max_batches=max_batches)


# --- ranking consistency ----------------------------------------------------------------------------


def rank_correlation(scores: Tensor) -> Tensor:
    """Spearman rank correlation between the rows of (L, D) scores: (L, L) float64, 1 on the diagonal.

    Tied scores share their average rank, so two rows correlate exactly as ``scipy.stats.spearmanr`` says
    (Pearson correlation of the ranks). A constant row has no order: 0 against every other row.
    """
    ranks = torch.from_numpy(scipy.stats.rankdata(scores.detach().double().cpu().numpy(), axis=1))  # (L, D)
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (ranks @ ranks.T).fill_diagonal_(1.0)


def topk_overlap(scores: Tensor, shared: Tensor, k: int) -> Tensor:
    """(L,) fraction of each row's top-k neurons that are also in the shared ranking's top-k."""
    k = max(1, min(k, shared.numel()))
    keep = torch.zeros(shared.numel(), dtype=torch.bool)
    keep[shared.argsort(descending=True, stable=True)[:k]] = True
    top = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # (L, k)
    return keep[top].double().mean(dim=1)


def off_diagonal_mean(matrix: Tensor) -> float:
    """Mean of the entries off the diagonal (the typical agreement between two different blocks)."""
    n = matrix.shape[0]
    if n < 2:
        return 1.0
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * n - n))


# --- blocks -----------------------------------------------------------------------------------------


def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Make a block the identity: return its input in place of its output."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


REPLAY_BYTES = 256 * 2**20  # the intact blocks' outputs are kept up to this size, else recomputed


class _Recorder:
    """Forward hooks that keep each block's outputs (in batch order) from the intact model's run, until
    they would take more than REPLAY_BYTES (then nothing is replayed)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.outputs: list[list[Any]] = [[] for _ in blocks]
        self.bytes, self.full = 0, False
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            first = output[0] if isinstance(output, tuple) else output
            self.bytes += first.numel() * first.element_size()
            self.full = self.full or self.bytes > REPLAY_BYTES
            if not self.full:
                self.outputs[index].append(output)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.full:
            self.outputs = [[] for _ in self.outputs]


@contextlib.contextmanager
def _replaying(blocks: Sequence[nn.Module], outputs: list[list[Any]]) -> Iterator[None]:
    """Blocks before the removed one see exactly the intact model's inputs, so their recorded outputs are
    returned in batch order instead of being recomputed (about half the blocks' work per evaluation)."""
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate may have wrapped forward
    for block, recorded in zip(blocks, outputs):
        replay = iter(recorded)
        block.forward = lambda *args, _replay=replay, **kwargs: next(_replay)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def block_ablation(model: nn.Module, batches: Sequence[dict], *, progress: Progress | None = None,
                   on_block: Callable[[int, dict], None] | None = None) -> dict:
    """The loss with each single block removed (the paper's Fig. 2, bottom), without changing the model.

    Each block in turn is bypassed by a forward hook that returns its input; the hook is removed at once.
    The blocks before it replay their outputs from the intact run (while those fit in REPLAY_BYTES).
    ``on_block(i, metrics)`` receives each block's result as soon as it is known (-1: the intact model).

    Returns:
        {"base": the intact model's loss, "losses": [loss without block i for each block]}, and for image
        classifiers also "base_accuracy" and "accuracies" (the same, as top-1 accuracy).
    """
    blocks = model.get_submodule(arch_for(model.config.model_type).blocks)
    total = len(blocks) + 1
    with exclusive(model):
        recorder = _Recorder(blocks)
        try:
            base = evaluate(model, batches)
        finally:
            recorder.remove()
        if on_block:
            on_block(-1, base)
        if progress:
            progress(1, total)
        removed = []
        for i, block in enumerate(blocks):
            replayed = i if all(recorder.outputs[:i]) else 0
            handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
            try:
                with _replaying(blocks[:replayed], recorder.outputs[:replayed]):
                    removed.append(evaluate(model, batches))
            finally:
                handle.remove()
            if on_block:
                on_block(i, removed[-1])
            if progress:
                progress(i + 2, total)
    return task_of_model(model).ablation_summary(base, removed)


def ablate_parent(parent: Parent, data_id: str | None, tokens: int, *, sequential: bool | None = None,
                  activation_memory: int | None = None, progress: Progress | None = None,
                  on_block: Callable[[int, dict], None] | None = None) -> dict:
    """block_ablation of a parent on about ``tokens`` validation tokens of a data set (None: its task's default).

    Args:
        sequential: run it block by block from the parent's safetensors files, each weight read once
            (pipeline.calibration.ablate_sequential); None does so when calibration would (needs_sequential: a
            memory budget that did not hold the parent), where offload would read the parent once per batch and
            block.
        activation_memory: as for measure_importance; the stored hidden states are blocks + 1 times
            calibration's on the same tokens.
        progress, on_block: as for block_ablation.
    """
    batches = validation_sample(parent, data_id, tokens)
    if sequential is None:
        sequential = needs_sequential(parent)
    if sequential:
        return ablate_sequential(parent.source, batches, progress=progress, on_block=on_block,
                                 **sequential_kwargs(parent, activation_memory))
    return block_ablation(parent.model, batches, progress=progress, on_block=on_block)
