"""Algorithm 1 written the plain way, as the authors did: a loop over classes and images
with a full sort of every feature vector. Slow on purpose: the numpy version is the oracle
the tests compare `influence.influential_features` with; both are the baselines the
benchmarks measure against.
"""
from __future__ import annotations

import numpy as np


def influential_features_loop(features, labels, k: int, k_prime: int, num_classes: int) -> list[list[int]]:
    """I_c for integer k, k' (ties toward the lower index, as the library's rule)."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    d = features.shape[1]
    scores = np.abs(features) if (features < 0).any() else features
    result = []
    for c in range(num_classes):
        histogram = np.zeros(d, dtype=np.int64)
        for row in scores[labels == c]:
            top = np.argsort(-row, kind="stable")[:k]
            for j in top:
                histogram[j] += 1
        result.append([int(j) for j in np.argsort(-histogram, kind="stable")[:k_prime]])
    return result


def influential_features_torch_loop(features, labels, k: int, k_prime: int, num_classes: int) -> list[list[int]]:
    """The same loop in PyTorch, one `torch.sort` per image, as the authors' scripts do it."""
    import torch
    histograms = torch.zeros(num_classes, features.shape[1], dtype=torch.long)
    for c in range(num_classes):
        for row in features[labels == c]:
            histograms[c, torch.sort(row, descending=True, stable=True).indices[:k]] += 1
    return torch.sort(histograms, dim=1, descending=True, stable=True).indices[:, :k_prime].tolist()
