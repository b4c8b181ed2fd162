"""Explanations of a class's logit, of its influential part, or of the rest: one entry point, `explain`.

Start (what is explained, for target class c; W, b the head, I_c the class's influential features):
  full              z_c   = sum_j W[c, j] phi_j + b_c
  influential       z_c^I = sum_{j in I_c} W[c, j] phi_j + b_c          (the decomposed logit, with the bias)
  non_influential   z_c^N = sum_{j not in I_c} W[c, j] phi_j            (so z_c = z_c^I + z_c^N)
built as the same body and pooling with a copied, masked head (`started_model`).

Methods (all return float (N, C, H, W) relevance over the input; `heatmap` sums the channels):
  gradient, gradient_x_input, integrated_gradients (zero baseline, midpoint rule, times x), smoothgrad:
      zennit attributors on the output 1 at class c. Linear in the explained function, so the
      influential and non-influential attributions add up to the full one.
  lrp_epsilon, lrp_epsilon_plus, lrp_epsilon_gamma_box, lrp_alpha2_beta1, lrp_gamma (one gamma per layer
      group: the body's convolutions in forward order split in thirds low / mid / high, and the classifier;
      epsilon is the rule's stabiliser, R_i = x_i (w_i + gamma w_i^+) / (eps + sum_j x_j (w_j + gamma w_j^+)) R):
      zennit composites, started from relevance z at class c (so input relevance sums to about z).
  channel_maps: Table 7's CAM-style map: the mean of the started feature set's last feature maps,
      bilinearly upsampled to the input (N, 1, H, W).
canonize=True explains the canonized model (canonization.py: checked equal, restored afterwards).
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    LayerMapComposite,
    NameLayerMapComposite,
    layer_map_base,
)
from zennit.rules import Epsilon, Gamma
from zennit.types import Convolution

from .canonization import NoInplace, canonizer_for
from .canonization import canonize as canonize_model
from .influence import InfluentialFeatures
from .models import FeatureModel, as_feature_model

GRADIENT_METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad")
LRP_METHODS = ("lrp_epsilon", "lrp_epsilon_plus", "lrp_epsilon_gamma_box", "lrp_alpha2_beta1", "lrp_gamma")
METHODS = GRADIENT_METHODS + LRP_METHODS + ("channel_maps",)
STARTS = ("full", "influential", "non_influential")
LAYER_GROUPS = ("low", "mid", "high", "classifier")


def started_model(model: nn.Module, influence: InfluentialFeatures | torch.Tensor | None,
                  start: str = "full") -> FeatureModel:
    """The model whose logit c is the started quantity: same body and pool, a copied head masked to I_c
    ("influential", bias kept), to its complement ("non_influential", no bias), or unmasked ("full")."""
    model = as_feature_model(model)
    check_start(start, influence, model)
    head = nn.Linear(model.head.in_features, model.head.out_features, bias=True,
                     device=model.head.weight.device, dtype=model.head.weight.dtype)
    with torch.no_grad():
        weight = model.head.weight.detach().clone()
        if isinstance(getattr(model.head, "mask", None), torch.Tensor):  # a DecomposedHead: its effective weight
            weight = weight * model.head.mask
        bias = model.head.bias.detach().clone() if model.head.bias is not None else torch.zeros_like(head.bias)
        if start != "full":
            mask = (influence.mask if isinstance(influence, InfluentialFeatures) else influence.bool()).to(weight.device)
            weight = weight * (mask if start == "influential" else ~mask)
            bias = bias if start == "influential" else torch.zeros_like(bias)
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    started = FeatureModel(model.body, head, pool=model.pool, name=f"{model.name}[{start}]")
    started.input_size = model.input_size
    return started.train(model.training)


def check_start(start, influence, model):
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}: choose one of {', '.join(STARTS)}")
    if start == "full":
        return
    if influence is None:
        raise ValueError(f"start={start!r} needs the class index sets: pass influence=influential_features(...)")
    shape = tuple(influence.mask.shape if isinstance(influence, InfluentialFeatures) else influence.shape)
    if shape != tuple(model.head.weight.shape):
        raise ValueError(f"the index sets cover {shape} (classes, features) but the model's head is "
                         f"{tuple(model.head.weight.shape)}: they were computed for another model")


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Module names per group: the body's convolutions in order, split in thirds (low, mid, high); the head."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("body.")]
    thirds = np.array_split(np.arange(len(convs)), 3)
    groups = {g: [convs[i] for i in idx] for g, idx in zip(LAYER_GROUPS[:3], thirds)}
    groups["classifier"] = ["head"]
    return groups


def make_composite(method: str, model: nn.Module, images: torch.Tensor, epsilon: float = 1e-6, gamma: float = 0.25,
                   gammas: dict | None = None, bounds: tuple | None = None):
    """The zennit composite of an LRP method (registered later on `model`, after canonization)."""
    if method == "lrp_epsilon":
        return LayerMapComposite(layer_map_base() + [(Convolution, Epsilon(epsilon)), (nn.Linear, Epsilon(epsilon))])
    if method == "lrp_epsilon_plus":
        return EpsilonPlus(epsilon=epsilon)
    if method == "lrp_alpha2_beta1":
        return EpsilonAlpha2Beta1(epsilon=epsilon)
    if method == "lrp_epsilon_gamma_box":
        low, high = bounds if bounds is not None else (images.amin(), images.amax())
        low = torch.as_tensor(low, dtype=images.dtype).expand_as(images)
        high = torch.as_tensor(high, dtype=images.dtype).expand_as(images)
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma)
    if method == "lrp_gamma":
        values = {g: gamma for g in LAYER_GROUPS} | dict(gammas or {})
        groups = layer_groups(model)
        name_map = [(tuple(groups[g]), Gamma(gamma=values[g], stabilizer=epsilon)) for g in LAYER_GROUPS if groups[g]]
        return NameLayerMapComposite(name_map=name_map, layer_map=layer_map_base())
    raise ValueError(f"{method!r} is not an LRP method: choose one of {', '.join(LRP_METHODS)}")


def check_inputs(model: FeatureModel, images, target, method, gammas, canonize):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if unknown := set(gammas or {}) - set(LAYER_GROUPS):
        raise ValueError(f"unknown layer groups {sorted(unknown)} in gammas: use {', '.join(LAYER_GROUPS)}")
    if not (torch.is_tensor(images) and images.dim() == 4 and images.is_floating_point()):
        raise ValueError("images must be a float tensor (N, C, H, W), normalised as the model expects "
                         "(e.g. split.normalize(uint8_images))")
    target = torch.as_tensor(target, device=images.device).long().reshape(-1)
    if target.numel() == 1:
        target = target.expand(len(images))
    if target.numel() != len(images):
        raise ValueError(f"{target.numel()} targets for {len(images)} images: give one class or one per image")
    bad = target[(target < 0) | (target >= model.num_classes)]
    if bad.numel():
        raise ValueError(f"class {int(bad[0])} is outside the model: it has classes 0..{model.num_classes - 1}")
    if canonize and method != "channel_maps":
        canonizer_for(model)  # an unsupported family raises here, before any work
    return target.clone()


def explain(model: nn.Module, images: torch.Tensor, target, method: str = "lrp_epsilon_plus", start: str = "full",
            influence: InfluentialFeatures | torch.Tensor | None = None, canonize: bool = True,
            epsilon: float = 1e-6, gamma: float = 0.25, gammas: dict | None = None, bounds: tuple | None = None,
            n_steps: int = 16, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Relevance (N, C, H, W) of `images` for class `target` (int or (N,)); see the module docstring.

    gammas: {"low", "mid", "high", "classifier"} -> gamma for lrp_gamma (others default to `gamma`);
    bounds: (low, high) input range for lrp_epsilon_gamma_box (default: the batch's min and max);
    n_steps: integrated gradients / smoothgrad iterations; noise: smoothgrad's noise level (std / input range).
    The model is put in eval mode."""
    model = as_feature_model(model).eval()
    target = check_inputs(model, images, target, method, gammas, canonize)
    check_start(start, influence, model)
    explained = started_model(model, influence, start)
    x = images.detach()
    if method == "channel_maps":
        return channel_maps(explained, x, target, influence, start)
    onehot = F.one_hot(target, model.num_classes).to(x.dtype)
    with ExitStack() as stack:
        if canonize:
            stack.enter_context(canonize_model(explained, probe=x[:8]))
        else:
            inplace = NoInplace()
            inplace.apply(explained)
            stack.callback(inplace.remove)
        if method in LRP_METHODS:
            composite = make_composite(method, explained, x, epsilon, gamma, gammas, bounds)
            with Gradient(explained, composite) as attributor:
                _, relevance = attributor(x, lambda out: out * onehot)
            return relevance.detach()
        if method in ("gradient", "gradient_x_input"):
            _, grad = Gradient(explained)(x, onehot)
            return (grad * x if method == "gradient_x_input" else grad).detach()
        if method == "integrated_gradients":
            _, grad = IntegratedGradients(explained, n_iter=n_steps)(x, onehot)
            return (grad * x).detach()
        torch.manual_seed(seed)
        _, grad = SmoothGrad(explained, noise_level=noise, n_iter=n_steps)(x, onehot)
        return grad.detach()


