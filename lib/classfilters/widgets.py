"""The k / k' panel: tune Algorithm 1's sizes live on a subject's cached features (JupyterLab, ipywidgets).

Three views, redrawn on every move of the k or k' slider or the class picker:
  - the class's index histogram H_c (how often each feature is among an image's top k), its
    index set I_c in red, and picks with a zero count marked (when fewer than k' features were ever
    in the class's top k, the rest of I_c is filled by index order and still costs multiply-adds);
  - the (k, k') point on the Fig 3 heatmap of relative accuracy (the grid of notebook 2);
  - per-class test accuracy, decomposed (bars) against the full head (dots).
Under them, one line of numbers: accuracy, relative accuracy, multiply-adds, I_c.

Cost per update: the class histograms of each k are computed once (Algorithm 1's first step,
cached), k' only reselects indices; the figure is one Agg render into an image widget
(`benchmarks/bench_panel.py` times both on CIFAR-10-sized features). `KPanel.state` is the
computation alone, without widgets.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from .decomposed import DecomposedHead
from .influence import class_histograms, select_indices
from .session import Subject
from .sizes import DEFAULT_K, as_size


@dataclass
class PanelState:
    """The panel's numbers for one (k, k', class)."""
    k: int
    k_prime: int
    cls: int
    histogram: np.ndarray          # int (D,): H_c
    indices: list[int]             # I_c, most frequent first
    zero_picks: list[int]          # members of I_c with H_c[j] = 0 (filled by index order)
    class_accuracy: np.ndarray     # float (C,): decomposed test accuracy per class
    accuracy: float                # decomposed test accuracy
    multiply_adds: int             # sum over classes of |I_c|


class KPanel:
    """Sliders for k and k', a class picker and three live views (see the module docstring).

    `grid`: the Fig 3 frame of `tables.grid_table` (columns k, k_prime, relative), or None for no heatmap."""

    def __init__(self, subject: Subject, k=DEFAULT_K, k_prime=DEFAULT_K, grid=None, cls: int = 0):
        self.subject = subject
        self.d, self.c = subject.model.num_features, subject.model.num_classes
        self.k, self.k_prime = (self._count(v, name) for v, name in ((k, "k"), (k_prime, "k'")))
        self.cls = cls
        self.grid = grid
        self._histograms: dict[int, torch.Tensor] = {}
        self._head = subject.head
        labels = subject.test.labels.long()
        self._labels = labels
        self._per_class = torch.bincount(labels, minlength=self.c).clamp(min=1).double()
        with torch.no_grad():
            full = self._head(subject.test_features).argmax(1) == labels
        self.full_accuracy = full.float().mean().item()
        self.full_class_accuracy = (torch.bincount(labels[full], minlength=self.c) / self._per_class).numpy()
        self._figure = None

    def _count(self, value, name: str) -> int:
        value = as_size(value, self.d, name)
        if not isinstance(value, int):
            print(f"note: the panel tunes counts; {name}={value} is a fraction of mass, starting at {DEFAULT_K}")
            value = min(DEFAULT_K, self.d)
        return value

    # ------------------------------------------------------------------------------ computation

    def histograms(self, k: int) -> torch.Tensor:
        """H (C, D) for this k, computed once."""
        if k not in self._histograms:
            s = self.subject
            self._histograms[k] = class_histograms(s.train_features, s.train.labels, self.c, k)[0].cpu()
        return self._histograms[k]

    @torch.no_grad()
    def state(self, k: int | None = None, k_prime: int | None = None, cls: int | None = None) -> PanelState:
        k = as_size(self.k if k is None else k, self.d, "k")
        k_prime = as_size(self.k_prime if k_prime is None else k_prime, self.d, "k'")
        cls = self.cls if cls is None else cls
        h = self.histograms(k)
        indices = select_indices(h, k_prime)
        mask = torch.zeros(self.c, self.d, dtype=torch.bool)
        for c, idx in enumerate(indices):
            mask[c, idx] = True
        pred = DecomposedHead(self._head, mask)(self.subject.test_features).argmax(1)
        right = pred == self._labels
        per_class = (torch.bincount(self._labels[right], minlength=self.c) / self._per_class).numpy()
        hist = h[cls].numpy()
        return PanelState(k, k_prime, cls, hist, indices[cls], [j for j in indices[cls] if hist[j] == 0],
                          per_class, right.float().mean().item(), int(mask.sum()))

    # ------------------------------------------------------------------------------ drawing

    def _build_figure(self):
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure  # not pyplot: the panel's figure is never shown twice inline

        fig = Figure(figsize=(12, 3.2), dpi=72, layout="constrained")
        axes = fig.subplots(1, 3, width_ratios=[2.2, 1, 1.4])
        ax = axes[0]
        self._all = LineCollection([], colors="0.55", linewidths=2)
        self._sel = LineCollection([], colors="C3", linewidths=3)
        ax.add_collection(self._all)
        ax.add_collection(self._sel)
        (self._zero,) = ax.plot([], [], "x", color="C3", ms=7, mew=2, label="picked with count 0")
        ax.set(xlim=(-1, self.d), xlabel="feature index j", ylabel="H_c[j]")
        ax.legend(loc="upper right", fontsize=8)
        self._hist_ax = ax
        ax = axes[1]
        self._point = None
        if self.grid is not None and len(self.grid):
            pivot = self.grid.pivot(index="k", columns="k_prime", values="relative")
            self._grid_ks, self._grid_kps = list(pivot.index), list(pivot.columns)
            mesh = ax.pcolormesh(pivot.to_numpy(), cmap="viridis")
            fig.colorbar(mesh, ax=ax, label="relative accuracy")
            ax.set_xticks(np.arange(len(self._grid_kps)) + 0.5, self._grid_kps, fontsize=7, rotation=90)
            ax.set_yticks(np.arange(len(self._grid_ks)) + 0.5, self._grid_ks, fontsize=7)
            ax.set(xlabel="k' (features per class)", ylabel="k (features per image)", title="Fig 3 grid")
            (self._point,) = ax.plot([], [], "o", ms=12, mfc="none", mec="red", mew=2.5)
        else:
            ax.set_axis_off()
        ax = axes[2]
        x = np.arange(self.c)
        self._bars = ax.bar(x, np.zeros(self.c), color="C0", label="decomposed")
        ax.plot(x, self.full_class_accuracy, "k.", label="full head")
        ax.set(ylim=(0, 1.05), xlabel="class", ylabel="test accuracy", title="per class")
        if self.c <= 20:
            ax.set_xticks(x, [str(c)[:8] for c in self.subject.classes], rotation=60, fontsize=7)
        ax.legend(loc="lower right", fontsize=8)
        self._figure = fig

    def _grid_position(self, value: int, axis: list[int]) -> float:
        return float(np.interp(value, axis, np.arange(len(axis)))) + 0.5

    def render(self, s: PanelState) -> bytes:
        """The three views for `s` as PNG bytes."""
        if self._figure is None:
            self._build_figure()
        j = np.arange(self.d)
        self._all.set_segments([[(i, 0), (i, v)] for i, v in zip(j, s.histogram)])
        self._sel.set_segments([[(i, 0), (i, s.histogram[i])] for i in s.indices])
        self._zero.set_data(s.zero_picks, [0] * len(s.zero_picks))
        self._hist_ax.set_ylim(0, max(1, s.histogram.max()) * 1.08)
        name = self.subject.classes[s.cls]
        self._hist_ax.set_title(f"class '{name}': H_c at k = {s.k}; red: I_c (k' = {s.k_prime})", fontsize=10)
        if self._point is not None:
            self._point.set_data([self._grid_position(s.k_prime, self._grid_kps)],
                                 [self._grid_position(s.k, self._grid_ks)])
        for bar, acc in zip(self._bars, s.class_accuracy):
            bar.set_height(acc)
            bar.set_color("C1" if bar is self._bars[s.cls] else "C0")
        buffer = io.BytesIO()
        self._figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def summary(self, s: PanelState) -> str:
        zero = f" (count 0, picked by index order: {s.zero_picks})" if s.zero_picks else ""
        full = self.c * self.d
        return (f"<b>accuracy</b> {s.accuracy:.4f} (full {self.full_accuracy:.4f}) &nbsp; <b>relative</b> "
                f"{s.accuracy / self.full_accuracy if self.full_accuracy else float('nan'):.4f} &nbsp; "
                f"<b>multiply-adds</b> {s.multiply_adds} of {full} &nbsp; "
                f"<b>I<sub>{self.subject.classes[s.cls]}</sub></b> = {s.indices}{zero}")

    # ------------------------------------------------------------------------------ widgets

    def widget(self):
        """The ipywidgets panel (sliders, class picker, the image of the three views, the numbers)."""
        import ipywidgets as w

        k = w.IntSlider(value=self.k, min=1, max=self.d, description="k", continuous_update=True)
        kp = w.IntSlider(value=self.k_prime, min=1, max=self.d, description="k'", continuous_update=True)
        picker = w.Dropdown(options=[(str(c), i) for i, c in enumerate(self.subject.classes)], value=self.cls,
                            description="class")
        image, text = w.Image(format="png"), w.HTML()

        def update(*_):
            s = self.state(k.value, kp.value, picker.value)
            image.value, text.value = self.render(s), self.summary(s)

        for control in (k, kp, picker):
            control.observe(update, names="value")
        update()
        return w.VBox([w.HBox([k, kp, picker]), image, text])


def k_panel(subject: Subject, k=DEFAULT_K, k_prime=DEFAULT_K, grid=None, cls: int = 0):
    """The k / k' panel as a widget (see `KPanel`)."""
    return KPanel(subject, k, k_prime, grid, cls).widget()
