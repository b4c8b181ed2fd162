"""ExplainFix's claims as one-line calls returning DataFrames, joined to class-specific features.

- `train_fixed` (from `fixed_training`): a model trained from scratch with its spatial filters fixed at `init`.
- `compare_initialisations`: per init, test accuracy, trainable / total parameters, seconds per
  epoch, and our relative accuracy at k = k' (decomposed / full head); `compare_architectures`
  the same for several architectures (e.g. a CIFAR ResNet and its bottleneck variant with 1x1 convs).
- `low_frequency_table`: `low_frequency_share` for several models, one row per (model, layer).
- `prune_sweep`: ChannelPrune at several percentages: kernels, parameters, multiply-adds, CPU
  latency, accuracy before / after fine-tuning, fine-tuning seconds per epoch, relative accuracy;
  beside them the unpruned model fine-tuned by the same recipe (what fine-tuning alone does).
- `class_specific_table`: relative accuracy at k = k' for any dict of models (learned, fixed, pruned).
- `class_subset_table`: `class_subset_model` reports for several class subsets.
- `class_specific_report`: for several models (learned, fixed, pruned), our class-specific features
  in three tables: relative accuracy at (k, k'), along the diagonal k = k', and Table 8 (noise in
  place of the influential vs non-influential features), features extracted once per model.
- `export_and_check`: `export_subset_model`, then model.pt2 loaded back with plain
  `torch.export.load` and compared with the model on test images (sizes on disk, max difference).
- `skip_reason`: why ExplainFix cannot run on a model / split (None when it can), for the notebooks.
"""
from __future__ import annotations

import copy
import time

import pandas as pd
import torch
from torch import nn

from .ablation import noise_ablation, summarize
from .class_subset import class_subset_model, export_subset_model, latency_ms, predict
from .data import ImageSplit
from .decomposed import accuracy, evaluate
from .explainsteer import low_frequency_share
from .features import extract_features
from .fixed_filters import (
    INITS,
    _canonical_init,
    check_has_spatial_convs,
    fix_spatial_filters,
    spatial_convs,
    trainable_parameters,
)
from .fixed_training import train_fixed
from .influence import influential_features
from .models import FeatureModel, build_model
from .prune import channel_prune, check_pct, check_prunable, macs_and_params
from .train import Recipe, train_classifier


def _relative(model: FeatureModel, train: ImageSplit, test: ImageSplit, k, k_prime) -> dict:
    model = model.cpu().eval()
    train_features = extract_features(model, train, device="cpu", progress=False, use_cache=False)
    test_features = extract_features(model, test, device="cpu", progress=False, use_cache=False)
    influence = influential_features(train_features, train.labels, k, k_prime, num_classes=train.num_classes)
    return evaluate(model.head, influence, test_features, test.labels)


def class_specific_table(models: dict[str, FeatureModel], train: ImageSplit, test: ImageSplit, k=5,
                         k_prime=5) -> pd.DataFrame:
    """Per model: full and decomposed test accuracy at (k, k') and their ratio (relative accuracy)."""
    rows = []
    for label, model in models.items():
        r = _relative(model, train, test, k, k_prime)
        rows.append({"model": label, "k": k, "k_prime": k_prime, "acc_full": r["acc_full"],
                     "acc_decomposed": r["acc_decomposed"], "relative": r["relative"]})
    return pd.DataFrame(rows)


def compare_initialisations(name: str, train: ImageSplit, test: ImageSplit, inits=("learned", "Unchanged", "KRandom",
                            "DCT2", "GHaar", "Psine"), recipe: Recipe | None = None, seed: int = 0,
                            source: nn.Module | None = None, k=5, k_prime=5, device=None, return_models: bool = False):
    """Train `name` from scratch once per init (same recipe and seed): accuracy, parameters, speed,
    relative accuracy at (k, k'). GuidedSteer needs `source` (a trained model of the same architecture).
    With `return_models`, (table, {init: model})."""
    for init in inits:  # every name checked before any training
        if init != "learned":
            _canonical_init(init)
    check_has_spatial_convs(build_model(name, num_classes=train.num_classes, in_channels=train.images.shape[1]))
    if any(i.lower() == "guidedsteer" for i in inits) and source is None:
        raise ValueError(f"GuidedSteer needs source=<a trained {name}>; the inits are learned, {', '.join(INITS)}")
    rows, models = [], {}
    for init in inits:
        model, seconds = train_fixed(name, train, init, recipe, seed, source, device)
        models[init] = model
        r = _relative(model, train, test, k, k_prime)
        rows.append({"init": init, "acc": r["acc_full"], "acc_decomposed": r["acc_decomposed"], "relative": r["relative"],
                     "trainable_params": trainable_parameters(model),
                     "params": sum(p.numel() for p in model.parameters()), "seconds_per_epoch": seconds})
    return (pd.DataFrame(rows), models) if return_models else pd.DataFrame(rows)


