"""Models as (body, pool, linear head): the one view of a classifier the method needs.

phi(x) (N, D) is the input of the classifier's final `nn.Linear`, whatever precedes it
(pooling, a LayerNorm, an MLP, a class token). `FeatureModel` holds the split:
`forward_features(x)` gives phi(x), `forward(x)` the logits `head(phi(x))`, and, when
`has_spatial_maps` (phi is the mean over H, W of maps (N, D, H, W): the paper's CNNs),
`forward_maps(x)` those maps. `as_feature_model` splits the CIFAR ResNets below and the
paper's torchvision families before their pooling, timm models with timm's
`forward_head(pre_logits=True)`, and any other classifier at its final `nn.Linear`, each
checked on a probe image (head(phi) must equal the logits); anything else is wrapped by hand:

    FeatureModel(body=my_backbone, head=my_linear)           # pool defaults to the mean over H, W

`build_model(name, ...)` makes a model by name ("resnet20", "resnet50", "convnext_tiny",
"timm:vit_tiny_patch16_224", ...), `model_family(name)` names its family, and
`load_cifar_resnet(path)` reads the legacy CIFAR-10 checkpoints of Idelbayev's
pytorch_resnet_cifar10 exactly.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# CIFAR ResNet-(6n+2) of He et al. with the option-A shortcut (strided subsampling +
# zero-padded channels). Parameter names match the shared checkpoints.


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


CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
TORCHVISION_RESNET_DEPTHS = (18, 34, 50, 101, 152)  # "resnet50" is torchvision's; "cifar_resnet50" the CIFAR one


def load_cifar_resnet(path: str | Path, depth: int | None = None, num_classes: int = 10,
                      trust_checkpoint: bool = False) -> CifarResNet:
    """Load a pytorch_resnet_cifar10 checkpoint (`module.` prefix, CUDA tensors, a `best_prec1`).

    The depth is read from the checkpoint when not given. The file is read with
    `read_checkpoint`: tensors only, unless `trust_checkpoint=True`.
    """
    state = read_state_dict(path, trust_checkpoint)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
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


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists what does not match."""
    own = model.state_dict()
    state = dict(state)
    for k in own:  # checkpoints from before PyTorch 0.4.1 lack BatchNorm's step counter
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ValueError(f"checkpoint {source} does not match {type(model).__name__}: " + ", ".join(parts)
                         + ". Pick the model the checkpoint was saved from.")
    model.load_state_dict(state)


# --------------------------------------------------------------------------------------
# The common view


def global_average_pool(maps: torch.Tensor) -> torch.Tensor:
    return maps.mean((2, 3))


SPATIAL_MAPS_HINT = ("the CIFAR ResNets; torchvision ResNet / Wide ResNet / ResNeXt / DenseNet / EfficientNet(V2) / "
                     "RegNet / GoogLeNet / Inception / Swin; timm CNNs whose head is a plain average pool; or your "
                     "own FeatureModel(body=<module giving maps (N, D, H, W)>, head=...) with the default pool")


