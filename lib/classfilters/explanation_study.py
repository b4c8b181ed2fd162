"""Notebook 10's tables and figures, one call each: do a class's influential features look at the object?

Study layer over canonization.py, explanations.py, mosaic.py, explanation_metrics.py and search.py. What a
model family cannot do is skipped with a printed note, never a crash, never a silent gap:

  canonization_table   `canonization_check` per model; a family without a canonizer gets a row saying so
  canonize_options     (True, False) when the model's family has a canonizer, else (False,) and a note
  study_mosaics        2x2 grid mosaics of the test split (None and a note when it has fewer than 4 classes)
  pointing_table       the grid pointing game per (method, start, canonized): score = share of the positive
                       relevance inside the explained class's tile (chance 0.25), mean and 95% bootstrap interval
  metric_table         `evaluate_mosaics` per (method, canonized), mean and 95% bootstrap interval per metric
  gamma_search / k_search
                       `search_explanations` over gamma per layer group and epsilon (canonized or not), and over
                       (k, k') of the decomposed explanation (start "influential"), at the profile's objective
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .canonization import SUPPORTED_FAMILIES, canonization_check, canonizer_family
from .explanation_metrics import evaluate_mosaics, summarize
from .explanations import STARTS, explanation_figure
from .models import as_feature_model, build_model
from .mosaic import TILES, GridMosaics, grid_mosaics, grid_pointing_games
from .search import SearchResult, search_explanations


def unsupported_note(name: str) -> str:
    return (f"{name}: no canonizer for this family (supported: {', '.join(SUPPORTED_FAMILIES.values())}); "
            f"its explanations are computed on the model as it is, the canonized column is skipped")


def canonize_options(model: nn.Module, name: str = "the model", log=print) -> tuple[bool, ...]:
    """(True, False): explain canonized and not; (False,) with a printed note when the family has no canonizer."""
    if canonizer_family(as_feature_model(model)) is None:
        log(unsupported_note(name))
        return (False,)
    return (True, False)


def with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh model's are mean 0, var 1: folding them
    would test nothing), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if bn.affine:
                    bn.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1)
                    bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def canonization_table(models: dict[str, nn.Module], check_families=(), seed: int = 0, log=print) -> pd.DataFrame:
    """`canonization_check` of `models` (name -> model) and of the torchvision architectures `check_families`
    (random weights and BatchNorm statistics); a model whose family has no canonizer gets a row with
    `family` "unsupported" and a printed note instead of an error."""
    torch.manual_seed(seed)
    every = {**models, **{f"{arch} (random)": with_random_statistics(build_model(arch, num_classes=10), seed)
                          for arch in check_families}}
    rows = []
    for name, model in every.items():
        model = as_feature_model(model).eval()
        if canonizer_family(model) is None:
            log(unsupported_note(name))
            rows.append(pd.DataFrame([{"model": name, "family": "unsupported"}]))
            continue
        probe = None
        if model.input_size is not None:  # a folder model: probe at its crop size (224, ...) is costly; 64 is enough
            probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        rows.append(canonization_check({name: model}, probe))
    return pd.concat(rows, ignore_index=True)


def study_mosaics(split, n: int, seed: int = 0, log=print) -> GridMosaics | None:
    """`grid_mosaics(split, n, seed)`, or None with a printed note when the split has fewer than 4 classes."""
    if split.num_classes < TILES:
        log(f"{split.name} has {split.num_classes} classes: a 2x2 grid mosaic needs {TILES} different ones, so the "
            f"grid pointing game, the metric table and the search are skipped")
        return None
    return grid_mosaics(split, n, seed)


def heatmaps(subject, influence, n: int, method: str = "lrp_epsilon_plus", log=print):
    """`explanation_figure` for the first test image of n classes: standard (full), influential and
    non-influential starts, canonized and not (not only, with a note, when the family has no canonizer)."""
    from .visualize import example_index, fetch_images
    test = subject.test
    index = example_index(test.labels, n)
    images = test.normalize(fetch_images(test, index))
    target = test.labels[index]
    titles = [f"class {test.classes[int(c)]}" for c in target]
    return explanation_figure(subject.model, images, target, influence.mask, method, STARTS,
                              canonize_options(subject.model, subject.name, log), titles)


def pointing_table(model, mosaics: GridMosaics | None, methods, influence, name: str = "the model",
                   log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per tile, summary): the grid pointing game of every method x start (full, influential, non-influential)
    x canonized or not; the summary holds the mean score with its 95% bootstrap interval and n tiles."""
    if mosaics is None:
        return pd.DataFrame(), pd.DataFrame()
    frame = grid_pointing_games(model, mosaics, tuple(methods), STARTS, canonize_options(model, name, log),
                                influence.mask)
    return frame, summarize(frame)