def compare_architectures(names: str | list[str], train: ImageSplit, test: ImageSplit, inits=("learned", "DCT2"),
                          recipe: Recipe | None = None, seed: int = 0, k=5, k_prime=5, device=None):
    """`compare_initialisations` for each architecture (every one checked before any training):
    (table with a `model` column, {"<name> <init>": model}). GuidedSteer needs a trained source per
    architecture: call `compare_initialisations(name, ..., source=...)` for it."""
    names = [names] if isinstance(names, str) else list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"compare_architectures takes distinct architecture names, got {names}")
    if any(str(i).lower() == "guidedsteer" for i in inits):
        raise ValueError("GuidedSteer draws filters from a trained model of each architecture: call "
                         "compare_initialisations(name, ..., source=<a trained model of name>) for it")
    for name in names:
        check_has_spatial_convs(build_model(name, num_classes=train.num_classes, in_channels=train.images.shape[1]))
    tables, models = [], {}
    for name in names:
        table, trained = compare_initialisations(name, train, test, inits, recipe, seed, k=k, k_prime=k_prime,
                                                 device=device, return_models=True)
        tables.append(table.assign(model=name)[["model", *table.columns]])
        models.update({f"{name} {init}": model for init, model in trained.items()})
    return pd.concat(tables, ignore_index=True), models