class FeatureModel(nn.Module):
    """A classifier split as `head(pool(body(x)))` with `head` its final `nn.Linear`.

    body: maps images to feature maps (N, D, H, W) or directly to phi(x) (N, D) (or to whatever
          `pool` takes, e.g. timm's token maps).
    pool: maps the body's output to phi(x) (N, D); None: the mean over H and W of a 4-d output
          (a 2-d output is phi itself).
    head: the final `nn.Linear(D, C)`; its weight is W and its bias b.
    spatial_maps: whether `forward_maps` gives maps whose mean over H, W is phi (Table 7's
          channel maps); None: so when `pool` is None.

    `input_size` (resize, crop, interpolation) and `mean`, `std` are the preprocessing the
    model's weights were evaluated with (None: any size; the split's own normalisation).
    """

    def __init__(self, body: nn.Module, head: nn.Linear, pool: Callable | None = None, name: str = "model",
                 spatial_maps: bool | None = None):
        super().__init__()
        if not isinstance(body, nn.Module):
            raise TypeError(f"the body must be an nn.Module (so that .eval() and .to() reach it), got "
                            f"{type(body).__name__}; wrap a method with classfilters.models.MethodBody(model, 'name')")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the head must be one nn.Linear, got {type(head).__name__}")
        self.body = body
        self.head = head
        self.pool = pool
        self.name = name
        self.has_spatial_maps = pool is None if spatial_maps is None else bool(spatial_maps)
        self.input_size: tuple[int, int, str] | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    @property
    def num_features(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward_maps(self, x):
        """The feature maps (N, D, H, W) whose spatial means are phi(x); only for models that have them."""
        self.require_spatial_maps("forward_maps")
        maps = self.body.forward_maps(x) if isinstance(self.body, SplitBody) else self.body(x)
        if maps.dim() != 4:
            raise ValueError(f"{self.name}'s body gives {maps.dim()}-d output {tuple(maps.shape)}, not feature maps "
                             "(N, D, H, W)")
        return maps

    def require_spatial_maps(self, what: str) -> None:
        """Refuse (naming `what`, which needs them) when phi is not the spatial mean of channel maps."""
        if not self.has_spatial_maps:
            raise ValueError(f"{what}: {self.name} has no spatial feature maps whose mean over H, W is phi (N, D) "
                             "(its phi is e.g. a class token, or a pooled vector passed through a norm or an MLP). "
                             f"Use a model that has them: {SPATIAL_MAPS_HINT}.")

    def forward_features(self, x):
        out = self.body(x)
        if self.pool is not None:
            return self.pool(out)
        return global_average_pool(out) if out.dim() == 4 else out

    def forward(self, x):
        return self.head(self.forward_features(x))


class MethodBody(nn.Module):
    """A module whose forward is another module's method (e.g. `forward_maps`), registered as a child."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x):
        return getattr(self.model, self.method)(x)


class TimmBody(nn.Module):
    """A timm model without its classifier: `forward` is timm's `forward_features`, and
    `pre_logits` its `forward_head(x, pre_logits=True)` (the input of the classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)

    def pre_logits(self, features):
        return self.model.forward_head(features, pre_logits=True)


class _DenseNetBody(nn.Module):
    """torchvision DenseNet applies its last ReLU in `forward`, outside `features`."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return F.relu(self.features(x))


WRAP_BY_HAND = ("wrap it by hand: classfilters.FeatureModel(body=<module giving phi (N, D) or feature maps "
                "(N, D, H, W)>, head=<the final nn.Linear>, pool=<optional callable giving phi>)")


def without_module(model: nn.Module, path: str) -> nn.Module:
    """A shallow copy of `model` whose submodule at `path` ("heads.head") is `nn.Identity`.

    Only the modules on the path are copied; every other module, parameter and buffer is
    shared (no weight is copied) and `model` itself is unchanged."""
    first, _, rest = path.partition(".")
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone._modules[first] = without_module(model._modules[first], rest) if rest else nn.Identity()
    return clone


def as_feature_model(model: nn.Module, name: str | None = None, example: torch.Tensor | None = None) -> FeatureModel:
    """Split a classifier into body / pool / final linear head (no copy of weights; `model` unchanged).

    The paper's families (CIFAR ResNets, torchvision ResNet / Wide ResNet / ResNeXt, DenseNet,
    EfficientNet) are split before their global average pool, so they have spatial maps; timm
    models use timm's `forward_features` and `forward_head(pre_logits=True)`; any other model
    is split at its final `nn.Linear` (the body is the model with that layer replaced by
    `nn.Identity`, so phi is whatever feeds it: a pooled vector, a LayerNorm'd class token, the
    output of an MLP). Every split is checked on `example` (default: one random image at a
    size the model accepts): its logits must equal the model's, else the model is refused.
    """
    import torchvision.models as tvm

    if isinstance(model, FeatureModel):
        return model
    name = name or type(model).__name__.lower()
    if isinstance(model, CifarResNet):
        wrapped, size = FeatureModel(MethodBody(model, "forward_maps"), model.linear, name=name), 32
    elif isinstance(model, tvm.ResNet) and isinstance(model.fc, nn.Linear):
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                             model.layer1, model.layer2, model.layer3, model.layer4)
        wrapped, size = FeatureModel(body, model.fc, name=name), 64
    elif isinstance(model, tvm.DenseNet) and isinstance(model.classifier, nn.Linear):
        wrapped, size = FeatureModel(_DenseNetBody(model.features), model.classifier, name=name), 64
    elif isinstance(model, tvm.EfficientNet) and isinstance(model.classifier[-1], nn.Linear):
        wrapped, size = FeatureModel(model.features, model.classifier[-1], name=name), 64
    elif hasattr(model, "forward_head") and hasattr(model, "get_classifier"):  # timm
        return _timm_feature_model(model, name, example)
    else:  # any other model (or one of the above with a changed head)
        return _split_at_final_linear(model, name, example)
    x = _example(model, example, size)
    with _probing(model, x, name):
        expected = model(x)
    _check_split(wrapped, x, expected)
    return wrapped


def _timm_feature_model(model: nn.Module, name: str, example) -> FeatureModel:
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        found = (f"{len(classifier)} classifiers ({', '.join(type(c).__name__ for c in classifier)}; "
                 "e.g. a distilled model averaging two heads)" if isinstance(classifier, (tuple, list))
                 else type(classifier).__name__ + (" (num_classes=0?)" if isinstance(classifier, nn.Identity) else ""))
        raise ValueError(f"timm model {name}'s classifier is {found}, not one nn.Linear; "  # noqa: TRY004
                         f"{WRAP_BY_HAND}")
    path = next(p for p, m in model.named_modules() if m is classifier)
    body = TimmBody(without_module(model, path))  # the classifier is registered once: as the head
    from timm.data import resolve_model_data_config
    x = _example(model, example, resolve_model_data_config(model)["input_size"][1:])
    with _probing(model, x, name):
        maps, expected = body(x), model(x)
        phi = body.pre_logits(maps)
    spatial = (maps.dim() == 4 and maps.shape[:2] == phi.shape
               and torch.allclose(global_average_pool(maps.float()), phi.float(), rtol=1e-4, atol=1e-5))
    wrapped = FeatureModel(body, classifier, pool=body.pre_logits, name=name, spatial_maps=spatial)
    _check_split(wrapped, x, expected, phi)
    return wrapped


def _split_at_final_linear(model: nn.Module, name: str, example) -> FeatureModel:
    x = _example(model, example, 224)
    calls = []  # every nn.Linear and global average pool call of one forward pass, in order
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0], out)))
             for m in model.modules() if isinstance(m, nn.Linear) or _is_global_average_pool(m)]
    try:
        with _probing(model, x, name):
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    what = type(model).__name__
    linears = [call for call in calls if isinstance(call[0], nn.Linear)]
    if not linears:
        layers = [(p, m) for p, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
        last = f"'{layers[-1][0]}' = {layers[-1][1]}" if layers else "no layer with weights"
        raise ValueError(f"{what} has no nn.Linear (its last layer with weights is {last}); the method needs "
                         f"logits = Linear(phi): {WRAP_BY_HAND}")
    linear, phi, out = linears[-1]
    path = next(p for p, m in model.named_modules() if m is linear)
    if not isinstance(logits, torch.Tensor) or out.shape != logits.shape or not torch.equal(out, logits):
        found = f"a {type(logits).__name__}" if not isinstance(logits, torch.Tensor) else f"shape {tuple(logits.shape)}"
        raise ValueError(f"{what}'s logits ({found}) are not the output of its last nn.Linear '{path}' (shape "
                         f"{tuple(out.shape)}): something follows it; {WRAP_BY_HAND}")
    pools = [(module, maps) for module, maps, _ in calls if not isinstance(module, nn.Linear)]
    maps_at = None  # the global average pool whose input phi is the spatial mean of, if any
    if pools and pools[-1][1].dim() == 4 and pools[-1][1].shape[:2] == phi.shape and torch.allclose(
            global_average_pool(pools[-1][1].float()), phi.float(), rtol=1e-4, atol=1e-5):
        maps_at = next(p for p, m in model.named_modules() if m is pools[-1][0])
    body = SplitBody(without_module(model, path), maps_at) if path else nn.Identity()
    wrapped = FeatureModel(body, linear, name=name, spatial_maps=maps_at is not None)
    _check_split(wrapped, x, logits)
    return wrapped


def _is_global_average_pool(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


class SplitBody(nn.Module):
    """A classifier whose final nn.Linear is `nn.Identity`: `forward` gives phi (N, D). When phi is
    the output of a global average pool (`maps_at`, e.g. "avgpool"), `forward_maps` gives its input."""

    def __init__(self, model: nn.Module, maps_at: str | None = None):
        super().__init__()
        self.model = model
        self.maps_at = maps_at

    def forward(self, x):
        return self.model(x)

    def forward_maps(self, x):
        seen = []
        hook = self.model.get_submodule(self.maps_at).register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        try:
            self.model(x)
        finally:
            hook.remove()
        return seen[-1]


def _example(model: nn.Module, example: torch.Tensor | None, size: int | tuple[int, int]) -> torch.Tensor:
    """`example`, or one seeded random image (1, C, H, W) of `size` on the model's device (C from its first conv)."""
    if example is not None:
        return example
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d to tell its input shape: pass example=<a batch it "
                         "accepts> to as_feature_model")
    weight = next(model.parameters())
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, conv.in_channels, height, width, generator=torch.Generator().manual_seed(0))
    return x.to(weight.device, weight.dtype)


