"""Class-Specific Gates (CSG, Liang et al. 2020): the baseline of the paper's Table 1.

A gate matrix G in [0, 1]^{D x C} (initialised to 0.5) multiplies the penultimate features
phi(x) by the column of the true label, in training only. Training alternates step by step
between the standard path (cross-entropy of head(phi)) and the gated path (cross-entropy of
head(phi * G[:, y]) + lam * relu(||G||_1 - budget |G|), budget 0.2 as the official code). The
body and head follow the recipe (SGD, one-cycle); the gates have their own Adam optimiser (`gate_lr`,
constant), stepped on gated steps, and after each gated step are clipped to [0, 1] (`gate_rule="clip"`, the default) or, as the
official code, divided by their row's maximum and clipped (`"row_max"`).

The official code (hyliang96/CSGCNN, VOCPart/train: `LearnableMaskLayer.loss_function`, `clip_lmask`,
`get_density`, and train.py's separate Adam optimiser `optimizer_reg` for the CSG path, lr_reg 1e-3,
lambda 1e-3, ~5e4 CSG steps) has the same loss, the same 0.2 budget and the row-max rule. Why the
gates stayed open (0.45-1.0 after 10 epochs) before: they were stepped with the body's SGD (lr 0.01,
lam 0.01: ~1e-4..1e-3 a step) for a few hundred steps, and the row-max rule undoes a shrinkage
delta common to a row: g -> (g - delta) / (1 - delta) keeps the row's maximum at 1, so only the
gap 1 - g of the other gates grows, by 1 / (1 - delta) a step, and a row the cross-entropy says
nothing about stays at 1 for ever (test: `test_csg_gates_of_features_a_class_does_not_use_close`).
It also bounds the L1-density below by 1/C (0.1 for 10 classes), so the CSG paper's ~0.08 for
ResNet-20 on CIFAR-10 cannot come from it. Clipping alone lets the L1 term close the gates a class
does not need; Adam makes the pace `gate_lr` whatever lam's scale (gated steps * gate_lr >~ 5).

The density of the gates is the CSG paper's L1-density ||G||_1 / |G| (`l1_density`, its
`get_density`), with the fraction of gates that are non-zero (`nonzero_fraction`) beside it.

`train_csg` trains a copy of a given model (a trained one, or a fresh one: `untrained_model`, for
CSG from scratch as the CSG paper does). Index sets of class c are read from G's column c: the k'
*lowest* gates (the authors' code, an ascending argsort) or the k' *highest* (the sound reading:
the filters the class keeps). A ResNet-20 on the digits trains for 10 epochs in a few seconds.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import cache
from .data import ImageSplit
from .decomposed import accuracy, head_on
from .device import default_device, training_precision
from .models import FeatureModel, build_model, fingerprint
from .progress import tqdm
from .train import Recipe, augment, one_cycle, step_in_micro_batches, training_key

SOURCE_DIGEST = cache.source_digest(sys.modules[__name__])  # this file as imported (a key of trained CSG models)


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


def l1_density(gates: torch.Tensor) -> float:
    """The CSG paper's L1-density of the gates: ||G||_1 / |G| (1 for all-open gates, 0 for all closed)."""
    return (gates.detach().abs().sum() / gates.numel()).item()


def nonzero_fraction(gates: torch.Tensor) -> float:
    """The fraction of gates that are not exactly 0 (the clip to [0, 1] makes closed gates exact zeros)."""
    return (gates.detach() != 0).double().mean().item()


def sparsity_loss(gates: torch.Tensor, lam: float, budget: float = 0.2) -> torch.Tensor:
    """lam * relu(||G||_1 - budget * |G|): only gate mass above the budget's L1-density costs (the official
    code: 0.2), so the density settles near `budget` unless the cross-entropy closes more gates."""
    return lam * F.relu(gates.abs().sum() - budget * gates.numel())


