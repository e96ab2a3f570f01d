"""Multi-process training helpers (torchrun / DDP): process-group set-up, seeded sharded batch order, gathering.

One process per GPU (``torchrun --nproc_per_node N -m flows.cli train ...``, multi-node with ``--nnodes`` and a
rendezvous address). With WORLD_SIZE unset or 1 everything here is a no-op, so single-process code is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from structxlip.devices import resolve_device

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: ``rank`` of ``world_size``, the GPU index on its node and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, metrics and the exported model."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedContext:
    """Return the process context, joining the process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op single-process)."""
    if context.enabled:
        dist.barrier()


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def gather_with_grad(tensor: Tensor, context: DistributedContext) -> Tensor:
    """Return every rank's ``tensor`` concatenated on dim 0 ``(world*B, ...)``, rank order; gradients flow to the
    local slot only.

    Each rank computes the same full-batch loss, but its gradient reaches the embeddings only through its own slot,
    and DDP then *averages* over ranks: that would scale the embedding gradients by 1/world (while ``logit_scale``,
    used directly by every rank, gets the full gradient). Scaling the local slot's gradient by ``world`` makes the
    averaged result the exact single-process full-batch gradient, without the extra all-reduce that
    ``torch.distributed.nn.all_gather``'s backward would cost.
    """
    if not context.enabled:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[context.rank] = _ScaleGradient.apply(tensor, float(context.world_size))
    return torch.cat(gathered, dim=0)


def gather_no_grad(tensor: Tensor, context: DistributedContext) -> Tensor:
    """Return every rank's ``tensor`` concatenated on dim 0 (for masks and ids; no gradient)."""
    if not context.enabled:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """Return True when ``flag`` is True on any rank (so every rank takes the same branch, e.g. skipping a step)."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class EpochBatchSampler:
    """Seeded, sharded batch order: epoch e is a permutation drawn from ``torch.Generator`` seeded ``seed + e``,
    padded (by wrapping) to a multiple of the world size and dealt round-robin to ranks, as DistributedSampler does.

    Every rank gets the same number of equally sized batches (all-gather needs equal shapes). A trailing batch with
    fewer than ``min_batch`` samples is dropped: a contrastive loss over one sample has no negatives.
    ``set_epoch(e, start_batch=n)`` skips the first ``n`` batches, so a resumed run sees exactly the remaining order.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, min_batch: int = 2):
        if size <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size, self.min_batch = rank, world_size, min_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def per_rank(self) -> int:
        return -(-self.size // self.world_size)

    def batch_sizes(self) -> list[int]:
        """Return the size of every batch of an epoch on this rank (the same on every rank)."""
        full, rest = divmod(self.per_rank, self.batch_size)
        sizes = [self.batch_size] * full
        if rest and (rest >= self.min_batch or not sizes):
            sizes.append(rest)
        return sizes

    def epoch_order(self, epoch: int) -> list[int]:
        """Return this rank's sample indices for ``epoch`` (before batching)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = self.per_rank * self.world_size
        order = (order * (-(-padded // self.size)))[:padded]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        start = 0
        for number, size in enumerate(self.batch_sizes()):
            if number >= self.start_batch:
                yield order[start:start + size]
            start += size

    def __len__(self) -> int:
        return max(len(self.batch_sizes()) - self.start_batch, 0)
