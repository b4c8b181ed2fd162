"""Network canonization: the same function, rebuilt from layers LRP rules can handle (zennit canonizers).

Pahde et al. (CVPRW 2023): rule-based explanations break on BatchNorm and on operations that are not
modules (residual additions, gates, functional pooling). A canonizer rewrites the model in place,
temporarily, so that it computes the same logits:

  BatchNorm after conv / linear   BN(z) = s (z - mu) + beta, s = gamma / sqrt(var + eps), folded:
                                  W' = s W, b' = s (b - mu) + beta; the BN becomes the identity (eps 0 too:
                                  zennit 0.5.1 leaves eps, which shifts ResNet-18 logits by ~2.5e-4).
  BatchNorm before ReLU -> conv   (DenseNet) ReLU(s x + t) = |s| ReLU(sign(s) (x - theta)), theta = -t / s:
                                  a thresholded ReLU, and |s| moved into the next conv's input channels
                                  (exact with zero padding, since the shift stays before the ReLU).
  residual additions              `a + b` -> zennit `Sum` over stacked inputs (a module rules attach to).
  global average pooling          the FeatureModel's functional mean -> an `nn.AdaptiveAvgPool2d` module.
  squeeze-excitation              gate * x with the gate treated as a constant in the backward pass
                                  (signal-only gate: relevance flows through x only).

Families: CIFAR ResNets (option-A shortcut), torchvision ResNet / Wide-ResNet, DenseNet, EfficientNet.
`canonize(model)` applies the family's canonizer, asserts on a probe batch that the logits are unchanged
(max |dz| <= rtol * max(1, max |z|)) and that every BatchNorm is now the identity, and otherwise
undoes everything and raises. `Canonized.remove()` (or leaving the `with` block) restores every
parameter, buffer and attribute bit for bit.

About 540 lines: the four families' canonizers, the generic folding they share and the checks that
guard each one; kept in one file so a family's rewrite and its equality check read together (a split
of the family-specific adapters into their own module, zennit's layout, is a candidate next step).
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import SqueezeExcitation
from zennit.canonizers import Canonizer, CompositeCanonizer, MergeBatchNorm
from zennit.core import collect_leaves
from zennit.layer import Sum

from .models import BasicBlock as CifarBasicBlock
from .models import (
    CifarBottleneckResNet,
    CifarResNet,
    FeatureModel,
    MethodBody,
    _DenseNetBody,
    as_feature_model,
    global_average_pool,
)

SUPPORTED_FAMILIES = {
    "cifar_resnet": "CIFAR ResNet (option-A shortcut CifarResNet, or projection-shortcut CifarBottleneckResNet)",
    "resnet": "torchvision ResNet / Wide-ResNet",
    "densenet": "torchvision DenseNet",
    "efficientnet": "torchvision EfficientNet",
}
DEFAULT_RTOL = 1e-5
BODY_MARK = "canonized_by_classfilters"  # set on a FeatureModel's body while it is canonized


class CanonizationError(ValueError):
    """The model cannot be canonized exactly (unsupported family, or the rewrite changed its function)."""


# --------------------------------------------------------------------------------------
# Building blocks


class FoldBatchNorm(MergeBatchNorm):
    """BatchNorms folded into the conv / linear before them, with eps set to 0 while folded.

    pairs: root -> [(linear, bn)]; by default every conv / linear directly followed by a BatchNorm of
    matching width in zennit's leaf order (a width mismatch is skipped, never mis-merged)."""

    def __init__(self, pairs=None):
        super().__init__()
        self.pairs = pairs or adjacent_pairs
        self.eps = None

    def apply(self, root_module):
        instances = []
        for linear, bn in self.pairs(root_module):
            instance = self.copy()
            instance.register((linear,), bn)
            instances.append(instance)
        return instances

    def copy(self):
        return FoldBatchNorm(self.pairs)

    def merge_batch_norm(self, modules, batch_norm):
        self.eps = batch_norm.eps
        MergeBatchNorm.merge_batch_norm(modules, batch_norm)
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self.eps


