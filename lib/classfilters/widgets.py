"""The k / k' panel: tune Algorithm 1's sizes live on a subject's cached features (JupyterLab, ipywidgets).

Three views, redrawn on every move of the k or k' slider or the class picker:
  - the class's index histogram H_c (how often each feature is among an image's top k), its
    index set I_c in red, and picks with a zero count marked (when fewer than k' features were ever
    in the class's top k, the rest of I_c is filled by index order and still costs multiply-adds);
  - the (k, k') point on the Fig 3 heatmap of relative accuracy (the grid of notebook 2);
  - per-class test accuracy, decomposed (bars) against the full head (dots).
Under them, one line of numbers: accuracy, relative accuracy, multiply-adds, I_c.

Cost per update: the class histograms of every k come from one pass over the training features
(ranks counted per class, cumulated), k' only reselects indices; the figure is one Agg render into an image widget
(`benchmarks/bench_panel.py` times both on CIFAR-10-sized features). `KPanel.state` is the
computation alone, without widgets.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from .decomposed import DecomposedHead, feature_ranks
from .influence import class_histograms, select_indices
from .session import Subject
from .sizes import DEFAULT_K, as_size

CUMULATIVE_LIMIT = 1 << 24  # C * D * D counts held for every k at once (128 MB of int64)


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
        self._cumulative = None
        self._head = subject.head
        labels = subject.test.labels.long()
        self._labels = labels
        self._per_class = torch.bincount(labels, minlength=self.c).clamp(min=1).double()
        with torch.no_grad():
            full = self._head(subject.test_features).argmax(1) == labels
        self.full_accuracy = full.float().mean().item()
        self.full_class_accuracy = (torch.bincount(labels[full], minlength=self.c) / self._per_class).numpy()
        self._train_counts = torch.bincount(subject.train.labels.long(), minlength=self.c).clamp(min=1).numpy()
        self._figure = None

    def _count(self, value, name: str) -> int:
        value = as_size(value, self.d, name)
        if not isinstance(value, int):
            print(f"note: the panel tunes counts; {name}={value} is a fraction of mass, starting at {DEFAULT_K}")
            value = min(DEFAULT_K, self.d)
        return value

    # ------------------------------------------------------------------------------ computation

    def histograms(self, k: int) -> torch.Tensor:
        """H (C, D) for this k. When C * D * D counts fit in memory (CIFAR-10: 41k), every k's histograms come
        from one pass at the first call (how often feature j has rank r in class c's images, cumulated over r,
        as `grid_accuracy`); otherwise each k's are computed once by Algorithm 1's kernel and kept."""
        s = self.subject
        if self.c * self.d * self.d <= CUMULATIVE_LIMIT:
            if self._cumulative is None:
                ranks = feature_ranks(s.train_features).long()
                flat = (s.train.labels.long()[:, None] * self.d + torch.arange(self.d)) * self.d + ranks
                counts = torch.bincount(flat.flatten(), minlength=self.c * self.d * self.d)
                self._cumulative = counts.view(self.c, self.d, self.d).cumsum(2)
            return self._cumulative[:, :, k - 1]
        if k not in self._histograms:
            self._histograms[k] = class_histograms(s.train_features, s.train.labels, self.c, k)[0].cpu()
        return self._histograms[k]

    def state(self, k: int | None = None, k_prime: int | None = None, cls: int | None = None) -> PanelState:
        """The panel's numbers. Computed on one thread: these small products (10,000 x 64 x 10 on CIFAR-10)
        take ~3 ms on one core, and 25x longer when two threads contend with other work for two cores."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._state(k, k_prime, cls)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def _state(self, k, k_prime, cls) -> PanelState:
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
        """The static parts drawn once (axes, the Fig 3 heatmap, the full head's accuracies), kept as a
        background; each update only draws the moving artists over it (blitting)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure  # not pyplot: the panel's figure is never shown inline as well

        fig = Figure(figsize=(12, 3.3), dpi=72)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3, width_ratios=[2.2, 1, 1.4])
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.22, top=0.9, wspace=0.35)  # fixed: no layout per update
        ax = axes[0]
        self._all = LineCollection([], colors="0.55", linewidths=2, animated=True)
        self._sel = LineCollection([], colors="C3", linewidths=3, animated=True)
        ax.add_collection(self._all)
        ax.add_collection(self._sel)
        (self._zero,) = ax.plot([], [], "x", color="C3", ms=8, mew=2, animated=True)
        ax.set(xlim=(-1, self.d), ylim=(0, 1.05), xlabel="feature index j",
               ylabel="share of the class's images", title="H_c / images of c (red: I_c; x: picked with count 0)")
        ax.title.set_fontsize(10)
        self._animated = [self._all, self._sel, self._zero]
        ax = axes[1]
        if self.grid is not None and len(self.grid):
            pivot = self.grid.pivot(index="k", columns="k_prime", values="relative")
            self._grid_ks, self._grid_kps = list(pivot.index), list(pivot.columns)
            mesh = ax.pcolormesh(pivot.to_numpy(), cmap="viridis")
            fig.colorbar(mesh, ax=ax, label="relative accuracy")
            ax.set_xticks(np.arange(len(self._grid_kps)) + 0.5, self._grid_kps, fontsize=7, rotation=90)
            ax.set_yticks(np.arange(len(self._grid_ks)) + 0.5, self._grid_ks, fontsize=7)
            ax.set(xlabel="k' (features per class)", ylabel="k (features per image)", title="(k, k') on Fig 3")
            (point,) = ax.plot([], [], "o", ms=12, mfc="none", mec="red", mew=2.5, animated=True)
            self._point = point
            self._animated.append(point)
        else:
            self._point = None
            ax.set_axis_off()
        ax = axes[2]
        x = np.arange(self.c)
        self._bars = list(ax.bar(x, np.zeros(self.c), color="C0", label="decomposed"))
        for bar in self._bars:
            bar.set_animated(True)
        ax.plot(x, self.full_class_accuracy, "k_", ms=10, mew=2, label="full head")
        ax.set(ylim=(0, 1.05), xlabel="class", ylabel="test accuracy", title="per class (orange: the class shown)")
        if self.c <= 20:
            ax.set_xticks(x, [str(c)[:8] for c in self.subject.classes], rotation=60, fontsize=7)
        ax.legend(loc="lower right", fontsize=8)
        self._animated += self._bars
        fig.canvas.draw()
        self._background = fig.canvas.copy_from_bbox(fig.bbox)
        self._figure = fig

    def _grid_position(self, value: int, axis: list[int]) -> float:
        return float(np.interp(value, axis, np.arange(len(axis)))) + 0.5

    def render(self, s: PanelState) -> bytes:
        """The three views for `s` as PNG bytes: the moving artists drawn over the cached background."""
        from PIL import Image

        if self._figure is None:
            self._build_figure()
        share = s.histogram / self._train_counts[s.cls]
        segments = np.zeros((self.d, 2, 2))
        segments[:, :, 0] = np.arange(self.d)[:, None]
        segments[:, 1, 1] = share
        self._all.set_segments(segments)
        self._sel.set_segments(segments[s.indices])
        self._zero.set_data(s.zero_picks, [0.02] * len(s.zero_picks))
        if self._point is not None:
            self._point.set_data([self._grid_position(s.k_prime, self._grid_kps)],
                                 [self._grid_position(s.k, self._grid_ks)])
        for c, (bar, acc) in enumerate(zip(self._bars, s.class_accuracy)):
            bar.set_height(acc)
            bar.set_color("C1" if c == s.cls else "C0")
        canvas = self._figure.canvas
        canvas.restore_region(self._background)
        for artist in self._animated:
            self._figure.draw_artist(artist)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buffer, format="png", compress_level=1)
        return buffer.getvalue()

    def summary(self, s: PanelState) -> str:
        zero = f" (count 0, picked by index order: {s.zero_picks})" if s.zero_picks else ""
        full = self.c * self.d
        return (f"<b>class</b> {self.subject.classes[s.cls]} at <b>k</b> = {s.k}, <b>k'</b> = {s.k_prime}: "
                f"<b>accuracy</b> {s.accuracy:.4f} (full {self.full_accuracy:.4f}) &nbsp; <b>relative</b> "
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
