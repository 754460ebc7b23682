"""How the engine spreads a candidate over the processes of a run: replicas (DDP) or shards (FSDP2).

Data parallelism keeps a full copy of the model, its gradients and its AdamW state in every process and
all-reduces the gradients (accelerate's DDP; a plain model in a single process). Sharding (``--fsdp``)
splits every block's parameters, gradients and optimizer state across the processes with torch's own
``fully_shard`` (FSDP2): a block's full weights exist only while it computes, so per-process memory for a
child's training state falls by the number of processes. FSDP2 runs the same code on CPU (gloo, which is
how CI tests it) and on GPUs (NCCL); accelerate's FSDP plugin calls the same ``fully_shard`` and is not
needed here.

A model built on the meta device (``training.materialize``) is placed or sharded before it has any storage;
each process then allocates and fills only what it holds (its shards under FSDP2) from the candidate's weight
source, so a sharded child never exists whole in one process, from loading to the final ``gather``.

Both give the engine one interface: ``wrap`` the model, ``no_sync`` during gradient accumulation, the
module to evaluate, ``idle_batches`` (the forwards a process runs without scoring so that every process
joins each collective of a sharded forward) and ``gather`` the trained model as a plain Hugging Face model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.io.devices import return_freed_memory
from subclone_core.training.materialize import WeightSource, is_meta, materialize, tie_on_meta

TORCHRUN_ENV = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"}  # what init_process_group reads


class DataParallel:
    """A full replica per process; gradients all-reduced by DDP (nothing to do in a single process)."""

    name = "ddp"

    def __init__(self, accelerator: Accelerator) -> None:
        self.acc = accelerator

    def wrap(self, model: nn.Module, weights: WeightSource | None = None) -> nn.Module:
        """The model on this process's device (a meta-built one filled whole from ``weights``), under DDP."""
        if is_meta(model):
            tie_on_meta(model)
            materialize(model, weights, self.acc.device)
        return self.acc.prepare_model(model)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.acc.no_sync(model)

    def inner(self, model: nn.Module) -> nn.Module:
        """The module that runs evaluation forwards (the DDP wrapper looked through)."""
        return self.acc.unwrap_model(model)

    def idle_batches(self, all_batches: list[dict], own: int) -> list[dict]:
        return []  # replicas share no collective in a forward

    def gather(self, model: nn.Module, plain_class: type) -> nn.Module | None:
        return self.acc.unwrap_model(model)


class Sharded:
    """FSDP2 over every process: one shard group per transformer block, then one for the rest (embeddings,
    final norm, head)."""

    name = "fsdp"

    def __init__(self, accelerator: Accelerator) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.acc = accelerator
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        if accelerator.device.type == "cpu":
            return_freed_memory()

    def wrap(self, model: nn.Module, weights: WeightSource | None = None) -> nn.Module:
        """The model sharded block by block, then at the root. A model built on the meta device is sharded
        there and each process then allocates and fills only its own shards from ``weights``; a model with
        weights (built whole in every process) is moved to the device and sharded."""
        from torch.distributed.fsdp import fully_shard

        meta = is_meta(model)
        if meta:
            tie_on_meta(model)  # before sharding: the shared embedding and head become one sharded parameter
        else:
            model.to(self.acc.device)
        for block in model.get_submodule(arch_for(model.config.model_type).blocks):
            fully_shard(block, mesh=self.mesh)
        model = fully_shard(model, mesh=self.mesh)
        if meta:
            materialize(model, weights, self.acc.device)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: Any) -> Iterator[None]:
        """Accumulate gradients locally; they are reduce-scattered on the last micro-batch of the step."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def inner(self, model: nn.Module) -> nn.Module:
        return model  # the sharded module itself gathers each block's weights in its forward

    def idle_batches(self, all_batches: list[dict], own: int) -> list[dict]:
        """Batches this process runs unscored so that it makes as many forwards as the busiest process."""
        busiest = -(-len(all_batches) // self.acc.num_processes)
        return all_batches[: busiest - own]

    def gather(self, model: nn.Module, plain_class: type) -> nn.Module | None:
        """The full model as a plain ``plain_class`` on the main process's CPU (None elsewhere).

        Every process must call this: the shards are all-gathered block by block into the main process.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if not self.acc.is_main_process:
            return None
        return plain_class.from_pretrained(None, config=model.config, state_dict=state, dtype=torch.float32)


PARALLEL = {"ddp": DataParallel, "fsdp": Sharded}


def check_launch(fsdp: bool) -> None:
    """Refuse sharding in a process that torchrun did not start (and that has no process group of its own):
    there is nothing to shard over, and no way to start the group."""
    if fsdp and not (dist.is_initialized() or TORCHRUN_ENV <= set(os.environ)):
        raise SubcloneError("--fsdp shards the child over the processes of torchrun: start the command with "
                            "`torchrun --nproc_per_node N subclone ...`, or leave out --fsdp")


def make_parallel(accelerator: Accelerator, fsdp: bool) -> DataParallel | Sharded:
    """The data-parallel or sharded strategy for this run."""
    check_launch(fsdp)
    return PARALLEL["fsdp" if fsdp else "ddp"](accelerator)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients to ``max_norm`` (total 2-norm) and return the norm before clipping.

    The same for replicas and shards: a sharded norm is a DTensor whose full value every process agrees on.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)
