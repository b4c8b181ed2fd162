"""Hostile and careless input: checkpoints that would run code, class lists that differ between
splits, broken or unwritable caches, bad arguments."""
import pathlib
import pickle
from functools import partial

import pytest
import torch

from classfilters.models import CifarResNet, UntrustedCheckpointError, build_model, read_checkpoint


class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran")


def malicious_checkpoints(tmp_path):
    marker = tmp_path / "MARKER"
    state = CifarResNet(8).state_dict()
    zipped = tmp_path / "zipped.th"
    torch.save({"state_dict": state, "extra": Payload(marker)}, zipped)
    legacy = tmp_path / "legacy.th"
    torch.save({"state_dict": state, "extra": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.th"  # a plain pickle named .th: runs before torch's "invalid magic number"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    return marker, (zipped, legacy, raw)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_malicious_checkpoint_runs_no_code(tmp_path):
    marker, files = malicious_checkpoints(tmp_path)
    for path in files:
        renamed = path.with_suffix(".pt")  # a .pt goes through the state-dict path, not the CIFAR one
        renamed.write_bytes(path.read_bytes())
        for load, source in ((read_checkpoint, path), (partial(build_model, "resnet8"), path),
                             (partial(build_model, "resnet8"), renamed), (partial(build_model, "resnet50"), path)):
            with pytest.raises(UntrustedCheckpointError, match="trust_checkpoint=True") as err:
                load(source)
            assert path.stem in str(err.value) and "run code" in str(err.value)
            assert not marker.exists(), f"loading {path.name} ran its code"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_trusting_a_checkpoint_unpickles_it(tmp_path):
    marker, (zipped, _, _) = malicious_checkpoints(tmp_path)
    model = build_model("resnet8", zipped, trust_checkpoint=True)  # the user said so: the payload runs
    assert marker.read_text() == "code ran"
    assert torch.equal(model.head.weight, torch.load(zipped, weights_only=False)["state_dict"]["linear.weight"])


def test_plain_checkpoints_load_without_trust(tmp_path):
    model = CifarResNet(8, num_classes=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 91.0},
               tmp_path / "m.th")
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    for path in (tmp_path / "m.th", tmp_path / "m.safetensors"):
        loaded = build_model("resnet8", path, num_classes=4)
        assert torch.equal(loaded.head.weight, model.linear.weight)


def test_the_shared_authors_checkpoints_load_safely(shared_data):
    for path in sorted((shared_data / "weights").glob("*.th"))[:2]:
        blob = read_checkpoint(path)
        assert isinstance(blob, dict) and "state_dict" in blob
        build_model(path.name.split("-")[0], path)


def test_a_truncated_checkpoint_says_so(tmp_path):
    torch.save(CifarResNet(8).state_dict(), tmp_path / "full.th")
    data = (tmp_path / "full.th").read_bytes()
    (tmp_path / "cut.th").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="could not be read"):
        read_checkpoint(tmp_path / "cut.th")


# --------------------------------------------------------------------------------------
# The cache: keyed by the forward code, checked on read, never fatal, cleaned after kills

def test_a_model_pooled_differently_gets_its_own_features(digits_model, tmp_path, monkeypatch):
    from classfilters import FeatureModel, extract_features, open_dataset
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))
    test = open_dataset("digits", "test")
    mean = extract_features(digits_model, test, progress=False)
    pooled = FeatureModel(digits_model.body, digits_model.head, pool=lambda maps: maps.amax((2, 3)))
    maxed = extract_features(pooled, test, progress=False)  # same weights, another forward
    assert torch.equal(maxed, extract_features(pooled, test, use_cache=False, progress=False))
    assert not torch.allclose(mean, maxed)


def test_overwritten_bytes_in_an_entry_are_detected(tmp_path, monkeypatch):
    from classfilters import cache
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))
    key = {"what": "test"}
    path = cache.save("features", key, {"features": torch.arange(1000, dtype=torch.float32)})
    data = bytearray(path.read_bytes())
    data[-100:-96] = torch.tensor([12345.0]).numpy().tobytes()  # one value, in place: the file stays valid
    path.write_bytes(bytes(data))
    with pytest.warns(cache.CacheWarning, match="checksum"):
        assert cache.load("features", key) is None
    cache.save("features", key, {"features": torch.arange(1000, dtype=torch.float32)})
    assert torch.equal(cache.load("features", key)["features"], torch.arange(1000, dtype=torch.float32))


