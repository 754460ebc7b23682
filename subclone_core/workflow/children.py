"""The steps users run, end to end: measure importance on a parent, make a child, save it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from subclone_core.core.archs import arch_of_model
from subclone_core.core.calibration import (
    INPUT_STATS,
    RESIDUAL_COV,
    TAYLOR_STATS,
    Importance,
    Progress,
    input_device,
)
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.slicing import TensorSink
from subclone_core.core.strategies import (
    Child,
    OpenSink,
    RefitItems,
    needs_calibration,
    needs_input_stats,
    needs_residual_cov,
    needs_taylor,
    refit_table,
    subclone_model,
)
from subclone_core.io.atomic import building
from subclone_core.io.devices import cpu_multiplies_bfloat16
from subclone_core.io.model_card import model_card
from subclone_core.io.placement import parse_dtype
from subclone_core.io.saving import (
    DEFAULT_SHARD_SIZE,
    StreamedWeights,
    check_output_dir,
    save_model_folder,
    write_model_files,
)
from subclone_core.io.streaming import PlacedTensors, checkpoint_tensors
from subclone_core.pipeline.calibration import calibrate, calibrate_sequential, taylor_scores
from subclone_core.pipeline.reconstruction import ParentRecord
from subclone_core.pipeline.refitting import SharedGrams, gram_bytes, record_bytes, refit_items
from subclone_core.sources import cache_dir, default_data_id, make_data
from subclone_core.sources.checks import first_nonfinite, refuse_nonfinite
from subclone_core.sources.parents import Parent
from subclone_core.training import interrupt

CALIB_SEQ_LEN = 128
CALIB_BATCH = 8
CALIB_TOKENS = 4096  # default calibration budget (token positions)
# what a search over many children of one parent may hold at once to refit them all from one pass over the parent:
# its Gram matrices (SharedGrams; SmolLM2-135M's and Gemma 3 270M's are about 1.05 GB in float64, a 0.5B parent's
# about 5 GB) or its recorded layer inputs (ParentRecord; SmolLM2-135M's on 1,024 tokens about 0.4 GB in float32)
SHARED_GRAMS_BYTES = 2 * 2**30
# how many children of one parent share the parent's pass over the refit's data (shared_refit_source)
REFIT_PASSES = ("shared", "recorded", "per shape")


def measure_importance(parent: Parent, data_id: str | None = None, *, tokens: int = CALIB_TOKENS,
                       batch_size: int = CALIB_BATCH, progress: Progress | None = None,
                       sequential: bool | None = None, activation_memory: int | None = None,
                       stats: dict | None = None, input_stats: bool = False,
                       residual_cov: bool = False, taylor: bool = False) -> Importance:
    """Calibrate the parent on the training split of a data set (None: the task's default), up to a
    budget of token positions (for a ViT, each patch and cls token of each image counts).

    Args:
        sequential: calibrate one block at a time from the parent's safetensors files, each weight read once
            (pipeline.calibration.calibrate_sequential); None does so only when the parent's memory budget did
            not hold it (part of it offloaded to disk: see needs_sequential), where accelerate's offload would read
            every offloaded weight once per batch.
        activation_memory: bytes of hidden states a sequential pass keeps in memory, the rest on disk under
            the cache (default: half of the RAM available; io.activations).
        stats: if given, a sequential pass fills it with what it read
            (pipeline.calibration.calibrate_sequential).
        input_stats: also record what the other methods score by (strategies.needs_input_stats).
        residual_cov: also record the residual stream's covariance, SliceGPT's basis (strategies.needs_residual_cov).
        taylor: also record LLM-Pruner's Taylor scores (strategies.needs_taylor): a backward pass over the same
            batches, the whole parent in memory (refused block by block).
    """
    data_id = data_id or default_data_id(parent.task)
    batches = calibration_batches(parent, data_id, tokens, batch_size)
    if sequential is None:
        sequential = needs_sequential(parent)
    if sequential and taylor:
        raise SubcloneError("llm-pruner's Taylor scores need the gradients of the whole parent, which a "
                            "block-by-block calibration does not hold: load the parent in memory (without "
                            "--sequential, with a --max-memory that holds it) or choose another strategy")
    if sequential:
        kwargs = sequential_kwargs(parent, activation_memory)  # refuses a parent with no folder on disk
        return calibrate_sequential(pass_source(parent) or parent.source, batches, max_tokens=tokens,
                                    progress=progress, data=data_id, stats=stats, input_stats=input_stats,
                                    residual_cov=residual_cov, **kwargs)
    importance = calibrate(parent.model, batches, max_tokens=tokens, progress=progress, data=data_id,
                           input_stats=input_stats, residual_cov=residual_cov)
    if taylor:
        importance.input_stats.update(taylor_scores(parent.model, calibration_batches(parent, data_id, tokens,
                                                                                      batch_size),
                                                    max_tokens=tokens, progress=progress))
    return importance


def recorded_statistics(strategies: Iterable[str]) -> dict[str, bool]:
    """measure_importance's switches for the optional statistics these strategies read (none for the paper's
    method: they cost calibration time that nothing else uses)."""
    names = list(strategies)
    return {"input_stats": any(needs_input_stats(s) for s in names),
            "residual_cov": any(needs_residual_cov(s) for s in names),
            "taylor": any(needs_taylor(s) for s in names)}


def has_statistics(importance: Importance, strategies: Iterable[str]) -> bool:
    """Whether a calibration recorded every optional statistic these strategies read (one measured for the
    paper's method alone has neither the other published methods' input statistics nor SliceGPT's covariance)."""
    recorded = {"input_stats": all(name in importance.input_stats for name in INPUT_STATS),
                "residual_cov": RESIDUAL_COV in importance.input_stats,
                "taylor": all(name in importance.input_stats for name in TAYLOR_STATS)}
    return all(recorded[name] for name, wanted in recorded_statistics(strategies).items() if wanted)


def calibration_batches(parent: Parent, data_id: str, tokens: int, batch_size: int = CALIB_BATCH) -> Iterable:
    """The calibration batches of the training split (the same ones every time: the refit reads the very
    batches the selection was measured on)."""
    # an image yields at least one patch plus the cls token: never more images than tokens / 2
    data = make_data(parent, data_id, "train", seq_len=CALIB_SEQ_LEN, max_tokens=tokens,
                     max_images=max(1, tokens // 2))
    return data.batches(batch_size)


def needs_sequential(parent: Parent) -> bool:
    """Whether calibration goes block by block by default: only for a parent loaded with a memory budget
    (--max-memory) that did not hold it, so that accelerate offloaded part of it to disk, and whose safetensors
    files can be read by the model's own tensor names."""
    if parent.placement.max_memory is None or parent.source is None:
        return False
    if "disk" not in set((getattr(parent.model, "hf_device_map", None) or {}).values()):
        return False
    return checkpoint_tensors(parent.model, parent.source, renames=True) is not None


def sequential_kwargs(parent: Parent, activation_memory: int | None = None) -> dict:
    """The arguments a block-by-block pass over the parent's files takes (pipeline.passes): its config, class,
    device and dtype, and where its hidden states go (in memory up to ``activation_memory``, then under the
    cache, on the disk that already holds parents).

    Raises:
        SubcloneError: the parent has no folder on disk.
    """
    if parent.source is None:
        raise SubcloneError(f"parent {parent.id!r} has no folder on disk to read block by block; "
                            "run it in memory (without --sequential)")
    return pass_kwargs(parent, activation_memory)


def pass_kwargs(parent: Parent, activation_memory: int | None = None) -> dict:
    """A block-by-block pass's model (config, class), device, dtype and hidden-state budget for this parent."""
    return {"config": parent.model.config, "model_class": type(parent.model), "device": input_device(parent.model),
            "dtype": parent.dtype, "activation_memory": activation_memory,
            "activation_root": cache_dir() / "activations"}


def make_child(
    parent: Parent,
    target: Shape,
    *,
    strategy: str = "subclone",
    drop: str | list[int] | None = None,
    scale: bool | None = None,
    untie_head: bool = False,
    importance: Importance | None = None,
    data_id: str | None = None,
    calib_tokens: int = CALIB_TOKENS,
    seed: int = 0, progress: Progress | None = None,
    residual_score: str | None = None,
    refit: bool | None = None, refit_dtype: str | torch.dtype | None = None,
    sequential: bool | None = None,
    activation_memory: int | None = None,
    stats: dict | None = None,
    open_sink: OpenSink | None = None) -> Child:
    """Make a child of a loaded parent, calibrating first when the strategy needs importance.

    Args:
        parent: from sources.parents.load_parent; never modified.
        target: the child's shape (see strategies.plan_shape).
        strategy, drop, scale, untie_head, seed, residual_score, refit: as in strategies.subclone_model.
        refit_dtype: the dtype the refit pass runs the blocks in (refit_dtype_for; None: its rule).
        importance, data_id, calib_tokens, progress: an earlier calibration to reuse (else one is measured), its
            data, budget and progress callback.
        sequential, activation_memory: calibrate block by block from the parent's files (measure_importance);
            the stored hidden states of the refit's pass keep to the same budget.
        stats: if given, filled with what each block-by-block pass read from the parent's files: "calibration"
            (a sequential calibration) and "refit" (the refit's pass), each {"bytes_read", "tensors_read",
            "activation_bytes_on_disk"}; a pass over the parent in memory reads no file.
        open_sink: where a sliced child's tensors go as made (subclone_model; make_child_into_folder's disk).
    """
    if importance is None and needs_calibration(strategy, drop):
        importance = measure_importance(parent, data_id, tokens=calib_tokens, progress=progress, sequential=sequential,
                                        activation_memory=activation_memory, stats=_part(stats, "calibration"),
                                        **recorded_statistics([strategy]))
    items = refit_source(parent, data_id or default_data_id(parent.task), calib_tokens, progress=progress,
                         activation_memory=activation_memory, stats=_part(stats, "refit"), block_dtype=refit_dtype)
    child = subclone_model(parent.model, target, strategy=strategy, importance=importance, drop=drop,
                           scale=scale, untie_head=untie_head, seed=seed, parent_tensors=parent_tensors(parent),
                           residual_score=residual_score, refit=refit, refit_items=items, open_sink=open_sink)
    if not on_meta(child.model):
        child.model.to(home_device(parent.model))
    child.manifest.parent = replace(child.manifest.parent, id=parent.id, label=parent.label,
                                    model_type=parent.model.config.model_type, weights_sha256=parent.weights_sha256(),
                                    licence=asdict(parent.licence) if parent.licence else None)
    child.preprocessor = parent.preprocessor
    return child


def _part(stats: dict | None, name: str) -> dict | None:
    """The entry of one pass in a stats dict (created empty), or None when no stats were asked for."""
    return None if stats is None else stats.setdefault(name, {})


def refit_source(parent: Parent, data_id: str, tokens: int, *, progress: Progress | None = None,
                 activation_memory: int | None = None, stats: dict | None = None,
                 block_dtype: str | torch.dtype | None = None, record: ParentRecord | None = None
                 ) -> RefitItems | None:
    """The refit's reads bound to this parent and its calibration batches (pipeline.refitting.refit_items):
    the parent's blocks one at a time, from memory, or from its files where it is offloaded; None where an
    offloaded parent's files cannot be read under the model's names (the plan refuses to build such a child).
    The blocks run in refit_dtype_for(parent, block_dtype); ``record``: as for refit_items."""
    source = pass_source(parent)
    if source is None:
        return None
    kwargs = {**pass_kwargs(parent, activation_memory), "block_dtype": refit_dtype_for(parent, block_dtype),
              "stats": stats, "record": record}

    def items(slicer, child_config):
        return refit_items(source, calibration_batches(parent, data_id, tokens), slicer, child_config=child_config,
                           max_tokens=tokens, progress=progress, **kwargs)
    return items


def shared_refit_source(parent: Parent, data_id: str, tokens: int, *, strategy: str = "subclone",
                        activation_memory: int | None = None,
                        block_dtype: str | torch.dtype | None = None) -> tuple[RefitItems | None, str]:
    """(refit source, how its children share the parent's pass: one of REFIT_PASSES) for many children of one
    parent (the explorer's shapes), each the same child as from a pass of its own: "shared", one pass whose Gram
    matrices every child's refit reads (pipeline.refitting.SharedGrams), each child then costing its solves only;
    "recorded", a refit on each child's own inputs whose parent side the first child's pass records
    (pipeline.reconstruction.ParentRecord), each further child running only its own stream; else "per shape",
    refit_source, one whole pass per child."""
    kind = refit_pass(parent, tokens, strategy, block_dtype)
    record = ParentRecord() if kind == "recorded" else None
    items = refit_source(parent, data_id, tokens, activation_memory=activation_memory, block_dtype=block_dtype,
                         record=record)
    if items is None:
        return None, "per shape"
    return (SharedGrams(items, check=interrupt.check) if kind == "shared" else items), kind


def refit_pass(parent: Parent, tokens: int, strategy: str = "subclone",
               block_dtype: str | torch.dtype | None = None) -> str:
    """How shared_refit_source's children of this parent share its pass (REFIT_PASSES): for a parent in memory,
    "shared" where the strategy refits on the parent's inputs and its Gram matrices fit SHARED_GRAMS_BYTES,
    "recorded" where it refits on the child's inputs and the parent's layer inputs over ``tokens`` fit it; else
    "per shape"."""
    inputs = refit_table(arch_of_model(parent.model), strategy).refit_inputs
    if not in_memory(parent):
        return "per shape"
    if inputs == "parent":
        return "shared" if gram_bytes(parent.model) <= SHARED_GRAMS_BYTES else "per shape"
    dtype = max(refit_dtype_for(parent, block_dtype), parent.dtype, key=lambda t: t.itemsize)  # blocks', stream's
    held = record_bytes(parent.model, tokens, dtype)
    return "recorded" if held <= SHARED_GRAMS_BYTES else "per shape"


def in_memory(parent: Parent) -> bool:
    """Whether every parent tensor is in memory (none offloaded to disk by accelerate)."""
    return not any(t.is_meta for t in parent.model.state_dict().values())


def refit_dtype_for(parent: Parent, asked: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype the refit pass runs the parent's (and the child's) blocks in: ``asked`` where given (a name of
    io.placement.DTYPES; "auto" or None: this rule). On a CPU that multiplies bfloat16 in hardware
    (io.devices.cpu_multiplies_bfloat16), bfloat16 for a float32 or bfloat16 parent: the embedded parents' children
    were made 1.2-1.8x faster, their step-0 losses within 0.035 nats either way (docs/BENCHMARKS.md, "The refit's
    dtype"). On other CPUs, float32 for a bfloat16 or float16 parent (bfloat16 is emulated there and ran 6x
    slower). Each block is cast while it runs; the stream between blocks, the embedding and the head keep the
    parent's dtype (and memory), and so does the child. On a GPU, and for float64, the parent's own dtype."""
    chosen = asked if isinstance(asked, torch.dtype) else parse_dtype(asked)
    if chosen is not None:
        return chosen
    if input_device(parent.model).type != "cpu" or parent.dtype == torch.float64:
        return parent.dtype
    if cpu_multiplies_bfloat16() and parent.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def pass_source(parent: Parent) -> Mapping[str, Tensor] | None:
    """The tensors a block-by-block pass reads: the parent's own in memory, and, where accelerate offloaded part
    of it to disk, those parts from its files (PlacedTensors); None where those files cannot be read under the
    model's names."""
    if in_memory(parent):
        return parent.model.state_dict()
    state = parent.model.state_dict()
    files = checkpoint_tensors(parent.model, parent.source, renames=True)
    if files is None:
        return None
    files.dtype = parent.dtype
    return PlacedTensors(state, files)


def parent_tensors(parent: Parent) -> Mapping[str, Tensor] | None:
    """The parent's tensors streamed from its safetensors files (the default's cache folder has them), or None
    for a model whose tensors only memory holds right (no files, or names transformers converted on loading).

    Raises:
        SubcloneError: the parent is partly offloaded (not in memory) and its files cannot be streamed.
    """
    tensors = checkpoint_tensors(parent.model, parent.source, renames=True)
    if tensors is None and any(p.is_meta for p in parent.model.parameters()):
        raise SubcloneError(f"parent {parent.id!r} is offloaded to disk but its checkpoint's tensor names differ "
                            "from the model's, so a child cannot be read from its files; load it without "
                            "--max-memory")
    return tensors


def home_device(model: nn.Module) -> torch.device:
    """Where a child of this parent goes: the parent's device when all of it is on one, else the CPU."""
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 and next(iter(devices)).type != "meta" else torch.device("cpu")


def on_meta(model: nn.Module) -> bool:
    """Whether a model's parameters are all on the meta device (a child whose weights went to disk)."""
    return all(p.is_meta for p in model.parameters())


def save_child(child: Child, out_dir: str | Path, *, task: str, overwrite: bool = False,
               max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Save a child as a plain Hugging Face folder with its tokenizer or image processor, card and manifest;
    weights larger than ``max_shard_size`` are written in shards with an index file."""
    return save_model_folder(child.model, out_dir, preprocessor=child.preprocessor, manifest=child.manifest,
                             model_card=model_card(child.manifest, task), overwrite=overwrite,
                             max_shard_size=max_shard_size)


def make_child_into_folder(make: Callable[..., Child], out_dir: str | Path, *, task: str, overwrite: bool = False,
                           max_shard_size: str | int = DEFAULT_SHARD_SIZE,
                           allow_nonfinite: bool = False) -> tuple[Child, Path]:
    """Make a child and save it as save_child does, its weights written to the folder's files as each tensor
    is made (io.saving.StreamedWeights), so that the child never exists whole in memory (a random-init child,
    built whole, is saved as it is).

    Args:
        make: make_child (or a function calling it) with every argument but open_sink bound.
        out_dir, task, overwrite, max_shard_size: as in save_child.
        allow_nonfinite: write a child tensor holding NaN or infinity (refused by default, by the tensor's name:
            the parent's weights where it was sliced from them; checked as each tensor is written, so an
            offloaded parent's files are not read once more for it).

    Returns:
        The child (its model on the meta device where its weights were streamed) and the output folder.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    with building(out) as tmp:
        writers: list[StreamedWeights] = []

        def open_sink(model: nn.Module) -> TensorSink:
            writers.append(StreamedWeights(tmp, model, max_shard_size))
            return writers[-1] if allow_nonfinite else partial(_write_finite, writers[-1])
        child = make(open_sink=open_sink)
        for writer in writers:
            writer.close()
        write_model_files(child.model, tmp, preprocessor=child.preprocessor, manifest=child.manifest,
                          model_card=model_card(child.manifest, task), max_shard_size=max_shard_size,
                          weights_written=bool(writers))
    return child, out


def _write_finite(writer: TensorSink, name: str, tensor: Tensor) -> None:
    """Write a child tensor, refusing one with NaN or infinite values."""
    refuse_nonfinite("the child", first_nonfinite([(name, tensor)]))
    writer(name, tensor)
