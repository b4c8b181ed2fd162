"""Hyper-parameter search for explanations (the canonization paper's §4, sized for a CPU).

Space: LRP-gamma with one gamma per layer group (low / mid / high convolutions, classifier), its stabiliser
epsilon, canonized or not, and, when training features are given, (k, k') of the index sets explained
from the decomposed logit (start "influential"). Every configuration is explained on the same mosaic tiles
and scored with `evaluate_explanations`.

Objective (stated, one scalar): maximise the mean `objective` metric (default: the grid pointing game,
localisation), or "aggregate" (the paper's normalised mean over several metrics), over configurations whose
mean `floor_metric` (default: faithfulness correlation) reaches `floor` and, for a (k, k') search given test
features, whose decomposed head keeps `accuracy_floor` of the full head's test accuracy (`relative`, with
`acc_decomposed` beside it); configurations below a floor are kept in the table, marked infeasible. The search is an
exhaustive grid when it has at most `budget` points, else `budget` points drawn from it without
replacement (seeded).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .decomposed import evaluate
from .explanation_metrics import HIGHER_IS_BETTER, METRICS, aggregate_score, evaluate_explanations
from .explanations import LAYER_GROUPS, explain, heatmap, heatmap_figure
from .influence import influential_features
from .models import as_feature_model
from .mosaic import GridMosaics

DEFAULT_SPACE = {"low": (0.0, 0.25, 1.0), "mid": (0.0, 0.25, 1.0), "high": (0.0, 0.25, 1.0),
                 "classifier": (0.0, 0.25), "epsilon": (1e-6, 0.1), "canonize": (True, False)}
KNOWN = set(LAYER_GROUPS) | {"epsilon", "canonize", "k", "k_prime"}


@dataclass
class SearchResult:
    """frame: one row per configuration (its parameters, the metric means, feasible); best / worst: rows."""
    frame: pd.DataFrame
    best: pd.Series
    worst: pd.Series
    objective: str
    floor_metric: str
    floor: float


def configurations(space: dict, budget: int, seed: int = 0) -> list[dict]:
    """The grid of `space` (name -> values), or `budget` of its points drawn without replacement."""
    names = list(space)
    sizes = [len(space[n]) for n in names]
    total = int(np.prod(sizes))
    rng = np.random.default_rng(seed)
    picks = range(total) if total <= budget else sorted(rng.choice(total, budget, replace=False).tolist())
    return [dict(zip(names, (space[n][i] for n, i in zip(names, np.unravel_index(p, sizes))))) for p in picks]


def search_explanations(model, mosaics: GridMosaics, space: dict | None = None, budget: int = 24,
                        objective: str = "grid_pointing", floor_metric: str = "faithfulness_correlation",
                        floor: float = 0.0, train_features: torch.Tensor | None = None,
                        train_labels: torch.Tensor | None = None, max_tiles: int = 16, seed: int = 0,
                        test_features: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                        accuracy_floor: float = 0.0,
                        aggregate_of: tuple = ("grid_pointing", "faithfulness_correlation", "sparseness",
                                               "avg_sensitivity")) -> SearchResult:
    """Score every configuration (see the module docstring); best = highest objective among the feasible.

    objective="aggregate": the paper's normalised mean (`aggregate_score`) of the metrics `aggregate_of`."""
    space = dict(DEFAULT_SPACE if space is None else space)
    if unknown := set(space) - KNOWN:
        raise ValueError(f"unknown search parameters {sorted(unknown)}: use {sorted(KNOWN)}")
    for name in (floor_metric, *(aggregate_of if objective == "aggregate" else (objective,))):
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
    decomposed = "k" in space or "k_prime" in space
    if decomposed and (train_features is None or train_labels is None):
        raise ValueError("searching k, k' needs train_features and train_labels (the penultimate features phi)")
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    scored_accuracy = decomposed and test_features is not None and test_labels is not None
    if accuracy_floor and not scored_accuracy:
        raise ValueError("an accuracy_floor needs a (k, k') search with test_features and test_labels")
    model = as_feature_model(model).eval()
    m, t, c = (v[:max_tiles] for v in mosaics.expanded())
    x, masks = mosaics.normalize(mosaics.images[m]), mosaics.masks(t)
    metrics = tuple(dict.fromkeys((*(aggregate_of if objective == "aggregate" else (objective,)), floor_metric)))
    rows = []
    for config in configurations(space, budget, seed):
        gammas = {g: float(config[g]) for g in LAYER_GROUPS if g in config}
        canon = bool(config.get("canonize", True))
        influence, start = None, "full"
        if decomposed:
            influence = influential_features(train_features, train_labels, config.get("k", 5), config.get("k_prime", 5),
                                             num_classes=model.head.out_features)
            start = "influential"
        scores = evaluate_explanations(model, x, c, "lrp_gamma", start, influence, canon, masks, metrics, seed,
                                       gammas=gammas, epsilon=float(config.get("epsilon", 1e-6)))
        rows.append({**config, **{k: float(scores[k].mean()) for k in metrics}})
        if scored_accuracy:
            acc = evaluate(model.head, influence, test_features, test_labels)
            rows[-1].update(acc_decomposed=acc["acc_decomposed"], relative=acc["relative"])
    frame = pd.DataFrame(rows)
    if objective == "aggregate":
        frame["aggregate"] = aggregate_score(frame, aggregate_of)
    frame["feasible"] = frame[floor_metric] >= floor if HIGHER_IS_BETTER[floor_metric] else frame[floor_metric] <= floor
    if scored_accuracy:
        frame["feasible"] &= frame["relative"] >= accuracy_floor
    sign = 1 if HIGHER_IS_BETTER.get(objective, True) else -1
    ranked = frame.assign(_score=sign * frame[objective]).sort_values("_score", ascending=False, kind="stable")
    feasible = ranked[ranked.feasible]
    best = (feasible if len(feasible) else ranked).iloc[0].drop("_score")
    worst = ranked.iloc[-1].drop("_score")
    return SearchResult(ranked.drop(columns="_score").reset_index(drop=True), best, worst, objective, floor_metric, floor)


