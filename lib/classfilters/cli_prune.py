"""`python -m classfilters prune`: a smaller model for a subset of classes, exported.

    python -m classfilters prune --model resnet20 --checkpoint ../shared/data/weights/resnet20-12fca82f.th \
        --dataset cifar10:../shared/data/cifar10-jpeg.tar.gz --classes cat,dog --pct 90 --out cat-dog/

Saliency from the logits of the chosen classes, their influential penultimate features kept,
pct % of the spatial filters zeroed and the dead channels removed, fine-tuned on their training
images; writes model.pt2 (loads with plain PyTorch: torch.export.load(path).module()), model.safetensors,
model.json and report.json (sizes, multiply-adds, latency, accuracy on their test images vs the full model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .class_subset import class_subset_model, export_subset_model, resolve_classes
from .data import open_dataset
from .models import build_model
from .prune import FILLS, check_pct
from .saliency import SALIENCY_KINDS
from .train import Recipe, trained_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m classfilters prune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="resnet20 (CIFAR 6n+2), resnet20_bottleneck (CIFAR 9n+2), a torchvision classifier, ...")
    p.add_argument("--checkpoint", help="weights (a CIFAR .th file, a state dict or .safetensors); "
                                        "without it the model is trained first (cached)")
    p.add_argument("--dataset", required=True, help="digits | cifar10 | cifar10:<path>")
    p.add_argument("--classes", required=True, help="comma-separated class names or indices, e.g. cat,dog")
    p.add_argument("--pct", type=float, default=90, help="percentage of spatial filters to zero, in (0, 100) (default 90)")
    p.add_argument("--k", type=int, default=5, help="Algorithm 1's k (default 5)")
    p.add_argument("--k-prime", type=int, default=5, help="Algorithm 1's k' (default 5)")
    p.add_argument("--saliency", choices=SALIENCY_KINDS, default="grad")
    p.add_argument("--fill", choices=FILLS, default="none")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of fine-tuning on the classes (default 2)")
    p.add_argument("--lr", type=float, default=0.02, help="fine-tuning peak learning rate (default 0.02)")
    p.add_argument("--train-epochs", type=int, default=30, help="epochs to train when no checkpoint is given")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, required=True, help="folder for model.pt2, model.safetensors, model.json, report.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_pct(args.pct)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    train, test = open_dataset(args.dataset, "train"), open_dataset(args.dataset, "test")
    try:
        resolve_classes(args.classes, train.classes)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if train.images is None:
        raise SystemExit("error: prune needs an in-memory dataset (digits or cifar10)")
    flip = train.name != "digits"
    if args.checkpoint:
        model = build_model(args.model, args.checkpoint, num_classes=train.num_classes, in_channels=train.images.shape[1])
    else:
        model = trained_model(args.model, train, Recipe(epochs=args.train_epochs, flip=flip), device=args.device)
    recipe = Recipe(epochs=args.finetune_epochs, lr=args.lr, flip=flip)
    small, report = class_subset_model(model, train, args.classes, args.pct, args.k, args.k_prime, args.saliency,
                                       args.fill, recipe, test=test, device=args.device, progress=True)
    paths = export_subset_model(small, args.out, train, args.model, report["classes"])
    report.update({"model": args.model, "checkpoint": args.checkpoint, "dataset": args.dataset,
                   "files": {k: str(v) for k, v in paths.items()}})
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"{'+'.join(report['classes'])}: params {report['params_full']} -> {report['params_small']}, multiply-adds "
          f"{report['macs_full']} -> {report['macs_small']}, latency {report['latency_ms_full']:.2f} -> "
          f"{report['latency_ms_small']:.2f} ms / 64 images, accuracy over the classes {report['acc_full']:.4f} (full) -> "
          f"{report['acc_finetuned']:.4f}; written to {args.out}", file=sys.stderr)
    return 0
