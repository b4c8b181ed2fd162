"""Algorithm 1's class histograms on the CPU, exact, in about one pass over the features (numba).

Float32 features are ranked through integer keys: the float's bits with the sign bit cleared.
For non-negative features (ReLU + pooling) the keys order like the values (and -0.0 ties with
0.0); for features of either sign they order like the magnitudes. One parallel kernel then
finds each row's top k:

1. threshold: view the row as consecutive runs of G >= k entries and take the maximum of each
   of the G lanes (vectorised). The smallest lane maximum t is reached by G >= k entries, so
   the top k are all >= t. A key with the exponent all ones (inf or NaN) flags the row instead.
2. compaction: the few entries >= t, with their indices, in index order (AVX-512: a compress
   into a register and a plain store, fast on Intel and AMD alike; a branch-free scalar loop
   without AVX-512).
3. selection: bucket the candidates by key between t and the row maximum (the buckets are
   monotone) and quickselect the k-th largest key T inside the one bucket that holds it.
4. the top k: every candidate > T, then the first candidates == T in index order, so ties at
   the k-th value go to the lower index, the same rule as `influence.topk_indices`.

A second, serial loop adds each row's k indices to its class's histogram. Timings and the
variants tried: benchmarks/README.md.
"""
from __future__ import annotations

import numpy as np
import torch
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16                  # int32 lanes of one AVX-512 register
BUCKETS_LOG2 = 7            # 128 value buckets between the threshold and the row maximum
NONFINITE = 0x7F800000      # a key at or above this is inf or NaN


