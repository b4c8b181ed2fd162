"""Table 7's figure: each image beside its class maps (`visualize.class_maps`) drawn over a grey copy.

Drawing only, apart from the maps' computation (visualize.py): its content (what each axis shows, the
overlay's opacity, the colour bar) is tested by reading the figure back from matplotlib; its look (sizes,
fonts) is not pinned by any test, and the module is left out of mutation testing (benchmarks/README.md).
"""
from __future__ import annotations

import torch

from .visualize import MAP_NAMES


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
