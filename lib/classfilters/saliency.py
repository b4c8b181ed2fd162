"""Saliency of every spatial filter, from gradients of the true-class logits (ExplainFix §4.1).

For spatial conv weights W (O, I/g, k, k) and the cost L = Σ_b z_{y_b}(x_b), the sum of each
image's true-class logit over the images of the chosen classes S (all classes by default):

    "grad"        s[o, i] = Σ_batches Σ_{h,w} |∂L/∂W[o, i, h, w]|               (the paper's runs, ExplainSteer)
    "weight_grad" s[o, i] = Σ_batches Σ_{h,w} |W[o, i, h, w] · ∂L/∂W[o, i, h, w]|  (the authors' library)

Returns {conv name: float64 (O, I/g)} in `spatial_convs` order. The model's requires_grad flags,
train/eval mode and device are restored afterwards, so fixed filters stay fixed.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import ImageSplit
from .features import default_device
from .fixed_filters import check_has_spatial_convs

SALIENCY_KINDS = ("grad", "weight_grad")


def check_saliency_kind(kind: str) -> None:
    if kind not in SALIENCY_KINDS:
        raise ValueError(f"unknown saliency {kind!r}: choose 'grad' (|∇W|, the paper's runs) or "
                         "'weight_grad' (|W ⊙ ∇W|, the authors' library)")


def class_images(split: ImageSplit, classes: list[int] | None) -> torch.Tensor:
    """Indices of the images of `split` whose label is in `classes` (all when None)."""
    if classes is None:
        return torch.arange(len(split))
    return torch.nonzero(torch.isin(split.labels, torch.as_tensor(classes))).flatten()


def filter_saliency(model: nn.Module, split: ImageSplit, kind: str = "grad", classes: list[int] | None = None,
                    max_images: int | None = 2048, batch_size: int = 128, device=None) -> dict[str, torch.Tensor]:
    """Saliency per spatial filter, summed over (up to `max_images` of) the images of `classes`."""
    check_saliency_kind(kind)
    convs = check_has_spatial_convs(model)
    if split.images is None:
        raise ValueError("filter_saliency needs an in-memory split (digits, CIFAR-10)")
    index = class_images(split, classes)
    if len(index) == 0:
        raise ValueError(f"the split has no image of the classes {classes}")
    if max_images is not None:
        index = index[:max_images]
    device = torch.device(device) if device is not None else default_device()
    was_training = model.training
    home = next(model.parameters()).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.to(device).eval()
    weights = [conv.weight for _, conv in convs]
    for w in weights:
        w.requires_grad_(True)
    scores = [torch.zeros(w.shape[:2], dtype=torch.float64, device=device) for w in weights]
    try:
        for start in range(0, len(index), batch_size):
            batch = index[start:start + batch_size]
            x = split.normalize(split.images[batch].to(device))
            y = split.labels[batch].to(device)
            logits = model(x)
            cost = logits.gather(1, y[:, None]).sum()
            grads = torch.autograd.grad(cost, weights)
            for score, w, g in zip(scores, weights, grads):
                term = (w.detach() * g) if kind == "weight_grad" else g
                score += term.abs().sum((2, 3)).double()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training).to(home)
    return {name: s.cpu() for (name, _), s in zip(convs, scores)}
