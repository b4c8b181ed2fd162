"""Batched JPEG decoding for image folders: files read by worker threads, decoded together.

On a GPU, `decode_folder_batches` decodes each batch with torchvision's batched nvJPEG
decoder (`decode_jpeg(list, device="cuda")`), then resizes and centre-crops on the GPU as
`data.resize_crop` does: the CPU only reads bytes. On the CPU it decodes the same way with
libjpeg. Either way the result equals `data.FolderImages` (the per-image reference path)
up to resampling differences between devices. Files that are not JPEG (PNG, ...) are
decoded one by one.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .data import DatasetError, FolderImages, resize_crop


def read_bytes(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def decode_resize_crop(blobs: list[torch.Tensor], device: torch.device, resize: int, crop: int,
                       names=None, interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (B, 3, crop, crop) from encoded images: decode (batched for JPEG), resize, centre-crop."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    is_jpeg = [len(b) > 2 and int(b[0]) == 0xFF and int(b[1]) == 0xD8 for b in blobs]
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    try:
        if jpegs:
            decoded = decode_jpeg([blobs[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpegs, decoded):
                images[i] = img
        for i, j in enumerate(is_jpeg):
            if not j:
                images[i] = decode_image(blobs[i], ImageReadMode.RGB).to(device)
    except Exception as e:
        where = f" among {[str(n) for n in names][:3]}..." if names is not None else ""
        raise DatasetError(f"a file could not be decoded{where} ({e}); remove or replace it") from e
    return torch.stack([resize_crop(img, resize, crop, interpolation) for img in images])


def decode_folder_batches(dataset: FolderImages, batch_size: int, start: int, stop: int, device,
                          threads: int = 8):
    """Yield uint8 batches of images start..stop of a `FolderImages`, in order, decoded on `device`."""
    device = torch.device(device)
    with ThreadPoolExecutor(threads) as pool:
        ranges = [(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
        reads = [pool.map(read_bytes, dataset.files[a:b]) for a, b in ranges[:2]]  # read ahead one batch
        for n, (a, b) in enumerate(ranges):
            blobs = list(reads[n])
            if n + 2 < len(ranges):
                reads.append(pool.map(read_bytes, dataset.files[ranges[n + 2][0]:ranges[n + 2][1]]))
            yield decode_resize_crop(blobs, device, dataset.resize, dataset.crop, dataset.files[a:b],
                                     dataset.interpolation)
