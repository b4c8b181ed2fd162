"""CIFAR ResNet-(6n+2) of He et al. (2016) with the option-A shortcut (strided subsampling +
zero-padded channels), its parameter names those of the shared checkpoints, and
`load_cifar_resnet` for the legacy CIFAR-10 checkpoints of Idelbayev's pytorch_resnet_cifar10.

`CifarBottleneckResNet(depth)` is the bottleneck variant of He et al.'s CIFAR study
(ResNet-(9n+2), e.g. 29, 47, 164): torchvision's `Bottleneck` blocks (1x1 -> 3x3 -> 1x1, 4x
expansion: 64/128/256 channels) with a projection shortcut (1x1 conv + BN) where the shape
changes. Its 1x1 convolutions keep learning when the 3x3 filters are fixed (ExplainFix).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from .checkpoints import load_state_dict_checked, read_state_dict


class ZeroPadShortcut(nn.Module):
    """Option A: keep every other pixel and pad the new channels with zeros (no weights)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = ZeroPadShortcut(planes - in_planes) if needs_projection else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16/32/64 channels, global average pool, `linear`."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...); got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, in_planes, layers = (16, 32, 64), 16, []
        for stage, planes in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (stage > 0 and b == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_maps(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x):
        return self.linear(self.forward_maps(x).mean((2, 3)))


def _bottleneck(in_planes: int, planes: int, stride: int) -> nn.Module:
    from torchvision.models.resnet import Bottleneck  # here: importing torchvision.models costs every kernel ~2 s

    out = planes * Bottleneck.expansion
    projection = None
    if stride != 1 or in_planes != out:
        projection = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    return Bottleneck(in_planes, planes, stride, downsample=projection)


class CifarBottleneckResNet(nn.Module):
    """ResNet-(9n+2) for 32x32 images of torchvision `Bottleneck` blocks (widths 16/32/64, outputs
    64/128/256), projection shortcuts where the shape changes, global average pool, `linear`."""

    def __init__(self, depth: int = 29, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"CIFAR bottleneck ResNet depth must be 9n+2 with n >= 1 (11, 20, 29, 47, ...); got {depth}")
        n = (depth - 2) // 9
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, layers = 16, []
        for stage, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(_bottleneck(in_planes, planes, 2 if (stage > 0 and b == 0) else 1))
                in_planes = blocks[-1].conv3.out_channels
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    forward_maps = CifarResNet.forward_maps  # the same stem, stages and pooled head as the basic ResNet
    forward = CifarResNet.forward


CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
TORCHVISION_RESNET_DEPTHS = (18, 34, 50, 101, 152)  # "resnet50" is torchvision's; "cifar_resnet50" the CIFAR one


def cifar_resnet_name(name: str) -> tuple[int, bool] | None:
    """(depth, bottleneck) of a CIFAR ResNet name ("resnet20", "cifar_resnet50", "resnet29_bottleneck"),
    None for any other name (torchvision's "resnet18/34/50/101/152" included)."""
    m = re.fullmatch(r"(cifar_)?resnet(\d+)(_bottleneck)?", name)
    if m is None or not (m.group(1) or m.group(3) or int(m.group(2)) not in TORCHVISION_RESNET_DEPTHS):
        return None
    return int(m.group(2)), bool(m.group(3))


def load_cifar_resnet(path: str | Path, depth: int | None = None, num_classes: int = 10,
                      trust_checkpoint: bool = False) -> CifarResNet:
    """Load a pytorch_resnet_cifar10 checkpoint (`module.` prefix, CUDA tensors, a `best_prec1`).

    The depth is read from the checkpoint when not given. The file is read with
    `read_checkpoint`: tensors only, unless `trust_checkpoint=True`.
    """
    state = read_state_dict(path, trust_checkpoint)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
    if any(re.match(r"layer1\.\d+\.conv3\.", k) for k in state):
        raise ValueError(f"checkpoint {path} is a bottleneck CIFAR ResNet-{9 * len(blocks) + 2} (conv3 in its blocks): "
                         f"use --model resnet{9 * len(blocks) + 2}_bottleneck")
    found_depth = 6 * len(blocks) + 2 if blocks else None
    if depth is None:
        if found_depth is None:
            raise ValueError(f"checkpoint {path} has no CIFAR ResNet keys (layer1.N...); it does not match the CIFAR ResNet family")
        depth = found_depth
    elif found_depth is not None and found_depth != depth:
        raise ValueError(f"checkpoint {path} is a ResNet-{found_depth}, not the requested ResNet-{depth}; use --model resnet{found_depth}")
    if "linear.weight" in state:
        num_classes = state["linear.weight"].shape[0]
    model = CifarResNet(depth, num_classes)
    load_state_dict_checked(model, state, str(path))
    return model