def out_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def adjacent_pairs(root: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs, last = [], None
    for leaf in collect_leaves(root):
        if (isinstance(last, (nn.Conv2d, nn.Linear)) and isinstance(leaf, nn.modules.batchnorm._BatchNorm)
                and out_width(last) == leaf.num_features):
            pairs.append((last, leaf))
        last = leaf
    return pairs


class SwapAttributes(Canonizer):
    """Set attributes (modules, forward methods) on matching modules; `remove` puts back exactly what was there
    (same object, same place: a child module keeps its position among its siblings).

    attribute_map: (name, module) -> dict of attributes, or None when the module does not match."""

    def __init__(self, attribute_map):
        super().__init__()
        self.attribute_map = attribute_map
        self.module = None
        self.saved = {}

    def apply(self, root_module):
        instances = []
        for name, module in list(root_module.named_modules()):
            attributes = self.attribute_map(name, module)
            if attributes is not None:
                instance = self.copy()
                instance.register(module, attributes)
                instances.append(instance)
        return instances

    def copy(self):
        return SwapAttributes(self.attribute_map)

    def register(self, module, attributes):
        self.module = module
        for key, value in attributes.items():
            self.saved[key] = where(module, key)
            setattr(module, key, value)

    def remove(self):
        for key, old in reversed(list(self.saved.items())):
            now = where(self.module, key)
            if old is not None and now is not None and old[0] == now[0] and old[0] != "__dict__":
                setattr(self.module, key, old[1])          # in place: keeps the child's position
                continue
            if now is not None:
                delattr(self.module, key)
            if old is not None:
                store = self.module.__dict__ if old[0] == "__dict__" else getattr(self.module, old[0])
                store[key] = old[1]


def where(module: nn.Module, key: str):
    """(store, object) where `key` lives on the instance, or None (then it is a class attribute or absent)."""
    for store in ("_parameters", "_buffers", "_modules"):
        if key in module.__dict__[store]:
            return store, module.__dict__[store][key]
    return ("__dict__", module.__dict__[key]) if key in module.__dict__ else None


class GlobalAvgPool(nn.Module):
    """(N, D, H, W) -> (N, D): the mean over H and W as a module (zennit maps AvgPool to the Norm rule)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(x).flatten(1) if x.dim() == 4 else x


class ThreshReLU(nn.ReLU):
    """ReLU(sign * (x - threshold)) per channel: a BatchNorm's shift kept before the ReLU (its scale moved on).

    A subclass of nn.ReLU, so composites treat it as an activation (relevance passes through)."""

    def __init__(self, threshold: torch.Tensor, sign: torch.Tensor):
        super().__init__()
        self.register_buffer("threshold", threshold)
        self.register_buffer("sign", sign)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return F.relu(self.sign.view(shape) * (x - self.threshold.view(shape)))


class FoldBatchNormIntoNext(Canonizer):
    """BN -> ReLU -> conv/linear (DenseNet): the ReLU becomes a ThreshReLU, |s| multiplies the next layer's
    input channels, the BN becomes the identity. Needs every BN weight nonzero (else the channel is a constant).

    triples: root -> [(bn, (owner, relu_name), next_layer)]; with relu_name on owner replaced by the ThreshReLU."""

    def __init__(self, triples):
        super().__init__()
        self.triples = triples
        self.saved = None

    def apply(self, root_module):
        triples = self.triples(root_module)
        for bn, _, _ in triples:  # all checked before anything changes
            check_scales(bn)
        instances = []
        for bn, (owner, relu_name), nxt in triples:
            instance = FoldBatchNormIntoNext(self.triples)
            instance.register(bn, owner, relu_name, nxt)
            instances.append(instance)
        return instances

    def register(self, bn, owner, relu_name, nxt):
        with torch.no_grad():
            s = check_scales(bn)
            t = bn.bias - bn.running_mean * s
            relu = ThreshReLU(-t / s, torch.sign(s))
        self.saved = (bn, {k: getattr(bn, k).data for k in ("weight", "bias", "running_mean", "running_var")},
                      bn.eps, nxt, nxt.weight.data)
        view = (1, -1) + (1,) * (nxt.weight.dim() - 2)
        nxt.weight.data = nxt.weight.data * s.abs().view(view)
        bn.running_mean.data = torch.zeros_like(bn.running_mean)
        bn.running_var.data = torch.ones_like(bn.running_var)
        bn.weight.data = torch.ones_like(bn.weight)
        bn.bias.data = torch.zeros_like(bn.bias)
        bn.eps = 0.0
        self.swap = SwapAttributes(None)
        self.swap.register(owner, {relu_name: relu})

    def remove(self):
        self.swap.remove()
        bn, params, eps, nxt, weight = self.saved
        for k, v in params.items():
            getattr(bn, k).data = v
        bn.eps = eps
        nxt.weight.data = weight


def check_scales(bn: nn.Module) -> torch.Tensor:
    """The BatchNorm's scales s = gamma / sqrt(var + eps); CanonizationError when one is 0 (a constant channel)."""
    with torch.no_grad():
        s = bn.weight / (bn.running_var + bn.eps).sqrt()
    if bool((s == 0).any()):
        raise CanonizationError(f"a BatchNorm before a ReLU has {int((s == 0).sum())} channels with weight 0: their "
                                "output is a constant the next layer cannot absorb exactly")
    return s


class SignalOnlyGate(torch.autograd.Function):
    """gate * x forward; backward sends the whole gradient to x and none to the gate."""

    @staticmethod
    def forward(ctx, gate, x):
        return gate * x

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), grad


