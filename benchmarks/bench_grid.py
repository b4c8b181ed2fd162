"""The whole (k, k') grid (D = 64: 4,096 pairs) on 10,000 test features, from 50,000 training
features, against evaluating each pair separately (Algorithm 1 + the decomposed head, per pair).
The per-pair baseline is timed on a random sample of pairs and scaled to the whole grid; both
run in this process on the same random ReLU features and a random head.

    python benchmarks/bench_grid.py [--sample 48]
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, record

from classfilters import evaluate, grid_accuracy, influential_features


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sample", type=int, default=48, help="pairs timed one by one for the baseline")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    d, c = 64, 10
    train, train_y = torch.relu(torch.randn(50_000, d, generator=gen)), torch.randint(0, c, (50_000,), generator=gen)
    test, test_y = torch.relu(torch.randn(10_000, d, generator=gen)), torch.randint(0, c, (10_000,), generator=gen)
    torch.manual_seed(0)
    head = nn.Linear(d, c)
    ks = list(range(1, d + 1))
    grid = None

    def run_grid():
        nonlocal grid
        grid = grid_accuracy(train, train_y, test, test_y, head, ks, ks)

    ours = best_of(run_grid)
    pairs = random.Random(0).sample([(k, kp) for k in ks for kp in ks], args.sample)
    start = time.perf_counter()
    agree = 0
    for k, kp in pairs:
        acc = evaluate(head, influential_features(train, train_y, k, kp), test, test_y)["acc_decomposed"]
        agree += abs(acc - grid[k - 1, kp - 1].item()) < 1e-6
    per_pair = (time.perf_counter() - start) / len(pairs)
    record("grid", [{"pairs": len(ks) ** 2, "test_rows": len(test), "D": d, "grid_s": ours,
                     "per_pair_s": per_pair, "per_pair_whole_grid_s": per_pair * len(ks) ** 2,
                     "speedup": per_pair * len(ks) ** 2 / ours, "sampled_pairs_equal": f"{agree}/{len(pairs)}"}])


if __name__ == "__main__":
    main()
