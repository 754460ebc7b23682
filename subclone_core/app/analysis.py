"""Computations the app shows that are not model surgery: text generation, ranking consistency,
single-block removal, shape suggestions, parameter counts, live training summaries, memory checks.

Pure functions over library objects; no Streamlit. A parent model is shared by every browser session
of a server, so anything that attaches hooks or runs it goes through ``exclusive(model)``.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from subclone_core.archs import arch_for
from subclone_core.errors import SubcloneError
from subclone_core.evaluate import evaluate
from subclone_core.metrics_log import curves
from subclone_core.selection import Selection
from subclone_core.shape import ROLES, Shape, validate_target
from subclone_core.slicing import child_config_dict
from subclone_core.speedup import HIGHER_IS_BETTER, speedup

Progress = Callable[[int, int], None]
SIZE_ROLES = tuple(r for r in ROLES if r != "head_dim")  # what a user may choose

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the model's own lock: hooks one session attaches must never see another session's forward."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.RLock())
    with lock:
        yield model


# --- generation ----------------------------------------------------------------------------------------


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy continuation of a prompt (the new text only).

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
                             max_new_tokens=new, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_shared(model: nn.Module, batches: Sequence[dict], max_batches: int | None = None) -> dict:
    """``evaluate`` under the model's lock (for the shared parent)."""
    with exclusive(model):
        return evaluate(model, batches, max_batches=max_batches)


# --- importance ---------------------------------------------------------------------------------------


def rank_correlation(scores: Tensor) -> Tensor:
    """Spearman rank correlation between the rows of (L, D) scores: (L, L), 1 on the diagonal."""
    ranks = scores.double().argsort(dim=1).argsort(dim=1).double()  # (L, D) rank of each neuron per row
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ranks @ ranks.T


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


# --- blocks -------------------------------------------------------------------------------------------


def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Make a block the identity: return its input in place of its output."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


def block_ablation(model: nn.Module, batches: Sequence[dict], *, progress: Progress | None = None) -> dict:
    """The loss with each single block removed (the paper's Fig. 2, bottom), without changing the model.

    Each block in turn is bypassed by a forward hook that returns its input; the hook is removed at once.

    Returns:
        {"base": the intact model's loss, "losses": [loss without block i for each block]}, and for image
        classifiers also "base_accuracy" and "accuracies" (the same, as top-1 accuracy).
    """
    blocks = model.get_submodule(arch_for(model.config.model_type).blocks)
    total = len(blocks) + 1
    with exclusive(model):
        base = evaluate(model, batches)
        if progress:
            progress(1, total)
        removed = []
        for i, block in enumerate(blocks):
            handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
            try:
                removed.append(evaluate(model, batches))
            finally:
                handle.remove()
            if progress:
                progress(i + 2, total)
    out = {"base": base["loss"], "losses": [r["loss"] for r in removed]}
    if "accuracy" in base:
        out.update(base_accuracy=base["accuracy"], accuracies=[r["accuracy"] for r in removed])
    return out


# --- shapes -------------------------------------------------------------------------------------------


def parameter_count(parent_model: nn.Module, shape: Shape) -> int:
    """Parameters of a child of this shape (built on the meta device: no memory, no time)."""
    arch = arch_for(parent_model.config.model_type)
    dummy = Selection(residual=[], blocks=list(range(shape.layers)), heads=[], kv_heads=[], ffn=[])
    config = type(parent_model.config).from_dict(child_config_dict(parent_model.config, arch, shape, dummy,
                                                                   tie_head=True))
    with torch.device("meta"):
        model = type(parent_model)(config)
    return sum(p.numel() for p in model.parameters())


def nearest_valid_shape(parent_model: nn.Module, sizes: dict[str, int]) -> Shape:
    """The valid child shape closest to the requested sizes (distance: sum of |log ratio| per size)."""
    parent = Shape.of(parent_model.config)
    arch = arch_for(parent_model.config.model_type)
    want = {role: max(1, int(sizes.get(role) or getattr(parent, role))) for role in SIZE_ROLES}
    ties_hidden = "head_dim" not in arch.config_keys
    best, best_cost = parent, math.inf
    for heads in range(1, parent.heads + 1):
        for kv in range(1, parent.kv_heads + 1):
            hidden = (heads * parent.head_dim if ties_hidden
                      else _round_to(min(want["hidden"], parent.hidden), heads))
            shape = Shape(layers=min(want["layers"], parent.layers), hidden=hidden, heads=heads, kv_heads=kv,
                          ffn=min(want["ffn"], parent.ffn), head_dim=parent.head_dim)
            try:
                validate_target(parent, shape, arch)
            except SubcloneError:
                continue
            cost = sum(abs(math.log(getattr(shape, r) / want[r])) for r in SIZE_ROLES)
            if cost < best_cost:
                best, best_cost = shape, cost
    return best


