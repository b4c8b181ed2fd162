"""classfilters: find the few penultimate features each class of a CNN relies on.

Implements "Decomposing the Deep: Finding Class Specific Filters in Deep CNNs". The layers, from
the bottom: the algorithm (influence.py: Algorithm 1; decomposed.py: the decomposed final layer and
the (k, k') grid; ablation.py; overlap.py; with sizes.py and checks.py for their arguments), the
pipeline (data.py, decode.py, models.py, features.py, device.py, cpu_memory.py, cache.py), training and extensions
(recipe.py, train.py, csg.py, visualize.py with map_figure.py; explanations of a class's influential features:
canonization.py, explanations.py, explanation_metrics.py, mosaic.py for the grid pointing game,
search.py; ExplainFix: fixed_filters.py, explainsteer.py (spectra), saliency.py, prune.py, class_subset.py,
explainfix_tables.py), the study (profile.py, session.py, tables.py,
widgets.py) and the faces (cli.py, runner.py, the notebooks).

The names below are imported on first use (PEP 562), so `import classfilters` and reading a
profile cost no torch import; `from classfilters import X` works as usual.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)

_EXPORTS = {
    "class_subset_model": "class_subset", "export_subset_model": "class_subset", "load_subset_model": "class_subset",
    "resolve_classes": "class_subset", "restrict_head": "class_subset", "subset_split": "class_subset",
    "class_specific_table": "explainfix_tables", "class_subset_table": "explainfix_tables",
    "compare_initialisations": "explainfix_tables", "compare_architectures": "explainfix_tables",
    "low_frequency_table": "explainfix_tables",
    "prune_sweep": "explainfix_tables", "train_fixed": "fixed_training",
    "class_specific_report": "explainfix_tables", "export_and_check": "explainfix_tables",
    "skip_reason": "explainfix_tables",
    "INITS": "fixed_filters", "dct_basis": "fixed_filters", "diagonal_order": "fixed_filters",
    "fix_spatial_filters": "fixed_filters", "guided_steer_sampler": "fixed_filters", "spatial_convs": "fixed_filters",
    "trainable_parameters": "fixed_filters",
    "EmbedShortcut": "prune", "channel_prune": "prune", "fill_zero": "prune", "macs_and_params": "prune",
    "mask_prunable": "prune", "prune_channels": "prune", "zero_least_salient": "prune",
    "filter_saliency": "saliency",
    "layer_spectrum": "explainsteer", "low_frequency_share": "explainsteer", "spectra": "explainsteer",
    "spectra_figure": "explainsteer",
    "CacheWarning": "cache",
    "CanonizationError": "canonization", "Canonized": "canonization", "SUPPORTED_FAMILIES": "canonization",
    "canonization_check": "canonization", "canonize": "canonization",
    "aggregate_score": "explanation_metrics", "evaluate_explanations": "explanation_metrics",
    "evaluate_mosaics": "explanation_metrics",
    "METHODS": "explanations", "STARTS": "explanations", "explain": "explanations",
    "explanation_figure": "explanations", "heatmap": "explanations", "heatmap_figure": "explanations",
    "started_model": "explanations",
    "GridMosaics": "mosaic", "grid_mosaics": "mosaic", "grid_pointing_game": "mosaic",
    "grid_pointing_games": "mosaic", "grid_pointing_score": "mosaic", "make_mosaic": "mosaic",
    "SearchResult": "search", "best_worst_figure": "search", "search_explanations": "search",
    "search_figure": "search",
    "UntrustedCheckpointError": "models", "model_family": "models", "read_checkpoint": "models",
    "noise_ablation": "ablation",
    "DatasetError": "data", "ImageSplit": "data", "check_same_classes": "data", "open_dataset": "data",
    "DecomposedHead": "decomposed", "accuracy": "decomposed", "evaluate": "decomposed", "grid_accuracy": "decomposed",
    "default_device": "device", "init_distributed": "device",
    "keep_freed_memory": "cpu_memory",
    "extract_features": "features", "extract_features_many": "features",
    "InfluentialFeatures": "influence", "influential_features": "influence",
    "CifarResNet": "models", "CifarBottleneckResNet": "models",
    "FeatureModel": "models", "as_feature_model": "models", "build_model": "models",
    "load_cifar_resnet": "models",
    "jaccard_matrix": "overlap", "mean_over_all_class_pairs": "overlap", "mean_pairwise": "overlap",
    "mutual_information_matrix": "overlap",
    "Profile": "profile", "load_profile": "profile",
    "Recipe": "recipe",
    "Study": "session", "Subject": "session", "open_study": "session",
    "DEFAULT_K": "sizes", "as_size": "sizes",
    "bootstrap_accuracy": "uncertainty", "correct_predictions": "uncertainty",
    "finetune_head": "train", "finetune_network": "train", "train_classifier": "train", "trained_model": "train",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 -- derived, so the two cannot drift apart


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'classfilters' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])