def _check_split(wrapped: FeatureModel, x: torch.Tensor, expected: torch.Tensor,
                 phi: torch.Tensor | None = None) -> None:
    """Refuse a split whose phi is not (N, D) or whose head(phi) is not the model's logits `expected` on `x`."""
    if phi is None:
        with _probing(wrapped, x, wrapped.name):
            phi = wrapped.forward_features(x)
    if phi.dim() != 2:
        raise ValueError(f"{wrapped.name}: the input of its final nn.Linear has shape {tuple(phi.shape)}, not (N, D): "
                         f"the linear layer is applied per position or token; {WRAP_BY_HAND}")
    with torch.no_grad():
        got = wrapped.head(phi)
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    scale = expected.abs().max().clamp(min=1).item()
    if expected.shape != got.shape or not torch.allclose(got, expected, rtol=tolerance, atol=tolerance * scale):
        difference = (got - expected).abs().max().item() if expected.shape == got.shape else "shape"
        raise ValueError(f"{wrapped.name}: head(phi) differs from the model's logits (largest difference "
                         f"{difference}); {WRAP_BY_HAND}")


@contextlib.contextmanager
def _probing(model: nn.Module, x: torch.Tensor, name: str):
    """Eval mode and no gradients (each module's mode restored after); a forward pass that fails says
    what to pass."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    except Exception as e:
        raise ValueError(f"{name} could not be run on a probe input of shape {tuple(x.shape)} ({type(e).__name__}: "
                         f"{e}); pass example=<a batch it accepts> to as_feature_model") from e
    finally:
        for m, mode in modes:
            m.training = mode


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


def build_model(name: str, checkpoint: str | Path | None = None, num_classes: int | None = None,
                in_channels: int = 3, pretrained: bool | str = False, trust_checkpoint: bool = False) -> FeatureModel:
    """Make a model by name and wrap it.

    name: "resnet8".."resnet110" (CIFAR, 6n+2; "cifar_resnetN" where N clashes with torchvision),
    any torchvision classifier ("resnet50", "convnext_tiny", "vit_b_16", ...; see
    `torchvision.models.list_models(module=torchvision.models)`), or "timm:<name>".
    checkpoint: a CIFAR .th file, or a state dict saved with torch.save / safetensors; read without
    running code from it (tensors only) unless `trust_checkpoint=True` (see `read_checkpoint`).
    pretrained: torchvision / timm ImageNet weights (needs internet the first time): True for the
    default ones, or the name of a torchvision weights entry ("IMAGENET1K_V1"). The model's
    `input_size` (resize, crop, interpolation), `mean` and `std` are then those the weights were
    evaluated with (torchvision's weights metadata, timm's pretrained config).
    """
    import torchvision.models as tvm

    m = re.fullmatch(r"(cifar_)?resnet(\d+)", name)
    if m and (m.group(1) or int(m.group(2)) not in TORCHVISION_RESNET_DEPTHS):
        depth = int(m.group(2))
        if checkpoint is not None and str(checkpoint).endswith(".th"):
            model = load_cifar_resnet(checkpoint, depth, trust_checkpoint=trust_checkpoint)
        else:
            model = CifarResNet(depth, num_classes or 10, in_channels)
            if checkpoint is not None:
                load_state_dict_checked(model, read_state_dict(checkpoint, trust_checkpoint), str(checkpoint))
        return as_feature_model(model, name)
    example = None
    if name.startswith("timm:"):
        import timm
        if not timm.is_model(timm.models.split_model_name_tag(name[5:])[0]):
            raise ValueError(f"unknown timm model '{name[5:]}': see timm.list_models()")
        if isinstance(pretrained, str):
            raise ValueError(f"timm chooses weights by the name's tag (timm:{name[5:].split('.')[0]}.<tag>, e.g. "
                             f"timm:resnet50.a1_in1k) with pretrained=True, not pretrained={pretrained!r}")
        model = timm.create_model(name[5:], pretrained=pretrained, num_classes=num_classes or 1000,
                                  in_chans=in_channels)
    else:
        if name not in tvm.list_models(module=tvm):
            raise ValueError(f"unknown model '{name}': use resnet<6n+2> (CIFAR), a torchvision classifier "
                             f"(e.g. {', '.join(TORCHVISION_MODELS[:4])}, convnext_tiny, vit_b_16; "
                             "torchvision.models.list_models(module=torchvision.models)) or timm:<name>")
        weights = torchvision_weights(name, pretrained) if pretrained else None
        kwargs = {} if weights is not None else {"num_classes": num_classes or 1000}
        model = tvm.get_model(name, weights=weights, **kwargs)
        smallest = tvm.get_model_weights(name).DEFAULT.meta.get("min_size", (32, 32))
        example = _example(model, None, (max(32, smallest[0]), max(32, smallest[1])))
    if checkpoint is not None:
        load_state_dict_checked(model, read_state_dict(checkpoint, trust_checkpoint), str(checkpoint))
    wrapped = as_feature_model(model, name, example)
    if pretrained and name.startswith("timm:"):
        wrapped.input_size, wrapped.mean, wrapped.std = timm_preprocessing(model)
    elif pretrained:
        wrapped.input_size, wrapped.mean, wrapped.std = weights_preprocessing(weights)
    return wrapped


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

    m = re.fullmatch(r"(cifar_)?resnet(\d+)", name)
    if m and (m.group(1) or int(m.group(2)) not in TORCHVISION_RESNET_DEPTHS):
        return "ResNet (CIFAR)"
    if name.startswith("timm:"):
        import timm
        architecture = timm.models.split_model_name_tag(name[5:])[0]
        if not timm.is_model(architecture):
            raise ValueError(f"unknown timm model '{name[5:]}': see timm.list_models()")
        prefix = re.match(r"(?:tf_|tv_)?([a-z]+v\d+|[a-z]+)", architecture)
        return f"{prefix.group(1) if prefix else architecture} (timm)"
    if name not in tvm.list_models(module=tvm):
        raise ValueError(f"unknown model '{name}': use resnet<6n+2> (CIFAR), a torchvision classifier or timm:<name>")
    for start, family in NAME_FAMILIES:
        if name.startswith(start):
            return family
    module = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return TORCHVISION_FAMILIES.get(module, module)


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and plain containers: reading it would run its code."""


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False):
    """The object saved in a checkpoint file, read without running any code from it.

    `.safetensors` files are read by safetensors (tensors only, by design). Anything else is
    read by `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain
    containers (dict, list, numbers, strings) and refuses every other object before making
    it: a pickle can name any Python function to call, so a full unpickling would run
    whatever code the file's author chose. Checkpoints that really need it (a whole pickled
    model, custom classes) are refused unless `trust_checkpoint=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass the path of a weights file, "
                                "e.g. ../shared/data/weights/resnet20-12fca82f.th")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e}); "
                             "is it complete?") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower() and "weights only" not in str(e).lower():
            raise ValueError(f"checkpoint {path} could not be read ({e}); is it a complete torch.save file?") from e
        if not trust_checkpoint:
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            operand = re.search(r"Unsupported operand \d+", str(e))
            detail = (f"it names the callable {named.group(1)}" if named else
                      f"{operand.group(0)}: not a torch.save file of tensors" if operand else "see the cause below")
            raise UntrustedCheckpointError(
                f"checkpoint {path} holds Python objects other than tensors ({detail}); unpickling it would "
                "run code named by the file. It was not loaded. If you trust its source, pass "
                "trust_checkpoint=True (CLI: --trust-checkpoint), or better, re-save its state_dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors.") from e
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                         "is it a complete torch.save file?") from e
    try:  # trusted by the caller: a full unpickling
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                         "is it a complete torch.save file?") from e


def read_state_dict(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """The state dict in a checkpoint (under "state_dict" or "model" when wrapped; `module.` prefix removed)."""
    blob = read_checkpoint(path, trust_checkpoint)
    state = blob.get("state_dict", blob.get("model", blob)) if isinstance(blob, dict) else blob
    if isinstance(state, nn.Module):  # a whole pickled model (trusted)
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fingerprint(model: nn.Module) -> str:
    """A hash of the architecture and every parameter and buffer: changes when any weight does."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    return h.hexdigest()
