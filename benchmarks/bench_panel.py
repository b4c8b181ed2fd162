"""The k / k' panel's update on CIFAR-10-sized features (50,000 x 64 train, 10,000 test, 10 classes):
milliseconds per move of the k' slider, the k slider (a new k: its class histograms computed once)
and the class picker, the computation (`KPanel.state`) and the drawing (`KPanel.render`, one Agg PNG)
apart. Goal: under 100 ms per update. The baseline measured in the same run is a full Algorithm 1
plus `evaluate` per update (what the panel did before it cached histograms and drew a figure).

    python benchmarks/bench_panel.py [--moves 30]
"""
import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import matplotlib
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import record

from classfilters import evaluate, influential_features
from classfilters.session import Subject
from classfilters.widgets import KPanel

matplotlib.use("Agg")


def ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--moves", type=int, default=30, help="updates timed per kind of move")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    d, c = 64, 10
    train, train_y = torch.relu(torch.randn(50_000, d, generator=gen)), torch.randint(0, c, (50_000,), generator=gen)
    test, test_y = torch.relu(torch.randn(10_000, d, generator=gen)), torch.randint(0, c, (10_000,), generator=gen)
    torch.manual_seed(0)
    model = types.SimpleNamespace(num_features=d, num_classes=c, head=nn.Linear(d, c))
    def split(y):
        return types.SimpleNamespace(labels=y, classes=[f"class{i}" for i in range(c)], num_classes=c)
    subject = Subject("random", model, split(train_y), split(test_y), train, test)
    axis = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32]
    grid = pd.DataFrame([{"k": k, "k_prime": kp, "relative": 0.9} for k in axis for kp in axis])
    panel = KPanel(subject, 5, 5, grid)
    first = ms(lambda: panel.render(panel.state()))  # once: every k's histograms, the figure's background
    rows = [{"move": "first update (every k's histograms, the figure)", "update_ms_median": first}]
    moves = {"k' slider": lambda i: (5, 1 + i % d, 0), "class picker": lambda i: (5, 5, i % c),
             "k slider (new k)": lambda i: (1 + (7 + i) % d, 5, 0)}
    for move, where in moves.items():
        compute, draw = [], []
        for i in range(args.moves):
            start = time.perf_counter()
            state = panel.state(*where(i))
            compute.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            panel.render(state)
            draw.append(1000 * (time.perf_counter() - start))
        total = [a + b for a, b in zip(compute, draw)]
        rows.append({"move": move, "compute_ms": statistics.median(compute), "draw_ms": statistics.median(draw),
                     "update_ms_median": statistics.median(total), "update_ms_max": max(total)})
    baseline = statistics.median(ms(lambda k=k: evaluate(model.head, influential_features(train, train_y, k, 5), test,
                                                         test_y)) for k in range(1, 11))
    rows.append({"move": "baseline: Algorithm 1 + evaluate, no figure", "update_ms_median": baseline})
    record("panel", rows)


if __name__ == "__main__":
    main()