# --------------------------------------------------------------------------------------
# Forward methods with the residual sum as a module


# The two terms are stacked on a new first axis (a contiguous copy; zennit's own block canonizers stack on
# the last axis, a strided copy that made the canonized forward twice as slow) and summed by Sum(dim=0).


def cifar_block_forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(self.canonizer_sum(torch.stack([self.shortcut(x), out])))


def basic_block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(self.canonizer_sum(torch.stack([identity, out])))


def bottleneck_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(self.canonizer_sum(torch.stack([identity, out])))


def mbconv_forward(self, x):
    result = self.block(x)
    if self.use_res_connect:
        result = self.canonizer_sum(torch.stack([x, self.stochastic_depth(result)]))
    return result


def se_forward(self, x):
    return SignalOnlyGate.apply(self._scale(x), x)


def densenet_body_forward(self, x):
    return self.canonizer_relu(self.features(x))


def _sum_blocks(cls, forward, when=lambda module: True):
    def attributes(name, module):
        if isinstance(module, cls) and when(module):
            return {"forward": forward.__get__(module), "canonizer_sum": Sum(dim=0)}
        return None
    return SwapAttributes(attributes)


def _pool_module(name, module):
    if isinstance(module, FeatureModel) and module.pool in (None, global_average_pool):  # None: the mean over H, W
        return {"pool": GlobalAvgPool()}
    return None


def _densenet_pairs(root):
    pairs = []
    for module in root.modules():
        if isinstance(module, tvm.densenet._DenseLayer):
            pairs.append((module.conv1, module.norm2))
        elif isinstance(module, nn.Sequential) and {"conv0", "norm0"} <= set(module._modules):
            pairs.append((module.conv0, module.norm0))
    return pairs


def _densenet_triples(root):
    triples = []
    for module in root.modules():
        if isinstance(module, tvm.densenet._DenseLayer):
            triples.append((module.norm1, (module, "relu1"), module.conv1))
        elif isinstance(module, tvm.densenet._Transition):
            triples.append((module.norm, (module, "relu"), module.conv))
    return triples


class DenseNetFinal(Canonizer):
    """The DenseNet body's last BN (norm5) -> functional ReLU -> mean pool -> head: ThreshReLU, |s| into the head."""

    def __init__(self):
        super().__init__()
        self.inner = None

    def apply(self, root_module):
        if not (isinstance(root_module, FeatureModel) and isinstance(root_module.body, _DenseNetBody)):
            return []
        body = root_module.body
        check_scales(body.features.norm5)
        body.forward = densenet_body_forward.__get__(body)
        body.canonizer_relu = nn.ReLU()
        self.inner = FoldBatchNormIntoNext(lambda root: [(body.features.norm5, (body, "canonizer_relu"), root.head)])
        self.instances = self.inner.apply(root_module)
        self.body = body
        return [self]

    def register(self):
        pass

    def remove(self):
        for instance in self.instances:
            instance.remove()
        del self.body.forward
        del self.body.canonizer_relu


