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
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from . import __version__, cache
from .data import DatasetError, check_same_classes, open_dataset
from .decomposed import evaluate
from .device import init_distributed
from .features import extract_features
from .influence import influential_features
from .models import build_model
from .sizes import DEFAULT_K, as_size, parse_size
from .train import Recipe, trained_model


def size(text: str) -> int | float:
    """'5' -> 5 (a count); '0.9' -> 0.9 (a fraction of mass). The range is checked by `validate`
    with every other argument, so that all problems are said at once."""
    try:
        return parse_size(text, check=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count (5) nor a fraction of mass (0.9)") from None


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    """The options (the README's table of them is checked against these)."""
    p = argparse.ArgumentParser(prog="python -m classfilters", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="resnet20 (CIFAR 6n+2), resnet20_bottleneck (CIFAR 9n+2), resnet50 / densenet121 / ... (torchvision) or timm:<name>")
    p.add_argument("--checkpoint", help="weights: a CIFAR .th file, a torch state dict or a .safetensors file")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that needs full unpickling (it can run any code: only for files you trust)")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="WEIGHTS",
                   help="torchvision / timm ImageNet weights (needs internet once); optionally a torchvision "
                        "weights name, e.g. IMAGENET1K_V1 (the 2021 weights of the paper)")
    p.add_argument("--dataset", required=True, help="digits | cifar10 | cifar10:<path> | imagefolder:<path>")
    p.add_argument("--k", type=size, default=DEFAULT_K,
                   help=f"features kept per image: a count or a fraction of mass (default {DEFAULT_K})")
    p.add_argument("--k-prime", type=size, default=DEFAULT_K,
                   help=f"features kept per class: a count or a fraction (default {DEFAULT_K})")
    p.add_argument("--train-epochs", type=int, default=None,
                   help=f"epochs to train when no weights are given (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass when extracting (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of reading the cache (decoded data and trained models are still cached)")
    p.add_argument("--out", type=Path, help="where to write the JSON (default: print it)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


DEFAULT_EPOCHS = 30
DATASET_KINDS = ("digits", "cifar10", "imagefolder")


def validate(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments that can be seen before any work, one line each."""
    errors = []
    for name, value in (("--k", args.k), ("--k-prime", args.k_prime)):
        try:
            as_size(value, None, name)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    if args.batch_size < 1:
        errors.append(f"--batch-size {args.batch_size}: must be at least 1")
    training = not (args.checkpoint or args.pretrained)
    if args.train_epochs is not None and args.train_epochs < 1:
        errors.append(f"--train-epochs {args.train_epochs}: must be at least 1 (an untrained model gives meaningless "
                      "features; pass --checkpoint or --pretrained for given weights)")
    elif args.train_epochs is not None and not training:
        errors.append("--train-epochs applies only when the model is trained here: drop it, or drop "
                      "--checkpoint / --pretrained")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        errors.append(f"--checkpoint {args.checkpoint}: no such file")
    errors += _dataset_errors(args.dataset)
    errors += _device_errors(args.device)
    errors += _out_errors(args.out)
    return errors


def _dataset_errors(spec: str) -> list[str]:
    kind, colon, path = spec.partition(":")
    if kind not in DATASET_KINDS:
        return [f"--dataset {spec}: unknown kind {kind!r}; use digits, cifar10, cifar10:<path> or imagefolder:<path>"]
    if kind == "digits" and colon:
        return [f"--dataset {spec}: digits takes no path (it is scikit-learn's bundled set); pass 'digits'"]
    if kind == "imagefolder" and not path:
        return [f"--dataset {spec}: imagefolder needs a path, e.g. imagefolder:/data/imagenet"]
    if path and not Path(path).expanduser().exists():
        return [f"--dataset {spec}: {path} does not exist"]
    return []


def _device_errors(device: str | None) -> list[str]:
    if device is None:
        return []
    try:
        dev = torch.device(device)
    except RuntimeError:
        return [f"--device {device}: not a device name; use cpu, cuda or cuda:<index>"]
    if dev.type == "cpu":
        return []
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return [f"--device {device}: no CUDA GPU is available here; use --device cpu"]
        if dev.index is not None and dev.index >= count:
            return [f"--device {device}: there are {count} CUDA GPUs (cuda:0..cuda:{count - 1})"]
        return []
    backend = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        return [f"--device {device}: no {dev.type} device is available here"]
    return []


def _out_errors(out: Path | None) -> list[str]:
    if out is None:
        return []
    if out.is_dir():
        return [f"--out {out}: is a folder; give a file name, e.g. {out / 'result.json'}"]
    parent = out.parent
    while not parent.exists():  # the nearest existing folder must let us create the rest
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return [f"--out {out}: cannot be written (check the folder's permissions)"]
    return []


def main(argv=None) -> int:
    args = parse_args(argv)
    errors = validate(args)
    if errors:
        for error in errors:
            print(f"python -m classfilters: error: {error}", file=sys.stderr)
        return 2
    started = time.time()
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        rank, world_size = init_distributed()
        try:
            code = compute(args, started, rank)
        except Exception as e:
            if args.debug:
                raise
            plain = isinstance(e, (ValueError, TypeError, FileNotFoundError, DatasetError, OSError))
            print(f"python -m classfilters: error: {' '.join(str(e).split())}"
                  + ("" if plain else f" ({type(e).__name__}; run with --debug for the traceback)"), file=sys.stderr)
            code = 1
        finally:
            if world_size > 1:
                torch.distributed.destroy_process_group()
    if world_size == 1:
        return code
    # now and then gloo's threads abort the interpreter's teardown once the group is gone
    # ("terminate called without an active exception"): the work is done and written, so skip it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"python -m classfilters: warning: {message}", file=sys.stderr)


def compute(args: argparse.Namespace, started: float, rank: int) -> int:
    use_cache = not args.no_cache
    cache.writable()  # said once, now, when it cannot be written (decoded data and trained models use it anyway)
    train, test = open_dataset(args.dataset, "train"), open_dataset(args.dataset, "test")
    check_same_classes({"train": train.classes, "test": test.classes})
    in_channels = train.images.shape[1] if train.images is not None else 3
    if args.checkpoint or args.pretrained:
        model = build_model(args.model, args.checkpoint, num_classes=train.num_classes, pretrained=args.pretrained,
                            in_channels=in_channels, trust_checkpoint=args.trust_checkpoint)
    else:  # an untrained copy first: a wrong name or k is said before the training
        check_sizes(args, build_model(args.model, num_classes=train.num_classes, in_channels=in_channels))
        flip = train.name != "digits"
        recipe = Recipe(epochs=args.train_epochs or DEFAULT_EPOCHS, flip=flip)
        model = trained_model(args.model, train, recipe, device=args.device)
    check_sizes(args, model)
    if model.input_size and train.images is None:  # an image folder, at the size the weights expect
        train, test = (open_dataset(args.dataset, which, model.input_size) for which in ("train", "test"))
    if model.mean is not None and model.std is not None:  # standardised as the weights expect
        train, test = (dataclasses.replace(s, mean=tuple(model.mean), std=tuple(model.std)) for s in (train, test))
    check_same_classes({"train": train.classes, "test": test.classes}, num_classes=model.num_classes,
                       model=f"{args.model}" + (f" from {args.checkpoint}" if args.checkpoint else ""))
    kw = {"batch_size": args.batch_size, "device": args.device, "use_cache": use_cache}
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


def check_sizes(args: argparse.Namespace, model) -> None:
    """k and k' against the model's number of features D (a count must be at most D)."""
    as_size(args.k, model.num_features, "--k")
    as_size(args.k_prime, model.num_features, "--k-prime")
