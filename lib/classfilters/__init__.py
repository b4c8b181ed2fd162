"""classfilters: find the few penultimate features each class of a CNN relies on.

Implements "Decomposing the Deep: Finding Class Specific Filters in Deep CNNs": Algorithm 1
(influence.py), the decomposed final layer and the (k, k') grid (decomposed.py), the noise
ablation (ablation.py), index-set overlap (overlap.py), on any classifier whose head is
global pooling + one linear layer (models.py), with cached feature extraction (features.py)
over digits, CIFAR-10 or ImageNet-style folders (data.py).
"""
__version__ = "0.1.0"

from .ablation import noise_ablation
from .data import DatasetError, ImageSplit, open_dataset
from .decomposed import DecomposedHead, accuracy, evaluate, grid_accuracy
from .features import extract_features, extract_features_many, init_distributed
from .influence import InfluentialFeatures, influential_features
from .models import CifarResNet, FeatureModel, as_feature_model, build_model, load_cifar_resnet
from .overlap import jaccard_matrix, mean_over_all_class_pairs, mean_pairwise, mutual_information_matrix
from .train import Recipe, finetune_head, finetune_network, train_classifier, trained_model
from .uncertainty import bootstrap_accuracy, correct_predictions

__all__ = [
           "CifarResNet",
           "DatasetError",
           "DecomposedHead",
           "FeatureModel",
           "ImageSplit",
           "InfluentialFeatures",
           "Recipe",
           "accuracy",
           "as_feature_model",
           "bootstrap_accuracy",
           "build_model",
           "correct_predictions",
           "evaluate",
           "extract_features",
           "extract_features_many",
           "finetune_head",
           "finetune_network",
           "grid_accuracy",
           "influential_features",
           "init_distributed",
           "jaccard_matrix",
           "load_cifar_resnet",
           "mean_over_all_class_pairs",
           "mean_pairwise",
           "mutual_information_matrix",
           "noise_ablation",
           "open_dataset",
           "train_classifier",
           "trained_model",
]
