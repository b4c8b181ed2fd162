"""Datasets as uint8 image tensors with labels: digits, CIFAR-10, ImageNet-style folders.

`open_dataset(spec, split)` understands
  "digits"                 scikit-learn's bundled 8x8 handwritten digits (no download; 80/20 split)
  "cifar10"                torchvision's CIFAR-10 under $CLASSFILTERS_DATA (downloaded when online)
  "cifar10:<path>"         a local copy: torchvision's folder or archive, or a JPEG tree / archive
                           laid out as <split>/<class>/*.jpg (e.g. ../shared/data/cifar10-jpeg.tar.gz)
  "imagefolder:<path>"     an ImageNet-style tree <path>/<split>/<class>/*.JPEG, decoded lazily,
                           resized to 256 and centre-cropped to 224
and returns an `ImageSplit`. Small datasets are held in memory as one uint8 tensor
(N, C, H, W); decoding a JPEG archive is done once and cached (see cache.py).

About 310 lines: the three sources share `ImageSplit` and its fingerprint, and each one's layout
checks (which folder is a split, a class, a truncated archive) belong with its reader.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import cache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(RuntimeError):
    """A dataset that is missing, corrupt or laid out in a way we cannot read."""


@functools.cache
def channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) mean and std on `device`, made once: copying them from the host every batch
    would make the GPU wait for the host at every step."""
    return torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)


@dataclass
class ImageSplit:
    """One split of a dataset: uint8 images in memory (or a lazy `dataset`), labels, classes.

    fingerprint identifies the source, split and decoding: feature caches are keyed by it.
    """
    labels: torch.Tensor                  # int64 (N,)
    classes: list[str]
    name: str
    fingerprint: str
    images: torch.Tensor | None = None    # uint8 (N, C, H, W), when held in memory
    dataset: Dataset | None = None        # yields (uint8 CHW tensor, label), when streamed
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float, scaled to [0, 1] and standardised."""
        mean, std = channel_stats(tuple(self.mean), tuple(self.std), batch.device)
        return (batch.float() / 255 - mean) / std

    def subset(self, index: torch.Tensor) -> ImageSplit:
        """The images at `index`. A lazily decoded folder stays a `FolderImages` (of the chosen
        files), so a subset is decoded the way the whole split is (batched on the GPU, decode.py);
        any other streamed dataset is wrapped in a `torch.utils.data.Subset`."""
        index = torch.as_tensor(index, dtype=torch.long)
        fingerprint = f"{self.fingerprint}[{cache.key_hash({'i': index.tolist()})}]"
        if self.images is not None:
            return ImageSplit(self.labels[index], self.classes, self.name, fingerprint,
                              images=self.images[index], mean=self.mean, std=self.std, meta=self.meta)
        if self.dataset is None:
            raise ValueError("subset() needs images in memory or a dataset")
        chosen = index.tolist()
        if isinstance(self.dataset, FolderImages):
            d = self.dataset
            dataset = FolderImages([d.files[i] for i in chosen], [d.labels[i] for i in chosen], d.resize, d.crop,
                                   d.interpolation)
        else:
            dataset = torch.utils.data.Subset(self.dataset, chosen)
        return ImageSplit(self.labels[index], self.classes, self.name, fingerprint, dataset=dataset,
                          mean=self.mean, std=self.std, meta=self.meta)


def folder_transform(size: tuple | None) -> tuple[int, int, str]:
    """(resize, crop, interpolation) of an image folder read at `size` = (resize, crop[, interpolation])
    or None (torchvision's usual 256, 224, bilinear)."""
    size = tuple(size or (256, 224))
    if len(size) not in (2, 3):
        raise ValueError(f"an image folder's size is (resize, crop) or (resize, crop, interpolation), got {size}")
    return int(size[0]), int(size[1]), size[2] if len(size) == 3 else "bilinear"


def data_root() -> Path:
    """Where torchvision downloads go: $CLASSFILTERS_DATA, else the checkout's data/ (see data/README.md),
    else ~/.cache/classfilters/data for an installed package without a checkout."""
    if "CLASSFILTERS_DATA" in os.environ:
        return Path(os.environ["CLASSFILTERS_DATA"])
    checkout = Path(__file__).resolve().parents[2] / "data"
    return checkout if (checkout / "manifest.json").is_file() else Path.home() / ".cache" / "classfilters" / "data"


def open_dataset(spec: str, split: str = "train", size: tuple | None = None) -> ImageSplit:
    """`size`: (resize, crop[, interpolation]) of an image folder's images (default 256, 224, bilinear);
    other datasets ignore it."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train' or 'test' ('val' for image folders), got {split!r}")
    kind, _, path = spec.partition(":")
    if kind == "digits":
        if path:
            raise ValueError(f"digits takes no path (it is scikit-learn's bundled set), got {spec!r}: pass 'digits'")
        return load_digits(split)
    if kind == "cifar10":
        return load_cifar10(split, path or None)
    if kind == "imagefolder":
        if not path:
            raise ValueError("imagefolder needs a path: imagefolder:/data/imagenet")
        return load_image_folder(path, "val" if split == "test" else split, *folder_transform(size))
    raise ValueError(f"unknown dataset {spec!r}: use digits, cifar10, cifar10:<path> or imagefolder:<path>")


# --------------------------------------------------------------------------------------


def load_digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16 scaled to 0..255), stratified split."""
    import sklearn
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = torch.from_numpy((bunch.images * (255 / 16)).round()).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=bunch.target)
    index = torch.tensor(train_idx if split == "train" else test_idx)
    train_pixels = images[torch.tensor(train_idx)].float() / 255
    return ImageSplit(labels[index], [str(c) for c in range(10)], "digits",
                      f"digits-sklearn{sklearn.__version__}-{split}-{test_fraction}-{seed}",
                      images=images[index], mean=(train_pixels.mean().item(),), std=(train_pixels.std().item(),))


