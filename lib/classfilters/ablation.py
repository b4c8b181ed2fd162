"""Table 8: replace a class's influential (or as many non-influential) features with noise.

For each test image of true class y, the features of I_y (or of a same-size random set
drawn once per class from outside I_y) are replaced with Gaussian noise, and accuracy is
measured again. Two variants:
  "authors": unscaled N(0, 1) noise, scored through the full head (the authors' code);
  "matched": noise with each feature's own mean and std on the training set, scored
             through the full head and through the decomposed head.
"""
from __future__ import annotations

import torch
from torch import nn

from .decomposed import DecomposedHead, accuracy, head_on
from .influence import InfluentialFeatures


def non_influential_mask(influence: InfluentialFeatures, seed: int = 0) -> torch.Tensor:
    """bool (C, D): for each class, |I_c| indices drawn at random from outside I_c."""
    mask = influence.mask
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask)
    for c in range(mask.shape[0]):
        outside = (~mask[c]).nonzero().flatten()
        size = min(int(mask[c].sum()), len(outside))
        out[c, outside[torch.randperm(len(outside), generator=gen, device="cpu")[:size].to(mask.device)]] = True
    return out


def with_noise(features: torch.Tensor, replace: torch.Tensor, mean: torch.Tensor | float = 0.0,
               std: torch.Tensor | float = 1.0, seed: int = 0) -> torch.Tensor:
    """`features` with the entries where `replace` (N, D) is True drawn from N(mean, std), on the
    features' device (the noise is drawn on the CPU: the same draw on every device)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(features.shape, generator=gen, device="cpu").to(features.device)
    noise = noise * torch.as_tensor(std, device=features.device) + torch.as_tensor(mean, device=features.device)
    return torch.where(replace.to(features.device), noise.to(features.dtype), features)


@torch.no_grad()
def noise_ablation(head: nn.Linear, influence: InfluentialFeatures, test_features: torch.Tensor,
                   test_labels: torch.Tensor, train_features: torch.Tensor, seed: int = 0) -> list[dict]:
    """Accuracies with influential vs non-influential features replaced by noise, both variants."""
    head = head_on(head, test_features.device)  # a copy: the model's head stays where it is
    labels = test_labels.long()
    sets = {"influential": influence.mask[labels.cpu()],
            "non-influential": non_influential_mask(influence, seed)[labels.cpu()]}
    mean, std = train_features.mean(0), train_features.std(0)
    decomposed = DecomposedHead(head, influence)
    rows = [{"variant": "none", "head": name, "replaced": "nothing", "accuracy": accuracy(h(test_features), labels)}
            for name, h in (("full", head), ("decomposed", decomposed))]
    for replaced, where in sets.items():
        authors = with_noise(test_features, where, 0.0, 1.0, seed)
        rows.append({"variant": "authors", "head": "full", "replaced": replaced, "accuracy": accuracy(head(authors), labels)})
        matched = with_noise(test_features, where, mean, std, seed)
        for name, h in (("full", head), ("decomposed", decomposed)):
            rows.append({"variant": "matched", "head": name, "replaced": replaced, "accuracy": accuracy(h(matched), labels)})
    return rows