def test_a_cache_that_cannot_be_written_is_reported_once_and_skipped(digits_model, tmp_path, monkeypatch):
    import os

    from classfilters import cache, extract_features, open_dataset
    test = open_dataset("digits", "test")
    expected = extract_features(digits_model, test, use_cache=False, progress=False)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    places = [a_file, a_file / "below"]
    if os.geteuid() != 0:  # root writes read-only folders anyway
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o500)
        places.append(read_only)
    for place in places:
        monkeypatch.setenv("CLASSFILTERS_CACHE", str(place))
        with pytest.warns(cache.CacheWarning, match="cannot be written") as caught:
            assert torch.equal(extract_features(digits_model, test, progress=False, checkpoint_every=100), expected)
        assert len([w for w in caught if "cannot be written" in str(w.message)]) == 1


KILLED_WRITE = """
import os, signal, sys, torch
import safetensors.torch
from classfilters import cache
def killed(tensors, filename, metadata=None):
    open(filename, "wb").write(b"half an entry")
    os.kill(os.getpid(), signal.SIGKILL)
cache.save_file = killed
cache.save("features", {"killed": 1}, {"features": torch.zeros(10)})
"""


def test_a_killed_writes_temporaries_are_removed_on_the_next_start(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from classfilters import cache
    folder = tmp_path / "features"
    env = {**os.environ, "CLASSFILTERS_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", KILLED_WRITE], env=env, check=False)
    assert run.returncode == -9
    left = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].read_bytes() == b"half an entry"
    old_theirs = folder / ".tmpAbC123"  # safetensors' own temporary, untouched for two hours
    old_theirs.write_bytes(b"x")
    os.utime(old_theirs, (time.time() - 7200, time.time() - 7200))
    fresh_theirs = folder / ".tmpXyZ789"  # maybe being written right now: kept
    fresh_theirs.write_bytes(b"x")
    live_ours = folder / f".{cache._host()}.{os.getpid()}.abc.tmp"  # a live process's: kept
    live_ours.write_bytes(b"x")
    entry = folder / "0123.safetensors"
    entry.write_bytes(b"x")
    removed = cache.remove_stale_temporaries(folder)
    assert sorted(removed) == sorted([left[0], old_theirs])
    assert fresh_theirs.exists() and live_ours.exists() and entry.exists()
    os.utime(fresh_theirs, (time.time() - 7200, time.time() - 7200))
    subprocess.run([sys.executable, "-c", "from classfilters import cache; cache.writable()"],
                   env=env, check=True)  # what the command line does on start: every kind's folder is swept
    assert not fresh_theirs.exists() and live_ours.exists()


# --------------------------------------------------------------------------------------
# Class lists: every split must hold the model's classes, named alike

