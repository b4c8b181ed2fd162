"""Reading a <split>/<class>/<file> image tree from a folder or a tar archive, and decoding it.

An archive cut short is refused: tarfile stops quietly at a cut or a bad header, which would
load a split with images or whole classes missing, so the reader records why reading stopped
and accepts only a proper end-of-archive marker.
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import torch

from .data import IMAGE_SUFFIXES, DatasetError


def read_tree(path: Path, split: str) -> dict[str, list[tuple[str, bytes]]]:
    files: dict[str, list[tuple[str, bytes]]] = {}
    if path.is_dir():
        split_dir = path / split
        if not split_dir.is_dir():
            raise DatasetError(f"{path} has no '{split}' folder; expected {path}/{split}/<class>/*.jpg")
        for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files[cls_dir.name] = [(f.name, f.read_bytes()) for f in cls_dir.iterdir()
                                   if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        try:
            with tarfile.open(path, tarinfo=EndCheckingTarInfo) as tf:
                for m in tf:
                    parts = Path(m.name).parts
                    parts = parts[parts.index(split):] if split in parts else ()
                    if len(parts) == 2 and m.isdir():
                        files.setdefault(parts[1], [])
                    if len(parts) == 3 and m.isfile() and Path(parts[2]).suffix.lower() in IMAGE_SUFFIXES:
                        files.setdefault(parts[1], []).append((parts[2], tf.extractfile(m).read()))
                end = getattr(tf, "end", None)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DatasetError(f"{path} is not a readable archive ({type(e).__name__}: {e}); it may be "
                               "truncated or corrupt: copy or download it again") from e
        if not isinstance(end, tarfile.EOFHeaderError):  # tarfile stops quietly at a cut or a bad header
            raise DatasetError(f"{path} ends before its end-of-archive marker ({end or 'no end found'}): it is "
                               "truncated or corrupt and would load with images or classes missing; copy or "
                               "download it again")
    if not files:
        raise DatasetError(f"no '{split}/<class>/<image>' files found in {path}")
    return files


class EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the archive why reading stopped: only a zero block (EOFHeaderError) is a proper end."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as e:
            archive.end = e
            raise


def decode_all(blobs: list[bytes], source: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), ImageReadMode.RGB))
        except Exception as e:
            raise DatasetError(f"image {i} of {source} could not be decoded ({e}); the copy is corrupt") from e
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) != 1:
        raise DatasetError(f"images in {source} have different sizes {sorted(shapes)[:3]}; use imagefolder: for those")
    return torch.stack(out)
