"""Explanations per second on the CPU, and inference of the canonized (BatchNorm-folded) model.

1. `explain` (gradient x input, and LRP-eps-plus with and without canonization, canonization's
   equality check included) against a plain gradient x input pass (torch.autograd on the model as is),
   on a CIFAR ResNet-20 (random weights, random BatchNorm statistics), 32x32 images, one batch.
   Checked: explain's gradient x input equals the plain one.
2. Forward passes of the canonized model (inside `canonize(...)`: BatchNorms folded into the convs and
   left as identities, sums and pooling as modules) against the original, for ResNet-20 (32x32) and
   torchvision ResNet-18 (64x64). Checked: same logits (rtol 1e-5).

Ratios are baseline / ours (> 1: ours is faster); all timings in this process, best of 3.

    python benchmarks/bench_explain.py [--batch 32]
"""
import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, record

from classfilters import CifarResNet, as_feature_model, canonize, explain


def random_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def plain_gradient_x_input(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x)[torch.arange(len(x)), target].sum()
    (grad,) = torch.autograd.grad(out, x)
    return grad * x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    model = as_feature_model(random_stats(CifarResNet(20)))
    x = torch.randn(args.batch, 3, 32, 32)
    target = torch.randint(0, 10, (args.batch,))
    baseline = best_of(lambda: plain_gradient_x_input(model, x, target))
    torch.testing.assert_close(explain(model, x, target, "gradient_x_input", canonize=False),
                               plain_gradient_x_input(model, x, target).detach())
    for method, canon in (("gradient_x_input", False), ("gradient_x_input", True), ("lrp_epsilon_plus", False),
                          ("lrp_epsilon_plus", True)):
        t = best_of(partial(explain, model, x, target, method, canonize=canon))
        rows.append({"what": "explain", "model": "resnet20", "method": method, "canonized": canon,
                     "batch": args.batch, "ours_s": t, "ours_per_s": args.batch / t,
                     "baseline": "plain gradient x input", "baseline_s": baseline,
                     "baseline_per_s": args.batch / baseline, "ratio": baseline / t})
    for name, net, size in (("resnet20", model, 32), ("resnet18", as_feature_model(random_stats(tvm.resnet18())), 64)):
        xi = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            original = best_of(partial(net, xi))
            reference = net(xi)
            with canonize(net, xi[:4]):
                folded = best_of(partial(net, xi))
                torch.testing.assert_close(net(xi), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        rows.append({"what": "inference", "model": name, "method": "forward", "canonized": True, "batch": args.batch,
                     "ours_s": folded, "ours_per_s": args.batch / folded, "baseline": "original (BatchNorm)",
                     "baseline_s": original, "baseline_per_s": args.batch / original, "ratio": original / folded})
    record("explain", rows)


if __name__ == "__main__":
    main()