def metric_table(model, mosaics: GridMosaics | None, methods, metrics, max_tiles: int, influence=None,
                 start: str = "full", name: str = "the model", seed: int = 0, log=print) -> pd.DataFrame:
    """Mean and 95% bootstrap interval of every metric per (method, canonized) on the first `max_tiles` tiles."""
    if mosaics is None:
        return pd.DataFrame()
    frame = evaluate_mosaics(model, mosaics, tuple(methods), (start,), canonize_options(model, name, log),
                             influence.mask if influence is not None else None, tuple(metrics), max_tiles, seed)
    return summarize(frame)


def gamma_search(model, mosaics: GridMosaics | None, space: dict, budget: int, objective: str, floor: float,
                 max_tiles: int, name: str = "the model", seed: int = 0, log=print) -> SearchResult | None:
    """LRP-gamma over `space` (gamma per layer group, epsilon; canonized or not where the family allows)."""
    if mosaics is None:
        return None
    space = {**{key: tuple(values) for key, values in space.items()},
             "canonize": canonize_options(model, name, log)}
    return search_explanations(model, mosaics, space, budget, objective, floor=floor, max_tiles=max_tiles, seed=seed)


def k_search(subject, mosaics: GridMosaics | None, ks, k_primes, budget: int, objective: str, floor: float,
             max_tiles: int, seed: int = 0, log=print, accuracy_floor: float = 0.0) -> SearchResult | None:
    """(k, k') of the explanation started from the decomposed logit (influential features only), LRP-gamma at
    its defaults on the canonized model where the family allows; the index sets from the training features.
    Each row carries the decomposed head's test accuracy (`acc_decomposed`, `relative`); a configuration
    whose `relative` is below `accuracy_floor` is infeasible. Column `best`: "explanation" on the best
    feasible row (none when no row is feasible; `SearchResult.best` then falls back to the best row overall),
    "accuracy" on the highest `relative`, "-" elsewhere."""
    if mosaics is None:
        return None
    space = {"k": tuple(ks), "k_prime": tuple(k_primes), "canonize": canonize_options(subject.model, subject.name, log)[:1]}
    result = search_explanations(subject.model, mosaics, space, budget, objective, floor=floor,
                               train_features=subject.train_features, train_labels=subject.train.labels,
                               test_features=subject.test_features, test_labels=subject.test.labels,
                               accuracy_floor=accuracy_floor, max_tiles=max_tiles, seed=seed)
    frame = result.frame
    marks = pd.Series("-", index=frame.index)  # "-", not "": an empty cell reads back from CSV as NaN
    if frame.feasible.any():
        marks[frame.index[frame.feasible][0]] = "explanation"  # the frame is sorted best first
    if frame.relative.notna().any():  # NaN everywhere when the full head scores nothing
        top = frame.relative.idxmax()
        marks[top] = "explanation, accuracy" if marks[top] != "-" else "accuracy"
    result.frame = frame.assign(best=marks)
    return result


def search_summary(result: SearchResult | None) -> pd.DataFrame:
    """Every scored configuration, best first (the objective, the floor metric, feasible); empty when skipped."""
    return pd.DataFrame() if result is None else result.frame
