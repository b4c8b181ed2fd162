"""Where the work runs: the default device, and the process group of a `torchrun` launch.

`default_device()` is the current CUDA device when there is one, else the CPU. Under torchrun
(WORLD_SIZE > 1), `init_distributed()` joins the group (NCCL on GPUs, gloo on CPUs) and
`world()` gives this process's (rank, world size); outside it, (0, 1). `training_precision(precision,
device)` resolves a recipe's "auto" precision: bf16 on GPUs and on CPUs with native bf16 instructions.
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


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, e.g. AMD Zen 4 and Intel Cooper Lake; or AMX,
    Intel Sapphire Rapids on): there a bf16 training step is faster than a float32 one (benchmarks/README.md);
    elsewhere oneDNN emulates bf16, slower than float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:  # a torch without these checks (before 2.4): the CPU's flags, on Linux
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(precision: str, device=None) -> str:
    """"bf16" or "fp32": a recipe's precision on `device` (None: `default_device()`), "auto" resolved (bf16
    on GPUs and on CPUs with native bf16, float32 elsewhere)."""
    if precision != "auto":
        return precision
    device = torch.device(device) if device is not None else default_device()
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16()) else "fp32"