def jpeg_tree(root, splits):
    """root/<split>/<class>/<i>.jpg with two tiny random images per class."""
    from torchvision.io import encode_jpeg
    gen = torch.Generator().manual_seed(0)
    for split, classes in splits.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                image = torch.randint(0, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)
                (folder / f"{i}.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())
    return root


CLASSES = ["bird", "cat", "dog"]


@pytest.mark.parametrize(("test_classes", "said"), [
    (["bird", "cat"], r"test has missing \['dog'\]"),
    (CLASSES + ["eel"], r"test has extra \['eel'\]"),
    (["bird", "cat", "dgo"], r"renamed against the train split's: 'dog' -> 'dgo'"),
    (["ant", "bird", "cat"], r"test has missing \['dog'\] and extra \['ant'\]"),
])
def test_differing_class_lists_stop_before_any_work(tmp_path, test_classes, said, capsys):
    from classfilters.cli import main
    from classfilters.data import DatasetError, check_same_classes, open_dataset
    root = jpeg_tree(tmp_path / "tree", {"train": CLASSES, "test": test_classes})
    train, test = open_dataset(f"cifar10:{root}", "train"), open_dataset(f"cifar10:{root}", "test")
    with pytest.raises(DatasetError, match=said):
        check_same_classes({"train": train.classes, "test": test.classes})
    assert main(["--model", "resnet8", "--dataset", f"cifar10:{root}", "--train-epochs", "50"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err
    assert __import__("re").search(said, err)


def test_a_model_with_other_classes_is_refused(tmp_path, capsys):
    from classfilters.cli import main
    root = jpeg_tree(tmp_path / "tree", {"train": CLASSES, "test": CLASSES})
    for suffix, said in ((".th", "resnet8 from .* predicts 10 classes but the train split has 3"),
                         (".pt", r"linear.weight: checkpoint \(10, 64\) vs model \(3, 64\)")):
        torch.save(CifarResNet(8, num_classes=10).state_dict(), tmp_path / f"ten{suffix}")
        assert main(["--model", "resnet8", "--checkpoint", str(tmp_path / f"ten{suffix}"),
                     "--dataset", f"cifar10:{root}"]) == 1
        assert __import__("re").search(said, capsys.readouterr().err)


def test_a_truncated_tar_does_not_load_with_fewer_classes(tmp_path):
    import tarfile

    from classfilters.data import DatasetError, open_dataset
    root = jpeg_tree(tmp_path / "tree", {"train": CLASSES, "test": CLASSES})
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        tf.add(root / "train", "train")
        tf.add(root / "test", "test")
    assert open_dataset(f"cifar10:{whole}", "train").classes == CLASSES
    with tarfile.open(whole) as tf:  # cut at the header of the first member of the last train class
        cut_at = next(m.offset for m in tf if m.name.startswith("train/dog"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    with pytest.raises(DatasetError, match="truncated"):
        open_dataset(f"cifar10:{cut}", "train")
    with pytest.raises(DatasetError, match="truncated"):
        open_dataset(f"cifar10:{cut}", "test")


# --------------------------------------------------------------------------------------
# Arguments: all checked before any work, one line per error

def test_bad_arguments_are_all_said_before_any_work(tmp_path, capsys):
    from classfilters.cli import main
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--model", "resnet8", "--dataset", "digits:extra", "--k", "0", "--k-prime", "1.5",
                 "--batch-size", "0", "--train-epochs", "0", "--device", "cuda:7", "--out", str(blocker / "x.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("python -m classfilters: error: ") for line in lines)
    said = "\n".join(lines)
    for expected in ("--k=0", "--k-prime=1.5", "--batch-size 0", "--train-epochs 0", "digits takes no path",
                     "--device cuda:7", "--out"):
        assert expected in said
    assert len(lines) == 7


def test_a_checkpoint_with_train_epochs_or_a_missing_file_is_refused(tmp_path, capsys):
    from classfilters.cli import main
    assert main(["--model", "resnet8", "--dataset", "digits", "--checkpoint", str(tmp_path / "none.th"),
                 "--train-epochs", "3", "--device", "warp-drive", "--dataset", "mnist"]) == 2
    said = capsys.readouterr().err
    assert "no such file" in said and "--train-epochs applies only" in said and "not a device name" in said
    assert "unknown kind 'mnist'" in said


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_cli_refuses_a_malicious_checkpoint_unless_trusted(tmp_path, capsys):
    from classfilters.cli import main
    marker, files = malicious_checkpoints(tmp_path)
    for path in files:
        assert main(["--model", "resnet8", "--checkpoint", str(path), "--dataset", "digits", "--k", "3"]) == 1
        err = capsys.readouterr().err
        assert "--trust-checkpoint" in err and len(err.strip().splitlines()) == 1
        assert not marker.exists()
    main(["--model", "resnet8", "--checkpoint", str(files[0]), "--dataset", "digits", "--trust-checkpoint"])
    assert marker.exists()  # trusted: unpickled in full, payload included


def test_k_larger_than_the_features_is_said_before_training(capsys):
    from classfilters.cli import main
    assert main(["--model", "resnet8", "--dataset", "digits", "--k", "65", "--train-epochs", "100"]) == 1
    assert "--k=65 is out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The library refuses what cannot give a meaningful number

def planted_setup():
    from conftest import planted

    from classfilters import influential_features
    features, labels = planted()
    head = torch.nn.Linear(features.shape[1], 6)
    return features, labels, head, influential_features(features, labels, 3, 3)


@pytest.mark.parametrize(("spoil", "said"), [
    (lambda f, y: (f.index_put((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"))), y), "NaN or inf"),
    (lambda f, y: (f.index_put((torch.tensor([4]), torch.tensor([2])), torch.tensor(float("inf"))), y), "NaN or inf"),
    (lambda f, y: (f, y.float() + 0.5), "integer class indices"),
    (lambda f, y: (f, torch.where(y == 5, 6, y)), r"must lie in \[0, 6\); found 0..6"),
    (lambda f, y: (f, y - 1), r"must lie in \[0, 6\)"),
    (lambda f, y: (f, y[:-1]), "shape"),
    (lambda f, y: (f[:, :-1], y), "columns"),
])
def test_evaluate_and_grid_refuse_bad_features_and_labels(spoil, said):
    from classfilters import evaluate, grid_accuracy
    features, labels, head, influence = planted_setup()
    bad_features, bad_labels = spoil(features.clone(), labels.clone())
    with pytest.raises((ValueError, TypeError), match=said):
        evaluate(head, influence, bad_features, bad_labels)
    with pytest.raises((ValueError, TypeError), match=said):
        grid_accuracy(features, labels, bad_features, bad_labels, head, [1, 3], [1, 3])
    with pytest.raises((ValueError, TypeError), match=said):
        grid_accuracy(bad_features, bad_labels, features, labels, head, [1, 3], [1, 3])


def test_float_labels_are_refused_by_algorithm_1():
    from classfilters import influential_features
    features, labels, _, _ = planted_setup()
    with pytest.raises(TypeError, match="integer class indices"):
        influential_features(features, labels.float(), 3, 3)


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_all_zero_rows_are_warned_about(device):
    from classfilters import influential_features
    features, labels, _, _ = planted_setup()
    features[:7] = 0
    if device == "torch":
        features = features.double()  # not a kernel dtype: the torch path
    with pytest.warns(UserWarning, match="7 of 240 rows are all zero"):
        influence = influential_features(features, labels, 3, 3)
    assert influence.histograms[0, 2] >= 7  # the 7 zero rows (class 0) vote for features 0, 1 and 2
    with pytest.warns(UserWarning, match="240 of 240 rows are all zero"):
        influential_features(torch.zeros_like(features), labels, 3, 3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        influential_features(features[7:], labels[7:], 3, 3, num_classes=6)


@pytest.mark.skipif(not __import__("classfilters.topk_cpu").topk_cpu.HAS_COMPRESS, reason="needs AVX-512")
def test_every_compaction_gives_the_same_top_k():
    from classfilters.influence import topk_indices
    from classfilters.topk_cpu import COMPACTIONS, topk_rows_cpu
    gen = torch.Generator().manual_seed(1)
    for n, d, k in ((300, 64, 5), (200, 2048, 50), (50, 33, 1), (40, 100, 17)):
        features = torch.relu(torch.randn(n, d, generator=gen))
        expected = topk_indices(features, k).sort(1).values
        for name in COMPACTIONS:
            assert torch.equal(torch.from_numpy(topk_rows_cpu(features, k, name)[0]).long(), expected), name


def test_a_compaction_the_cpu_lacks_is_refused(monkeypatch):
    from classfilters import topk_cpu
    monkeypatch.setattr(topk_cpu, "HAS_COMPRESS", False)
    assert topk_cpu.compaction(None) == topk_cpu.COMPACTIONS["scalar"]  # the fallback, picked by itself
    with pytest.raises(ValueError, match="needs AVX-512"):
        topk_cpu.compaction("register")
    with pytest.raises(ValueError, match="compress must be"):
        topk_cpu.compaction("fast")


NO_AVX512 = """
import torch
from classfilters import influential_features, topk_cpu
from classfilters.influence import topk_indices
assert not topk_cpu.HAS_COMPRESS
features = torch.relu(torch.randn(300, 100, generator=torch.Generator().manual_seed(0)))
top, _, _ = topk_cpu.topk_rows_cpu(features, 7)
assert torch.equal(torch.from_numpy(top).long(), topk_indices(features, 7).sort(1).values)
print("scalar ok")
"""


def test_the_kernel_compiles_and_is_exact_on_a_cpu_without_avx512(tmp_path):
    """numba made to target a Haswell (AVX2, no AVX-512), as on a CPU that lacks it: the AVX-512
    paths must still compile (LLVM aborts on AVX-512 intrinsics otherwise) and the scalar one run."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx2,+fma,+popcnt,+sse4.2,-avx512f",
           "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", NO_AVX512], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "scalar ok" in run.stdout, run.stderr[-2000:]
