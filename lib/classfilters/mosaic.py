"""The grid pointing game (Böhle et al., CVPR 2022): localisation measured without annotations.

A mosaic tiles 2x2 images of four different classes (tiles 0 1 / 2 3: top-left, top-right, bottom-left,
bottom-right). Explaining the class of tile t, the score is the fraction of the positive relevance that
falls inside tile t:

    score = sum_{p in tile t} max(R_p, 0) / sum_p max(R_p, 0)        (NaN when no relevance is positive)

Chance is 0.25. JPEG CIFAR-10 test images (32x32) give 64x64 mosaics, digits (8x8) 16x16; a model with
global pooling accepts either size. `grid_mosaics(split, n, seed)` draws the mosaics reproducibly.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .data import ImageSplit, channel_stats
from .explanations import explain, heatmap
from .models import as_feature_model
from .visualize import fetch_images

TILES = 4


@dataclass
class GridMosaics:
    """M mosaics: images uint8 (M, C, 2H, 2W), tile_classes int64 (M, 4), source (M, 4) split indices."""
    images: torch.Tensor
    tile_classes: torch.Tensor
    source: torch.Tensor
    mean: tuple
    std: tuple
    name: str = "mosaics"

    def __len__(self):
        return len(self.images)

    def normalize(self, batch: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 mosaics -> float, scaled to [0, 1] and standardised with the source split's statistics."""
        batch = self.images if batch is None else batch
        mean, std = channel_stats(tuple(self.mean), tuple(self.std), batch.device)
        return (batch.float() / 255 - mean) / std

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mosaic index, tile, class) for every tile of every mosaic, each (4M,)."""
        m = torch.arange(len(self)).repeat_interleave(TILES)
        t = torch.arange(TILES).repeat(len(self))
        return m, t, self.tile_classes.reshape(-1)

    def masks(self, tiles: torch.Tensor) -> torch.Tensor:
        """bool (len(tiles), 1, 2H, 2W): the region of each given tile."""
        return tile_masks(self.images.shape[-2:], tiles)


def make_mosaic(images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Four images (C, H, W) of one size -> one (C, 2H, 2W) mosaic, tiles in reading order."""
    if len(images) != TILES:
        raise ValueError(f"a mosaic takes {TILES} images, got {len(images)}")
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(f"mosaic images must share one size (C, H, W), got {sorted(shapes)}: resize them first")
    a, b, c, d = images
    return torch.cat([torch.cat([a, b], -1), torch.cat([c, d], -1)], -2)


def tile_masks(size: tuple[int, int], tiles: torch.Tensor) -> torch.Tensor:
    h, w = int(size[0]), int(size[1])
    if h % 2 or w % 2:
        raise ValueError(f"a 2x2 mosaic has even sides, got {h}x{w}")
    tiles = torch.as_tensor(tiles).long().reshape(-1)
    rows = torch.arange(h)[None, :, None] >= h // 2
    cols = torch.arange(w)[None, None, :] >= w // 2
    return ((rows == (tiles // 2)[:, None, None].bool()) & (cols == (tiles % 2)[:, None, None].bool()))[:, None]


def grid_mosaics(split: ImageSplit, n: int, seed: int = 0) -> GridMosaics:
    """n mosaics from `split`, each of four distinct random classes in random tiles, one random image each
    (torch.Generator seeded with `seed`: the same split and seed give the same mosaics)."""
    if split.num_classes < TILES:
        raise ValueError(f"{split.name} has {split.num_classes} classes; a grid mosaic needs {TILES} different ones")
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(split.labels == c).flatten() for c in range(split.num_classes)]
    usable = torch.tensor([len(i) > 0 for i in by_class])
    if int(usable.sum()) < TILES:
        raise ValueError(f"{split.name} has images of only {int(usable.sum())} classes; need {TILES}")
    classes = torch.stack([torch.nonzero(usable).flatten()[torch.randperm(int(usable.sum()), generator=g)[:TILES]]
                           for _ in range(n)])
    source = torch.stack([torch.stack([by_class[c][torch.randint(len(by_class[c]), (1,), generator=g)][0]
                                       for c in row.tolist()]) for row in classes])
    images = fetch_images(split, source.reshape(-1))
    if images.dim() != 4:
        raise ValueError(f"{split.name} images are not (N, C, H, W)")
    tiles = images.reshape(n, TILES, *images.shape[1:])
    mosaics = torch.stack([make_mosaic(list(t)) for t in tiles])
    return GridMosaics(mosaics, classes, source, tuple(split.mean), tuple(split.std), f"{split.name}-mosaics-{seed}")


def grid_pointing_score(relevance: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """(N,) fraction of positive relevance inside each sample's tile; relevance (N, [C,] 2H, 2W)."""
    r = relevance.sum(1) if relevance.dim() == 4 else relevance
    positive = r.clamp(min=0)
    inside = (positive * tile_masks(r.shape[-2:], tiles)[:, 0].to(r.dtype)).sum((1, 2))
    total = positive.sum((1, 2))
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(r.dtype).tiny), torch.nan)


def grid_pointing_game(model, mosaics: GridMosaics, method: str = "lrp_epsilon_plus", start: str = "full",
                       influence=None, canonize: bool = True, batch_size: int = 64, **explain_kwargs) -> pd.DataFrame:
    """Explain the class of every tile of every mosaic; one row per (mosaic, tile): class, score."""
    m, t, c = mosaics.expanded()
    scores = []
    for lo in range(0, len(m), batch_size):
        sl = slice(lo, lo + batch_size)
        x = mosaics.normalize(mosaics.images[m[sl]])
        device = next(as_feature_model(model).parameters()).device
        r = explain(model, x.to(device), c[sl].to(device), method, start, influence, canonize, **explain_kwargs)
        scores.append(grid_pointing_score(heatmap(r).cpu(), t[sl]))
    return pd.DataFrame({"mosaic": m.numpy(), "tile": t.numpy(), "cls": c.numpy(),
                         "grid_pointing": torch.cat(scores).numpy(), "method": method, "start": start,
                         "canonized": canonize})


def grid_pointing_games(model, mosaics: GridMosaics, methods=("lrp_epsilon_plus",), starts=("full",),
                        canonize=(True, False), influence=None, **explain_kwargs) -> pd.DataFrame:
    """`grid_pointing_game` for every (method, start, canonized), rows concatenated (`summarize` them)."""
    return pd.concat([grid_pointing_game(model, mosaics, method, start, influence, canon, **explain_kwargs)
                      for method in methods for start in starts for canon in canonize], ignore_index=True)
