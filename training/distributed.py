"""DistributedDataParallel plumbing: process group set-up from torchrun's environment, and a
sampler that shards, shuffles per epoch and can start mid-epoch (for exact --resume)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainingError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a single process.
    gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # Leave together: a rank that tears gloo down while rank 0 is still writing checkpoints
        # can abort in gloo's threads ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo, device) -> list[float]:
    """Sum a few floats over ranks (identity on a single process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_flag(flag: bool, info: DistInfo, device) -> bool:
    """Rank 0's decision for everyone (e.g. "stop now": all ranks must stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The global item order (num_items,) of an epoch, identical on every rank."""
    if not shuffle:
        return list(range(num_items))
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_items, generator=g).tolist()


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[list[int]]:
    """Global batches of item indices for an epoch (each batch_size long when drop_last)."""
    order = epoch_order(num_items, seed, epoch)
    if num_items < batch_size:  # tiny datasets: repeat items so one full batch exists
        order = (order * (batch_size // max(num_items, 1) + 1))[:batch_size]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch, starting at batch `start`.

    A global batch of B items is split into world_size contiguous slices of B / world_size, so the
    global batch (and hence the gradient, averaged by DDP) does not depend on how many ranks run."""

    def __init__(self, num_items: int, global_batch: int, seed: int, info: DistInfo):
        if global_batch % info.world_size:
            raise TrainingError(f"batch size {global_batch} is not divisible by the {info.world_size} processes")
        self.num_items, self.global_batch, self.seed, self.info = num_items, global_batch, seed, info
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start_batch)

    def batches_per_epoch(self) -> int:
        return len(epoch_batches(self.num_items, self.global_batch, self.seed, 0))

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start, 0)

    def __iter__(self):
        per_rank = self.global_batch // self.info.world_size
        lo = self.info.rank * per_rank
        for batch in epoch_batches(self.num_items, self.global_batch, self.seed, self.epoch)[self.start:]:
            yield batch[lo:lo + per_rank]
