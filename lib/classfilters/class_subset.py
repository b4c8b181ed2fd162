"""A smaller model for the classes you need: ChannelPrune steered by a class subset S, then export.

Given a trained model and a subset S of its classes (names or indices):
1. the head is cut to S's rows: logits z_S = W[S] φ(x) + b[S] (argmax over S, the same decisions
   as the full model restricted to S);
2. the union U = ∪_{c∈S} I_c of S's influential penultimate features (Algorithm 1 on the train
   split, `influential_features`) is protected: those input channels of the head are never removed;
3. filter saliency comes from the logits of S alone, on S's training images; the `pct` % least
   salient spatial filters are zeroed and dead channels removed (prune.py);
4. the smaller model is fine-tuned on S's training images (`train_classifier`, labels 0..|S|−1);
5. `export_subset_model` writes model.pt2 (`torch.export`: loads with plain PyTorch,
   `torch.export.load(p).module()(images)`, images float in [0, 1], standardisation inside),
   model.safetensors (the weights) and model.json (classes, input shape, mean/std, every module's
   shape), which `load_subset_model` turns back into a module.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from .data import ImageSplit
from .decomposed import accuracy
from .features import extract_features
from .influence import influential_features
from .models import FeatureModel, build_model
from .prune import EmbedShortcut, channel_prune, check_pct, check_prunable, macs_and_params, replace_zero_pad_shortcuts
from .saliency import check_saliency_kind
from .train import Recipe, train_classifier


def resolve_classes(classes, names: list[str]) -> list[int]:
    """Class names or indices (a list, or a comma-separated string) -> sorted unique indices."""
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    out = []
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in names:
                raise ValueError(f"unknown class {c!r}: the classes are {', '.join(names)}")
            out.append(names.index(c))
        else:
            i = int(c)
            if not 0 <= i < len(names):
                raise ValueError(f"class index {i} is outside 0..{len(names) - 1}; the classes are {', '.join(names)}")
            out.append(i)
    out = sorted(set(out))
    if not out:
        raise ValueError(f"no class given: pick some of {', '.join(names)}")
    return out


def subset_split(split: ImageSplit, classes: list[int]) -> ImageSplit:
    """The images of `classes`, relabelled 0..|S|−1 in the order of `classes`."""
    index = torch.nonzero(torch.isin(split.labels, torch.tensor(classes))).flatten()
    part = split.subset(index)
    remap = torch.full((split.num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    part.labels = remap[part.labels]
    part.classes = [split.classes[c] for c in classes]
    part.fingerprint = f"{part.fingerprint}[classes {classes}]"
    return part


def _swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in model.modules():
        for name, child in list(module.named_children()):
            if child is old:
                setattr(module, name, new)


def restrict_head(model: FeatureModel, classes: list[int]) -> FeatureModel:
    """A copy whose head predicts only `classes` (rows of W and b), everywhere the head is held."""
    model = copy.deepcopy(model)
    old = model.head
    new = nn.Linear(old.in_features, len(classes), bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight[classes])
        if old.bias is not None:
            new.bias.copy_(old.bias[classes])
    _swap_module(model, old, new)
    return model


@torch.inference_mode()
def predict(model: nn.Module, split: ImageSplit, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(split.normalize(split.images[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(split), batch_size)])


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, repeat: int = 20) -> float:
    """Median milliseconds of one forward pass on `example` (after 3 warm-up passes)."""
    model.eval()
    for _ in range(3):
        model(example)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def class_subset_model(model: FeatureModel, train: ImageSplit, classes, pct: float = 90, k=5, k_prime=5,
                       saliency: str = "grad", fill: str = "none", recipe: Recipe | None = None,
                       test: ImageSplit | None = None, max_images: int | None = 2048, seed: int = 0,
                       device=None, progress: bool = False, keep_per_layer: int = 0) -> tuple[FeatureModel, dict]:
    """The smaller model predicting `classes` and a report (sizes, multiply-adds, latency, and with
    `test`, accuracy on S's test images of the full model (argmax over S) and of the small one).
    recipe: the fine-tuning (default 2 epochs, lr 0.02; epochs=0 for none)."""
    if not isinstance(model, FeatureModel):
        raise TypeError("class_subset_model needs a FeatureModel (build_model or as_feature_model)")
    chosen = resolve_classes(classes, train.classes)
    check_pct(pct)
    check_saliency_kind(saliency)
    check_prunable(model)
    if model.num_classes != train.num_classes:
        raise ValueError(f"the model predicts {model.num_classes} classes but the split has {train.num_classes}")
    if train.images is None:
        raise ValueError("class_subset_model needs an in-memory split (digits, CIFAR-10)")
    recipe = recipe if recipe is not None else Recipe(epochs=2, lr=0.02, flip=train.name != "digits")
    model = copy.deepcopy(model).cpu().eval()
    features = extract_features(model, train, device=device, progress=progress)
    influence = influential_features(features, train.labels, k, k_prime, num_classes=train.num_classes)
    union = sorted({j for c in chosen for j in influence.indices[c]})
    part = subset_split(train, chosen)
    small = restrict_head(model, chosen)
    pruned, report = channel_prune(small, part, pct, saliency, fill=fill, protect={small.head: union},
                                   keep_per_layer=keep_per_layer,
                                   max_images=max_images, seed=seed, device=device)
    pruned = pruned.cpu().eval()
    report.update({"classes": [train.classes[c] for c in chosen], "class_indices": chosen,
                   "protected_features": union, "k": k, "k_prime": k_prime,
                   "features_before": model.num_features, "features_after": pruned.head.in_features})
    if test is not None:
        test_part = subset_split(test, chosen)
        report["acc_full"] = accuracy(predict(model, test_part)[:, chosen], test_part.labels)
        report["acc_pruned"] = accuracy(predict(pruned, test_part), test_part.labels)
    if recipe.epochs:
        train_classifier(pruned, part, recipe, device=device, seed=seed, progress=progress)
        pruned = pruned.cpu().eval()
    if test is not None:
        report["acc_finetuned"] = accuracy(predict(pruned, test_part), test_part.labels)
    example = train.normalize(train.images[:64])
    report["latency_ms_full"] = latency_ms(model, example)
    report["latency_ms_small"] = latency_ms(pruned, example)
    report["macs_full"], report["params_full"] = macs_and_params(model, example[:1])
    report["macs_small"], report["params_small"] = macs_and_params(pruned, example[:1])
    report["finetune_epochs"] = recipe.epochs
    pruned.name = f"{getattr(model, 'name', 'model')}-{'+'.join(report['classes'])}-{pct:g}"
    pruned.classes = report["classes"]
    return pruned, report


# ---------------------------------------------------------------------------------------------
# Export


class Standardized(nn.Module):
    """images in [0, 1] (N, C, H, W) -> logits: (x − mean) / std, then the model."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def _describe(model: nn.Module) -> dict:
    """Every conv / BN / linear / shortcut's shape: enough to rebuild the pruned modules."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = {"type": "BatchNorm2d", "features": m.num_features}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, EmbedShortcut):
            out[name] = {"type": "EmbedShortcut", "in": m.in_channels, "out": len(m.source), "stride": m.stride}
    return out


def export_subset_model(model: FeatureModel, folder: str | Path, split: ImageSplit, base: str,
                        classes: list[str] | None = None) -> dict[str, Path]:
    """Write model.pt2 (torch.export, dynamic batch), model.safetensors and model.json to `folder`.

    base: the `build_model` name the model was made from (e.g. "resnet20"). The exported program
    takes float images in [0, 1] of the split's shape and returns logits over `classes`."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():  # each tensor its own contiguous storage: torch.export.save warns of any that is not
        for t in [*model.parameters(), *model.buffers()]:  # (a trained model's convolutions are channels_last)
            t.data = t.data.clone(memory_format=torch.contiguous_format)
    wrapped = Standardized(model, split.mean, split.std).eval()
    example = split.images[:2].float() / 255
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    paths = {"pt2": folder / "model.pt2", "safetensors": folder / "model.safetensors", "json": folder / "model.json"}
    torch.export.save(program, str(paths["pt2"]))
    save_model(model, str(paths["safetensors"]))
    description = {"format": "classfilters-subset-model/1", "base": base,
                   "classes": list(classes or getattr(model, "classes", [])), "input": list(split.images.shape[1:]),
                   "input_range": [0, 1], "mean": list(split.mean), "std": list(split.std),
                   "modules": _describe(model)}
    paths["json"].write_text(json.dumps(description, indent=1))
    return paths


def load_subset_model(folder: str | Path) -> nn.Module:
    """Rebuild an exported subset model from model.json + model.safetensors (our code); the module
    takes images in [0, 1], like model.pt2."""
    from safetensors.torch import load_model

    folder = Path(folder)
    description = json.loads((folder / "model.json").read_text())
    if description.get("format") != "classfilters-subset-model/1":
        raise ValueError(f"{folder / 'model.json'} is not a classfilters subset model description")
    channels = description["input"][0]
    model = build_model(description["base"], num_classes=len(description["classes"]), in_channels=channels)
    replace_zero_pad_shortcuts(model)
    modules = dict(model.named_modules())
    for name, spec in description["modules"].items():
        old = modules.get(name)
        if old is None:
            raise ValueError(f"{name} is not a module of {description['base']}: the description does not match")
        if spec["type"] == "Conv2d":
            new = nn.Conv2d(spec["in"], spec["out"], old.kernel_size, old.stride, old.padding, old.dilation,
                            spec["groups"], old.bias is not None, old.padding_mode)
        elif spec["type"] == "BatchNorm2d":
            new = nn.BatchNorm2d(spec["features"], old.eps, old.momentum)
        elif spec["type"] == "Linear":
            new = nn.Linear(spec["in"], spec["out"], old.bias is not None)
        else:
            new = EmbedShortcut(torch.zeros(spec["out"], dtype=torch.long), spec["in"], spec["stride"])
        _swap_module(model, old, new)
    load_model(model, str(folder / "model.safetensors"))
    return Standardized(model, description["mean"], description["std"]).eval()
