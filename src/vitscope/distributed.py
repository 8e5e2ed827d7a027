"""Process groups the way torchrun describes them (NCCL on GPUs, gloo on CPUs), and the few collectives
the analyses and the training loops need."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistEnv", "init_distributed", "current_env", "all_mean", "all_sum", "gather_to_main", "barrier"]


@dataclass
class DistEnv:
    """This process's place: rank, world size, local rank and the device it computes on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK): NCCL on GPUs, gloo on CPU.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (one process: that GPU;
    under torchrun each rank takes the GPU of its local rank).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if world > 1:
            index = local_rank
        else:
            index = (torch.device(device).index or 0) if device != "auto" else 0
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def all_mean(value: Tensor, env: DistEnv) -> Tensor:
    """The mean of ``value`` over all ranks (the value itself in one process)."""
    if env.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world
    return value


def current_env() -> DistEnv:
    """The process group this process already belongs to (one process when none was set up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_to_main(value: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; an empty list on the others."""
    if env.world == 1:
        return [value]
    gathered: list[Any] | None = [None] * env.world if env.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


def all_sum(value: int, env: DistEnv) -> int:
    """The sum of an integer over all ranks."""
    if env.world == 1:
        return value
    gathered: list[Any] = [None] * env.world
    dist.all_gather_object(gathered, value)
    return int(sum(gathered))


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()
