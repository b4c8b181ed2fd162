"""Measured explanation quality (Quantus 0.6.0), per sample, for any `explain` configuration.

The evaluated function is the explained one: `started_model(model, influence, start)`'s logit of the target
(logits, no softmax), so a decomposed explanation is judged against the decomposed logit.

  faithfulness    pixel_flipping_aopc: Quantus PixelFlipping curves f(x_k) (most relevant first, replaced by
                    the image mean), summarised as AOPC = mean_k (f(x_0) - f(x_k))           (higher better)
                  region_perturbation_aopc: Quantus RegionPerturbation (patches, most relevant first),
                    AOPC = mean_k (f(x_0) - f(x_k))                                          (higher better)
                  faithfulness_correlation: Pearson r between the relevance of random pixel subsets and
                    the logit drop when they are replaced                                   (higher better)
  localisation    relevance_mass, relevance_rank (|R| inside the mask; top-|mask| pixels inside),
                  pointing_game (max |R| inside), grid_pointing (positive R inside; mosaic.py)  (higher better)
  complexity      sparseness: Gini index of |R|                                              (higher better)
  randomisation   random_logit: SSIM between explanations of the target and of a random other class
                                                                                             (lower better)
                  model_randomisation: Quantus MPRT, mean Spearman r to the original explanation while
                    layers are randomised top-down (costly: one explanation per layer)       (lower better)
  robustness      avg_sensitivity: mean change of the (second-moment normalised) explanation under
                    uniform input noise                                                     (lower better)

Quantus 0.6.0 calls `np.trapz`, removed in numpy 2.4: this module restores it as `np.trapezoid` when absent.
Localisation needs masks (N, 1, H, W): the tiles of grid mosaics (`evaluate_mosaics`).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

if not hasattr(np, "trapz"):  # quantus 0.6.0 needs it; numpy >= 2.4 only has trapezoid
    np.trapz = np.trapezoid

import quantus

from .explanations import check_inputs, explain, heatmap, started_model
from .models import as_feature_model
from .mosaic import GridMosaics, grid_pointing_score

METRICS = ("pixel_flipping_aopc", "region_perturbation_aopc", "faithfulness_correlation", "relevance_mass",
           "relevance_rank", "pointing_game", "grid_pointing", "sparseness", "random_logit", "avg_sensitivity",
           "model_randomisation")
DEFAULT_METRICS = METRICS[:-1]
LOCALISATION = ("relevance_mass", "relevance_rank", "pointing_game", "grid_pointing")
HIGHER_IS_BETTER = {m: m not in ("random_logit", "avg_sensitivity", "model_randomisation") for m in METRICS}


def second_moment_normalise(a: np.ndarray, normalise_axes=None, **kwargs) -> np.ndarray:
    """a / sqrt(mean(a^2)) per sample (the canonization paper's normalisation); zeros stay zeros."""
    axes = tuple(range(1, a.ndim))
    scale = np.sqrt((a ** 2).mean(axis=axes, keepdims=True))
    return a / np.where(scale > 0, scale, 1.0)


def aopc(start_values: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """(N,) area over the perturbation curve: mean_k (f(x_0) - f(x_k)) for curves (N, L) of f(x_k), k = 1..L."""
    curves = np.asarray(curves, dtype=float)
    return (np.asarray(start_values, dtype=float)[:, None] - curves).mean(1)


def quantus_explainer(method: str, canonize: bool, **explain_kwargs):
    """An `explain_func` for Quantus: (model, inputs, targets) numpy -> (N, 1, H, W) numpy relevance."""
    def explain_func(model, inputs, targets, **_):
        device = next(model.parameters()).device
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=device)
        t = torch.as_tensor(np.asarray(targets), device=device).long().reshape(-1)
        r = explain(model, x, t, method, "full", canonize=canonize, **explain_kwargs)
        return heatmap(r)[:, None].cpu().numpy()
    return explain_func


def evaluate_explanations(model, images: torch.Tensor, targets, method: str = "lrp_epsilon_plus", start: str = "full",
                          influence=None, canonize: bool = True, masks: torch.Tensor | None = None,
                          metrics: tuple = DEFAULT_METRICS, seed: int = 0, **explain_kwargs) -> pd.DataFrame:
    """One row per image, one column per metric (see the module docstring), for one explanation configuration.

    images: float (N, C, H, W), normalised; targets: the explained classes; masks: bool (N, 1, H, W) object
    regions for the localisation metrics (without them those metrics are left out)."""
    model = as_feature_model(model).eval()
    targets = check_inputs(model, images, targets, method, explain_kwargs.get("gammas"), canonize)
    if unknown := [m for m in metrics if m not in METRICS]:
        raise ValueError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")
    if masks is None:
        metrics = [m for m in metrics if m not in LOCALISATION]
    elif tuple(masks.shape) != (len(images), 1, *images.shape[-2:]):
        raise ValueError(f"masks must be (N, 1, H, W) = {(len(images), 1, *images.shape[-2:])}, got {tuple(masks.shape)}")
    explained = started_model(model, influence, start).eval()
    relevance = explain(explained, images, targets, method, "full", canonize=canonize, **explain_kwargs)
    a = heatmap(relevance)[:, None].cpu().numpy()
    x, y = images.detach().cpu().numpy(), targets.cpu().numpy()
    s = masks.cpu().numpy().astype(float) if masks is not None else None
    h, w = images.shape[-2:]
    explain_func = quantus_explainer(method, canonize, **explain_kwargs)
    device = str(next(explained.parameters()).device)
    common = {"model": explained, "x_batch": x, "y_batch": y, "a_batch": a, "device": device}
    rows = {}
    np.random.seed(seed)
    torch.manual_seed(seed)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        start_values = explained(images)[torch.arange(len(y)), targets].cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in metrics:
            if name == "pixel_flipping_aopc":
                step = pixel_step(h * w)
                curves = quantus.PixelFlipping(features_in_step=step, perturb_baseline="mean", disable_warnings=True)(
                    **common, softmax=False)
                rows[name] = aopc(start_values, curves)
            elif name == "region_perturbation_aopc":
                drops = quantus.RegionPerturbation(patch_size=max(2, h // 8), regions_evaluation=16,
                                                   perturb_baseline="mean", disable_warnings=True)(**common, softmax=False)
                rows[name] = np.asarray(drops, dtype=float).mean(1)
            elif name == "faithfulness_correlation":
                rows[name] = quantus.FaithfulnessCorrelation(
                    nr_runs=20, subset_size=max(1, h * w // 16), perturb_baseline="mean", abs=False,
                    similarity_func=quantus.similarity_func.correlation_pearson, return_aggregate=False,
                    disable_warnings=True)(**common, softmax=False)
            elif name == "relevance_mass":
                rows[name] = quantus.RelevanceMassAccuracy(abs=True, disable_warnings=True)(**common, s_batch=s)
            elif name == "relevance_rank":
                rows[name] = quantus.RelevanceRankAccuracy(abs=True, disable_warnings=True)(**common, s_batch=s)
            elif name == "pointing_game":
                rows[name] = quantus.PointingGame(disable_warnings=True)(**common, s_batch=s)
            elif name == "grid_pointing":
                rows[name] = grid_pointing_score(torch.from_numpy(a[:, 0]), mask_tiles(masks.cpu())).numpy()
            elif name == "sparseness":
                rows[name] = quantus.Sparseness(abs=True, disable_warnings=True)(**common)
            elif name == "random_logit":
                rows[name] = quantus.RandomLogit(num_classes=model.num_classes, similarity_func=quantus.similarity_func.ssim,
                                                 disable_warnings=True)(**common, explain_func=explain_func,
                                                                        explain_func_kwargs={})
            elif name == "avg_sensitivity":
                rows[name] = quantus.AvgSensitivity(
                    nr_samples=3, lower_bound=0.1, normalise=True, normalise_func=second_moment_normalise,
                    disable_warnings=True)(**common, explain_func=explain_func, explain_func_kwargs={})
            elif name == "model_randomisation":
                scores = quantus.MPRT(layer_order="top_down", similarity_func=quantus.similarity_func.correlation_spearman,
                                      return_average_correlation=True, disable_warnings=True)(
                    **common, explain_func=explain_func, explain_func_kwargs={})
                rows[name] = np.asarray(scores, dtype=float)
    frame = pd.DataFrame({k: np.asarray(v, dtype=float).reshape(-1) for k, v in rows.items()})
    frame.insert(0, "target", y)
    return frame.assign(method=method, start=start, canonized=canonize)


def pixel_step(pixels: int, steps: int = 16) -> int:
    """features_in_step dividing H*W into about `steps` steps per channel (Quantus requires a divisor)."""
    step = max(1, pixels // steps)
    while pixels % step:
        step -= 1
    return step


def mask_tiles(masks: torch.Tensor) -> torch.Tensor:
    """The tile (0..3) each mosaic mask covers."""
    h, w = masks.shape[-2:]
    top = masks[:, 0, : h // 2].flatten(1).any(1)
    left = masks[:, 0, :, : w // 2].flatten(1).any(1)
    return (~top).long() * 2 + (~left).long()


def evaluate_mosaics(model, mosaics: GridMosaics, methods=("lrp_epsilon_plus",), starts=("full",),
                     canonize=(True, False), influence=None, metrics: tuple = DEFAULT_METRICS, max_tiles: int = 32,
                     seed: int = 0, **explain_kwargs) -> pd.DataFrame:
    """Per-sample metrics of every (method, start, canonized) on mosaic tiles (the first `max_tiles` of them),
    the explained class's tile as its localisation mask. Concatenated rows; `summarize` gives the table."""
    m, t, c = mosaics.expanded()
    m, t, c = m[:max_tiles], t[:max_tiles], c[:max_tiles]
    x, masks = mosaics.normalize(mosaics.images[m]), mosaics.masks(t)
    model = as_feature_model(model).eval()
    for method in methods:  # every bad argument raises before any work
        check_inputs(model, x, c, method, explain_kwargs.get("gammas"), any(canonize))
    frames = [evaluate_explanations(model, x, c, method, start, influence, canon, masks, metrics, seed,
                                    **explain_kwargs).assign(mosaic=m.numpy(), tile=t.numpy())
              for method in methods for start in starts for canon in canonize]
    return pd.concat(frames, ignore_index=True)


def aggregate_score(table: pd.DataFrame, metrics) -> pd.Series:
    """The canonization paper's aggregate (its `compute_rankings`), one value per row of `table` (one row per
    configuration, metric means as columns): each metric's |value| scaled to (0, 1] across the rows, by
    v / max v where higher is better and by min v / v where lower is better, then averaged over the metrics."""
    if not len(metrics) or (missing := [m for m in metrics if m not in table]):
        raise ValueError(f"aggregate needs metric columns, missing {missing if metrics else 'all'}")
    parts = []
    for name in metrics:
        v = table[name].abs().astype(float)
        parts.append(v / v.max() if HIGHER_IS_BETTER[name] else v.min() / v)
    return pd.concat(parts, axis=1).mean(axis=1)


def summarize(frame: pd.DataFrame, by=("method", "start", "canonized"), n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean and 95% percentile-bootstrap interval of every metric column per group (NaNs dropped); `n` counts the
    rows that at least one metric scored (a tile no metric could score, e.g. a zero heatmap, is not counted) and
    `rows` all rows of the group."""
    rng = np.random.default_rng(seed)
    metrics = [col for col in frame.columns if col in METRICS]
    rows = []
    for key, group in frame.groupby(list(by), sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for name in metrics:
            v = group[name].dropna().to_numpy()
            if len(v) == 0:
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = np.nan, np.nan, np.nan
                continue
            boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = v.mean(), *np.percentile(boots, [2.5, 97.5])
        row["n"] = int(group[metrics].notna().any(axis=1).sum())
        row["rows"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows)
