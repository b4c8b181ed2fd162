"""ExplainFix on a CIFAR ResNet, each measurement beside its baseline in the same run:

1. training seconds per epoch with every spatial filter fixed (DCT2) vs fully learned, same
   images, recipe and seed (`train_classifier`); the fixed weights are checked bit-identical after;
2. CPU latency of ChannelPrune'd models (90 % and 99 % of the spatial filters, |W ⊙ ∇W| saliency,
   no fine-tuning) vs the full model, with parameters, multiply-adds and test accuracy (before any
   fine-tuning, as a sanity check only), and the pruned == masked function check;
3. the saliency pass (`filter_saliency`, gradients of the true-class logits w.r.t. the spatial
   weights only) vs a plain forward + backward of the cross-entropy over all parameters.

    python benchmarks/bench_explainfix.py [--model resnet20] [--images 2048] [--repeat 3]
        [--data cifar10:../shared/data/cifar10-jpeg.tar.gz] [--checkpoint ../shared/data/weights/resnet20-12fca82f.th]

Images come from the test split, shuffled with seed 0 (it is sorted by class): training and saliency
slice the first --images, accuracy the last 5,000.
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHARED
from common import best_of, record

from classfilters import (
    Recipe,
    build_model,
    channel_prune,
    filter_saliency,
    fix_spatial_filters,
    macs_and_params,
    open_dataset,
    spatial_convs,
    train_classifier,
)
from classfilters.decomposed import accuracy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--checkpoint", default=str(SHARED / "weights" / "resnet20-12fca82f.th"))
    p.add_argument("--data", default=f"cifar10:{SHARED / 'cifar10-jpeg.tar.gz'}")
    p.add_argument("--images", type=int, default=2048, help="training / saliency images")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="latency batch size")
    args = p.parse_args()
    split = open_dataset(args.data, "test")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))  # the split is sorted by class
    part, held = split.subset(order[:args.images]), split.subset(order[-5000:])
    rows = []

    # 1. fixed vs learned, seconds per epoch (alternating, best of `repeat`)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    times = {"learned": [], "DCT2": []}
    for _ in range(args.repeat):
        for init, seconds in times.items():
            torch.manual_seed(0)
            model = build_model(args.model)
            if init != "learned":
                fix_spatial_filters(model, init)
            fixed = {n: c.weight.detach().clone() for n, c in spatial_convs(model)}
            seconds.append(best_of(lambda m=model: train_classifier(m, part, recipe, "cpu", 0, False), 1))
            if init != "learned":
                assert all(torch.equal(c.weight.detach().contiguous(), fixed[n].contiguous()) for n, c in spatial_convs(model))
    learned, fixed_s = min(times["learned"]), min(times["DCT2"])
    rows.append({"what": "seconds per epoch", "images": args.images, "learned": learned, "fixed_DCT2": fixed_s,
                 "ratio_learned_over_fixed": learned / fixed_s})

    # 2. pruned vs full latency
    full = build_model(args.model, args.checkpoint if Path(args.checkpoint).is_file() else None).eval()
    x = split.normalize(held.images[:args.batch])
    macs, params = macs_and_params(full, x[:1])
    with torch.inference_mode():
        full_acc = accuracy(torch.cat([full(split.normalize(held.images[i:i + 500])) for i in range(0, 5000, 500)]),
                            held.labels)
    for pct in (90, 99):
        pruned, report = channel_prune(full, part, pct, "weight_grad", max_images=args.images, keep_per_layer=1,
                                       device="cpu")
        pruned.eval()
        with torch.inference_mode():  # full and pruned alternate, so that both see the same load
            pairs = [(best_of(lambda: full(x), 1), best_of(lambda m=pruned: m(x), 1)) for _ in range(2 * args.repeat)]
            full_ms, ms = 1000 * min(p[0] for p in pairs), 1000 * min(p[1] for p in pairs)
            acc = accuracy(torch.cat([pruned(split.normalize(held.images[i:i + 500])) for i in range(0, 5000, 500)]),
                           held.labels)
        rows.append({"what": f"latency, {pct} % of spatial filters zeroed", "batch": args.batch, "full_ms": full_ms,
                     "pruned_ms": ms, "speedup": full_ms / ms, "params_full": params,
                     "params_pruned": report["params_after"], "macs_full": macs, "macs_pruned": report["macs_after"],
                     "kernels_full": report["filters"], "kernels_pruned": report["spatial_filters_after"],
                     "acc_full": full_acc, "acc_pruned_no_finetune": acc})

    # 3. the saliency pass vs a plain forward + backward
    model = copy.deepcopy(full)

    def plain():
        model.zero_grad(set_to_none=True)
        for i in range(0, args.images, 128):
            F.cross_entropy(model(split.normalize(part.images[i:i + 128])), part.labels[i:i + 128]).backward()

    ours = best_of(lambda: filter_saliency(full, part, "grad", max_images=args.images, batch_size=128, device="cpu"),
                   args.repeat)
    base = best_of(plain, args.repeat)
    rows.append({"what": "saliency pass", "images": args.images, "filter_saliency_s": ours,
                 "forward_backward_s": base, "ratio": ours / base})
    for row in rows:  # this machine is shared: say how busy it was
        row["load_average_1min"] = round(os.getloadavg()[0], 2)
    record("explainfix", rows)


if __name__ == "__main__":
    main()
