"""Table 7: where a class's influential features look, as maps upsampled over the image.

For each chosen image of true class y, from `FeatureModel.forward_maps` (N, D, h, w) (models whose
phi is the spatial mean of these maps: `FeatureModel.has_spatial_maps`; others are refused):
  standard         the mean of all D channel maps (what the whole layer sees),
  non-influential  the mean over |I_y| channels drawn outside I_y (the ablation's sets),
  influential      the mean over the channels of I_y,
each bilinearly upsampled to the image size and scaled to [0, 1] map by map (their raw means
are returned too). One batched forward pass; a handful of images takes well under a second on a CPU.
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


@torch.no_grad()
def class_maps(model: FeatureModel, split: ImageSplit, images: torch.Tensor, labels: torch.Tensor,
               influence: InfluentialFeatures, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, raw): maps float (N, 3, H, W) in [0, 1] in MAP_NAMES order; raw (N, 3) their mean activations."""
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


def overlay_figure(images: torch.Tensor, maps: torch.Tensor, titles: list[str], alpha: float = 0.75):
    """A grid: one row per image; the image, then each map over its grey copy. A map is drawn in a
    colour map whose opacity grows with its value (low values transparent, so the picture shows
    through; at most `alpha`), with one shared colour bar."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8.6, 2 * n), squeeze=False, layout="constrained")
    pictures = images.permute(0, 2, 3, 1).float() / 255
    pictures = pictures.expand(-1, -1, -1, 3) if pictures.shape[-1] == 1 else pictures
    cmap = plt.get_cmap("inferno")
    small = max(images.shape[-2:]) <= 32  # digits, CIFAR: show the pixels, not a blur of them
    for row in range(n):
        axes[row, 0].imshow(pictures[row].numpy(), interpolation="nearest" if small else "antialiased")
        axes[row, 0].set_ylabel(titles[row], fontsize=8)
        for col in range(3):
            overlay = cmap(maps[row, col].numpy())
            overlay[..., 3] = alpha * maps[row, col].numpy()
            axes[row, col + 1].imshow(pictures[row].mean(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                                      interpolation="nearest" if small else "antialiased")
            axes[row, col + 1].imshow(overlay)
    for col, title in enumerate(("image", *MAP_NAMES)):
        axes[0, col].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes[:, 1:], shrink=min(1.0, 3 / n + 0.2),
                 label="map value (each map scaled to [0, 1]; low values transparent)")
    return fig