def _target_has_avx512() -> bool:
    """Whether the code numba makes may use AVX-512: the host has it and numba targets the host
    (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES can name another CPU, e.g. for a portable cache)."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "host"):
        return False  # a named CPU: the scalar path, right on every CPU
    return bool(binding.get_host_cpu_features().get("avx512f", False))


HAS_COMPRESS = _target_has_avx512()
COMPACTIONS = {"scalar": 0, "register": 1, "memory": 2}  # how step 2 compacts (see _compress16_codegen)
COMPRESS_REGISTER, COMPRESS_MEMORY = COMPACTIONS["register"], COMPACTIONS["memory"]


def _compress16_codegen(to_memory: bool):
    """Append the keys of row[start:start + 16] that are >= threshold, and their indices, to
    keys_out / index_out at `count`; return the new count. Two ways:

    - register (the default): `vpcompressd` into a register, then one plain 16-lane store (the
      lanes past the chosen ones are overwritten by the next call; the buffers have 16 spare
      entries). Fast on Intel and on AMD Zen 4 / Zen 5 alike.
    - memory: a masked compress-store (`vpcompressd` to memory), which writes only the chosen
      lanes. As fast on Intel, but microcoded on Zen 4: twice slower than the scalar loop there.
    """
    # Without AVX-512 these paths never run (`compaction` refuses them) but are still compiled: the
    # generic masked compress-store compiles for any CPU, the x86 compress intrinsic aborts LLVM.
    to_memory = to_memory or not HAS_COMPRESS

    def codegen(context, builder, signature, args):
        row_v, start_v, threshold_v, keys_v, index_v, count_v = args
        i32 = ir.IntType(32)
        vec = ir.VectorType(i32, LANES)
        mask_type = ir.VectorType(ir.IntType(1), LANES)
        data = [context.make_array(signature.args[i])(context, builder, v).data
                for i, v in ((0, row_v), (3, keys_v), (4, index_v))]

        def splat(x):
            one = builder.insert_element(ir.Constant(vec, None), x, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(vec, [0] * LANES))

        raw = builder.load(builder.bitcast(builder.gep(data[0], [start_v]), vec.as_pointer()), align=4)
        keys = builder.and_(raw, splat(ir.Constant(i32, 0x7FFFFFFF)))
        chosen = builder.icmp_signed(">=", keys, splat(builder.trunc(threshold_v, i32)))
        index = builder.add(splat(builder.trunc(start_v, i32)), ir.Constant(vec, list(range(LANES))))
        for values, out in ((keys, data[1]), (index, data[2])):
            target = builder.gep(out, [count_v])
            if to_memory:
                store = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [vec, target.type, mask_type]),
                    "llvm.masked.compressstore.v16i32")
                builder.call(store, [values, target, chosen])
            else:
                compress = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vec, [vec, vec, mask_type]), "llvm.x86.avx512.mask.compress.v16i32")
                packed = builder.call(compress, [values, ir.Constant(vec, None), chosen])
                builder.store(packed, builder.bitcast(target, vec.as_pointer()), align=4)
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(LANES), [ir.IntType(LANES)]), "llvm.ctpop.i16")
        chosen_count = builder.call(popcount, [builder.bitcast(chosen, ir.IntType(LANES))])
        return builder.add(count_v, builder.zext(chosen_count, count_v.type))

    return codegen


@intrinsic
def _compress16(typingctx, row, start, threshold, keys_out, index_out, count):
    return types.intp(row, start, threshold, keys_out, index_out, count), _compress16_codegen(to_memory=False)


@intrinsic
def _compress16_store(typingctx, row, start, threshold, keys_out, index_out, count):
    return types.intp(row, start, threshold, keys_out, index_out, count), _compress16_codegen(to_memory=True)


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


@njit(cache=True)
def _bit_length(x):
    n = 0
    while x > 0:
        x >>= 1
        n += 1
    return n


@njit(parallel=True, cache=True, boundscheck=False)
def _topk_rows(raw, k, compress, top, nonfinite, negative, zero):
    n, d = raw.shape
    groups = min(d, (k + LANES - 1) // LANES * LANES if k >= LANES else k)
    full = d // groups * groups
    blocks = max(1, min(n, 256))
    for blk in prange(blocks):  # per-block buffers, reused row after row
        lane_max = np.empty(groups, np.int32)
        keys = np.empty(d + LANES, np.int32)
        index = np.empty(d + LANES, np.int32)
        inside = np.empty(d, np.int32)
        counts = np.empty(1 << BUCKETS_LOG2, np.int32)
        for r in range(blk * n // blocks, (blk + 1) * n // blocks):
            row = raw[r]
            below_zero = 0  # largest key of an entry with the sign bit set (0 when none is negative)
            for q in range(groups):
                lane_max[q] = row[q] & 0x7FFFFFFF
                below_zero = max(below_zero, lane_max[q] if row[q] < 0 else 0)
            for start in range(groups, full, groups):
                run = row[start:start + groups]
                for q in range(groups):
                    v = run[q] & 0x7FFFFFFF
                    lane_max[q] = max(lane_max[q], v)
                    below_zero = max(below_zero, v if run[q] < 0 else 0)
            for j in range(full, d):
                v = row[j] & 0x7FFFFFFF
                lane_max[j - full] = max(lane_max[j - full], v)
                below_zero = max(below_zero, v if row[j] < 0 else 0)
            negative[r] = below_zero > 0
            t = lane_max[0]
            highest = lane_max[0]
            for q in range(1, groups):
                t = min(t, lane_max[q])
                highest = max(highest, lane_max[q])
            if highest >= NONFINITE:
                nonfinite[r] = True
                continue
            zero[r] = highest == 0
            count = 0
            j = 0
            if compress == COMPRESS_REGISTER:
                while j + LANES <= d:
                    count = _compress16(row, j, t, keys, index, count)
                    j += LANES
            elif compress == COMPRESS_MEMORY:
                while j + LANES <= d:
                    count = _compress16_store(row, j, t, keys, index, count)
                    j += LANES
            for i in range(j, d):  # branch-free: always written, kept when >= t
                v = row[i] & 0x7FFFFFFF
                keys[count] = v
                index[count] = i
                count += v >= t
            shift = max(0, _bit_length(highest - t) - BUCKETS_LOG2)
            bucket = (highest - t) >> shift
            counts[:bucket + 1] = 0
            for i in range(count):
                counts[(keys[i] - t) >> shift] += 1
            above = 0
            while above + counts[bucket] < k:  # buckets above the one holding the k-th largest key
                above += counts[bucket]
                bucket -= 1
            held = 0
            for i in range(count):
                v = keys[i]
                inside[held] = v
                held += ((v - t) >> shift) == bucket
            kth = _kth_largest(inside, held, k - above)
            room = k - above
            for i in range(held):
                room -= inside[i] > kth  # what is left is how many keys == kth are taken
            chosen = 0
            out = top[r]
            for i in range(count):
                v = keys[i]
                tie = v == kth
                keep = (v > kth) | (tie & (room > 0))
                room -= tie & keep
                if chosen < k:
                    out[chosen] = index[i]
                chosen += keep


@njit(cache=True, boundscheck=False)
def _add_to_histograms(top, labels, skip, histograms):
    for r in range(top.shape[0]):
        if not skip[r]:
            histogram = histograms[labels[r]]
            for q in range(top.shape[1]):
                histogram[top[r, q]] += 1


def compaction(compress: bool | str | None) -> int:
    """The compaction of step 2: None (the fastest this CPU has: "register" with AVX-512, else
    "scalar"), True ("register"), False ("scalar"), or a name from COMPACTIONS."""
    name = {None: "register" if HAS_COMPRESS else "scalar", True: "register", False: "scalar"}.get(compress, compress)
    if name not in COMPACTIONS:
        raise ValueError(f"compress must be None, True, False or one of {list(COMPACTIONS)}, got {compress!r}")
    if name != "scalar" and not HAS_COMPRESS:
        raise ValueError(f"the {name!r} compaction needs AVX-512, which this CPU lacks: use compress=None or False")
    return COMPACTIONS[name]


def topk_rows_cpu(features: torch.Tensor, k: int, compress: bool | str | None = None, zero: np.ndarray | None = None):
    """Each row's top k by key (see above): (N, k) int32 indices in index order, and bool (N,)
    masks of the rows holding inf/NaN (their indices are undefined) and of those holding a
    negative entry. `compress` picks the compaction (see `compaction`); `zero`, a bool (N,)
    array when given, is set where a row is all zero (its top k is then the first k indices)."""
    raw = features.detach().to(torch.float32).contiguous().numpy().view(np.int32)
    n = raw.shape[0]
    top = np.empty((n, k), np.int32)
    nonfinite = np.zeros(n, np.bool_)
    negative = np.zeros(n, np.bool_)
    zero = np.zeros(n, np.bool_) if zero is None else zero
    if n:
        _topk_rows(raw, k, compaction(compress), top, nonfinite, negative, zero)
    return top, nonfinite, negative


def class_histograms_cpu(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                         compress: bool | str | None = None,
                         zero: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """H (C, D) int64 ranked by magnitude (by value for non-negative features), the rows that
    hold inf/NaN (left out of H) and whether any entry is negative (`zero`: see topk_rows_cpu)."""
    top, nonfinite, negative = topk_rows_cpu(features, k, compress, zero)
    histograms = np.zeros((num_classes, features.shape[1]), np.int64)
    _add_to_histograms(top, labels.cpu().numpy().astype(np.int64), nonfinite, histograms)
    return torch.from_numpy(histograms), torch.from_numpy(nonfinite), bool(negative.any())
