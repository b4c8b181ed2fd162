"""ExplainSteer: which spatial frequencies each spatial layer uses (ExplainFix §3).

For one spatial conv with N = O·I/g filters F (N × k²), saliencies s (N,) and the raster DCT-II
basis B (k² × k², `fixed_filters.dct_basis`), the coefficients are C = F Bᵀ and

    e^(d)[m]      = Σ_n s_n |C[n, m]|                                (k² values; reported in diagonal
                                                                       low → high order)
    e^(1)[ky]     = Σ_kx e^(d)[(ky, kx)]^(1/2)   (vertical frequencies, k values)
    e^(1)[k + kx] = Σ_ky e^(d)[(ky, kx)]^(1/2)   (horizontal frequencies, k values)
    e^(0)[f]      = e^(1)[f] + e^(1)[k + f]      (frequency f in either direction, 0 = DC)

Without saliency s_n = 1/N (the mean |coefficient|); with it, s_n = Σ|∇W_n| summed over the data
(saliency.py, "grad"), so e^(d) is the gradient-weighted spectrum. (The authors sum e^(1), e^(0)
over minibatches with the root taken per batch; here the root is taken once, on e^(d) summed over
all images: e^(d) is the same, e^(1) and e^(0) differ by that order of operations.)

`low_frequency_share` is the share of e^(d) in the lowest third of the basis (diagonal order: for
3×3 the DC, (0,1) and (1,0) filters), per layer, beside its null: the same share for i.i.d.
uniform random filters of the same count (for which every coefficient has the same law: ≈ 1/3).
"""
from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from .data import ImageSplit
from .fixed_filters import check_has_spatial_convs, dct_basis, diagonal_order
from .saliency import filter_saliency


def layer_spectrum(weight: torch.Tensor, saliency: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(e^(d) in diagonal order, e^(1), e^(0)) of one layer's weight (O, I, kh, kw); e^(0) is None for
    non-square kernels (whose e^(d) then stays in raster order)."""
    kh, kw = weight.shape[-2:]
    filters = weight.detach().double().reshape(-1, kh * kw)
    s = (torch.full((len(filters),), 1 / len(filters), dtype=torch.float64) if saliency is None
         else saliency.detach().double().reshape(-1))
    coeff = filters @ dct_basis(kh, kw).reshape(kh * kw, kh * kw).T
    ed = (s[:, None] * coeff.abs()).sum(0)
    root = ed.sqrt().reshape(kh, kw)
    e1 = torch.cat([root.sum(1), root.sum(0)])
    if kh != kw:
        return ed, e1, None
    e0 = e1[:kh] + e1[kh:]
    return ed[diagonal_order(kh)], e1, e0


def spectra(model: nn.Module, split: ImageSplit | None = None, classes: list[int] | None = None,
            max_images: int | None = 2048, device=None) -> pd.DataFrame:
    """Tidy spectra of every spatial layer: one row per (layer, spectrum, position).

    Without `split`, unweighted (s_n = 1/N); with it, weighted by each filter's gradient magnitude
    summed over up to `max_images` images of `classes`. Columns: layer (index), conv (name),
    kernel (k), spectrum ("ed", "e1", "e0"), position (0 = lowest), basis (the raster index for
    "ed"; "v<f>"/"h<f>" for "e1"; the frequency for "e0"), energy, weighted.
    """
    convs = check_has_spatial_convs(model)
    sal = filter_saliency(model, split, "grad", classes, max_images, device=device) if split is not None else {}
    rows = []
    for layer, (name, conv) in enumerate(convs):
        kh, kw = conv.kernel_size
        ed, e1, e0 = layer_spectrum(conv.weight, sal.get(name))
        order = diagonal_order(kh) if kh == kw else list(range(kh * kw))
        labels = {"ed": order, "e1": [f"v{f}" for f in range(kh)] + [f"h{f}" for f in range(kw)],
                  "e0": list(range(kh))}
        for spectrum, values in (("ed", ed), ("e1", e1), ("e0", e0)):
            if values is None:
                continue
            for position, value in enumerate(values.tolist()):
                rows.append({"layer": layer, "conv": name, "kernel": kh, "spectrum": spectrum, "position": position,
                             "basis": labels[spectrum][position], "energy": value, "weighted": split is not None})
    return pd.DataFrame(rows)


def _share(ed_diagonal: torch.Tensor) -> float:
    low = math.ceil(len(ed_diagonal) / 3)
    total = float(ed_diagonal.sum())
    return float(ed_diagonal[:low].sum()) / total if total > 0 else float("nan")


def low_frequency_share(model: nn.Module, null_draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """Per spatial layer (square kernels): the share of e^(d) in the lowest third of frequencies, and
    the null from `null_draws` sets of i.i.d. U(−1, 1) filters of the same shape (mean, 2.5 %, 97.5 %)."""
    convs = check_has_spatial_convs(model)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for layer, (name, conv) in enumerate(convs):
        kh, kw = conv.kernel_size
        if kh != kw:
            continue
        share = _share(layer_spectrum(conv.weight)[0])
        null = torch.tensor([_share(layer_spectrum(torch.rand(conv.weight.shape, generator=gen) * 2 - 1)[0])
                             for _ in range(null_draws)])
        rows.append({"layer": layer, "conv": name, "kernel": kh, "filters": conv.weight[:, :, 0, 0].numel(),
                     "low_share": share, "null_mean": float(null.mean()),
                     "null_lo": float(null.quantile(0.025)), "null_hi": float(null.quantile(0.975)),
                     "above_null": share > float(null.quantile(0.975))})
    return pd.DataFrame(rows)


def spectra_figure(table: pd.DataFrame, title: str | None = None, log: bool = False):
    """The layers × frequency heatmap of e^(d) (diagonal low → high order, top row = DC; smaller
    kernels padded with zeros at the bottom) with its marginals: energy per layer (top) and per
    basis position summed over layers (right). `table` is `spectra(...)`'s DataFrame."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    ed = table[table.spectrum == "ed"]
    if ed.empty:
        raise ValueError("the table has no e^(d) rows: pass the DataFrame that spectra() returns")
    matrix = ed.pivot_table(index="position", columns="layer", values="energy", fill_value=0.0).to_numpy()
    if log:
        matrix = np.log1p(np.log1p(matrix))
    fig = plt.figure(figsize=(max(5.0, 0.3 * matrix.shape[1] + 3), 5))
    grid = fig.add_gridspec(2, 2, width_ratios=(6, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    heat = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=heat)
    right = fig.add_subplot(grid[1, 1], sharey=heat)
    image = heat.imshow(matrix, aspect="auto", cmap="Greens", vmin=0, interpolation="nearest")
    heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat.set_xlabel("spatial layer")
    heat.set_ylabel("DCT-II basis filter (low → high frequency)")
    top.bar(np.arange(matrix.shape[1]), matrix.sum(0), color="tab:green")
    top.set_ylabel("per layer")
    top.tick_params(labelbottom=False)
    right.barh(np.arange(matrix.shape[0]), matrix.sum(1), color="tab:green")
    right.set_xlabel("all layers")
    right.tick_params(labelleft=False)
    fig.colorbar(image, ax=[heat, right], shrink=0.6, label="log log e^(d)" if log else "e^(d)")
    weighted = bool(ed.weighted.iloc[0])
    fig.suptitle(title or f"ExplainSteer e^(d) ({'saliency-weighted' if weighted else 'unweighted'})")
    return fig
