"""Spatially fixed networks (ExplainFix, Gaudio et al. 2023): every k×k filter set once and never learned.

A *spatial* conv is any `nn.Conv2d` whose kernel is not 1×1 (stems, 3×3, strided, depthwise); its
weight (O, I/g, k, k) holds O·I/g spatial filters W[o, i]. `fix_spatial_filters(model, init)` gives
every spatial conv new filters from `init` and sets `requires_grad=False` on them (their bias too);
BatchNorm, 1×1 convs and the head keep learning.

The orthonormal DCT-II basis of a k×k kernel (`dct_basis`): c_f(n) = s_f cos(π f (n + ½) / k),
s_0 = 1/√k, s_f = √(2/k); B_m[i, j] = c_ky(i) c_kx(j) with m = ky·k + kx (raster order; ky is the
vertical, kx the horizontal frequency). Reshaped to (k², k²), B Bᵀ = I. `diagonal_order(k)` lists
the raster indices low → high frequency: by ky + kx, then edges (|ky − kx| large) first, then ky.

Initialisations (each (o, i) filter drawn independently, no fan-in scaling, as the authors):
- "DCT2": each filter is one basis filter. I/g == 1: B[randperm(O)[o] mod k²]; else for each o,
  B[randperm(I)[i] mod k²] (so with I < k² only the first I raster basis filters occur: their quirk).
- "GHaar": G[i, j] = h cos(f x_i) + v cos(f x_j) + d cos(f x_i) cos(f x_j), x = linspace(0, π, k),
  (h, v, d) ~ U(−1, 1)³, f ~ U(0, 2(k − 1)).
- "Psine": K = Σ_l w_l (sin(f_l0 x + t_l0) ⊗ sin(f_l1 x + t_l1))^p_l over L = ⌊3 + 2^{6u}⌋ terms,
  f ~ U(0, 1)·U(1, 5), t ~ U(0, 2π), integer p = round(1 + u((L − 1)/2 − 1)), w = 2u/Σu − 1; then
  rescaled to [−1, 1] and divided by its L2 norm.
- "Unchanged": the current weights, frozen. "KRandom": PyTorch's default init U(±1/√fan_in), frozen.
- "GuidedSteer": for spatial layer ℓ, F (N×k²) = the same layer's filters of a trained `source`
  model of the same architecture; Bu = principal directions of FᵀF; new filters = samples of a
  Gaussian KDE (Scott's bandwidth N^(−1/(d+4))) over the coefficients F Buᵀ, mapped back by Bu.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from . import cache
from .models import FeatureModel

SOURCE_DIGEST = cache.source_digest(sys.modules[__name__])  # this file as imported (a key of fixed-filter models)

INITS = ("DCT2", "GHaar", "Psine", "Unchanged", "KRandom", "GuidedSteer")


# ---------------------------------------------------------------------------------------------
# Which convs are spatial


def spatial_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv) of every nn.Conv2d with a kernel other than 1×1, in `named_modules` order
    (each module once, even when shared: FeatureModel holds the network's head twice)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)]


def check_has_spatial_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The spatial convs of `model`; a model without any, or a FeatureModel whose phi is not the spatial
    mean of channel maps (a ViT's patch embedding is a conv, but not ExplainFix's), is refused here."""
    if isinstance(model, FeatureModel):
        model.require_spatial_maps("ExplainFix's spatial convolutions")
    convs = spatial_convs(model)
    if not convs:
        kinds = sorted({type(m).__name__ for m in model.modules() if next(m.parameters(recurse=False), None) is not None})
        raise ValueError(f"{type(model).__name__} has no spatial convolution (an nn.Conv2d with a kernel larger than "
                         f"1×1); its parametrised layers are {kinds}. ExplainFix works on CNNs with k×k convs.")
    return convs


# ---------------------------------------------------------------------------------------------
# The DCT-II basis


def dct_basis_1d(n: int, dtype=torch.float64) -> torch.Tensor:
    """(n, n): row f is c_f, the orthonormal DCT-II vector of frequency f."""
    f = torch.arange(n, dtype=dtype)[:, None]
    pos = torch.arange(n, dtype=dtype)[None, :]
    scale = torch.full((n, 1), math.sqrt(2 / n), dtype=dtype)
    scale[0] = math.sqrt(1 / n)
    return scale * torch.cos(math.pi * f * (pos + 0.5) / n)