@torch.no_grad()
def channel_maps(explained: FeatureModel, x, target, influence, start) -> torch.Tensor:
    """(N, 1, H, W): mean of the chosen channels of the last feature maps, upsampled (Table 7's maps)."""
    maps = explained.forward_maps(x)
    if maps.dim() != 4:
        raise ValueError(f"{explained.name}'s body gives {maps.dim()}-d output, not feature maps (N, D, h, w)")
    if start == "full":
        chosen = torch.ones(len(x), maps.shape[1], dtype=torch.bool, device=x.device)
    else:
        mask = (influence.mask if isinstance(influence, InfluentialFeatures) else influence.bool()).to(x.device)[target]
        chosen = mask if start == "influential" else ~mask
    w = chosen.to(maps.dtype)
    mean = (maps * w[:, :, None, None]).sum(1, keepdim=True) / w.sum(1).clamp(min=1)[:, None, None, None]
    return F.interpolate(mean, size=x.shape[-2:], mode="bilinear", align_corners=False)


def heatmap(relevance: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) relevance -> (N, H, W), summed over channels."""
    return relevance.sum(1)


def heatmap_figure(images: torch.Tensor, heatmaps: dict[str, torch.Tensor], titles: list[str] | None = None):
    """A grid: one row per image, the image then each named heatmap (bwr, symmetric about 0)."""
    import matplotlib.pyplot as plt

    n, names = len(images), list(heatmaps)
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.8 * (len(names) + 1), 1.8 * n), squeeze=False)
    pictures = images.permute(0, 2, 3, 1).float()
    pictures = (pictures - pictures.amin()) / (pictures.amax() - pictures.amin()).clamp(min=1e-8)
    pictures = pictures.expand(-1, -1, -1, 3) if pictures.shape[-1] == 1 else pictures
    for row in range(n):
        axes[row, 0].imshow(pictures[row].numpy())
        if titles:
            axes[row, 0].set_ylabel(titles[row], fontsize=8)
        for col, name in enumerate(names):
            h = heatmaps[name][row]
            h = h.sum(0) if h.dim() == 3 else h
            v = float(h.abs().max()) or 1.0
            axes[row, col + 1].imshow(h.numpy(), cmap="bwr", vmin=-v, vmax=v)
    for col, title in enumerate(("image", *names)):
        axes[0, col].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def explanation_figure(model: nn.Module, images: torch.Tensor, target, influence=None,
                       method: str = "lrp_epsilon_plus", starts=STARTS, canonize=(True, False),
                       titles: list[str] | None = None, **explain_kwargs):
    """Heatmaps of `images` (float, normalised) for every start x canonized-or-not, one column each."""
    maps = {f"{start}{', canonized' if canon else ''}": heatmap(explain(model, images, target, method, start, influence,
                                                                         canon, **explain_kwargs))
            for start in starts for canon in canonize}
    return heatmap_figure(images.cpu(), {k: v.cpu() for k, v in maps.items()}, titles)
