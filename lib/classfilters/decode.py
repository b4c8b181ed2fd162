"""Batched JPEG decoding for image folders: files read by worker threads, decoded together.

On a GPU, `decode_folder_batches` decodes each batch with torchvision's batched nvJPEG
decoder (`decode_jpeg(list, device="cuda")`), then resizes and centre-crops on the GPU as
`data.resize_crop` does: the CPU only reads bytes. On the CPU it decodes the same way with
libjpeg. Each GPU decode first waits for the current stream (nvJPEG writes on a stream of its
own). A batch the decoder refuses (nvJPEG cannot read CMYK JPEGs) is decoded image by image on
the CPU, and a file that fails there too is named. Either way the result equals
`data.FolderImages` (the per-image reference path) up to resampling differences between devices. Files that are not JPEG (PNG, ...) are
decoded one by one.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .data import DatasetError, FolderImages, resize_crop


def read_bytes(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def decode_resize_crop(blobs: list[torch.Tensor], device: torch.device, resize: int, crop: int,
                       names=None, interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (B, 3, crop, crop) from encoded images: decode (batched for JPEG), resize, centre-crop.
    A batch the GPU decoder refuses (nvJPEG cannot read CMYK JPEGs) is decoded image by image on
    the CPU; a file that fails there too is named."""
    from torchvision.io import ImageReadMode, decode_image
    device = torch.device(device)

    is_jpeg = [len(b) > 2 and int(b[0]) == 0xFF and int(b[1]) == 0xD8 for b in blobs]
    names = [str(n) for n in names] if names is not None else [f"image {i}" for i in range(len(blobs))]
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    if jpegs:
        try:
            for i, img in zip(jpegs, _decode_jpeg_batch([blobs[i] for i in jpegs], device)):
                images[i] = img
        except RuntimeError as e:  # nvJPEG refuses CMYK files, libjpeg a corrupt one: decode one by one
            if device.type == "cuda":
                warnings.warn(f"the GPU decoder refused a batch ({e}); decoding it image by image on the CPU",
                              stacklevel=2)
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = decode_image(blobs[i], ImageReadMode.RGB).to(device)
            except RuntimeError as e:
                raise DatasetError(f"{names[i]} could not be decoded ({e}); remove or replace it") from e
    return torch.stack([resize_crop(img, resize, crop, interpolation) for img in images])


def _decode_jpeg_batch(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Batched `decode_jpeg` on `device` (nvJPEG on CUDA, libjpeg on the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if device.type == "cuda":
        # torchvision's CUDA decoder allocates its outputs on the current stream but nvJPEG writes on
        # its own stream, which does not wait for ours: kernels still queued on ours (the last batch's
        # resize) may be reading blocks the decoder is about to reuse. Let them finish first.
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


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
