"""Class-Specific Gates (CSG, Liang et al. 2020): the baseline of the paper's Table 1.

A gate matrix G in [0, 1]^{D x C} (initialised to 0.5) multiplies the penultimate features
phi(x) by the column of the true label, in training only. Training alternates step by step
between the standard path (cross-entropy of head(phi)) and the gated path (cross-entropy of
head(phi * G[:, y]) + lam * relu(||G||_1 - 0.2 |G|)); after every step each filter's gate row
is divided by its maximum and clipped to [0, 1]. `train_csg` starts from a given model
(the profile's trained or pretrained one) and trains everything, body and head included.

Index sets of class c are read from G's column c: the k' *lowest* gates (the authors' code,
an ascending argsort) or the k' *highest* (the sound reading: the filters the class keeps).
A ResNet-20 on the digits trains for 10 epochs in a few seconds on a CPU.
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import cache
from .data import ImageSplit
from .decomposed import accuracy, head_on
from .features import default_device
from .models import FeatureModel, fingerprint
from .train import Recipe, augment, one_cycle, step_in_micro_batches


class GatedModel(nn.Module):
    """A `FeatureModel` with a gate matrix (D, C) applied to phi(x) when labels are given."""

    def __init__(self, model: FeatureModel, init: float = 0.5):
        super().__init__()
        self.model = model
        self.gates = nn.Parameter(torch.full((model.num_features, model.num_classes), float(init)))

    def forward(self, x, labels: torch.Tensor | None = None):
        phi = self.model.forward_features(x)
        return self.model.head(gate(phi, self.gates, labels))


def gate(phi: torch.Tensor, gates: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """phi * G[:, y] row by row (the gated path); phi itself when labels is None (the standard path)."""
    return phi if labels is None else phi * gates[:, labels].T.to(phi.dtype)


def sparsity_loss(gates: torch.Tensor, lam: float, density: float = 0.2) -> torch.Tensor:
    """lam * relu(||G||_1 - density * |G|): only gate mass above 20 % of the entries costs."""
    return lam * F.relu(gates.abs().sum() - density * gates.numel())


@torch.no_grad()
def normalize_gates_(gates: torch.Tensor) -> None:
    """Each filter's gate row divided by its max, then clipped to [0, 1] (in place)."""
    gates.div_(gates.amax(1, keepdim=True).clamp(min=1e-12)).clamp_(0, 1)


def shuffled_batches(split: ImageSplit, batch_size: int, gen: torch.Generator, device):
    """(uint8 images, labels) in a random order: slices of the split held on `device`, or a
    shuffling loader for folders."""
    if split.images is not None:
        images, labels = split.images.to(device), split.labels.to(device)
        perm = torch.randperm(len(split), generator=gen).to(device)
        for start in range(0, len(split), batch_size):
            idx = perm[start:start + batch_size]
            yield images[idx], labels[idx]
        return
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=batch_size, shuffle=True, generator=gen,
                                         num_workers=2)
    for images, labels in loader:
        yield images.to(device), labels.to(device)


def train_csg(model: FeatureModel, split: ImageSplit, recipe: Recipe | None = None, lam: float = 0.01,
              seed: int = 0, device=None, progress: bool = False) -> GatedModel:
    """CSG training from `model` (copied): alternating standard and gated steps, gates renormalised."""
    recipe = recipe or Recipe()
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # crops and flips drawn on the GPU there (no step waits for the host), else from the order's generator
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1) if device.type == "cuda" else gen
    gated = GatedModel(copy.deepcopy(model)).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD([{"params": gated.model.parameters(), "weight_decay": recipe.weight_decay},
                           {"params": [gated.gates], "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=0.9, nesterov=True)
    steps = recipe.epochs * -(-len(split) // recipe.batch_size)
    sched = one_cycle(opt, recipe.lr, steps)
    width = split.images.shape[-1] if split.images is not None else 224
    padding = recipe.crop_padding if recipe.crop_padding is not None else width // 8
    step, micro = 0, recipe.batch_size
    for _ in tqdm(range(recipe.epochs), desc=f"CSG {model.name}", disable=not progress, unit="epoch"):
        for images, labels in shuffled_batches(split, recipe.batch_size, gen, device):
            x = split.normalize(augment(images, padding, recipe.flip, augment_gen))
            x = x.contiguous(memory_format=torch.channels_last)
            gated_step = step % 2 == 1
            micro = step_in_micro_batches(opt, x, labels, micro, partial(_chunk_loss, gated, gated_step, len(x)),
                                          partial(sparsity_loss, gated.gates, lam) if gated_step else None)
            sched.step()
            normalize_gates_(gated.gates)
            step += 1
    return gated.cpu().eval()


def _chunk_loss(gated: GatedModel, gated_step: bool, batch: int, x, labels) -> torch.Tensor:
    """The chunk's share of the batch's mean cross-entropy, through the gated or the standard path."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = gated(x, labels if gated_step else None)
    return F.cross_entropy(logits.float(), labels, reduction="sum") / batch


def trained_csg(model: FeatureModel, split: ImageSplit, recipe: Recipe | None = None, lam: float = 0.01,
                seed: int = 0, device=None, progress: bool = False) -> GatedModel:
    """`train_csg`, cached under the starting weights, the split, the recipe, lam and the seed."""
    recipe = recipe or Recipe()
    key = {"csg_from": fingerprint(model), "data": split.fingerprint, "recipe": asdict(recipe), "lam": lam,
           "seed": seed, "memory_format": "channels_last", "precision": "bf16 on GPUs"}
    gated = GatedModel(copy.deepcopy(model))
    if (state := cache.load("csg", key)) is not None:
        gated.load_state_dict(state)
        return gated.eval()
    gated = train_csg(model, split, recipe, lam, seed, device, progress)
    cache.save("csg", key, {k: v.detach().cpu().clone() for k, v in gated.state_dict().items()})
    return gated


def gate_mask(gates: torch.Tensor, k_prime: int, order: str = "highest") -> torch.Tensor:
    """bool (C, D): per class the k' highest gates ("highest", sound) or lowest ("lowest", the authors')."""
    if order not in ("highest", "lowest"):
        raise ValueError(f"order must be 'highest' or 'lowest', got {order!r}")
    g = gates.detach().T.float()                              # (C, D)
    idx = torch.sort(g, dim=1, descending=order == "highest", stable=True).indices[:, :k_prime]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)


@torch.no_grad()
def path_accuracies(gated: GatedModel, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Test accuracy of the standard path and of the gated path (true-label gates, as in training)."""
    head = head_on(gated.model.head, features.device)  # a copy: the model's head stays where it is
    labels = labels.long().to(features.device)
    return {"standard": accuracy(head(features), labels),
            "gated": accuracy(head(gate(features, gated.gates.detach().to(features.device), labels)), labels)}
