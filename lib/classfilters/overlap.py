"""How much the classes' index sets overlap: Jaccard matrix and pairwise mutual information.

For two classes a, b the index sets are indicator vectors over the D features; their mutual
information (in nats, as scikit-learn's `mutual_info_score`) is

    MI(a, b) = sum_{u, v in {0, 1}} p(u, v) log(p(u, v) / (p_a(u) p_b(v)))

with p the frequencies over the D features. Disjoint small sets score near 0; a set with itself
scores its entropy H(a) = -p log p - (1 - p) log(1 - p), p = |I_a| / D.

Two averages over the (C, C) matrix, both kept and labelled:
  `mean_pairwise`:             the C (C - 1) distinct pairs (ours: how much two classes share);
  `mean_over_all_class_pairs`: all C^2 ordered pairs, each class paired with itself included (the
                               paper's number: the authors' `mutual_info.py` in
                               akshaybadola/decomposing-the-deep loops `for a in inds: for b in inds`
                               and takes `np.mean` of `mutual_info_score`, 0.0345 for ResNet-20 at
                               k = k' = 5). The C self-pairs add their entropies, so this is larger,
                               and dominated by the sets' sizes rather than their overlap.
"""
from __future__ import annotations

import torch


def jaccard_matrix(mask: torch.Tensor) -> torch.Tensor:
    """float (C, C): |I_a & I_b| / |I_a | I_b| for boolean masks (C, D)."""
    m = mask.double()
    inter = m @ m.T
    sizes = m.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def mutual_information_matrix(mask: torch.Tensor) -> torch.Tensor:
    """float (C, C): mutual information (nats) between each pair of indicator vectors."""
    m = mask.double()
    d = m.shape[1]
    n11 = m @ m.T
    a = m.sum(1)[:, None]
    b = m.sum(1)[None, :]
    joint = torch.stack([d - a - b + n11, b - n11, a - n11, n11]) / d     # p(0,0), p(0,1), p(1,0), p(1,1)
    pa = torch.stack([1 - a / d, 1 - a / d, a / d, a / d]).expand_as(joint)
    pb = torch.stack([1 - b / d, b / d, 1 - b / d, b / d]).expand_as(joint)
    terms = torch.where(joint > 0, joint * torch.log(joint / (pa * pb)), torch.zeros_like(joint))
    return terms.sum(0)


def mean_pairwise(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a symmetric (C, C) matrix."""
    c = matrix.shape[0]
    off = ~torch.eye(c, dtype=torch.bool)
    return matrix[off].mean().item() if c > 1 else float("nan")


def mean_over_all_class_pairs(matrix: torch.Tensor) -> float:
    """Mean of all C^2 entries of a (C, C) matrix, diagonal included: the paper's averaging of the
    mutual information (each class paired with itself too)."""
    return matrix.double().mean().item()
