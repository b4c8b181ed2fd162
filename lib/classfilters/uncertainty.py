"""Bootstrap confidence intervals over test images for full, decomposed and relative accuracy.

Given per-image correctness of the full head and of the decomposed head on the same N test images
(bool (N,) each), draw B resamples of N image indices with replacement; in each, the full accuracy
a_f, the decomposed accuracy a_d and the relative accuracy a_d / a_f are computed on the *same*
indices (paired resampling: the two heads' errors are correlated, and the relative accuracy's
interval is much narrower than the ratio of two independent intervals would suggest). The interval
is the percentile interval [q_{(1-level)/2}, q_{(1+level)/2}] of the B values (Efron & Tibshirani,
ch. 13). The resamples come from a seeded generator: the same inputs and seed give the same interval.

This measures the uncertainty from the finite test set only, not from training (several seeds) or
from the index sets (those are computed on the training set and held fixed here).
"""
from __future__ import annotations

import torch
from torch import nn

from .decomposed import DecomposedHead
from .influence import InfluentialFeatures, influential_features


@torch.no_grad()
def correct_predictions(head: nn.Linear, influence: InfluentialFeatures | torch.Tensor, features: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (N,) twice: whether the full head and the decomposed head classify each image correctly."""
    head = head.cpu().float()
    labels = labels.long()
    full = head(features.float()).argmax(1) == labels
    decomposed = DecomposedHead(head, influence)(features.float()).argmax(1) == labels
    return full, decomposed


def bootstrap_accuracy(correct_full: torch.Tensor, correct_decomposed: torch.Tensor, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> dict:
    """Point estimates and paired-bootstrap percentile intervals of acc_full, acc_decomposed and relative.

    Returns {"acc_full", "acc_full_lo", "acc_full_hi", "acc_decomposed", ..._lo, ..._hi, "relative", ..._lo,
    ..._hi, "n", "resamples", "level"}.
    """
    full, dec = correct_full.flatten().double(), correct_decomposed.flatten().double()
    if full.shape != dec.shape or len(full) == 0:
        raise ValueError(f"need two non-empty correctness vectors of the same length, got {tuple(correct_full.shape)} "
                         f"and {tuple(correct_decomposed.shape)}")
    if not 0 < level < 1 or resamples < 2:
        raise ValueError(f"level must be in (0, 1) and resamples >= 2, got level={level}, resamples={resamples}")
    n = len(full)
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, 2_000_000 // n)                            # resamples per chunk: ~16 MB of indices
    acc_f, acc_d = [], []
    for start in range(0, resamples, chunk):
        idx = torch.randint(0, n, (min(chunk, resamples - start), n), generator=gen)
        acc_f.append(full[idx].mean(1))
        acc_d.append(dec[idx].mean(1))
    acc_f, acc_d = torch.cat(acc_f), torch.cat(acc_d)
    rel = acc_d / acc_f.clamp(min=1e-12)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    for name, point, values in (("acc_full", full.mean(), acc_f), ("acc_decomposed", dec.mean(), acc_d),
                                ("relative", dec.mean() / full.mean().clamp(min=1e-12), rel)):
        lo, hi = torch.quantile(values, q).tolist()
        out.update({name: point.item(), f"{name}_lo": lo, f"{name}_hi": hi})
    return {**out, "n": n, "resamples": resamples, "level": level}


def diagonal_intervals(head: nn.Linear, train_features: torch.Tensor, train_labels: torch.Tensor,
                       test_features: torch.Tensor, test_labels: torch.Tensor, ks, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> list[dict]:
    """The relative-vs-k curve with intervals: for each k, Algorithm 1 at k = k' on the training features,
    then `bootstrap_accuracy` over the test images (the same seed, hence the same resamples, for every k)."""
    rows = []
    for k in ks:
        influence = influential_features(train_features, train_labels, int(k), int(k),
                                         num_classes=head.out_features)
        full, dec = correct_predictions(head, influence, test_features, test_labels)
        rows.append({"k": int(k), "k_prime": int(k), **bootstrap_accuracy(full, dec, resamples, level, seed)})
    return rows