def load_cifar10(split: str, source: str | None = None) -> ImageSplit:
    """CIFAR-10 from torchvision (download when online) or from a local folder / archive."""
    if source is None:
        return _cifar10_torchvision(data_root(), split, download=True)
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"CIFAR-10 copy {path} does not exist. Pass 'cifar10' to download it with "
                           "torchvision, or the path of a local copy (torchvision's folder or archive, "
                           "or a <split>/<class>/*.jpg tree or .tar.gz)")
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file():
            root = path if (path / "cifar-10-batches-py").is_dir() else path.parent
            return _cifar10_torchvision(root, split, download=False)
        return _decoded_tree(path, split, "cifar10", cache.folder_digest(path, IMAGE_SUFFIXES))
    if path.name.endswith("cifar-10-python.tar.gz"):
        return _cifar10_torchvision(path.parent, split, download=False)
    return _decoded_tree(path, split, "cifar10", cache.file_digest(path))


def _cifar10_torchvision(root: Path, split: str, download: bool) -> ImageSplit:
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except Exception as e:
        raise DatasetError(f"CIFAR-10 could not be loaded from {root} ({e}). With internet, pass 'cifar10' "
                           "and torchvision downloads it (set CLASSFILTERS_DATA to choose where); without, "
                           "pass cifar10:<path> to a local copy.") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(torch.tensor(ds.targets), list(ds.classes), "cifar10",
                      f"cifar10-torchvision-{split}", images=images)


def _decoded_tree(path: Path, split: str, name: str, digest: str) -> ImageSplit:
    """A <split>/<class>/<file> tree (folder or tar archive) decoded once and cached as uint8."""
    import torchvision

    from . import archives  # it imports DatasetError from here
    key = {"source": digest, "split": split, "layout": "split/class/file", "torchvision": torchvision.__version__}
    hit = cache.load("decoded", key)
    if hit is None:
        files = archives.read_tree(path, split)
        classes = sorted(files)
        images, labels = [], []
        for label, cls in enumerate(classes):
            if not files[cls]:
                raise DatasetError(f"class '{cls}' has no images in {path} ({split}); the copy is incomplete")
            images += [data for _, data in sorted(files[cls])]
            labels += [label] * len(files[cls])
        decoded = archives.decode_all(images, path)
        hit = {"images": decoded, "labels": torch.tensor(labels),
               "classes": torch.tensor(list("\n".join(classes).encode()), dtype=torch.uint8)}
        cache.save("decoded", key, hit)
    classes = bytes(hit["classes"].tolist()).decode().split("\n")
    return ImageSplit(hit["labels"], classes, name, f"{name}-{digest[:16]}-{split}", images=hit["images"],
                      meta={"source": str(path)})


