"""Models by name: torchvision's weights and their preprocessing, timm's pretrained config, families.

`torchvision_weights(name, pretrained)` picks a weights entry, `weights_preprocessing` and
`timm_preprocessing` give the ((resize, crop, interpolation), mean, std) a model's weights were
evaluated with, and `model_family(name)` groups names for the depth study.
"""
from __future__ import annotations

import math
import re
import warnings

from torch import nn

from .cifar_resnet import cifar_resnet_name

# Every torchvision family of the paper, by the names torchvision uses.
TORCHVISION_MODELS = ("resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
                      "densenet121", "densenet161", "densenet169", "densenet201",
                      "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")


def torchvision_weights(name: str, pretrained: bool | str):
    """The torchvision weights entry: its DEFAULT for True, else the one named (e.g. "IMAGENET1K_V1",
    the 2021 weights the paper used; DEFAULT is newer for the ResNets and EfficientNet-B1)."""
    import torchvision.models as tvm
    entries = tvm.get_model_weights(name)
    if pretrained is True:
        return entries.DEFAULT
    try:
        return entries[pretrained]
    except KeyError:
        raise ValueError(f"{name} has no torchvision weights named {pretrained!r}: choose one of "
                         f"{[e.name for e in entries]} (or pretrained=True for the default)") from None


def weights_input_size(weights) -> tuple[int, int, str]:
    """(resize, crop, interpolation) of the evaluation transform the weights were published with
    (EfficientNet's weights were evaluated with bicubic resizing, the others with bilinear)."""
    transform = weights.transforms()
    return transform.resize_size[0], transform.crop_size[0], transform.interpolation.value


def timm_preprocessing(model: nn.Module) -> tuple[tuple[int, int, str], tuple, tuple]:
    """((resize, crop, interpolation), mean, std) of timm's evaluation transform for `model`'s
    pretrained config (`timm.data.resolve_data_config`): resize = floor(crop / crop_pct)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"timm model {model.pretrained_cfg.get('architecture')} expects {height}x{width} images; "
                         "image folders are centre-cropped to squares only: use a model with a square input")
    if cfg.get("crop_mode", "center") != "center":
        warnings.warn(f"timm's config asks for crop_mode={cfg['crop_mode']!r}; images are resized and centre-cropped "
                      "instead", stacklevel=2)
    return (math.floor(height / cfg["crop_pct"]), height, cfg["interpolation"]), tuple(cfg["mean"]), tuple(cfg["std"])


def weights_preprocessing(weights) -> tuple[tuple[int, int, str], tuple, tuple]:
    """((resize, crop, interpolation), mean, std) of torchvision weights' evaluation transform."""
    transform = weights.transforms()
    return weights_input_size(weights), tuple(transform.mean), tuple(transform.std)


# The depth study's families: torchvision's module of the builder -> name (a few names split a module).
TORCHVISION_FAMILIES = {"alexnet": "AlexNet", "convnext": "ConvNeXt", "densenet": "DenseNet",
                        "efficientnet": "EfficientNet", "googlenet": "GoogLeNet", "inception": "Inception",
                        "maxvit": "MaxViT", "mnasnet": "MNASNet", "mobilenetv2": "MobileNetV2",
                        "mobilenetv3": "MobileNetV3", "regnet": "RegNet", "resnet": "ResNet (ImageNet)",
                        "shufflenetv2": "ShuffleNetV2", "squeezenet": "SqueezeNet", "swin_transformer": "Swin",
                        "vgg": "VGG", "vision_transformer": "ViT"}
NAME_FAMILIES = (("wide_resnet", "Wide ResNet"), ("resnext", "ResNeXt"), ("efficientnet_v2", "EfficientNetV2"),
                 ("swin_v2", "Swin V2"))


def model_family(name: str) -> str:
    """The family of a `build_model` name, for grouping a depth study: "resnet20" -> "ResNet (CIFAR)",
    "regnet_y_400mf" -> "RegNet" (torchvision's module of the builder), "timm:convnext_atto.d2_in1k"
    -> "convnext (timm)" (the prefix of timm's architecture name)."""
    import torchvision.models as tvm

    if (cifar := cifar_resnet_name(name)) is not None:
        return "ResNet bottleneck (CIFAR)" if cifar[1] else "ResNet (CIFAR)"
    if name.startswith("timm:"):
        import timm
        architecture = timm.models.split_model_name_tag(name[5:])[0]
        if not timm.is_model(architecture):
            raise ValueError(f"unknown timm model '{name[5:]}': see timm.list_models()")
        prefix = re.match(r"(?:tf_|tv_)?([a-z]+v\d+|[a-z]+)", architecture)
        return f"{prefix.group(1) if prefix else architecture} (timm)"
    if name not in tvm.list_models(module=tvm):
        raise ValueError(f"unknown model '{name}': use resnet<6n+2> or resnet<9n+2>_bottleneck (CIFAR), a torchvision classifier or timm:<name>")
    for start, family in NAME_FAMILIES:
        if name.startswith(start):
            return family
    module = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return TORCHVISION_FAMILIES.get(module, module)