def dct_basis(height: int, width: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """(H·W, H, W): basis filter m = ky·W + kx is the outer product c_ky(rows) ⊗ c_kx(columns)."""
    width = height if width is None else width
    rows, cols = dct_basis_1d(height, dtype), dct_basis_1d(width, dtype)
    return torch.einsum("ai,bj->abij", rows, cols).reshape(height * width, height, width)


def diagonal_order(k: int) -> list[int]:
    """Raster indices of a k×k basis from low to high frequency (3×3: [0, 1, 3, 2, 6, 4, 5, 7, 8])."""
    pairs = [(ky, kx) for ky in range(k) for kx in range(k)]
    pairs.sort(key=lambda p: (p[0] + p[1], -abs(p[0] - p[1]), p[0]))
    return [ky * k + kx for ky, kx in pairs]


# ---------------------------------------------------------------------------------------------
# The initialisations: functions (O, I, k, gen) -> float64 (O, I, k, k)


def _dct2(out_ch: int, in_ch: int, k: int, gen: torch.Generator) -> torch.Tensor:
    basis = dct_basis(k)
    if in_ch == 1:
        index = (torch.randperm(out_ch, generator=gen) % (k * k))[:, None]
    else:
        index = torch.stack([torch.randperm(in_ch, generator=gen) for _ in range(out_ch)]) % (k * k)
    return basis[index]


def _ghaar(out_ch: int, in_ch: int, k: int, gen: torch.Generator) -> torch.Tensor:
    n = out_ch * in_ch
    hvd = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1
    f = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 * (k - 1)
    wave = torch.cos(f * torch.linspace(0, math.pi, k, dtype=torch.float64))  # (n, k)
    h, v, d = (hvd[:, j, None, None] for j in range(3))
    g = h * wave[:, :, None] + v * wave[:, None, :] + d * wave[:, :, None] * wave[:, None, :]
    return g.reshape(out_ch, in_ch, k, k)


def _psine(out_ch: int, in_ch: int, k: int, gen: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    n, max_terms = out_ch * in_ch, 3 + 64
    x = torch.linspace(0, math.pi, k, dtype=torch.float64)
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        terms = (3 + 2 ** (6 * torch.rand(m, generator=gen, dtype=torch.float64))).floor()  # L per filter
        active = torch.arange(max_terms, dtype=torch.float64)[None] < terms[:, None]        # (m, 67)
        fmax = 1 + 4 * torch.rand(m, 1, 1, generator=gen, dtype=torch.float64)
        f = torch.rand(m, max_terms, 2, generator=gen, dtype=torch.float64) * fmax
        t = torch.rand(m, max_terms, 2, generator=gen, dtype=torch.float64) * 2 * math.pi
        p = (torch.rand(m, max_terms, generator=gen, dtype=torch.float64) * ((terms[:, None] - 1) / 2 - 1) + 1).round()
        u = torch.rand(m, max_terms, generator=gen, dtype=torch.float64) * active
        w = 2 * u / u.sum(1, keepdim=True) - 1
        rows = torch.sin(f[..., 0, None] * x + t[..., 0, None])                              # (m, 67, k)
        cols = torch.sin(f[..., 1, None] * x + t[..., 1, None])
        kernel = (rows[..., :, None] * cols[..., None, :]) ** p[..., None, None]
        filt = (w[..., None, None] * kernel * active[..., None, None]).sum(1)                 # (m, k, k)
        lo, hi = filt.amin((1, 2), keepdim=True), filt.amax((1, 2), keepdim=True)
        filt = 2 * (filt - lo) / (hi - lo).clamp_min(1e-12) - 1
        out.append(filt / filt.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None])
    return torch.cat(out).reshape(out_ch, in_ch, k, k)


def guided_steer_sampler(source_filters: torch.Tensor):
    """A function (n, gen) -> (n, k, k) drawing filters from a Gaussian KDE fitted, in their principal
    basis, to `source_filters` (O, I, k, k) of a trained layer."""
    k = source_filters.shape[-1]
    flat = source_filters.detach().double().reshape(-1, k * k)                   # F: (N, d)
    _, _, principal = torch.linalg.svd(flat.T @ flat)                            # rows: principal directions Bu
    coeff = flat @ principal.T                                                   # C = F Buᵀ
    n, d = coeff.shape
    bandwidth = n ** (-1 / (d + 4))                                              # Scott's rule
    cov = torch.cov(coeff.T).reshape(d, d) * bandwidth ** 2 if n > 1 else torch.zeros(d, d, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt()                                     # root @ rootᵀ = cov

    def sample(count: int, gen: torch.Generator) -> torch.Tensor:
        centres = coeff[torch.randint(n, (count,), generator=gen)]
        noise = torch.randn(count, d, generator=gen, dtype=torch.float64) @ root.T
        return ((centres + noise) @ principal).reshape(count, k, k)

    return sample


def _canonical_init(init: str) -> str:
    names = {name.lower(): name for name in INITS}
    if not isinstance(init, str) or init.lower() not in names:
        raise ValueError(f"unknown initialisation {init!r}: choose one of {', '.join(INITS)}")
    return names[init.lower()]


def _layer_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(conv.weight.shape) + (conv.groups,) for _, conv in spatial_convs(model)]


def check_guided_source(model: nn.Module, source: nn.Module) -> None:
    """The GuidedSteer source must have the same spatial layers (shapes and groups), in the same order."""
    if source is None:
        raise ValueError("GuidedSteer needs source=<a trained model of the same architecture> "
                         "(e.g. build_model('resnet20', '../shared/data/weights/resnet20-12fca82f.th'))")
    mine, theirs = _layer_shapes(model), _layer_shapes(source)
    if mine != theirs:
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise ValueError(
            f"the GuidedSteer source is another architecture: {len(theirs)} spatial convs vs the model's {len(mine)}; "
            f"spatial conv {first} is {theirs[first] if first < len(theirs) else 'missing'} in the source and "
            f"{mine[first] if first < len(mine) else 'missing'} in the model (shape + groups). Give a trained model "
            "built with the same name.")


@torch.no_grad()
def fix_spatial_filters(model: nn.Module, init: str = "Unchanged", source: nn.Module | None = None,
                        seed: int = 0) -> nn.Module:
    """Give every spatial conv of `model` filters from `init` and freeze them (requires_grad False on
    weight and bias); everything else keeps learning. In place; returns `model`.

    init: one of INITS (case-insensitive). source: for "GuidedSteer", a trained model of the same
    architecture whose filters, layer by layer, give the density to draw from. seed: the draws.
    """
    init = _canonical_init(init)
    convs = check_has_spatial_convs(model)
    for name, conv in convs:
        if conv.kernel_size[0] != conv.kernel_size[1] and init not in ("Unchanged", "KRandom"):
            raise ValueError(f"{name} has a {tuple(conv.kernel_size)} kernel: {init} needs square kernels "
                             "(use Unchanged or KRandom)")
    if init == "GuidedSteer":
        check_guided_source(model, source)
        source_convs = [conv for _, conv in spatial_convs(source)]
    gen = torch.Generator().manual_seed(seed)
    for index, (_, conv) in enumerate(convs):
        out_ch, in_ch, k, _ = conv.weight.shape
        if init == "DCT2":
            new = _dct2(out_ch, in_ch, k, gen)
        elif init == "GHaar":
            new = _ghaar(out_ch, in_ch, k, gen)
        elif init == "Psine":
            new = _psine(out_ch, in_ch, k, gen)
        elif init == "GuidedSteer":
            new = guided_steer_sampler(source_convs[index].weight)(out_ch * in_ch, gen).reshape(conv.weight.shape)
        elif init == "KRandom":
            bound = 1 / math.sqrt(in_ch * conv.kernel_size[0] * conv.kernel_size[1])  # kaiming_uniform(a=√5)
            new = (torch.rand(conv.weight.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        else:
            new = None
        if new is not None:
            conv.weight.copy_(new.to(conv.weight.dtype))
        conv.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with requires_grad (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
