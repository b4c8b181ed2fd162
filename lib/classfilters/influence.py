"""Algorithm 1: the influential penultimate features of every class, vectorised.

For each training image i, S_i = the k largest components of phi(x_i) (by magnitude when
features can be negative); H_c[j] counts the images of class c with j in S_i; I_c = the
k' most frequent indices of H_c. Ties are broken toward the lower index at both steps.
k and k' can also be fractions in (0, 1): the fewest components covering that fraction of
an instance's activation mass (k), or of a class histogram's mass (k').

No Python loop runs over images or classes: on the CPU one numba kernel (topk_cpu.py), on a
GPU one Triton kernel (topk_gpu.py), finds every row's top k and checks the features on the
way; otherwise (fractions of mass, no Triton, float64), per chunk of rows, one `torch.topk` (plus
a fix-up of rows whose ties straddle the k-th value) or a sort, and one `bincount`.
`reference.py` holds the plain loop this must equal.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checks import check_features, check_labels, check_rank_by, check_shape, nonfinite_error, resolve_rank_by
from .sizes import DEFAULT_K, Size, as_size
from .topk_cpu import class_histograms_cpu


@dataclass
class InfluentialFeatures:
    """The result of Algorithm 1: per-class index sets, their histograms and how they were made."""
    indices: list[list[int]]          # I_c, most frequent first
    histograms: torch.Tensor          # int64 (C, D): H_c[j]
    k: Size
    k_prime: Size
    rank_by: str = "value"            # "value" or "magnitude"
    provenance: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.histograms.shape[0]

    @property
    def num_features(self) -> int:
        return self.histograms.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        """bool (C, D): mask[c, j] is True when j is in I_c."""
        m = torch.zeros(self.num_classes, self.num_features, dtype=torch.bool)
        for c, idx in enumerate(self.indices):
            m[c, idx] = True
        return m

    @property
    def multiply_adds(self) -> int:
        """Cost of the decomposed final layer: sum over classes of |I_c| (full layer: C * D)."""
        return sum(len(i) for i in self.indices)

    def to_dict(self) -> dict:
        return {"k": self.k, "k_prime": self.k_prime, "rank_by": self.rank_by,
                "num_classes": self.num_classes, "num_features": self.num_features,
                "indices": self.indices, "histograms": self.histograms.tolist(), "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict) -> InfluentialFeatures:
        return cls([list(map(int, i)) for i in d["indices"]], torch.tensor(d["histograms"], dtype=torch.int64),
                   d["k"], d["k_prime"], d.get("rank_by", "value"), d.get("provenance", {}))

    @classmethod
    def load(cls, path: str | Path) -> InfluentialFeatures:
        return cls.from_dict(json.loads(Path(path).read_text()))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each row's k largest entries; ties at the k-th value go to lower indices."""
    values, idx = torch.topk(scores, k, dim=1)
    threshold = values[:, -1:]
    straddle = (scores == threshold).sum(1) > (values == threshold).sum(1)
    if straddle.any():  # a tie crosses the cut: choose the tied entries by index
        rows = scores[straddle]
        t = threshold[straddle]
        above = rows > t
        tied = rows == t
        room = k - above.sum(1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(1) <= room))
        idx[straddle] = chosen.nonzero()[:, 1].view(-1, k)
    return idx


def mass_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool (N, D): the fewest top entries of each row whose sum reaches `fraction` of the row's sum."""
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    cum = values.cumsum(1)
    count = (cum < fraction * cum[:, -1:]).sum(1, keepdim=True) + 1
    count = torch.where(cum[:, -1:] > 0, count, torch.zeros_like(count))
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, ranks < count)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exact as float32 keys


def gpu_kernel_takes(features: torch.Tensor) -> bool:
    """Whether the Triton kernel (topk_gpu.py) can take `features`; Triton is imported only for CUDA features
    (importing it costs about a second, which every notebook's kernel would pay on a CPU)."""
    if not features.is_cuda:
        return False
    from . import topk_gpu
    return topk_gpu.available(features)


