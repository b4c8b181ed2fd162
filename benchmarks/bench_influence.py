"""Algorithm 1, vectorised, against the authors' approach (a loop over classes and images with a
full sort of every feature vector), at CIFAR scale (50,000 x 64, 10 classes, k = k' = 5) and
ImageNet scale (1,281,167 x 2048, 1000 classes, k = k' = 50; a 200,000-row slice on the CPU).
Baselines: that loop in PyTorch (one `torch.sort` per image, the authors' style) and in numpy
(`np.argsort` per image); all run in this process on the same random ReLU features, must agree
exactly, and the printed ratios are baseline / ours. On the CPU the top-k kernel alone is also timed
with each compaction (scalar; AVX-512 compress into a register; compress-store to memory, slow on
AMD Zen 4), and the result file is named by the CPU's vendor, family and model. `--loop-rows N` times the loops on the first
N rows only (checked against ours on the same rows) and scales their time by rows / N: the loops
cost the same per row, and the full ImageNet-scale loops take minutes.

    python benchmarks/bench_influence.py [--rows 200000] [--loop-rows 100000] [--device cuda]
"""
import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, record

from classfilters.influence import influential_features
from classfilters.reference import influential_features_loop, influential_features_torch_loop


def relu_features(n, d, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[:c] = torch.arange(c)
    features = torch.relu(torch.randn(n, d, generator=gen))
    return features, labels


def keep_result(out: list, fn, *args):
    out.append(fn(*args))


def plain_topk_bincount(features, labels, c, k):
    """The GPU baseline: torch's top-k of every row, then one bincount over (class, feature)."""
    d = features.shape[1]
    return torch.bincount((labels[:, None] * d + features.topk(k, 1).indices).flatten(), minlength=c * d)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=None, help="ImageNet-scale rows (default: all on GPU, 200,000 on CPU)")
    p.add_argument("--loop-rows", type=int, default=None, help="time the baseline loops on this many rows, scaled")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []
    imagenet_rows = args.rows or (1_281_167 if device.type == "cuda" else 200_000)
    for scale, n, d, c, k in (("cifar", 50_000, 64, 10, 5), ("imagenet", imagenet_rows, 2048, 1000, 50)):
        features, labels = relu_features(n, d, c)
        ours_in = (features.to(device), labels.to(device))
        ours = best_of(partial(influential_features, *ours_in, k, k, num_classes=c), sync=sync)
        m = min(n, args.loop_rows or n)  # rows the loops run on; their time is scaled by n / m
        result = influential_features(ours_in[0][:m], ours_in[1][:m], k, k, num_classes=c).indices
        loops = {}
        for name, loop, loop_in in (("torch_loop", influential_features_torch_loop, (features[:m], labels[:m])),
                                    ("numpy_loop", influential_features_loop, (features[:m].numpy(), labels[:m].numpy()))):
            out = []
            loops[name] = best_of(partial(keep_result, out, loop, *loop_in, k, k, c), repeat=1) * n / m
            assert out[0] == result, f"{name} disagrees with the vectorised result"
        rows.append({"scale": scale, "rows": n, "loop_rows": m, "D": d, "classes": c, "k": k, "device": device.type, "ours_s": ours,
                     **{f"{name}_s": t for name, t in loops.items()},
                     **{f"speedup_vs_{name}": t / ours for name, t in loops.items()}})
        if device.type == "cpu":  # the numba kernel alone, for each compaction this CPU has (see topk_cpu.py)
            from classfilters.topk_cpu import COMPACTIONS, HAS_COMPRESS, topk_rows_cpu
            for compaction in COMPACTIONS if HAS_COMPRESS else ("scalar",):
                kernel = best_of(partial(topk_rows_cpu, features, k, compaction))
                rows.append({"scale": scale, "rows": n, "D": d, "k": k, "compaction": compaction, "kernel_s": kernel})
        if device.type == "cuda":  # the Triton kernel alone, for each number of warps per row
            from classfilters.topk_gpu import class_histograms_gpu
            for warps in (1, 2, 4, 8):
                kernel = best_of(partial(class_histograms_gpu, *ours_in, c, k, num_warps=warps), sync=sync)
                rows.append({"scale": scale, "rows": n, "D": d, "k": k, "kernel_num_warps": warps, "kernel_s": kernel})
            plain = best_of(partial(plain_topk_bincount, *ours_in, c, k), sync=sync)
            rows.append({"scale": scale, "rows": n, "D": d, "k": k, "plain_topk_bincount_s": plain})
    record("influence", rows)


if __name__ == "__main__":
    main()
