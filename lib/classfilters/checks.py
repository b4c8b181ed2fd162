"""Argument checks shared by the algorithm modules: feature matrices and the ranking (`rank_by`).

Pure tensor code (imports only torch): `influence`, `decomposed`, `ablation` and `overlap` check
their inputs with it without pulling in data loading or decoding. The sizes k and k' are checked
by `sizes.py`.
"""
from __future__ import annotations

import math

import torch

RANKINGS = ("auto", "value", "magnitude")


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be 'auto', 'value' or 'magnitude', got {rank_by!r}")


def resolve_rank_by(features: torch.Tensor, rank_by: str = "auto", lowest: float | None = None) -> str:
    """The one place "auto" is resolved: "value" for non-negative features (ReLU + pooling),
    "magnitude" when any is negative. `lowest`: the features' minimum, when already known."""
    check_rank_by(rank_by)
    if rank_by != "auto":
        return rank_by
    if lowest is None:
        lowest = features.min().item() if features.numel() else 0.0
    return "magnitude" if lowest < 0 else "value"


def check_shape(features: torch.Tensor, what: str = "features") -> None:
    if features.dim() != 2:
        raise ValueError(f"{what}: features must be (N, D), got shape {tuple(features.shape)}")


def nonfinite_error(what: str, bad_rows: torch.Tensor) -> ValueError:
    """The error for features with NaN or inf in the rows `bad_rows` (indices)."""
    return ValueError(f"{what}: {len(bad_rows)} rows hold NaN or inf (first rows {bad_rows[:5].tolist()}); "
                      "check the checkpoint and the input normalisation, or use fp32 instead of bf16")


def check_features(features: torch.Tensor, what: str = "features") -> tuple[float, float]:
    """Refuse anything but finite (N, D) features; return their smallest and largest value (one pass)."""
    check_shape(features, what)
    if not features.numel():
        return 0.0, 0.0
    lowest, highest = (v.item() for v in torch.aminmax(features))
    if not (math.isfinite(lowest) and math.isfinite(highest)):  # NaN propagates through min and max
        raise nonfinite_error(what, (~torch.isfinite(features)).any(1).nonzero().flatten())
    return lowest, highest


def check_labels(labels, n: int, num_classes: int | None, what: str = "labels") -> torch.Tensor:
    """Integer class indices (N,) in [0, num_classes), as int64; anything else is refused."""
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, device="cpu")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be integer class indices, got {labels.dtype} (a float label would be "
                        "truncated): pass e.g. labels.long() after checking they are whole numbers")
    if labels.shape != (n,):
        raise ValueError(f"{what} have shape {tuple(labels.shape)} but there are {n} feature rows")
    if num_classes is not None and n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}); found {int(labels.min())}..{int(labels.max())}")
    return labels.long()
