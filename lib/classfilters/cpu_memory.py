"""Freed memory kept in the process (Linux, glibc), so that CPU training does not fault in new pages every step.

glibc serves blocks over its mmap threshold (at most 32 MB: a CIFAR ResNet-20's activation maps at batch
512 in float32) with mmap and unmaps them when freed, and trims the heap's free top back to the OS. A CPU
training step then zero-fills every large activation afresh: on a 2-core AMD Zen 4, 263,000-341,000 page
faults a float32 step of 512 images, and a step 2.2x as long as with the memory kept (benchmarks/README.md).
`keep_freed_memory()` turns both off (`mallopt`: M_MMAP_MAX 0, M_TRIM_THRESHOLD at its maximum), as jemalloc
and tcmalloc do by design: the process then keeps its peak memory instead of returning it. `TUNABLES` is
the same setting for a child process's environment (GLIBC_TUNABLES; glibc reads it at start). The runner
(for its kernels), `python -m classfilters` and the bare runner use them; a script calls
`keep_freed_memory()` once, before its first large tensor.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (malloc.h)
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}


def keep_freed_memory() -> bool:
    """Keep freed memory in this process from now on (there is no way back: glibc's adaptive thresholds stay off
    once set). Returns whether it took effect: False off Linux or with another C library (nothing changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return all(libc.mallopt(param, value) == 1 for param, value in _KEEP.items())


def child_environment(environ: dict) -> dict:
    """The variables to add to `environ` for a child process to keep its freed memory: GLIBC_TUNABLES,
    unless the user set it (theirs is kept)."""
    return {} if "GLIBC_TUNABLES" in environ or platform.system() != "Linux" else {"GLIBC_TUNABLES": TUNABLES}
