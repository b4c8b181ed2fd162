"""Training a CIFAR ResNet from scratch: the library's `train_classifier` against a straightforward
GPU-resident eager loop (SGD + Nesterov, one-cycle, bf16, channels_last, crops and flips drawn per
image), both on the uint8 JPEG CIFAR-10 train split held on the device, both run here.

Printed per path: seconds of training (compilation included; data decoding and the test pass
excluded; the median of `--repeat` alternating runs), epochs, the precision the recipe resolved to, and the test accuracy. The H100 goal for ResNet-20
is >= 88.0 % in <= 30 s. On the CPU the baseline loop runs in float32 (as a user's would), and
`--recipe precision=fp32` adds the library's loop in float32, showing what bf16 autocast gives on a CPU
with native bf16 (`Recipe.precision="auto"`); `--train-images N` trains on N random training images:

    python benchmarks/bench_train.py --device cpu --no-compile --epochs 1 --baseline-epochs 1 \
        --train-images 5120 --keep-freed-memory --repeat 3 --recipe precision=fp32

    python benchmarks/bench_train.py [--epochs 30] [--baseline-epochs 30] [--batch-size 512] [--lr 0.2]
        [--no-compile] [--model resnet20] [--data cifar10:../shared/data/cifar10-jpeg.tar.gz]
        [--recipe "epochs=40,batch_size=1024,lr=0.4,label_smoothing=0.1" ...]

Each `--recipe` (fields of `classfilters.Recipe`, over the flags' values) is one more run of
`train_classifier`, so one call can compare several recipes against the same baseline.
"""
import argparse
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHARED
from common import record

from classfilters import Recipe, build_model, open_dataset, train_classifier
from classfilters.cpu_memory import keep_freed_memory
from classfilters.device import training_precision


def plain_loop(model, split, epochs, batch_size, lr, flip, device):
    """The loop a user would write first: everything on the GPU, eager, one optimiser step a batch."""
    images, labels = split.images.to(device), split.labels.to(device)
    mean = torch.tensor(split.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(split.std, device=device).view(1, -1, 1, 1)
    model.to(device).to(memory_format=torch.channels_last).train()
    steps = epochs * -(-len(split) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.25)
    n, pad, size = len(split), images.shape[-1] // 8, images.shape[-1]
    for _ in range(epochs):
        perm = torch.randperm(n, device=device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            x = F.pad(images[idx], (pad,) * 4)
            dy, dx = (torch.randint(0, 2 * pad + 1, (len(idx),), device=device) for _ in range(2))
            rows = (dy[:, None] + torch.arange(size, device=device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(size, device=device))[:, None, None, :]
            x = x[torch.arange(len(idx), device=device)[:, None, None, None],
                  torch.arange(x.shape[1], device=device)[None, :, None, None], rows, cols]
            if flip:
                x = torch.where(torch.rand(len(idx), device=device)[:, None, None, None] < 0.5, x.flip(3), x)
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def test_accuracy(model, split, device):
    model.to(device).eval()
    correct = 0
    for start in range(0, len(split), 1000):
        x = split.normalize(split.images[start:start + 1000].to(device)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            correct += (model(x).argmax(1).cpu() == split.labels[start:start + 1000]).sum().item()
    return correct / len(split)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default=f"cifar10:{SHARED / 'cifar10-jpeg.tar.gz'}")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--baseline-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--recipe", action="append", default=[], help="k=v,k=v: another Recipe to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=1, help="run every path this many times, alternating; median")
    p.add_argument("--train-images", type=int, help="train on this many random training images (default: all)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="cf.keep_freed_memory() for the whole process, every path (as the runner and the CLI do)")
    args = p.parse_args()
    device = torch.device(args.device)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    train, test = open_dataset(args.data, "train"), open_dataset(args.data, "test")
    if args.train_images:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.train_images])
    channels = train.images.shape[1]
    rows = []
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, label_smoothing=args.label_smoothing,
                    flip=channels == 3, compile=not args.no_compile)
    recipes = [recipe] + [replace(recipe, **{k: yaml.safe_load(v) for k, v in
                                             (item.split("=") for item in spec.split(","))}) for spec in args.recipe]
    runs = [("straightforward eager loop (baseline)", None,
             lambda m: plain_loop(m, train, args.baseline_epochs, args.batch_size, args.lr, recipe.flip, device))]
    runs += [(f"train_classifier{' compiled' if r.compile else ''}{'' if r.precision == 'auto' else ', ' + r.precision}", r,
              lambda m, r=r: train_classifier(m, train, r, device, seed=0, progress=False)) for r in recipes]
    # warm-up outside every timing (CUDA context, cuDNN / cuBLAS handles and algorithm choice), so the
    # baseline, run first, does not pay the start-up the others then skip
    warm = train.subset(torch.arange(min(len(train), 8 * args.batch_size)))  # 8 steps: a one-cycle schedule
    plain_loop(build_model(args.model, num_classes=train.num_classes, in_channels=channels), warm, 1,
               args.batch_size, args.lr, recipe.flip, device)
    sync()
    seconds, models = {}, {}
    for _ in range(args.repeat):  # the paths alternate, so that a machine whose speed drifts affects all alike
        for path, r, fit in runs:
            torch.manual_seed(0)
            models[path] = build_model(args.model, num_classes=train.num_classes, in_channels=channels)
            sync()
            start = time.perf_counter()
            fit(models[path])
            sync()
            seconds.setdefault(path, []).append(time.perf_counter() - start)
    for path, r, fit in runs:
        settings = asdict(r) if r else {"epochs": args.baseline_epochs, "batch_size": args.batch_size, "lr": args.lr}
        settings.update(train_images=len(train), freed_memory_kept=kept)
        settings["precision_used"] = training_precision(r.precision, device) if r else "bf16" if device.type == "cuda" else "fp32"
        rows.append({"path": path, "model": args.model, **settings, "train_s": statistics.median(seconds[path]),
                     "train_s_each": seconds[path], "test_acc": test_accuracy(models[path], test, device)})
        if r:
            rows[-1]["speedup"] = rows[0]["train_s"] / rows[-1]["train_s"]
    record("train", rows, device=args.device)


if __name__ == "__main__":
    main()
