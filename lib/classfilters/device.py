"""Where the work runs: the default device, and the process group of a `torchrun` launch.

`default_device()` is the current CUDA device when there is one, else the CPU. Under torchrun
(WORLD_SIZE > 1), `init_distributed()` joins the group (NCCL on GPUs, gloo on CPUs) and
`world()` gives this process's (rank, world size); outside it, (0, 1). `training_precision(precision,
device)` resolves a recipe's "auto" precision: bf16 on GPUs and on CPUs with native bf16 instructions;
`denormals_flushed(device)` computes subnormal numbers as zero on the CPU while training.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
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
    Intel Sapphire Rapids on): there bf16 convolutions are about twice as fast as float32 ones; elsewhere
    oneDNN emulates them, slower than float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def training_precision(precision: str, device=None) -> str:
    """"bf16" or "fp32": a recipe's precision on `device` (None: `default_device()`), "auto" resolved (bf16
    on GPUs and on CPUs with native bf16, float32 elsewhere)."""
    if precision != "auto":
        return precision
    device = torch.device(device) if device is not None else default_device()
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16()) else "fp32"


@contextlib.contextmanager
def denormals_flushed(device):
    """On the CPU, subnormal float32 numbers (below ~1.2e-38) computed as zero inside the block, in this thread and
    in every thread of torch's OpenMP pool; the calling thread's floating-point state is restored in all of them
    after. x86 CPUs take a slow microcode path for every subnormal operand, and a CIFAR ResNet's training
    produces many: on a 2-core AMD Zen 4 a ResNet-20 step of 512 real images took 4.2 s with them and 0.75 s
    without (bf16). `torch.set_flush_denormal` alone sets only the calling thread, so the pool's threads (made
    at torch's first parallel operation) are given the same state through OpenMP itself (libgomp, which torch's
    Linux wheels use; elsewhere only the calling thread is set). On other devices nothing changes. Like the number
    of threads, this floating-point state is not part of a trained model's cache key: it changes results only at
    the level of rounding below float32's normal range."""
    if torch.device(device).type != "cpu":
        yield
        return
    saved = _float_environment()
    if not torch.set_flush_denormal(True):  # a CPU without the flags: nothing to do
        yield
        return
    _in_every_thread(_float_environment())
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        _in_every_thread(saved)


def _float_environment():
    """The calling thread's floating-point environment (fenv_t: rounding, exceptions, flush-to-zero), or None."""
    libm = _libm()
    state = ctypes.create_string_buffer(64)  # fenv_t: 32 bytes on x86-64, 8 on arm64
    return state if libm is not None and libm.fegetenv(state) == 0 else None


def _in_every_thread(state) -> None:
    """Load the floating-point environment `state` in every thread of torch's OpenMP pool (one parallel region of
    OpenMP's default size, each thread calling fesetenv), where that pool is libgomp's; else nothing."""
    gomp, libm = _libgomp(), _libm()
    if state is not None and gomp is not None and libm is not None:
        gomp.GOMP_parallel(ctypes.cast(libm.fesetenv, ctypes.c_void_p), ctypes.cast(state, ctypes.c_void_p), 0, 0)


@functools.cache
def _libm():
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


@functools.cache
def _libgomp():
    """torch's libgomp (in /proc/self/maps, inside torch's folder: scikit-learn and others bring their own), with
    GOMP_parallel typed; None elsewhere."""
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))  # site-packages: torch/lib or torch.libs
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
        path = next((p for p in sorted(paths) if p.startswith(os.path.join(torch_dir, "torch"))), None)
        gomp = ctypes.CDLL(path) if path else None
    except OSError:
        return None
    if gomp is not None:
        gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel.restype = None
    return gomp
