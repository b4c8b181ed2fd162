"""Per-row top-k indices on the CPU, exact, in about two passes over the data (numba, all cores).

For each row: split it into k blocks and take the smallest block maximum t; at least k
entries are >= t, so the top k all are. The few entries >= t are copied out in index
order and bucketed by value (buckets are monotone in value), so the k-th largest value T
is found by a partial sort of one small bucket; the output is
every entry > T plus the first entries == T in index order: ties at the k-th value go to
the lower index, the same rule as `influence.topk_indices`. About 10x faster than
`torch.topk` on 2 cores for k << D, so Algorithm 1 is bound by reading the features.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


@njit(cache=True)
def _kth_largest(values, count, k):
    """The k-th largest of values[:count] (reorders values): Hoare's quickselect."""
    target = count - k  # position in ascending order
    lo, hi = 0, count - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return values[target]


BUCKETS = 128  # value buckets between the candidate threshold and the row's maximum


@njit(parallel=True, cache=True)
def _topk_rows(scores, k, offsets, out):
    n, d = scores.shape
    blocks = max(1, min(n, 256))
    for blk in prange(blocks):
        values = np.empty(d, dtype=scores.dtype)  # per-thread buffers, reused row after row
        index = np.empty(d, dtype=np.int64)
        counts = np.empty(BUCKETS, dtype=np.int64)
        for r in range(blk * n // blocks, (blk + 1) * n // blocks):
            row = scores[r]
            t = np.inf
            top = -np.inf
            for b in range(k):  # smallest of the k block maxima: at least k entries reach it
                lo, hi = b * d // k, (b + 1) * d // k
                m = row[lo]
                for j in range(lo + 1, hi):
                    m = max(m, row[j])
                t = min(t, m)
                top = max(top, m)
            count = 0
            for j in range(d):  # the candidates, in index order (branch-free: written, kept if >= t)
                values[count] = row[j]
                index[count] = j
                count += row[j] >= t
            scale = BUCKETS / (top - t) if top > t else 0.0
            if not (scale > 0 and np.isfinite(scale)):  # all candidates equal, or a span too small to bucket
                inside, above = count, 0
            else:  # bucket the candidates by value; the k-th largest lies in one bucket
                counts[:] = 0
                for i in range(count):
                    counts[min(int((values[i] - t) * scale), BUCKETS - 1)] += 1
                above, b = 0, BUCKETS - 1
                while above + counts[b] < k:
                    above += counts[b]
                    b -= 1
                inside = 0
                for i in range(count):  # monotone buckets: every entry of a higher bucket is larger
                    v = values[i]
                    values[inside] = v
                    inside += min(int((v - t) * scale), BUCKETS - 1) == b
            kth = _kth_largest(values, inside, k - above)
            greater = above
            for i in range(inside):
                greater += values[i] > kth
            room = k - greater  # how many entries equal to the k-th value fit, lowest index first
            o = 0
            for i in range(count):
                v = row[index[i]]
                if v > kth or (v == kth and room > 0):
                    if v == kth:
                        room -= 1
                    out[r, o] = offsets[r] + index[i]
                    o += 1


def topk_indices_cpu(scores: torch.Tensor, k: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) int64 indices of each row's k largest entries (in index order), plus `offsets` (N,) if given."""
    array = scores.detach().contiguous().numpy()
    out = np.empty((array.shape[0], k), dtype=np.int64)
    offsets = np.zeros(array.shape[0], dtype=np.int64) if offsets is None else offsets.long().contiguous().numpy()
    if array.shape[0]:
        _topk_rows(array, k, offsets, out)
    return torch.from_numpy(out)
