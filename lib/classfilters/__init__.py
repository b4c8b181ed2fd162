"""classfilters: find the few penultimate features each class of a CNN relies on.

Implements "Decomposing the Deep: Finding Class Specific Filters in Deep CNNs": Algorithm 1
(influence.py), the decomposed final layer and the (k, k') grid (decomposed.py), the noise
ablation (ablation.py), index-set overlap (overlap.py), on any classifier whose head is
global pooling + one linear layer (models.py), with cached feature extraction (features.py)
over digits, CIFAR-10 or ImageNet-style folders (data.py). Explanations of a class's influential
features: canonization (canonization.py), LRP and gradient methods started from the full, influential
or non-influential logit (explanations.py), their measured quality (explanation_metrics.py), the grid
pointing game (mosaic.py) and a hyper-parameter search (search.py).
"""
__version__ = "0.1.0"

from .ablation import noise_ablation
from .data import DatasetError, ImageSplit, open_dataset
from .decomposed import DecomposedHead, accuracy, evaluate, grid_accuracy
from .features import extract_features, extract_features_many, init_distributed
from .influence import InfluentialFeatures, influential_features
from .models import CifarResNet, FeatureModel, as_feature_model, build_model, load_cifar_resnet
from .overlap import jaccard_matrix, mean_pairwise, mutual_information_matrix
from .train import Recipe, finetune_head, finetune_network, train_classifier, trained_model

# Explanations (zennit, Quantus: seconds to import) load on first use: classfilters.explain(...) works as usual.
_LAZY = {
    "canonization": ("SUPPORTED_FAMILIES", "CanonizationError", "Canonized", "canonization_check", "canonize",
                     "model_family"),
    "explanation_metrics": ("aggregate_score", "evaluate_explanations", "evaluate_mosaics", "summarize"),
    "explanations": ("METHODS", "STARTS", "explain", "explanation_figure", "heatmap", "heatmap_figure",
                     "started_model"),
    "mosaic": ("GridMosaics", "grid_mosaics", "grid_pointing_game", "grid_pointing_games", "grid_pointing_score",
               "make_mosaic"),
    "search": ("SearchResult", "best_worst_figure", "search_explanations", "search_figure"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _LAZY_NAMES:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'classfilters' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "STARTS",
    "SUPPORTED_FAMILIES",
    "CanonizationError",
    "Canonized",
    "CifarResNet",
    "DatasetError",
    "DecomposedHead",
    "FeatureModel",
    "GridMosaics",
    "ImageSplit",
    "InfluentialFeatures",
    "Recipe",
    "SearchResult",
    "accuracy",
    "aggregate_score",
    "as_feature_model",
    "best_worst_figure",
    "build_model",
    "canonization_check",
    "canonize",
    "evaluate",
    "evaluate_explanations",
    "evaluate_mosaics",
    "explain",
    "explanation_figure",
    "extract_features",
    "extract_features_many",
    "finetune_head",
    "finetune_network",
    "grid_accuracy",
    "grid_mosaics",
    "grid_pointing_game",
    "grid_pointing_games",
    "grid_pointing_score",
    "heatmap",
    "heatmap_figure",
    "influential_features",
    "init_distributed",
    "jaccard_matrix",
    "load_cifar_resnet",
    "make_mosaic",
    "mean_pairwise",
    "model_family",
    "mutual_information_matrix",
    "noise_ablation",
    "open_dataset",
    "search_explanations",
    "search_figure",
    "started_model",
    "summarize",
    "train_classifier",
    "trained_model",
]
