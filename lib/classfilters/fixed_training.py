"""A network trained from scratch with its spatial filters fixed (ExplainFix's claim, `train_fixed`).

`train_fixed(name, train, init)` builds `name`, fixes every spatial conv at `init` ("learned": nothing
fixed), trains it with the library's loop and caches the weights with the measured seconds per epoch.
The cache key holds the model, data, recipe, precision, seed, init (and GuidedSteer source's weights),
the model's forward code and the source of this file, `fixed_filters` and `train`: the code that made
the weights, and nothing else (an edit of the tables built on top retrains nothing).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict

import torch
from torch import nn

from . import cache, fixed_filters
from .data import ImageSplit
from .device import training_precision
from .fixed_filters import _canonical_init, check_has_spatial_convs, fix_spatial_filters
from .models import FeatureModel, build_model, fingerprint
from .train import Recipe, train_classifier, training_key

SOURCE_DIGEST = cache.source_digest(sys.modules[__name__])  # this file as imported (a key of fixed-filter models)


def train_fixed(name: str, train: ImageSplit, init: str = "learned", recipe: Recipe | None = None, seed: int = 0,
                source: nn.Module | None = None, device=None, progress: bool = False) -> tuple[FeatureModel, float]:
    """(model trained on `train` with spatial filters fixed at `init`, seconds per epoch when trained)."""
    recipe = recipe or Recipe()
    init = "learned" if init == "learned" else _canonical_init(init)
    in_channels = train.images.shape[1]
    torch.manual_seed(seed)
    model = build_model(name, num_classes=train.num_classes, in_channels=in_channels)
    check_has_spatial_convs(model)  # refused before any training, learned or not
    if init != "learned":
        fix_spatial_filters(model, init, source=source, seed=seed)
    key = {"model": name, "data": train.fingerprint, "recipe": asdict(recipe),
           "precision": training_precision(recipe.precision, device), "seed": seed, "init": init,
           "source": fingerprint(source) if init == "GuidedSteer" else None, "in_channels": in_channels,
           "classes": train.num_classes, "kind": "explainfix-fixed",
           **training_key(model, fixed_filters.SOURCE_DIGEST, SOURCE_DIGEST)}
    if (blob := cache.load("models", key)) is not None:
        seconds = float(blob.pop("__seconds_per_epoch__"))
        model.load_state_dict(blob)
        return model.eval(), seconds
    start = time.perf_counter()
    train_classifier(model, train, recipe, device, seed, progress)
    seconds = (time.perf_counter() - start) / max(recipe.epochs, 1)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    cache.save("models", key, {**state, "__seconds_per_epoch__": torch.tensor(seconds)})
    return model.cpu().eval(), seconds


