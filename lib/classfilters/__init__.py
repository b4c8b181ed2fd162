"""classfilters: find the few penultimate features each class of a CNN relies on.

Implements "Decomposing the Deep: Finding Class Specific Filters in Deep CNNs": Algorithm 1
(influence.py), the decomposed final layer and the (k, k') grid (decomposed.py), the noise
ablation (ablation.py), index-set overlap (overlap.py), on any classifier whose head is
global pooling + one linear layer (models.py), with cached feature extraction (features.py)
over digits, CIFAR-10 or ImageNet-style folders (data.py).

ExplainFix (Gaudio et al. 2023) joined to it: spatially fixed filters (fixed_filters.py), their
frequency spectra (spectra.py), filter saliency (saliency.py), ChannelPrune (prune.py) and a smaller
exported model for a subset of classes (class_subset.py).
"""
__version__ = "0.1.0"

from .ablation import noise_ablation
from .class_subset import (
    class_subset_model,
    export_subset_model,
    load_subset_model,
    resolve_classes,
    restrict_head,
    subset_split,
)
from .data import DatasetError, ImageSplit, open_dataset
from .decomposed import DecomposedHead, accuracy, evaluate, grid_accuracy
from .explainfix_tables import (
    class_specific_table,
    class_subset_table,
    compare_initialisations,
    low_frequency_table,
    prune_sweep,
    train_fixed,
)
from .features import extract_features, extract_features_many, init_distributed
from .fixed_filters import (
    INITS,
    dct_basis,
    diagonal_order,
    fix_spatial_filters,
    guided_steer_sampler,
    spatial_convs,
    trainable_parameters,
)
from .influence import InfluentialFeatures, influential_features
from .models import CifarResNet, FeatureModel, as_feature_model, build_model, load_cifar_resnet
from .overlap import jaccard_matrix, mean_pairwise, mutual_information_matrix
from .prune import (
    EmbedShortcut,
    channel_prune,
    fill_zero,
    macs_and_params,
    mask_prunable,
    prune_channels,
    zero_least_salient,
)
from .saliency import filter_saliency
from .spectra import layer_spectrum, low_frequency_share, spectra, spectra_figure
from .train import Recipe, finetune_head, finetune_network, train_classifier, trained_model

__all__ = [
    "INITS",
    "CifarResNet",
    "DatasetError",
    "DecomposedHead",
    "EmbedShortcut",
    "FeatureModel",
    "ImageSplit",
    "InfluentialFeatures",
    "Recipe",
    "accuracy",
    "as_feature_model",
    "build_model",
    "channel_prune",
    "class_specific_table",
    "class_subset_model",
    "class_subset_table",
    "compare_initialisations",
    "dct_basis",
    "diagonal_order",
    "evaluate",
    "export_subset_model",
    "extract_features",
    "extract_features_many",
    "fill_zero",
    "filter_saliency",
    "finetune_head",
    "finetune_network",
    "fix_spatial_filters",
    "grid_accuracy",
    "guided_steer_sampler",
    "influential_features",
    "init_distributed",
    "jaccard_matrix",
    "layer_spectrum",
    "load_cifar_resnet",
    "load_subset_model",
    "low_frequency_share",
    "low_frequency_table",
    "macs_and_params",
    "mask_prunable",
    "mean_pairwise",
    "mutual_information_matrix",
    "noise_ablation",
    "open_dataset",
    "prune_channels",
    "prune_sweep",
    "resolve_classes",
    "restrict_head",
    "spatial_convs",
    "spectra",
    "spectra_figure",
    "subset_split",
    "train_classifier",
    "train_fixed",
    "trainable_parameters",
    "trained_model",
    "zero_least_salient",
]