class NoInplace(Canonizer):
    """In-place activations set to out-of-place (same function; autograd hooks need it). Restored on remove."""

    def apply(self, root_module):
        modules = [m for m in root_module.modules() if getattr(m, "inplace", False) is True]
        for m in modules:
            m.inplace = False
        self.modules = modules
        return [self]

    def register(self):
        pass

    def remove(self):
        for m in self.modules:
            m.inplace = True


# --------------------------------------------------------------------------------------
# Families


def canonizer_family(model: nn.Module) -> str | None:
    """The canonization family of a (Feature)Model: a key of SUPPORTED_FAMILIES, or None."""
    body = model.body if isinstance(model, FeatureModel) else model
    cifar = (CifarResNet, CifarBottleneckResNet)
    if isinstance(body, cifar) or (isinstance(body, MethodBody) and isinstance(body.model, cifar)):
        return "cifar_resnet"
    if isinstance(body, (_DenseNetBody, tvm.DenseNet)):
        return "densenet"
    modules = list(body.modules())
    if any(isinstance(m, (tvm.resnet.BasicBlock, tvm.resnet.Bottleneck)) for m in modules):
        return "resnet"
    if any(isinstance(m, tvm.efficientnet.MBConv) for m in modules):
        return "efficientnet"
    return None


def canonizer_for(model: nn.Module) -> CompositeCanonizer:
    """The zennit canonizer of the model's family (applied to a FeatureModel); CanonizationError if none."""
    family = canonizer_family(model)
    parts = [NoInplace()]
    if family == "cifar_resnet":
        parts += [FoldBatchNorm(), _sum_blocks(CifarBasicBlock, cifar_block_forward),
                  _sum_blocks(tvm.resnet.Bottleneck, bottleneck_forward)]  # the bottleneck variant's blocks
    elif family == "resnet":
        parts += [FoldBatchNorm(), _sum_blocks(tvm.resnet.BasicBlock, basic_block_forward),
                  _sum_blocks(tvm.resnet.Bottleneck, bottleneck_forward)]
    elif family == "densenet":
        parts += [FoldBatchNorm(_densenet_pairs), FoldBatchNormIntoNext(_densenet_triples), DenseNetFinal()]
    elif family == "efficientnet":
        parts += [FoldBatchNorm(), _sum_blocks(tvm.efficientnet.MBConv, mbconv_forward, lambda m: m.use_res_connect),
                  SwapAttributes(lambda n, m: {"forward": se_forward.__get__(m)}
                                 if isinstance(m, SqueezeExcitation) else None)]
    else:
        name = getattr(model, "name", type(model).__name__)
        raise CanonizationError(f"no canonizer for model '{name}' ({type(getattr(model, 'body', model)).__name__}): "
                                f"supported families are {', '.join(SUPPORTED_FAMILIES.values())}; "
                                "explain it with canonize=False")
    body = getattr(model, "body", None)
    if body is not None and getattr(body, BODY_MARK, False):
        # nested use (explaining inside `with canonize(model)`): the shared body is canonized already, so only
        # this wrapper's pooling is left to change
        return CompositeCanonizer([NoInplace(), SwapAttributes(_pool_module)])
    parts.append(SwapAttributes(_pool_module))
    if body is not None:
        parts.append(SwapAttributes(lambda name, module: {BODY_MARK: True} if module is body else None))
    return CompositeCanonizer(parts)


