"""Several processes, one model: the few torch.distributed pieces the trainer and explorer use.

    torchrun --nproc_per_node=8 train.py --stage sft ...     # 8 ranks, one per GPU
    torchrun --nproc_per_node=2 explore.py --split train ...  # tasks split over 2 ranks

torchrun starts N copies of the script and gives each the environment variables
RANK (0..N-1), LOCAL_RANK (GPU index on this machine), WORLD_SIZE (= N) and
MASTER_ADDR/MASTER_PORT (where the ranks meet). A plain `python train.py` has no
WORLD_SIZE: every helper here then answers for a single process (rank 0 of 1) and
no process group is created, so single-process runs are unchanged.

Data parallelism, as the trainer uses it: every rank builds the same global batch,
cuts it into the same micro-batches and takes micro-batches rank, rank+N, ...
Gradients are averaged over ranks: by one all-reduce per gradient after a global batch's
last micro-batch when every rank holds the whole model (`average_gradients`), or by
FSDP's reduce-scatter after every micro-batch (`fully_shard`: every rank holds 1/N of
each weight, gradient and AdamW state, and gathers a layer's weights just before using it).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from eto_ref.runtime import resolve_device

T = TypeVar("T")
# How long a rank waits at a collective before the job fails (torch's default for NCCL: 10 minutes).
# Ranks wait at barriers for the slowest share of an exploration, and for rank 0 writing a 7B model's
# checkpoint (27 GB) and AdamW state (54 GB).
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def launched_distributed() -> bool:
    """True when started by torchrun (or the same env vars) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK variable (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, metrics, logs and merged files."""
    return rank() == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); return this rank's device.

    On CUDA each rank uses GPU LOCAL_RANK (eto_ref/runtime.py resolve_device). Calling it again (or with
    one rank) changes nothing.
    """
    if device.type == "cuda" and launched_distributed():
        device = resolve_device(str(device))  # cuda:LOCAL_RANK
        torch.cuda.set_device(device)
    if launched_distributed() and not is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return device


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def from_main(compute: Callable[[], T]) -> T:
    """What rank 0 computes, on every rank: the others wait and receive it (a single process just computes it).
    For checks that read a whole checkpoint, which one rank reading is enough."""
    if not is_initialized():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of a list: items rank, rank+N, rank+2N, ... (disjoint, together all of them)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return items[rank_::world]


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over ranks (every rank must pass the same keys). Returns plain floats."""
    if not is_initialized():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)  # (K,)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_gather_dicts(d: dict) -> dict:
    """Merge a dict from every rank into one (each rank contributes different keys)."""
    if not is_initialized():
        return dict(d)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replicated training (every rank holds the whole model): average each gradient over the ranks.

    One all-reduce per gradient, all in flight at once, after the backward of the last
    micro-batch. (DistributedDataParallel would overlap them with the backward; it only
    syncs through a module's `forward`, and the trainer calls `scored_logprobs`.)
    """
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for work in works:
        work.wait()
    for p in params:
        p.grad /= world_size()


def wrap_fsdp(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Full sharding (FSDP2): one `fully_shard` unit per decoder layer, then the root (embeddings, norm, head).

    In place: the parameters become DTensors holding 1/N of each float32 weight on each
    rank; a layer's weights are all-gathered just before its forward/backward and freed
    after; gradients are reduce-scattered (averaged) after each backward, so no rank ever
    holds a whole model's gradients. With a compute dtype below float32 the weights are
    gathered and used in that dtype and the gradients reduced in float32 (where autocast
    would keep a compute-dtype copy of every weight for the whole forward). The root's
    gathering is hooked to `scored_logprobs`, the trainer's forward. Works with gloo on CPU.
    """
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "scored_logprobs")
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded DTensor (a collective: every rank calls it); others as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded DTensor; others as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Cut a whole tensor the way `param` is sharded (inverse of full_tensor); plain params: as is."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full
