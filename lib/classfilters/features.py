"""Batched extraction of the pooled penultimate features phi(x), cached on disk, on one GPU or many.

`extract_features(model, split)` runs the model over a split in batches (no DataLoader for
in-memory splits; worker processes for streamed folders) in channels_last (1.2-2x faster
convolutions on the CPU too), with bf16 autocast on the GPU, shows a tqdm bar, and returns
float32 (N, D) features in dataset order. The body runs under autocast, but its maps are pooled
in float32: pooled in bf16 (8 significant bits) many features of a row would round to the same
value, and the top-k of Algorithm 1 would be decided by ties.

- Cache: keyed by the model's weights and forward code (body, pool, head: `cache.code_identity`),
  the split's fingerprint, the normalisation, the precision, the memory format and the torch /
  torchvision versions; a changed checkpoint or pooling never reuses a stale entry (see cache.py).
- Resumable: progress is saved every `checkpoint_every` images; an interrupted run resumes.
- Many processes: under `torchrun` (torch.distributed initialised, e.g. by `init_distributed`),
  rank r extracts the r-th contiguous slice and the slices are gathered, so every rank gets
  all N rows in dataset order, with no padded duplicates.
- Out of GPU memory: the run goes on in chunks of half the batch, saying so (retried after the
  handler, so the failed pass is freed first; later batches keep the reduced size).
- Several models: `extract_features_many` reads, decodes and normalises each batch once for all.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from . import cache
from .checks import check_features
from .data import FolderImages, ImageSplit
from .decode import decode_folder_batches
from .device import default_device, init_distributed, world  # noqa: F401 -- init_distributed: re-exported
from .models import FeatureModel, fingerprint, global_average_pool
from .progress import tqdm


@functools.cache
def library_versions() -> dict:
    """torch and torchvision: convolutions and image decoding (libjpeg, resizing) may change with them."""
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def batches(split: ImageSplit, batch_size: int, start: int = 0, stop: int | None = None, num_workers: int | None = None,
            device=None):
    """Yield uint8 (B, C, H, W) batches of images start..stop of `split`, in order.

    Image folders are decoded in batches on the GPU when `device` is one (decode.py), else
    by DataLoader workers."""
    stop = len(split) if stop is None else stop
    if split.images is not None:
        for i in range(start, stop, batch_size):
            yield split.images[i:min(i + batch_size, stop)]
        return
    if device is not None and torch.device(device).type == "cuda" and isinstance(split.dataset, FolderImages):
        yield from decode_folder_batches(split.dataset, batch_size, start, stop, device)
        return
    subset = torch.utils.data.Subset(split.dataset, range(start, stop))
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers  # decoding workers
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available())
    for images, _ in loader:
        yield images


@torch.no_grad()
def extract_features(model: FeatureModel, split: ImageSplit, batch_size: int = 256, device=None,
                     bf16: bool | None = None, use_cache: bool = True, progress: bool = True,
                     checkpoint_every: int = 50_000) -> torch.Tensor:
    """phi(x) for every image of `split`, float32 (N, D), on the CPU (on every rank)."""
    return extract_features_many({"model": model}, split, batch_size, device, bf16, use_cache, progress,
                                 checkpoint_every)["model"]


@torch.no_grad()
def extract_features_many(models: dict[str, FeatureModel], split: ImageSplit, batch_size: int = 256, device=None,
                          bf16: bool | None = None, use_cache: bool = True, progress: bool = True,
                          checkpoint_every: int = 50_000) -> dict[str, torch.Tensor]:
    """`extract_features` for several models over one pass of the data: each batch is read,
    decoded and normalised once and fed to every model (a depth study's 13 models share it)."""
    device = torch.device(device) if device is not None else default_device()
    bf16 = (device.type == "cuda") if bf16 is None else bf16
    # without the cache no key is needed: no weights hashed (431 M parameters for the depth study)
    keys = {name: {"model": fingerprint(m), "forward": cache.code_identity(m), "data": split.fingerprint,
                   "mean": split.mean, "std": split.std, "precision": "bf16" if bf16 else "fp32",
                   "memory_format": "channels_last", "n": len(split), "versions": library_versions()}
            if use_cache else {"model": name}
            for name, m in models.items()}
    result = {}
    for name, key in keys.items():
        if use_cache and (hit := cache.load("features", key)) is not None:
            result[name] = hit["features"]
    todo = {name: m for name, m in models.items() if name not in result}
    if not todo:
        return result
    rank, size = world()
    start, stop = len(split) * rank // size, len(split) * (rank + 1) // size
    part_keys = {name: {**keys[name], "slice": [start, stop]} for name in todo}
    modes = {name: m.training for name, m in todo.items()}
    for m in models.values():  # all of them, cached or not: no model is left split across devices
        m.to(device, memory_format=torch.channels_last)
    for m in todo.values():
        m.eval()
    features, parts = _extract_slice(todo, split, start, stop, part_keys, batch_size, device, bf16, use_cache,
                                     progress and rank == 0, checkpoint_every)
    for name, m in todo.items():
        m.train(modes[name])
        phi = _gather_in_order(features[name], len(split), device) if size > 1 else features[name]
        check_features(phi, f"{m.name} on {split.name}")
        if use_cache and rank == 0:
            cache.save("features", keys[name], {"features": phi})
        for i in range(parts if use_cache else 0):  # the saved progress is no longer needed once the whole result is
            cache.discard("features-part", {**part_keys[name], "part": i})
        result[name] = phi
    return {name: result[name] for name in models}


def _extract_slice(models, split, start, stop, keys, batch_size, device, bf16, use_cache, progress, checkpoint_every):
    """Features of images start..stop for every model, resuming from the parts all models saved."""
    done = {name: [] for name in models}
    if use_cache:  # resume from saved parts (as many as every model has)
        for name in models:
            while (part := cache.load("features-part", {**keys[name], "part": len(done[name])})) is not None:
                done[name].append(part["features"])
        common = min(len(d) for d in done.values())
        done = {name: d[:common] for name, d in done.items()}
    any_done = next(iter(done.values()))
    first = start + sum(len(p) for p in any_done)
    pending, in_pending = {name: [] for name in models}, 0
    chunk = {name: batch_size for name in models}  # the largest chunk that fits, per model
    label = next(iter(models.values())).name if len(models) == 1 else f"{len(models)} models"
    bar = tqdm(total=stop - start, initial=first - start, desc=f"features {label} / {split.name}",
               disable=not progress, unit="img")
    for images in batches(split, batch_size, first, stop, device=device):
        x = split.normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        for name, m in models.items():  # copied out without waiting: the GPU runs ahead of the host
            phi, chunk[name] = forward_with_backoff(m, x, chunk[name], bf16, bar.write)
            pending[name].append(phi.to("cpu", non_blocking=True))
        in_pending += len(images)
        bar.update(len(images))
        if use_cache and in_pending >= checkpoint_every:
            _wait_for_copies(device)
            for name in models:
                part = torch.cat(pending[name])
                cache.save("features-part", {**keys[name], "part": len(done[name])}, {"features": part})
                done[name].append(part)
                pending[name] = []
            in_pending = 0
    bar.close()
    _wait_for_copies(device)
    features = {name: torch.cat(done[name] + pending[name]) if (done[name] or pending[name])
                else torch.empty(0, m.num_features) for name, m in models.items()}
    return features, len(any_done)


def _wait_for_copies(device) -> None:
    """The non-blocking device-to-host copies of the features are complete after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pooled_features(model: FeatureModel, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """phi(x), float32: the body under bf16 autocast when `bf16`, the pooling always in float32
    (outside autocast), so that rounding creates no ties among the pooled features."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model.forward_maps(x) if model.has_spatial_maps else model.body(x)  # pooled below in float32
    with torch.autocast(x.device.type, enabled=False):
        out = out.float()
        if model.pool is not None:
            return model.pool(out).float()
        return (global_average_pool(out) if out.dim() == 4 else out).float()


def forward_with_backoff(model, x, chunk: int, bf16: bool, say=print) -> tuple[torch.Tensor, int]:
    """(phi of the batch `x` computed in chunks of `chunk` images, the chunk size that fitted).

    On CUDA out-of-memory the chunk is halved and the batch redone. The retry happens after the
    `except` block: inside it the traceback would keep the failed pass's activations alive."""
    while True:
        try:
            return torch.cat([pooled_features(model, x[a:a + chunk], bf16) for a in range(0, len(x), chunk)]), chunk
        except torch.cuda.OutOfMemoryError:
            if min(chunk, len(x)) == 1:
                raise
        failed = min(chunk, len(x))  # the failed pass is gone: free its blocks, then retry smaller
        chunk = failed // 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        say(f"out of GPU memory at batch size {failed}: going on with {chunk}", file=sys.stderr)


def _gather_in_order(local: torch.Tensor, n: int, device) -> torch.Tensor:
    """Concatenate every rank's contiguous slice, in rank order, dropping the padding."""
    _, size = world()
    sizes = [n * (r + 1) // size - n * r // size for r in range(size)]
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(max(sizes), local.shape[1], device=backend_device)
    padded[:len(local)] = local.to(backend_device)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s].cpu() for g, s in zip(gathered, sizes)])