class Canonized:
    """A canonization in force on `model` (a FeatureModel, changed in place). `remove()` restores it exactly.

    family: the family key; instances: the applied zennit canonizer instances; max_error: max |dz| on the
    probe; folded: number of BatchNorms folded; sums: residual additions made modules."""

    def __init__(self, model, family, instances, max_error, scale):
        self.model, self.family, self.instances = model, family, instances
        self.max_error, self.scale = max_error, scale
        self.folded = sum(isinstance(i, (FoldBatchNorm, FoldBatchNormIntoNext)) for i in instances) + sum(
            len(getattr(i, "instances", [])) for i in instances if isinstance(i, DenseNetFinal))
        self.sums = sum(isinstance(m, Sum) for m in model.modules())
        self.active = True

    def remove(self):
        if self.active:
            for instance in reversed(self.instances):
                instance.remove()
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def default_probe(model: nn.Module, size: int = 32, n: int = 4, seed: int = 0) -> torch.Tensor:
    """A random normal batch (n, in_channels, size, size) on the model's device (in_channels of its first conv)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, first.in_channels, size, size, generator=g).to(p.device, p.dtype)


def canonize(model: nn.Module, probe: torch.Tensor | None = None, rtol: float = DEFAULT_RTOL) -> Canonized:
    """Canonize `model` in place (wrapped as a FeatureModel first) and check it computes the same logits.

    probe: inputs (N, C, H, W) for the check (default: `default_probe`, 32x32 normal noise). Refuses a
    training-mode model (BatchNorm would use batch statistics) and any model whose canonized logits differ by
    more than rtol * max(1, max |z|) or keep a BatchNorm that is not the identity: it is restored, then
    CanonizationError is raised. Use as `with canonize(m): ...` or call `.remove()`."""
    model = as_feature_model(model)
    canonizer = canonizer_for(model)          # raises for unsupported families, before any work
    family = canonizer_family(model)
    if any(m.training for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))):
        raise CanonizationError("the model is in training mode (BatchNorm uses batch statistics, so folding is not "
                                "exact): call model.eval() first")
    probe = default_probe(model) if probe is None else probe
    instances = []
    with torch.no_grad():
        before = model(probe)
        try:
            for part in canonizer.canonizers:   # one by one: a part that refuses leaves the earlier ones removable
                instances += part.apply(model)
            after = model(probe)
            scale = max(1.0, before.abs().max().item())
            error = (after - before).abs().max().item()
            left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and not bn_is_identity(m)]
            if not error <= rtol * scale:
                raise CanonizationError(f"canonized {SUPPORTED_FAMILIES[family]} '{model.name}' changed the logits by "
                                        f"{error:.3g} (> {rtol:g} * {scale:.3g}); the model was restored")
            if left:
                raise CanonizationError(f"{len(left)} BatchNorms of {SUPPORTED_FAMILIES[family]} '{model.name}' could not"
                                        f" be folded (e.g. {left[:3]}); the model was restored")
        except BaseException:
            for instance in reversed(instances):
                instance.remove()
            raise
    return Canonized(model, family, instances, error, scale)


def bn_is_identity(bn: nn.Module) -> bool:
    return (bn.eps == 0 and bool((bn.weight == 1).all()) and bool((bn.bias == 0).all())
            and bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all()))


def canonization_check(models: dict[str, nn.Module], probe: torch.Tensor | None = None,
                       rtol: float = DEFAULT_RTOL) -> pd.DataFrame:
    """One row per model: family, BatchNorms folded, sums made modules, max |dz| canonized vs original
    (relative too), zennit 0.5.1's own ResNet canonizer error where it applies, and whether removal restored
    the state dict and the logits bit for bit."""
    rows = []
    for name, model in models.items():
        model = as_feature_model(model).eval()
        x = default_probe(model) if probe is None else probe
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            before = model(x)
            with canonize(model, x, rtol) as c:
                pass
            after = model(x)
        restored = all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and torch.equal(before, after)
        rows.append({"model": name, "family": c.family, "bn_folded": c.folded, "sums": c.sums,
                     "max_abs_dz": c.max_error, "max_rel_dz": c.max_error / c.scale,
                     "zennit_0.5.1_dz": zennit_resnet_error(model, x) if c.family == "resnet" else float("nan"),
                     "restored_exactly": restored})
    return pd.DataFrame(rows)


@torch.no_grad()
def zennit_resnet_error(model: FeatureModel, x: torch.Tensor) -> float:
    """max |dz| of zennit's own ResNetCanonizer (eps left in the folded BNs): the error FoldBatchNorm removes."""
    from zennit.torchvision import ResNetCanonizer
    before = model(x)
    instances = ResNetCanonizer().apply(model)
    try:
        return (model(x) - before).abs().max().item()
    finally:
        for instance in reversed(instances):
            instance.remove()
