"""Models as (body, pool, linear head): the one view of a classifier the method needs.

`FeatureModel` wraps any classifier whose head is global pooling followed by one
`nn.Linear`: `forward_maps(x)` gives the last feature maps (N, D, H, W),
`forward_features(x)` the pooled penultimate features phi(x) (N, D), `forward(x)` the
logits `head(phi(x))`. `as_feature_model` builds it for the CIFAR ResNets below, every
torchvision family of the paper and timm models; anything else is wrapped by hand:

    FeatureModel(body=my_backbone, head=my_linear)           # pool defaults to the mean over H, W

`build_model(name, ...)` makes a model by name ("resnet20", "resnet50", "densenet121",
"efficientnet_b0", "timm:resnet10t", ...) and `load_cifar_resnet(path)` reads the
legacy CIFAR-10 checkpoints of Idelbayev's pytorch_resnet_cifar10 exactly.
"""
from __future__ import annotations

import hashlib
import pickle
import re
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


class FeatureModel(nn.Module):
    """A classifier split as `head(pool(body(x)))` with `head` a single `nn.Linear`.

    body: maps images to feature maps (N, D, H, W) (or directly to (N, D) features).
    pool: maps the body's output to phi(x) (N, D); the mean over H and W by default.
    head: the final `nn.Linear(D, C)`; its weight is W and its bias b.
    """

    def __init__(self, body: nn.Module, head: nn.Linear, pool: Callable | None = None, name: str = "model"):
        super().__init__()
        if not isinstance(body, nn.Module):
            raise TypeError(f"the body must be an nn.Module (so that .eval() and .to() reach it), got "
                            f"{type(body).__name__}; wrap a method with classfilters.models.MethodBody(model, 'name')")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the head must be one nn.Linear, got {type(head).__name__}")
        self.body = body
        self.head = head
        self.pool = pool or global_average_pool
        self.name = name
        # (resize, crop, interpolation) its weights were evaluated with; None: any size
        self.input_size: tuple[int, int, str] | None = None

    @property
    def num_features(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward_maps(self, x):
        return self.body(x)

    def forward_features(self, x):
        out = self.body(x)
        return self.pool(out) if out.dim() == 4 else out

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


class _TimmPool(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, maps):
        return self.model.forward_head(maps, pre_logits=True)


class _DenseNetBody(nn.Module):
    """torchvision DenseNet applies its last ReLU in `forward`, outside `features`."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return F.relu(self.features(x))


def _no_head_error(model: nn.Module, found: str) -> ValueError:
    return ValueError(
        f"{type(model).__name__} has no pooled single-linear head: found {found}. The method needs "
        "logits = Linear(pool(features)); wrap your model by hand with "
        "classfilters.FeatureModel(body=<module giving feature maps>, head=<the nn.Linear>, pool=<optional>)."
    )


def as_feature_model(model: nn.Module, name: str | None = None) -> FeatureModel:
    """Split a supported classifier into body / pool / linear head (no copy of weights)."""
    import torchvision.models as tvm

    name = name or type(model).__name__.lower()
    if isinstance(model, FeatureModel):
        return model
    if isinstance(model, CifarResNet):
        return FeatureModel(MethodBody(model, "forward_maps"), model.linear, name=name)
    if isinstance(model, tvm.ResNet):
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                             model.layer1, model.layer2, model.layer3, model.layer4)
        return _checked(model, body, model.fc, name)
    if isinstance(model, tvm.DenseNet):
        return _checked(model, _DenseNetBody(model.features), model.classifier, name)
    if isinstance(model, tvm.EfficientNet):
        linear = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else model.classifier
        return _checked(model, model.features, linear, name)
    if hasattr(model, "forward_head") and hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise _no_head_error(model, f"timm classifier {type(head).__name__}")
        return FeatureModel(MethodBody(model, "forward_features"), head, pool=_TimmPool(model), name=name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = list(model.named_children())[-1] if list(model.children()) else ("", model)
    raise _no_head_error(model, f"last child '{last[0]}' = {type(last[1]).__name__}"
                         + (f", linear layers {linears[-3:]}" if linears else ", no nn.Linear at all"))


def _checked(model, body, head, name):
    if not isinstance(head, nn.Linear):
        raise _no_head_error(model, f"head {type(head).__name__}")
    return FeatureModel(body, head, name=name)


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


def build_model(name: str, checkpoint: str | Path | None = None, num_classes: int | None = None,
                in_channels: int = 3, pretrained: bool | str = False, trust_checkpoint: bool = False) -> FeatureModel:
    """Make a model by name and wrap it.

    name: "resnet8".."resnet110" (CIFAR, 6n+2; "cifar_resnetN" where N clashes with torchvision), a torchvision name from TORCHVISION_MODELS
    (or any torchvision classifier), or "timm:<name>".
    checkpoint: a CIFAR .th file, or a state dict saved with torch.save / safetensors; read without
    running code from it (tensors only) unless `trust_checkpoint=True` (see `read_checkpoint`).
    pretrained: torchvision / timm ImageNet weights (needs internet the first time): True for the
    default ones, or the name of a torchvision weights entry ("IMAGENET1K_V1"). The model's
    `input_size` is then the (resize, crop, interpolation) those weights were evaluated with.
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
    if name.startswith("timm:"):
        import timm
        model = timm.create_model(name[5:], pretrained=pretrained, num_classes=num_classes or 1000,
                                  in_chans=in_channels)
    else:
        if name not in tvm.list_models(module=tvm):
            raise ValueError(f"unknown model '{name}': use resnet<6n+2> (CIFAR), a torchvision classifier "
                             f"(e.g. {', '.join(TORCHVISION_MODELS[:4])}) or timm:<name>")
        weights = torchvision_weights(name, pretrained) if pretrained else None
        kwargs = {} if weights is not None else {"num_classes": num_classes or 1000}
        model = tvm.get_model(name, weights=weights, **kwargs)
    if checkpoint is not None:
        load_state_dict_checked(model, read_state_dict(checkpoint, trust_checkpoint), str(checkpoint))
    wrapped = as_feature_model(model, name)
    if not name.startswith("timm:") and pretrained:
        wrapped.input_size = weights_input_size(weights)
    return wrapped


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
