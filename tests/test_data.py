"""Datasets: digits offline, archives and folders decoded once, clear errors for bad copies."""
import tarfile

import pytest
import torch
from torchvision.io import encode_png

from classfilters import DatasetError, open_dataset
from classfilters.data import load_image_folder


def test_digits_split_is_stratified_and_disjoint():
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797
    assert torch.bincount(test.labels).min() >= 35
    assert train.fingerprint != test.fingerprint


def _png(seed, size=(3, 12, 12)):
    return encode_png(torch.randint(0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))).numpy().tobytes()


def _write_tree(root, classes=("a", "b"), per_class=3, split="train"):
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / split / c / f"{i:04d}.png").write_bytes(_png(hash((c, i)) % 1000))


def test_tree_folder_and_archive_agree_and_are_cached(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")
    folder = open_dataset(f"cifar10:{tmp_path / 'tree'}", "train")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree" / "train", arcname="train")
    archive = open_dataset(f"cifar10:{tmp_path / 'tree.tar.gz'}", "train")
    assert folder.classes == archive.classes == ["a", "b"]
    assert torch.equal(folder.images, archive.images) and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    from classfilters import archives
    monkeypatch.setattr(archives, "read_tree", lambda *a: pytest.fail("the decoded cache was not used"))
    assert torch.equal(open_dataset(f"cifar10:{tmp_path / 'tree.tar.gz'}", "train").images, archive.images)


def test_missing_corrupt_and_incomplete_datasets(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*torchvision"):
        open_dataset(f"cifar10:{tmp_path / 'nowhere.tar.gz'}", "train")
    _write_tree(tmp_path / "tree")
    with tarfile.open(tmp_path / "good.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree" / "train", arcname="train")
    blob = (tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        open_dataset(f"cifar10:{tmp_path / 'cut.tar.gz'}", "train")
    (tmp_path / "tree" / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="class 'empty' has no images"):
        open_dataset(f"cifar10:{tmp_path / 'tree'}", "train")
    with pytest.raises(DatasetError, match="no 'test' folder"):
        open_dataset(f"cifar10:{tmp_path / 'tree'}", "test")
    (tmp_path / "tree" / "train" / "empty" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="could not be decoded"):
        open_dataset(f"cifar10:{tmp_path / 'tree'}", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("mnist", "train")


def test_torchvision_cifar_without_internet_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFILTERS_DATA", str(tmp_path))
    from classfilters import data
    with pytest.raises(DatasetError, match="local copy"):
        data._cifar10_torchvision(tmp_path, "train", download=False)


def test_imagenet_style_folder_is_resized_and_cropped(tmp_path):
    for c in ("n01", "n02"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "val" / c / f"{i}.JPEG").write_bytes(_png(i, (3, 300 + 20 * i, 260)))
    split = open_dataset(f"imagefolder:{tmp_path}", "test")
    image, label = split.dataset[3]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and label == 1
    assert split.classes == ["n01", "n02"] and len(split) == 4
    (tmp_path / "val" / "n03").mkdir()
    with pytest.raises(DatasetError, match="class 'n03' has no images"):
        load_image_folder(tmp_path, "val")


def test_an_image_folder_with_train_and_test_splits(tmp_path):
    """<root>/train and <root>/test (no val/): test/ is the test split, never a class of the root; a missing split
    beside the others is named, not read as the root's class folders. A root of class folders may have a class
    named test or train."""
    for split, classes, n in (("train", ("a", "b"), 1), ("test", ("a", "b", "c"), 2)):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / c / f"{i}.png").write_bytes(_png(i, (3, 32, 32)))
    test = open_dataset(f"imagefolder:{tmp_path}", "test")
    assert test.classes == ["a", "b", "c"] and len(test) == 6
    assert open_dataset(f"imagefolder:{tmp_path}", "train").classes == ["a", "b"]
    __import__("shutil").rmtree(tmp_path / "test")
    with pytest.raises(DatasetError, match=r"has no val/ or test/ folder"):
        open_dataset(f"imagefolder:{tmp_path}", "test")
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", "val")
    flat = tmp_path / "flat"
    for c in ("cat", "test", "train"):
        (flat / c).mkdir(parents=True)
        (flat / c / "0.png").write_bytes(_png(0, (3, 32, 32)))
    for split in ("val", "train"):
        assert load_image_folder(flat, split).classes == ["cat", "test", "train"]
