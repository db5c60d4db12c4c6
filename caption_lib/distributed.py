"""Data-parallel training with `torch.distributed`: several processes, one model.

`torchrun --nproc_per_node=N` (or `srun torchrun ...` on a SLURM cluster) starts N copies
of the same program and tells each its place through environment variables:

    RANK        this process among all of them (0 .. WORLD_SIZE-1)
    WORLD_SIZE  how many processes in all (nodes x processes per node)
    LOCAL_RANK  this process on its node (which GPU to use)
    MASTER_ADDR, MASTER_PORT   where rank 0 listens (torchrun sets them)

`setup()` reads them and joins the process group (backend NCCL on CUDA, Gloo on CPU);
without them it does nothing and every helper below behaves as for one process, so the
same code runs unchanged with 1 or N processes. The trainer (`caption_lib.train`), the
evaluation loop (`caption_lib.evaluate`) and the feature cache (`caption_lib.features`)
use these helpers; `DistributedDataParallel` itself averages the gradients
(`data_parallel`), and `split_batch` gives each process its share of a global batch with
the loss weights that make that average the one-process gradient.

Nothing here is home-made parallelism: this module only names the few `torch.distributed`
calls the book needs (rank, barrier, all-reduce, all-gather of Python objects) so that
they read the same with or without a process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from caption_lib.errors import CaptionLibError


def setup(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes; True when this call created it.

    Does nothing (returns False) when WORLD_SIZE is unset or 1, or when a group already
    exists (e.g. made by a test with `torch.multiprocessing.spawn`). The backend is NCCL
    when `device` is a CUDA device, else Gloo.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CaptionLibError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                              "unset: start the program with torchrun")
    cuda = device is not None and device.type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            device_id=device if cuda else None)
    return True


def cleanup(created: bool = True) -> None:
    """Leave the process group (only if `created`, i.e. `setup()` made it)."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """The device of this process: `cuda` becomes `cuda:LOCAL_RANK` (one GPU per process)."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0: the process that logs, shows progress and writes checkpoints
    (also before `setup` and after `cleanup`: then torchrun's RANK decides)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait until every process got here (no-op for one process)."""
    if dist.is_initialized():
        dist.barrier()


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s share of `items`: every `world`-th item from position `rank`.

    No padding: shards differ by at most one item, and together they hold every item
    exactly once (unlike `DistributedSampler`, which repeats items to even them out,
    and would make an evaluation count some images twice).
    """
    if not 0 <= rank < world:
        raise CaptionLibError(f"rank {rank} outside 0..{world - 1}")
    return list(items[rank::world])


def block(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous block of `range(n)` (blocks differ by at most one item)."""
    if not 0 <= rank < world:
        raise CaptionLibError(f"rank {rank} outside 0..{world - 1}")
    return range(n * rank // world, n * (rank + 1) // world)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over all processes (float64 on the CPU; Gloo and NCCL both work)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)  # (K,)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order, on every process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_by_index(parts: Sequence[dict[int, Any]], n: int) -> list[Any]:
    """Join per-rank results `{index: value}` into one list of length `n`.

    Raises when an index comes twice or is missing: an evaluation must score every
    image exactly once.
    """
    merged: dict[int, Any] = {}
    for part in parts:
        for i, value in part.items():
            if i in merged:
                raise CaptionLibError(f"item {i} computed by two processes")
            merged[i] = value
    missing = sorted(set(range(n)) - set(merged))
    if missing or len(merged) != n:
        raise CaptionLibError(f"{len(missing)} of {n} items computed by no process "
                              f"(first: {missing[:3]})")
    return [merged[i] for i in range(n)]


def split_batch(pairs: Sequence[tuple[int, int]], targets: Callable[[tuple[int, int]], int],
                rank: int, world: int) -> tuple[list, tuple[float, float] | None]:
    """Rank `rank`'s part of a global batch of (image, caption) pairs, and its loss weights.

    The part: every `world`-th image of the batch, with its captions. The weights
    (per-token terms, per-caption terms) = this rank's share of the batch's tokens and
    captions times `world`: the loss's means over this rank's tokens and captions, so
    weighted, are its sums over the global counts / `world`, and the gradient DDP
    averages is the one-process gradient of the whole batch. `targets(pair)`: tokens the
    loss predicts for a caption. One process: all pairs, weights None (plain means).
    A rank with no image gets the first pair with weights (0, 0): it still has to join
    the gradient all-reduce.
    """
    if world == 1:
        return list(pairs), None
    images = list(dict.fromkeys(i for i, _ in pairs))  # the batch's images, in order
    own = set(images[rank::world])
    mine = [(i, j) for i, j in pairs if i in own]
    if not mine:
        return list(pairs[:1]), (0.0, 0.0)
    tokens = sum(targets(p) for p in mine) * world / sum(targets(p) for p in pairs)
    return mine, (tokens, len(mine) * world / len(pairs))


class _Method(nn.Module):
    """`model.<name>` as the forward of a module, so that DDP can wrap it."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.name)(*args, **kwargs)


def data_parallel(model: nn.Module, method: str, device: torch.device,
                  **ddp_options: Any) -> Callable:
    """`model.<method>`; under a process group, the same through `DistributedDataParallel`,
    which shares the model's weights and averages their gradients over the processes in
    `backward()`. `ddp_options` go to DDP (e.g. `forward_sync_buffers=False`)."""
    if world_size() == 1:
        return getattr(model, method)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_Method(model, method), device_ids=ids, **ddp_options)
