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

About 420 lines: the split, its check on a probe image and its refusals are one concept and
read best together; the CIFAR ResNets (cifar_resnet.py), reading checkpoints (checkpoints.py)
and models by name with their weights' preprocessing and families (zoo.py) live apart and are
re-exported here.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import (  # noqa: F401 -- re-exported: models.read_checkpoint etc. keep working
    UntrustedCheckpointError,
    load_state_dict_checked,
    read_checkpoint,
    read_state_dict,
)
from .cifar_resnet import (  # noqa: F401 -- re-exported
    CIFAR_DEPTHS,
    TORCHVISION_RESNET_DEPTHS,
    BasicBlock,
    CifarBottleneckResNet,
    CifarResNet,
    ZeroPadShortcut,
    cifar_resnet_name,
    load_cifar_resnet,
)
from .zoo import (  # noqa: F401 -- re-exported
    TORCHVISION_MODELS,
    model_family,
    timm_preprocessing,
    torchvision_weights,
    weights_input_size,
    weights_preprocessing,
)

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

    def pool_output(self, out):
        """phi (N, D) from the body's output: `pool`, else the mean over H, W of 4-d maps."""
        if self.pool is not None:
            return self.pool(out)
        return global_average_pool(out) if out.dim() == 4 else out

    def forward_features(self, x):
        return self.pool_output(self.body(x))

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
    if isinstance(model, (CifarResNet, CifarBottleneckResNet)):
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


def build_model(name: str, checkpoint: str | Path | None = None, num_classes: int | None = None,
                in_channels: int = 3, pretrained: bool | str = False, trust_checkpoint: bool = False) -> FeatureModel:
    """Make a model by name and wrap it.

    name: "resnet8".."resnet110" (CIFAR, 6n+2; "cifar_resnetN" where N clashes with torchvision),
    "resnet29_bottleneck" (CIFAR bottleneck, 9n+2),
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

    if (cifar := cifar_resnet_name(name)) is not None:
        depth, bottleneck = cifar
        if checkpoint is not None and str(checkpoint).endswith(".th") and not bottleneck:
            model = load_cifar_resnet(checkpoint, depth, trust_checkpoint=trust_checkpoint)
        else:
            cls = CifarBottleneckResNet if bottleneck else CifarResNet
            model = cls(depth, num_classes or 10, in_channels)
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
            raise ValueError(f"unknown model '{name}': use resnet<6n+2> or resnet<9n+2>_bottleneck (CIFAR), a torchvision classifier "
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
