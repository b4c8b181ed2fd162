"""Algorithm 1's class histograms on a GPU, exact, in one pass over the features (Triton).

One program per row, the row held in registers. Floats are ranked through the same integer
keys as on the CPU (topk_cpu.py: the bits with the sign cleared, so non-negative features rank
by value and signed ones by magnitude). The k-th largest key T is found bit by bit, from the
highest: keep a bit when at least k keys reach the prefix with it set (31 counts over the row in
registers; it stops as soon as exactly k keys reach the prefix, typically after about half the
bits). Every entry > T, and the first entries == T in index order (ties go to the lower index,
as everywhere in the library), are added to the row's class histogram with atomic adds.
Rows holding inf/NaN are flagged and left out, as are negative entries reported, in the same pass.

Used by `influence.class_histograms` for CUDA features (half precision ranked as float32)
when Triton is installed; the tests run it on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): influence.py uses torch.topk instead
    triton = None

MAX_WIDTH = 16384       # rows wider than this do not fit one program's registers: torch.topk instead


if triton is not None:
    @triton.jit
    def _class_histograms_kernel(x_ptr, labels_ptr, hist_ptr, flags_ptr, d, stride, k, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < d
        raw = tl.load(x_ptr + row.to(tl.int64) * stride + offs, mask=inside, other=0.0)
        bits = raw.to(tl.int32, bitcast=True)
        keys = tl.where(inside, bits & 0x7FFFFFFF, -1)  # padding ranks below every entry
        negative = tl.max(((bits < 0) & (keys > 0)).to(tl.int32), 0)  # -0.0 is not negative
        finite = tl.max(keys, 0) < 0x7F800000  # a key at or above this is inf or NaN
        kth = tl.full((), 0, tl.int32)  # invariant: count = #keys >= kth >= k
        count = tl.sum(inside.to(tl.int32), 0)
        bit = tl.full((), 30, tl.int32)
        while (bit >= 0) & (count != k):  # stop early once exactly k keys reach kth: the top k are known
            candidate = kth | (1 << bit)
            reached = tl.sum((keys >= candidate).to(tl.int32), 0)
            kth = tl.where(reached >= k, candidate, kth)
            count = tl.where(reached >= k, reached, count)
            bit -= 1
        greater = tl.sum((keys > kth).to(tl.int32), 0)
        tie = keys == kth
        keep = (keys > kth) | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= k - greater))
        label = tl.load(labels_ptr + row).to(tl.int64)
        tl.atomic_add(hist_ptr + label * d + offs, keep.to(tl.int32), mask=keep & finite, sem="relaxed")
        tl.store(flags_ptr + row, (1 - finite.to(tl.int32)) + 2 * negative)


def available(features: torch.Tensor) -> bool:
    """Whether this kernel can take `features`: on a CUDA device, at most MAX_WIDTH wide, with Triton installed."""
    return triton is not None and features.is_cuda and features.shape[1] <= MAX_WIDTH


def class_histograms_gpu(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                         num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """H (C, D) int64 ranked by magnitude (by value for non-negative features), the rows that
    hold inf/NaN (left out of H) and whether any entry is negative; all on the features' device.
    Half-precision features are ranked as float32 (exactly). `num_warps` per row: by default
    one warp per 1024 entries (32 keys a thread: 96 registers and no spills at D = 2048 on sm_90;
    one warp would need 255 registers). `bench_influence.py --device cuda` compares 1, 2, 4 and 8."""
    features = features.float().contiguous()
    n, d = features.shape
    histograms = torch.zeros(num_classes, d, dtype=torch.int32, device=features.device)
    flags = torch.zeros(n, dtype=torch.int32, device=features.device)
    if n:
        block = triton.next_power_of_2(d)
        _class_histograms_kernel[(n,)](features, labels.to(features.device).contiguous(), histograms, flags, d,
                                       features.stride(0), k, BLOCK=block,
                                       num_warps=num_warps or max(1, min(16, block // 1024)))
    return histograms.long(), (flags & 1).bool(), bool((flags & 2).any())
