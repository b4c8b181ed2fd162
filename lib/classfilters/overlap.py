"""How much the classes' index sets overlap: Jaccard matrix and pairwise mutual information.

The mutual information follows our reading of the authors' comparison with CSG: for two
classes, the index sets are indicator vectors over the D features, and the score is the
mutual information (in nats, as scikit-learn's `mutual_info_score`) between the two
indicators, averaged over all pairs of classes. Disjoint small sets score near 0.
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
