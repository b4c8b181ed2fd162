"""Where the work runs: the default device, and the process group of a `torchrun` launch.

`default_device()` is the current CUDA device when there is one, else the CPU. Under torchrun
(WORLD_SIZE > 1), `init_distributed()` joins the group (NCCL on GPUs, gloo on CPUs) and
`world()` gives this process's (rank, world size); outside it, (0, 1).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Join the process group that `torchrun` describes (WORLD_SIZE > 1 in the environment): NCCL
    on this rank's GPU (LOCAL_RANK), gloo on CPUs. A no-op otherwise. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return world()


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
