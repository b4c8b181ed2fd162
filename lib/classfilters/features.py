"""Batched extraction of the pooled penultimate features phi(x), cached on disk.

`extract_features(model, split)` runs the model body over a split in batches (no
DataLoader for in-memory splits; worker processes for streamed folders), on the GPU with
channels_last and bf16 autocast, shows a tqdm bar, and returns float32 (N, D) features
in dataset order. Results are cached under a key of the model's weights, the split's
fingerprint, the normalisation and the precision; long runs save their progress every
`checkpoint_every` images, so an interrupted extraction resumes where it stopped.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import cache
from .data import ImageSplit
from .models import FeatureModel, fingerprint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(split: ImageSplit, batch_size: int, start: int = 0, num_workers: int = 4):
    """Yield uint8 (B, C, H, W) batches of `split` in order, from image `start` on."""
    if split.images is not None:
        for i in range(start, len(split), batch_size):
            yield split.images[i:i + batch_size]
        return
    subset = torch.utils.data.Subset(split.dataset, range(start, len(split)))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    for images, _ in loader:
        yield images


@torch.no_grad()
def extract_features(model: FeatureModel, split: ImageSplit, batch_size: int = 256, device=None,
                     bf16: bool | None = None, use_cache: bool = True, progress: bool = True,
                     checkpoint_every: int = 50_000) -> torch.Tensor:
    """phi(x) for every image of `split`, float32 (N, D), on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    bf16 = (device.type == "cuda") if bf16 is None else bf16
    key = {"model": fingerprint(model), "data": split.fingerprint, "mean": split.mean, "std": split.std,
           "precision": "bf16" if bf16 else "fp32", "n": len(split)}
    if use_cache and (hit := cache.load("features", key)) is not None:
        return hit["features"]
    done = []
    if use_cache:  # resume from saved parts
        while (part := cache.load("features-part", {**key, "part": len(done)})) is not None:
            done.append(part["features"])
    start = sum(len(p) for p in done)
    was_training = model.training
    model.eval().to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    pending, in_pending = [], 0
    bar = tqdm(total=len(split), initial=start, desc=f"features {model.name} / {split.name}",
               disable=not progress, unit="img")
    for images in batches(split, batch_size, start):
        x = split.normalize(images.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            phi = model.forward_features(x)
        pending.append(phi.float().cpu())
        in_pending += len(images)
        bar.update(len(images))
        if use_cache and in_pending >= checkpoint_every:
            part = torch.cat(pending)
            cache.save("features-part", {**key, "part": len(done)}, {"features": part})
            done.append(part)
            pending, in_pending = [], 0
    bar.close()
    model.train(was_training)
    features = torch.cat(done + pending) if (done or pending) else torch.empty(0, model.num_features)
    check_features(features, f"{model.name} on {split.name}")
    if use_cache:
        cache.save("features", key, {"features": features})
        for i in range(len(done)):
            cache.entry_path("features-part", {**key, "part": i}).unlink(missing_ok=True)
    return features


def check_features(features: torch.Tensor, what: str = "features") -> None:
    if features.dim() != 2:
        raise ValueError(f"{what}: features must be (N, D), got shape {tuple(features.shape)}")
    if features.numel() and not torch.isfinite(torch.stack(torch.aminmax(features))).all():  # NaN propagates
        bad = (~torch.isfinite(features)).any(1).nonzero().flatten()
        raise ValueError(f"{what}: {len(bad)} rows hold NaN or inf (first rows {bad[:5].tolist()}); "
                         "check the checkpoint and the input normalisation, or use fp32 instead of bf16")
