"""Where and how a fit runs: the device, the seeds, and torchrun's process group (NCCL on GPUs, gloo on CPUs).

Shared by the fits (train.fit, train.fit_memory), the views' combination and evaluation, none of which needs
the others' code to choose a device.
"""
from __future__ import annotations

import os
import random
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device: got 'cuda', but no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"--device: got {name!r}, expected auto, cuda or cpu")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def distributed_context() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run plainly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local_rank


def join_process_group(device: torch.device) -> bool:
    """Set up torchrun's process group unless it is up already; True if this call set it up (and so tears it
    down). Several fits in one run (the views) share one group: torn down and set up again, the second
    rendezvous on torchrun's store could wait forever (seen once in a test of two views)."""
    if distributed_context()[1] == 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def leave_process_group(owned: bool) -> None:
    """Every rank waits for the others (rank 0 writes the checkpoint); the group's owner then tears it down."""
    if distributed_context()[1] > 1:
        dist.barrier()
        if owned:
            dist.destroy_process_group()
