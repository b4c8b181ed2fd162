"""Table 8: replace features of the penultimate layer with Gaussian noise and measure accuracy again.

For each test image of true class y one of three sets of its D features is replaced:
  "influential":                   I_y, the k' features of its class (the paper's first arm);
  "non_influential_all":           every feature outside I_y, D - k' of them (the paper's second arm:
                                   the authors' procedure, reproduced exactly);
  "non_influential_matched_size":  |I_y| features drawn at random from outside I_y (a size-matched
                                   control, ours: new sets for every draw, one set per class).
with one of two noises:
  "standard_normal": unscaled N(0, 1), scored through the full head (the authors' procedure);
  "matched":         N(mean_j, std_j) with each feature's own mean and std over the training set,
                     scored through the full head and through the decomposed head (ours: the noise
                     then looks like the feature it replaces, so only the information is removed).
The authors' Table 8 is exactly the rows (standard_normal, full, influential) and (standard_normal,
full, non_influential_all); `authors_table8` marks them.

Every noisy row is repeated over `draws` seeded draws (the noise, and the random sets where there are
any); `summarize` gives mean and standard deviation over the draws.

Sources. The paper (§5.2.6) says only that "the values at pre-final layer of influential features and
non-influential features respectively" are replaced with Gaussian noise. The authors' public code
(akshaybadola/decomposing-the-deep, `main.py`, `modified_resnet.py`, `mutual_info.py`, read with
the search tool) holds the decomposed forward pass (pooled features, then `x[:, indices]`) but not
the ablation script; the procedure above (all D - k' outside I_y, unscaled N(0, 1), full head) is
the one issue 10 reports from the authors' code, and it reproduces the size of the paper's drop
(ResNet-20: 91.17 -> 82.24 there).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .decomposed import DecomposedHead, accuracy, head_on
from .influence import InfluentialFeatures

ARMS = ("influential", "non_influential_all", "non_influential_matched_size")


def non_influential_mask(influence: InfluentialFeatures, seed: int | torch.Generator = 0) -> torch.Tensor:
    """bool (C, D): for each class, |I_c| indices drawn at random from outside I_c (the size-matched arm)."""
    mask = influence.mask
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask)
    for c in range(mask.shape[0]):
        outside = (~mask[c]).nonzero().flatten()
        size = min(int(mask[c].sum()), len(outside))
        out[c, outside[torch.randperm(len(outside), generator=gen, device="cpu")[:size].to(mask.device)]] = True
    return out


def with_noise(features: torch.Tensor, replace: torch.Tensor, mean: torch.Tensor | float = 0.0,
               std: torch.Tensor | float = 1.0, seed: int | torch.Generator = 0) -> torch.Tensor:
    """`features` (N, D) with the entries where `replace` (N, D) is True drawn from N(mean, std);
    mean and std are floats or (D,) tensors (one per feature). On the features' device; the noise
    is drawn on the CPU, so a seed gives the same draw on every device."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    noise = torch.randn(features.shape, generator=gen, dtype=torch.float32, device="cpu").to(features.device)
    noise = noise * torch.as_tensor(std, device=features.device) + torch.as_tensor(mean, device=features.device)
    return torch.where(replace.to(features.device), noise.to(features.dtype), features)


def arm_masks(influence: InfluentialFeatures, labels: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """bool (N, D) per arm: the features replaced in each test image (rows chosen by its true class)."""
    mask, labels = influence.mask, labels.cpu()  # the index sets live on the CPU; with_noise moves the masks
    return {"influential": mask[labels], "non_influential_all": ~mask[labels],
            "non_influential_matched_size": non_influential_mask(influence, gen)[labels]}


def noise_ablation(head: nn.Linear, influence: InfluentialFeatures, test_features: torch.Tensor,
                   test_labels: torch.Tensor, train_features: torch.Tensor, seed: int = 0,
                   draws: int = 10) -> list[dict]:
    """One row per (noise, head, arm, draw), plus the two noiseless rows (noise "none", draw 0).

    Keys: noise, head, replaced, draw, accuracy, authors_table8. Draw i uses the generator seeded
    with seed + i for both the random sets and the noise, so a row is reproducible on its own.
    """
    with torch.no_grad():
        if draws < 1:
            raise ValueError(f"draws must be at least 1, got {draws}")
        head = head_on(head, test_features.device)  # a float32 copy: the model's head stays where it is
        labels = test_labels.long()
        phi = test_features.float()
        decomposed = DecomposedHead(head, influence)
        heads = {"full": head, "decomposed": decomposed}
        mean, std = train_features.float().mean(0), train_features.float().std(0)
        rows = [{"noise": "none", "head": name, "replaced": "nothing", "draw": 0, "accuracy": accuracy(h(phi), labels),
                 "authors_table8": name == "full"} for name, h in heads.items()]
        for draw in range(draws):
            gen = torch.Generator().manual_seed(seed + draw)
            for arm, where in arm_masks(influence, labels, gen).items():
                noisy = with_noise(phi, where, 0.0, 1.0, gen)
                rows.append({"noise": "standard_normal", "head": "full", "replaced": arm, "draw": draw,
                             "accuracy": accuracy(head(noisy), labels), "authors_table8": arm != ARMS[2]})
                noisy = with_noise(phi, where, mean, std, gen)
                rows += [{"noise": "matched", "head": name, "replaced": arm, "draw": draw,
                          "accuracy": accuracy(h(noisy), labels), "authors_table8": False} for name, h in heads.items()]
        return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation of the accuracy over the draws of each (noise, head, replaced),
    in the order the rows come: keys noise, head, replaced, authors_table8, draws, mean, std."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["noise"], r["head"], r["replaced"]), []).append(r)
    out = []
    for (noise, head, replaced), group in groups.items():
        acc = [r["accuracy"] for r in group]
        m = sum(acc) / len(acc)
        s = math.sqrt(sum((a - m) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
        out.append({"noise": noise, "head": head, "replaced": replaced, "authors_table8": group[0]["authors_table8"],
                    "draws": len(acc), "mean": m, "std": s})
    return out
