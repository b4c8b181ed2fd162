"""Command line: influential features of a model on a dataset, with test accuracies, as JSON.

    python -m classfilters --model resnet20 --checkpoint ../shared/data/weights/resnet20-12fca82f.th \
        --dataset cifar10:../shared/data/cifar10-jpeg.tar.gz --k 5 --k-prime 5 --out resnet20.json
    python -m classfilters --model resnet14 --dataset digits --train-epochs 30 --out digits.json

Algorithm 1 runs on the train split; full, decomposed and relative accuracy are measured on
the test split. Without a checkpoint (and without --pretrained) the model is first trained
on the train split for --train-epochs (cached). On several GPUs or nodes, launch it with
torchrun (`torchrun --nproc_per_node 8 -m classfilters ...`): the ranks share the training
and the extraction, and rank 0 writes the result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .data import open_dataset
from .decomposed import evaluate
from .device import init_distributed
from .features import extract_features
from .influence import influential_features
from .models import build_model
from .sizes import DEFAULT_K, parse_size
from .train import Recipe, trained_model


def size(text: str) -> int | float:
    """'5' -> 5 (a count); '0.9' -> 0.9 (a fraction of mass): sizes.parse_size, as argparse wants it."""
    try:
        return parse_size(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m classfilters", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="resnet20 (CIFAR 6n+2), resnet50 / densenet121 / ... (torchvision) or timm:<name>")
    p.add_argument("--checkpoint", help="weights: a CIFAR .th file, a torch state dict or a .safetensors file")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="WEIGHTS",
                   help="torchvision / timm ImageNet weights (needs internet once); optionally a torchvision "
                        "weights name, e.g. IMAGENET1K_V1 (the 2021 weights of the paper)")
    p.add_argument("--dataset", required=True, help="digits | cifar10 | cifar10:<path> | imagefolder:<path>")
    p.add_argument("--k", type=size, default=DEFAULT_K,
                   help=f"features kept per image: a count or a fraction of mass (default {DEFAULT_K})")
    p.add_argument("--k-prime", type=size, default=DEFAULT_K,
                   help=f"features kept per class: a count or a fraction (default {DEFAULT_K})")
    p.add_argument("--train-epochs", type=int, default=30, help="epochs to train when no weights are given (default 30)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of reading the cache")
    p.add_argument("--out", type=Path, help="where to write the JSON (default: print it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    rank, size = init_distributed()
    if size == 1:
        return compute(args, started, rank)
    try:
        code = compute(args, started, rank)
    finally:
        torch.distributed.destroy_process_group()
    # now and then gloo's threads abort the interpreter's teardown once the group is gone
    # ("terminate called without an active exception"): the work is done and written, so skip it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compute(args: argparse.Namespace, started: float, rank: int) -> int:
    train, test = open_dataset(args.dataset, "train"), open_dataset(args.dataset, "test")
    if args.checkpoint or args.pretrained:
        model = build_model(args.model, args.checkpoint, num_classes=train.num_classes, pretrained=args.pretrained,
                            in_channels=train.images.shape[1] if train.images is not None else 3)
    else:
        flip = train.name != "digits"
        model = trained_model(args.model, train, Recipe(epochs=args.train_epochs, flip=flip), device=args.device)
    if model.input_size and train.images is None:  # an image folder, at the size the weights expect
        train, test = (open_dataset(args.dataset, which, model.input_size) for which in ("train", "test"))
    if model.num_classes != train.num_classes:
        raise SystemExit(f"the model predicts {model.num_classes} classes but {args.dataset} has {train.num_classes}")
    kw = {"batch_size": args.batch_size, "device": args.device, "use_cache": not args.no_cache}
    train_features, test_features = extract_features(model, train, **kw), extract_features(model, test, **kw)
    provenance = {"model": args.model, "checkpoint": args.checkpoint, "dataset": args.dataset,
                  "classfilters": __version__, "torch": torch.__version__, "python": platform.python_version()}
    influence = influential_features(train_features, train.labels, args.k, args.k_prime,
                                     num_classes=train.num_classes, provenance=provenance)
    results = evaluate(model.head.cpu().float(), influence, test_features, test.labels)
    out = {**influence.to_dict(), "classes": train.classes, "test": results,
           "seconds": round(time.time() - started, 1)}
    if rank != 0:
        return 0
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    print(f"{args.model} on {args.dataset}: full {results['acc_full']:.4f}, decomposed {results['acc_decomposed']:.4f}, "
          f"relative {results['relative']:.4f}, multiply-adds {results['multiply_adds_full']} -> "
          f"{results['multiply_adds_decomposed']}", file=sys.stderr)
    return 0
