"""Table 7: where a class's influential features look, as maps upsampled over the image.

For each chosen image of true class y, from `FeatureModel.forward_maps` (N, D, h, w) (models whose
phi is the spatial mean of these maps: `FeatureModel.has_spatial_maps`; others are refused):
  standard         the mean of all D channel maps (what the whole layer sees),
  non-influential  the mean over |I_y| channels drawn outside I_y (the ablation's sets),
  influential      the mean over the channels of I_y,
each bilinearly upsampled to the image size and scaled to [0, 1] map by map (their raw means
are returned too). One batched forward pass; a handful of images takes well under a second on a CPU.
The figure that draws them is `map_figure.overlay_figure`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ablation import non_influential_mask
from .data import ImageSplit
from .influence import InfluentialFeatures
from .models import FeatureModel

MAP_NAMES = ("standard", "non-influential", "influential")


def example_index(labels: torch.Tensor, max_images: int = 8) -> torch.Tensor:
    """The first image of each class present, in class order, at most `max_images`."""
    order = torch.argsort(labels, stable=True)
    present = torch.unique(labels)
    first = order[torch.searchsorted(labels[order], present)]
    return first[:max_images]


def fetch_images(split: ImageSplit, index: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) images at `index`, from memory or decoded in one batch."""
    if split.images is not None:
        return split.images[index]
    subset = torch.utils.data.Subset(split.dataset, index.tolist())
    images, _ = next(iter(torch.utils.data.DataLoader(subset, batch_size=len(index))))
    return images


def class_maps(model: FeatureModel, split: ImageSplit, images: torch.Tensor, labels: torch.Tensor,
               influence: InfluentialFeatures, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, raw): maps float (N, 3, H, W) in [0, 1] in MAP_NAMES order; raw (N, 3) their mean activations."""
    with torch.no_grad():
        model.require_spatial_maps("Table 7's class maps")
        model.eval().cpu()
        maps = model.forward_maps(split.normalize(images)).float()
        labels = labels.long()
        chosen = [torch.ones_like(influence.mask[labels]), non_influential_mask(influence, seed)[labels],
                  influence.mask[labels]]
        stack = torch.stack([(maps * m.float()[:, :, None, None]).sum(1) / m.float().sum(1).clamp(min=1)[:, None, None]
                             for m in chosen], 1)                     # (N, 3, h, w)
        raw = stack.mean((2, 3))
        up = F.interpolate(stack, size=images.shape[-2:], mode="bilinear", align_corners=False)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        return (up - low) / (high - low).clamp(min=1e-8), raw


def image_correlation(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(N, 3): Pearson correlation of each map with the image's brightness (on digits: with the ink)."""
    gray = images.float().mean(1, keepdim=True)
    a = gray - gray.mean((2, 3), keepdim=True)
    b = maps - maps.mean((2, 3), keepdim=True)
    return (a * b).sum((2, 3)) / ((a.square().sum((2, 3)) * b.square().sum((2, 3))).sqrt().clamp(min=1e-8))