def check_same_classes(splits: dict[str, list[str]], num_classes: int | None = None, model: str = "the model") -> None:
    """Refuse class lists that differ between splits (or from a model's number of classes), naming the
    difference: each split numbers its own sorted class folders, so a missing, extra or renamed class
    would silently score images as another class."""
    (first, reference), *others = splits.items()
    problems = []
    for name, classes in others:
        if list(classes) == list(reference):
            continue
        missing = [c for c in reference if c not in classes]
        extra = [c for c in classes if c not in reference]
        pairs = [(a, b) for a, b in zip(reference, classes) if a != b]
        if len(classes) == len(reference) and missing and all(a in missing and b in extra for a, b in pairs):
            renamed = [f"{a!r} -> {b!r}" for a, b in pairs]
            problems.append(f"the {name} split's classes are renamed against the {first} split's: "
                            + ", ".join(renamed[:5]) + (" ..." if len(renamed) > 5 else ""))
        elif missing or extra:
            parts = ([f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else "")] if missing else []) + \
                    ([f"extra {extra[:5]}" + (" ..." if len(extra) > 5 else "")] if extra else [])
            problems.append(f"the {name} split has {len(classes)} classes and the {first} split {len(reference)}: "
                            f"{name} has " + " and ".join(parts))
        else:
            problems.append(f"the {name} split orders its classes differently from the {first} split")
    if num_classes is not None and num_classes != len(reference):
        problems.append(f"{model} predicts {num_classes} classes but the {first} split has {len(reference)}")
    if problems:
        raise DatasetError("; ".join(problems) + ". Every split must hold the same classes as the model "
                           "(the same folder names); fix the copy or pick the matching model.")


# --------------------------------------------------------------------------------------


class FolderImages(Dataset):
    """Lazily decoded, resized (shorter side, antialiased) and centre-cropped images of a
    <root>/<class>/<file> tree; `interpolation` is torchvision's name ("bilinear", "bicubic")."""

    def __init__(self, files: list[Path], labels: list[int], resize: int = 256, crop: int = 224,
                 interpolation: str = "bilinear"):
        from torchvision.transforms import InterpolationMode
        try:
            InterpolationMode(interpolation)
        except ValueError:
            raise ValueError(f"unknown interpolation {interpolation!r}: use one of "
                             f"{[m.value for m in InterpolationMode]}") from None
        self.files, self.labels, self.resize, self.crop = files, labels, resize, crop
        self.interpolation = interpolation

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_image
        try:
            img = decode_image(str(self.files[i]), ImageReadMode.RGB)
        except Exception as e:
            raise DatasetError(f"{self.files[i]} could not be decoded ({e}); remove or replace it") from e
        return resize_crop(img, self.resize, self.crop, self.interpolation), self.labels[i]


def resize_crop(img: torch.Tensor, size: int, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """torchvision's evaluation transform on a uint8 image: shorter side to `size`, centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import center_crop, resize
    img = resize(img, [size], interpolation=InterpolationMode(interpolation), antialias=True)
    return center_crop(img, [crop, crop])


def _holds_class_folders(folder: Path) -> bool:
    """Whether `folder` is a split (it holds class folders), not a class (it holds images): a root of class
    folders may have a class named train, val or test."""
    return folder.is_dir() and any(child.is_dir() for child in folder.iterdir())


def load_image_folder(root: str | Path, split: str = "val", resize: int = 256, crop: int = 224,
                      interpolation: str = "bilinear") -> ImageSplit:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected {root}/{split}/<class>/<images>")
    names = (split, "test") if split == "val" else (split,)  # the test split is val/ (ImageNet) or else test/
    split_dir = next((root / name for name in names if _holds_class_folders(root / name)), root)
    if split_dir == root and any(_holds_class_folders(root / name) for name in ("train", "val", "test")):
        raise DatasetError(f"image folder {root} has no {' or '.join(f'{n}/' for n in names)} folder beside its "
                           f"other splits; expected {root}/{split}/<class>/<images>")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<images>")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted(f for f in (split_dir / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DatasetError(f"class '{cls}' has no images in {split_dir / cls}")
        files += found
        labels += [label] * len(found)
    digest = cache.folder_digest(split_dir, IMAGE_SUFFIXES)
    return ImageSplit(torch.tensor(labels), classes, f"imagefolder-{root.name}",
                      f"imagefolder-{digest[:16]}-{split}-{resize}-{crop}"
                      + ("" if interpolation == "bilinear" else f"-{interpolation}"),
                      dataset=FolderImages(files, labels, resize, crop, interpolation), meta={"source": str(root)})