def low_frequency_table(models: dict[str, nn.Module], null_draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """`low_frequency_share` of every model, one row per (model, spatial layer)."""
    return pd.concat([low_frequency_share(m, null_draws, seed).assign(model=label) for label, m in models.items()],
                     ignore_index=True)


def prune_sweep(model: FeatureModel, train: ImageSplit, test: ImageSplit, pcts=(50, 90, 99), saliency: str = "grad",
                recipe: Recipe | None = None, fixed: str | None = None, k=5, k_prime=5, max_images: int | None = 2048,
                seed: int = 0, keep_per_layer: int = 0, device=None, return_models: bool = False,
                control: bool = True):
    """ChannelPrune at each percentage, then fine-tune (`recipe`, default 1 epoch at lr 0.02; with
    `fixed`, the pruned model's spatial filters are fixed at that init first, as the paper's runs).
    One row per `model`: "unpruned" (pct 0, not fine-tuned), with `control` and a recipe that trains
    "unpruned, fine-tuned" (pct 0, the same recipe: the baseline that tells what pruning costs from what
    fine-tuning alone changes, e.g. a checkpoint meeting a shifted training split), then "pruned <pct>%".
    With `return_models`, (table, {name: model}) for every fine-tuned row."""
    for pct in pcts:
        check_pct(pct)
    check_prunable(model)
    if train.images is None:
        raise ValueError("prune_sweep needs an in-memory split (digits, CIFAR-10)")
    if fixed is not None:
        _canonical_init(fixed)
    recipe = recipe if recipe is not None else Recipe(epochs=1, lr=0.02, flip=train.name != "digits")
    model = copy.deepcopy(model).cpu().eval()
    example = train.normalize(train.images[:64])

    def row(name, pct, m, acc_before, seconds, macs):
        r = _relative(m, train, test, k, k_prime)
        return {"model": name, "pct": pct, "kernels": sum(c.weight[:, :, 0, 0].numel() for _, c in spatial_convs(m)),
                "params": sum(p.numel() for p in m.parameters()), "latency_ms": latency_ms(m, example),
                "acc_before_finetune": acc_before, "acc": r["acc_full"], "relative": r["relative"],
                "finetune_seconds_per_epoch": seconds, "macs": macs}

    def finetune(m):  # seconds per epoch (NaN without epochs)
        start = time.perf_counter()
        if recipe.epochs:
            train_classifier(m, train, recipe, device, seed, progress=False)
        return (time.perf_counter() - start) / recipe.epochs if recipe.epochs else float("nan")

    unpruned_macs, unpruned_acc = macs_and_params(model, example[:1])[0], accuracy(predict(model, test), test.labels)
    rows, models = [row("unpruned", 0, model, unpruned_acc, float("nan"), unpruned_macs)], {}
    if control and recipe.epochs:
        tuned = copy.deepcopy(model)
        seconds = finetune(tuned)
        rows.append(row("unpruned, fine-tuned", 0, tuned.cpu().eval(), unpruned_acc, seconds, unpruned_macs))
        models["unpruned, fine-tuned"] = tuned
    for pct in pcts:
        pruned, report = channel_prune(model, train, pct, saliency, max_images=max_images, seed=seed,
                                       keep_per_layer=keep_per_layer, device=device)
        acc_before = accuracy(predict(pruned, test), test.labels)
        if fixed is not None:
            fix_spatial_filters(pruned, fixed, seed=seed)
        seconds = finetune(pruned)
        name = f"pruned {pct:g}%"
        rows.append(row(name, pct, pruned.cpu().eval(), acc_before, seconds, report["macs_after"]))
        models[name] = pruned
    return (pd.DataFrame(rows), models) if return_models else pd.DataFrame(rows)


def class_subset_table(model: FeatureModel, train: ImageSplit, test: ImageSplit, subsets, pct: float = 90,
                       recipe: Recipe | None = None, seed: int = 0, k=5, k_prime=5, max_images: int | None = 2048,
                       device=None, return_models: bool = False, keep_per_layer: int = 0):
    """One `class_subset_model` report per class subset (e.g. ["cat,dog", "airplane,ship,truck"]).
    With `return_models`, (table, [small model per subset])."""
    rows, models = [], []
    for subset in subsets:
        small, report = class_subset_model(model, train, subset, pct, k, k_prime, recipe=recipe, test=test,
                                           max_images=max_images, seed=seed, device=device,
                                           keep_per_layer=keep_per_layer)
        models.append(small)
        rows.append({"classes": "+".join(report["classes"]), "pct": pct,
                     **{k: report[k] for k in ("params_full", "params_small", "macs_full", "macs_small",
                                               "latency_ms_full", "latency_ms_small", "acc_full", "acc_pruned",
                                               "acc_finetuned")}})
    return (pd.DataFrame(rows), models) if return_models else pd.DataFrame(rows)


def class_specific_report(models: dict[str, FeatureModel], train: ImageSplit, test: ImageSplit, k=5, k_prime=5,
                          diagonal=(1, 2, 5, 10, 20), seed: int = 0) -> dict[str, pd.DataFrame]:
    """Our class-specific features of each model: {"at_k": relative accuracy at (k, k'), "diagonal":
    relative accuracy at k = k' for each value of `diagonal` up to D, "ablation": Table 8 (noise in
    place of I_y vs outside it, `ablation.noise_ablation`: mean and std over the draws)}."""
    at_k, along, noise = [], [], []
    for label, model in models.items():
        model = model.cpu().eval()
        phi_train = extract_features(model, train, device="cpu", progress=False, use_cache=False)
        phi_test = extract_features(model, test, device="cpu", progress=False, use_cache=False)
        influence = influential_features(phi_train, train.labels, k, k_prime, num_classes=train.num_classes)
        r = evaluate(model.head, influence, phi_test, test.labels)
        at_k.append({"model": label, "k": k, "k_prime": k_prime, "acc_full": r["acc_full"],
                     "acc_decomposed": r["acc_decomposed"], "relative": r["relative"]})
        for size in [s for s in diagonal if s <= model.num_features]:
            inf = influential_features(phi_train, train.labels, size, size, num_classes=train.num_classes)
            along.append({"model": label, "k": size, **evaluate(model.head, inf, phi_test, test.labels)})
        rows = noise_ablation(model.head.cpu().float(), influence, phi_test, test.labels, phi_train, seed)
        noise += [{"model": label, **row} for row in summarize(rows)]
    return {"at_k": pd.DataFrame(at_k), "diagonal": pd.DataFrame(along), "ablation": pd.DataFrame(noise)}


def export_and_check(model: FeatureModel, folder, train: ImageSplit, test: ImageSplit, base: str,
                     classes: list[str] | None = None, atol: float = 1e-4) -> dict:
    """`export_subset_model` to `folder`, then model.pt2 loaded back with plain `torch.export.load` and run
    on (up to 256 of) `test`'s images in [0, 1]: its logits against the model's. Returns the files' sizes
    (bytes), the largest absolute difference and whether they agree within `atol`."""
    paths = export_subset_model(model, folder, train, base, classes)
    loaded = torch.export.load(str(paths["pt2"])).module()
    images = test.images[:256].float() / 255
    with torch.inference_mode():
        ours = copy.deepcopy(model).cpu().eval()(train.normalize(test.images[:256]))
        theirs = loaded(images)
    diff = float((ours - theirs).abs().max())
    return {**{f"bytes_{kind}": path.stat().st_size for kind, path in paths.items()},
            "images": len(images), "max_abs_diff": diff, "equal": diff <= atol,
            "same_decisions": bool((ours.argmax(1) == theirs.argmax(1)).all())}


def skip_reason(model: nn.Module, split: ImageSplit) -> str | None:
    """Why ExplainFix's fixed filters, spectra or pruning cannot run here, or None: a model without
    spatial maps or spatial convs, or a streamed split (image folders: training from scratch and
    saliency need the images in memory)."""
    if isinstance(model, FeatureModel) and not model.has_spatial_maps:
        return f"{model.name} has no spatial feature maps: ExplainFix's spatial convolutions do not apply"
    if not spatial_convs(model):
        return f"{getattr(model, 'name', type(model).__name__)} has no spatial convolution"
    if split.images is None:
        return (f"{split.name} is streamed from an image folder: ExplainFix's training and saliency need an "
                "in-memory split (digits, CIFAR-10)")
    return None