GATE_RULES = ("clip", "row_max")


def clip_gates_(gates: torch.Tensor) -> None:
    """Gates clipped to [0, 1] (in place): the L1 shrinkage acts, a gate no class needs goes to 0."""
    with torch.no_grad():
        gates.clamp_(0, 1)


def normalize_gates_(gates: torch.Tensor) -> None:
    """Each filter's gate row divided by its max, then clipped to [0, 1] (in place; the official `clip_lmask`)."""
    with torch.no_grad():
        gates.div_(gates.amax(1, keepdim=True).clamp(min=1e-12)).clamp_(0, 1)


STREAM_WORKERS = 2  # the loader's processes for a streamed split


def shuffled_batches(split: ImageSplit, batch_size: int, gen: torch.Generator, device):
    """(uint8 images, labels) in a random order drawn from `gen`: slices of the split held on `device`,
    or the same batches read by a loader from a streamed split (the order does not depend on where
    the images are, so a split streamed trains as the same split in memory)."""
    perm = torch.randperm(len(split), generator=gen)
    starts = range(0, len(split), batch_size)
    if split.images is not None:
        images, labels, perm = split.images.to(device), split.labels.to(device), perm.to(device)
        for start in starts:
            idx = perm[start:start + batch_size]
            yield images[idx], labels[idx]
        return
    # the workers' seeds from a generator of their own: `gen` (the augmentations') and the global one untouched
    loader = torch.utils.data.DataLoader(split.dataset, batch_sampler=[perm[s:s + batch_size].tolist() for s in starts],
                                         num_workers=STREAM_WORKERS,
                                         generator=torch.Generator().manual_seed(gen.initial_seed()))
    for images, labels in loader:
        yield images.to(device), labels.to(device)


class _Optimizers:
    """Several optimisers stepped and zeroed as one (the body's SGD and the gates' Adam on gated steps)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.optimizers:
            o.step()


def untrained_model(name: str, split: ImageSplit, seed: int = 0) -> FeatureModel:
    """A freshly initialised `name` for `split` (seeded): the start of CSG trained from scratch."""
    torch.manual_seed(seed)
    in_channels = split.images.shape[1] if split.images is not None else 3
    return build_model(name, num_classes=split.num_classes, in_channels=in_channels)


def train_csg(model: FeatureModel, split: ImageSplit, recipe: Recipe | None = None, lam: float = 0.01,
              seed: int = 0, device=None, progress: bool = False, gate_lr: float = 0.01,
              gate_rule: str = "clip", budget: float = 0.2) -> GatedModel:
    """CSG training from `model` (copied; trained, or `untrained_model` for CSG from scratch):
    alternating standard and gated steps; the gates stepped by Adam at `gate_lr`, then clipped to
    [0, 1] (`gate_rule="clip"`) or divided by their row's max and clipped (`"row_max"`, the official);
    `budget`: the L1-density above which the sparsity term costs (`sparsity_loss`)."""
    recipe = recipe or Recipe()
    if gate_lr <= 0 or lam < 0:
        raise ValueError(f"gate_lr must be > 0 and lam >= 0, got gate_lr={gate_lr}, lam={lam}")
    if not 0 <= budget <= 1:
        raise ValueError(f"budget is the gates' L1-density in [0, 1] above which the L1 term costs (the official "
                         f"code: 0.2), got {budget}")
    if gate_rule not in GATE_RULES:
        raise ValueError(f"gate_rule must be one of {GATE_RULES}, got {gate_rule!r}")
    if recipe.optimizer != "sgd":
        raise ValueError(f"CSG trains body and head with SGD + Nesterov (one-cycle): recipe.optimizer must be 'sgd', "
                         f"got {recipe.optimizer!r}")
    after_step = clip_gates_ if gate_rule == "clip" else normalize_gates_
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # crops and flips drawn on the GPU there (no step waits for the host), else from the order's generator
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1) if device.type == "cuda" else gen
    gated = GatedModel(copy.deepcopy(model)).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(gated.model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                          weight_decay=recipe.weight_decay)
    both = _Optimizers(opt, torch.optim.Adam([gated.gates], lr=gate_lr))
    steps = recipe.epochs * -(-len(split) // recipe.batch_size)
    sched = one_cycle(opt, recipe.lr, steps)
    step, micro = 0, recipe.batch_size
    bf16 = training_precision(recipe.precision, device) == "bf16"
    for _ in tqdm(range(recipe.epochs), desc=f"CSG {model.name}", disable=not progress, unit="epoch"):
        for images, labels in shuffled_batches(split, recipe.batch_size, gen, device):
            padding = recipe.crop_padding if recipe.crop_padding is not None else images.shape[-1] // 8
            x = split.normalize(augment(images, padding, recipe.flip, augment_gen))
            x = x.contiguous(memory_format=torch.channels_last)
            gated_step = step % 2 == 1
            micro = step_in_micro_batches(both if gated_step else opt, x, labels, micro,
                                          partial(_chunk_loss, gated, gated_step, len(x), bf16),
                                          partial(sparsity_loss, gated.gates, lam, budget) if gated_step else None)
            sched.step()
            if gated_step:
                after_step(gated.gates)
            step += 1
    return gated.cpu().eval()


def _chunk_loss(gated: GatedModel, gated_step: bool, batch: int, bf16: bool, x, labels) -> torch.Tensor:
    """The chunk's share of the batch's mean cross-entropy, through the gated or the standard path."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = gated(x, labels if gated_step else None)
    return F.cross_entropy(logits.float(), labels, reduction="sum") / batch