def suggested_layers(parent_layers: int) -> int:
    """A first guess at the child's depth: a fifth of the parent's, at least 2 (first and last kept)."""
    return min(parent_layers, max(2, parent_layers // 5))


def suggested_shape(parent_model: nn.Module, layers: int | None = None) -> Shape:
    """A first guess at a child: a fifth of the blocks (or ``layers``), about a third of every width."""
    parent = Shape.of(parent_model.config)
    start = {role: max(1, getattr(parent, role) // 3) for role in SIZE_ROLES}
    start["layers"] = layers or suggested_layers(parent.layers)
    return nearest_valid_shape(parent_model, start)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


# --- training -----------------------------------------------------------------------------------------


def live_summary(events: list[dict], baseline: str = "random") -> list[dict]:
    """One row per candidate from a run's events so far: step, losses, throughput, speedup so far."""
    metric = "accuracy" if any("accuracy" in e for e in events if e.get("event") == "eval") else "loss"
    evals = curves(events, kind="eval", key=metric)
    last_step: dict[str, dict] = {}
    for event in events:
        if event.get("event") == "step":
            last_step[event["candidate"]] = event
    rows = []
    for name in dict.fromkeys([*evals, *last_step]):
        step, curve = last_step.get(name, {}), evals.get(name, [])
        row = {"model": name, "step": step.get("step", 0), "train loss": step.get("loss"),
               f"val {metric}": curve[-1][1] if curve else None,
               step.get("unit", "tokens/s"): step.get("throughput")}
        if name == baseline:
            row["speedup vs random"] = "baseline"
        elif baseline in evals and curve:
            row["speedup vs random"] = speedup(evals[baseline], curve,
                                               higher_is_better=HIGHER_IS_BETTER[metric]).text()
        rows.append(row)
    return rows


def run_progress(events: list[dict]) -> tuple[int, int]:
    """(last step reported by any candidate, the run's total steps; 0 before the run has started)."""
    total = next((e["config"]["steps"] for e in events if e.get("event") == "start"), 0)
    done = max((e["step"] for e in events if e.get("event") == "step"), default=0)
    return done, total


def metrics_rows(events: list[dict]) -> list[dict]:
    """Step and evaluation events as flat rows (a table and its CSV)."""
    keys = ("event", "candidate", "step", "time", "loss", "perplexity", "accuracy", "lr", "grad_norm",
            "throughput", "seen")
    return [{k: e.get(k) for k in keys} for e in events if e.get("event") in ("step", "eval")]


def training_bytes(models: Sequence[nn.Module], batch_size: int, seq_len: int) -> int:
    """A rough upper estimate of the memory a run needs: fp32 weights, gradients and AdamW state of every
    model (all stay alive), plus one model's activations and logits at a time (they train in turn)."""
    params = sum(p.numel() for m in models for p in m.parameters())
    widest = max(models, key=lambda m: sum(p.numel() for p in m.parameters()))
    shape = Shape.of(widest.config)
    width = getattr(widest.config, "vocab_size", None) or getattr(widest.config, "num_labels", 1)
    activations = batch_size * seq_len * (shape.layers * (12 * shape.hidden + 2 * shape.ffn) + 4 * width)
    return 16 * params + 4 * activations


def available_bytes(device: torch.device | str | None = None) -> int:
    """Free memory where training would run: the GPU's, or the machine's available RAM."""
    if torch.device(device or "cpu").type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    import psutil  # an accelerate dependency

    return int(psutil.virtual_memory().available)


def check_memory(need: int, free: int, headroom: float = 0.8) -> None:
    """Refuse a run that would not fit in ``headroom`` of the free memory.

    Raises:
        SubcloneError: with both numbers and what to lower.
    """
    if need > headroom * free:
        raise SubcloneError(
            f"this run needs about {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free; lower the "
            "batch size or sequence length, train fewer models, or wait for other jobs to finish"
        )


# --- files --------------------------------------------------------------------------------------------


def zip_folder(folder: str | Path) -> bytes:
    """The files of a folder as a zip archive in memory, under a top-level folder of the same name."""
    folder = Path(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return buffer.getvalue()


def first_batches(batches: Iterator[dict], n: int) -> list[dict]:
    """The first n batches as a list (reused for several evaluations)."""
    return list(islice(batches, n))