def search_figure(result: SearchResult):
    """The objective against gamma per layer group (mean over the other parameters); canonized solid, not dashed."""
    import matplotlib.pyplot as plt

    groups = [g for g in LAYER_GROUPS if g in result.frame]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(3 * max(1, len(groups)), 2.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for canon, style in ((True, "-"), (False, "--")):
            part = result.frame[result.frame.get("canonize", True) == canon] if "canonize" in result.frame else result.frame
            if len(part):
                means = part.groupby(group)[result.objective].mean()
                ax.plot(means.index, means.values, style, marker="o", label="canonized" if canon else "not canonized")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(f"gamma ({group})")
        ax.set_title(group, fontsize=9)
    axes[0, 0].set_ylabel(result.objective)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def best_worst_figure(model, mosaics: GridMosaics, result: SearchResult, n: int = 4,
                      train_features: torch.Tensor | None = None, train_labels: torch.Tensor | None = None):
    """Heatmaps of the best and the worst configuration on the first n mosaic tiles."""
    m, t, c = (v[:n] for v in mosaics.expanded())
    x = mosaics.normalize(mosaics.images[m])
    maps = {}
    for label, row in (("best", result.best), ("worst", result.worst)):
        influence, start = None, "full"
        if "k" in row or "k_prime" in row:
            influence = influential_features(train_features, train_labels, _size(row.get("k", 5)),
                                             _size(row.get("k_prime", 5)))
            start = "influential"
        gammas = {g: float(row[g]) for g in LAYER_GROUPS if g in row}
        maps[label] = heatmap(explain(model, x, c, "lrp_gamma", start, influence, bool(row.get("canonize", True)),
                                      gammas=gammas, epsilon=float(row.get("epsilon", 1e-6))))
    return heatmap_figure(x, maps, [f"class {int(k)}, tile {int(j)}" for k, j in zip(c, t)])


def _size(value):
    """A table cell back to an int count or a float fraction (pandas gives numpy scalars)."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if float(value).is_integer() and float(value) >= 1 else float(value)