def trained_csg(model: FeatureModel, split: ImageSplit, recipe: Recipe | None = None, lam: float = 0.01,
                seed: int = 0, device=None, progress: bool = False, gate_lr: float = 0.01,
                gate_rule: str = "clip", budget: float = 0.2) -> GatedModel:
    """`train_csg`, cached under the starting weights, the split, the recipe, lam, the budget, the gates' rule and
    lr, the seed."""
    recipe = recipe or Recipe()
    key = {"csg_from": fingerprint(model), "data": split.fingerprint, "recipe": asdict(recipe), "lam": lam,
           "budget": budget, "gate_lr": gate_lr, "gate_rule": gate_rule, "gate_optimizer": "adam", "seed": seed, "memory_format": "channels_last",
           "precision": training_precision(recipe.precision, device),
           **training_key(model, SOURCE_DIGEST)}
    gated = GatedModel(copy.deepcopy(model))
    if (state := cache.load("csg", key)) is not None:
        gated.load_state_dict(state)
        return gated.eval()
    gated = train_csg(model, split, recipe, lam, seed, device, progress, gate_lr, gate_rule, budget)
    cache.save("csg", key, {k: v.detach().cpu().clone() for k, v in gated.state_dict().items()})
    return gated


def gate_mask(gates: torch.Tensor, k_prime: int, order: str = "highest") -> torch.Tensor:
    """bool (C, D): per class the k' highest gates ("highest", sound) or lowest ("lowest", the authors')."""
    if order not in ("highest", "lowest"):
        raise ValueError(f"order must be 'highest' or 'lowest', got {order!r}")
    g = gates.detach().T.float()                              # (C, D)
    idx = torch.sort(g, dim=1, descending=order == "highest", stable=True).indices[:, :k_prime]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)


def path_accuracies(gated: GatedModel, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Test accuracy of the standard path and of the gated path (true-label gates, as in training)."""
    with torch.no_grad():
        head = head_on(gated.model.head, features.device)  # a copy: the model's head stays where it is
        labels = labels.long().to(features.device)
        return {"standard": accuracy(head(features), labels),
                "gated": accuracy(head(gate(features, gated.gates.detach().to(features.device), labels)), labels)}