def class_histograms(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: Size,
                     rank_by: str = "auto", chunk_size: int = 65536,
                     what: str = "features") -> tuple[torch.Tensor, str]:
    """H (C, D) int64: how often each index is among an image's top k, per class; and the
    ranking used. Features holding NaN or inf are refused."""
    check_shape(features, what)
    check_rank_by(rank_by)
    n, d = features.shape
    k = as_size(k, d, "k")
    on_cpu = features.device.type == "cpu"
    if isinstance(k, int) and features.dtype in KERNEL_DTYPES and (on_cpu or gpu_kernel_takes(features)):
        if on_cpu:
            zero = np.zeros(n, np.bool_)
            histograms, nonfinite, negative = class_histograms_cpu(features, labels, num_classes, k, zero=zero)
            zero_rows = int(zero.sum())
        else:
            from .topk_gpu import class_histograms_gpu
            histograms, nonfinite, negative = class_histograms_gpu(features, labels, num_classes, k)
            zero_rows = int((features == 0).all(1).sum())
        if nonfinite.any():
            raise nonfinite_error(what, nonfinite.nonzero().flatten())
        warn_zero_rows(zero_rows, n, what)
        rank_by = resolve_rank_by(features, rank_by, lowest=-1.0 if negative else 0.0)
        if not (rank_by == "value" and negative):  # the kernel ranks by magnitude
            return histograms, rank_by
    else:
        warn_zero_rows(int((features == 0).all(1).sum()), n, what)
    lowest, _ = check_features(features, what)
    rank_by = resolve_rank_by(features, rank_by, lowest)
    counts = torch.zeros(num_classes * d, dtype=torch.int64, device=features.device)
    for start in range(0, n, chunk_size):
        scores = features[start:start + chunk_size]
        scores = scores.abs() if rank_by == "magnitude" else scores
        y = labels[start:start + chunk_size].to(features.device)
        if isinstance(k, int):
            flat = (y[:, None] * d + topk_indices(scores, k)).flatten()
        else:
            rows, cols = mass_mask(scores, k).nonzero(as_tuple=True)
            flat = y[rows] * d + cols
        counts += torch.bincount(flat, minlength=num_classes * d)
    return counts.view(num_classes, d), rank_by


def warn_zero_rows(zero_rows: int, n: int, what: str) -> None:
    """All-zero rows have no top k: ties go to the lower index, so they vote for features 0..k-1."""
    if zero_rows:
        warnings.warn(f"{what}: {zero_rows} of {n} rows are all zero; their top k is the first k indices "
                      "(ties go to the lower index), so the index sets partly reflect feature order, not the "
                      "data. Check the model and the input (a dead layer, a wrong normalisation)",
                      stacklevel=_stacklevel_outside_package())  # pragma: no mutate


def _stacklevel_outside_package() -> int:  # pragma: no mutate block
    """The `stacklevel` that points a warning raised by our caller at the first frame outside this package (the
    user's call, whether it reached us through `influential_features` or `class_histograms`). Not mutated, as a
    whole (`pragma: no mutate block`): under mutmut its trampolines are frames outside the package, so the test
    of the warning's location runs outside mutmut only."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while (frame is not None and not frame.f_code.co_filename.startswith("<")
           and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package):
        frame, level = frame.f_back, level + 1
    return level


def select_indices(histograms: torch.Tensor, k_prime: Size) -> list[list[int]]:
    """I_c: the k' most frequent indices of each row (lower index first among equal counts)."""
    d = histograms.shape[1]
    if isinstance(k_prime, int):  # one key per entry: the count, then the lower index
        key = histograms.long() * d + torch.arange(d - 1, -1, -1, device=histograms.device)
        return key.topk(k_prime, dim=1).indices.tolist()
    counts, order = torch.sort(histograms, dim=1, descending=True, stable=True)
    cum = counts.cumsum(1).double()
    sizes = ((cum < k_prime * cum[:, -1:]).sum(1) + 1).clamp(max=histograms.shape[1]).tolist()
    return [row[:s] for row, s in zip(order.tolist(), sizes)]


def influential_features(features: torch.Tensor, labels: torch.Tensor, k: Size = DEFAULT_K, k_prime: Size = DEFAULT_K,
                         num_classes: int | None = None, rank_by: str = "auto",
                         provenance: dict | None = None) -> InfluentialFeatures:
    """Algorithm 1 on training features (N, D) with labels (N,)."""
    check_shape(features, "training features")
    check_rank_by(rank_by)
    labels = check_labels(labels, features.shape[0], None)
    num_classes = num_classes or int(labels.max()) + 1
    labels = check_labels(labels, features.shape[0], num_classes)
    present = torch.bincount(labels, minlength=num_classes)
    if (present == 0).any():
        missing = (present == 0).nonzero().flatten().tolist()
        raise ValueError(f"classes {missing} have no training images: every class needs at least one "
                         "to find its features (check the split, or pass num_classes)")
    d = features.shape[1]
    k, k_prime = as_size(k, d, "k"), as_size(k_prime, d, "k'")
    histograms, rank_by = class_histograms(features, labels, num_classes, k, rank_by, what="training features")
    info = {"num_train": int(features.shape[0]), **(provenance or {})}
    return InfluentialFeatures(select_indices(histograms, k_prime), histograms.cpu(), k, k_prime, rank_by, info)
