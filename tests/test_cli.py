"""The command line end to end on digits: trains, finds the features, writes the JSON."""
import json
import subprocess
import sys

from classfilters import InfluentialFeatures
from classfilters.cli import main

# The fast checks first (a mutation run stops at the first failure)

def test_an_image_folder_is_read_at_the_size_and_standardised_as_the_weights_expect(tmp_path, monkeypatch, capsys):
    """Weights name their preprocessing (input size, mean, std): the image folder is decoded at that size and both
    splits are standardised with that mean and std, not the folder defaults (256 -> 224, the dataset's own)."""
    from test_security import CLASSES, jpeg_tree

    from classfilters import cli
    real_build, real_extract, seen = cli.build_model, cli.extract_features, []

    def build(name, checkpoint=None, **kw):  # a small model that names its preprocessing, as pretrained weights do
        model = real_build("resnet8", num_classes=kw["num_classes"], in_channels=kw["in_channels"])
        model.input_size, model.mean, model.std = (36, 32, "bilinear"), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
        return model

    def extract(model, split, **kw):
        seen.append((tuple(split.dataset[0][0].shape), split.mean, split.std))
        return real_extract(model, split, **kw)
    monkeypatch.setattr(cli, "build_model", build)
    monkeypatch.setattr(cli, "extract_features", extract)
    root = jpeg_tree(tmp_path / "tree", {"train": CLASSES, "val": CLASSES})
    assert main(["--model", "resnet18", "--pretrained", "--dataset", f"imagefolder:{root}", "--device", "cpu",
                 "--k", "2", "--k-prime", "2", "--out", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    assert seen == [((3, 32, 32), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))] * 2


def test_a_class_without_training_images_is_said_not_dropped(monkeypatch, capsys):
    """Algorithm 1 is told the dataset's number of classes: a class whose training images are all gone (here the
    last digit) is an error that names it, not a result with one class fewer."""
    import dataclasses

    from classfilters import build_model, cli
    real_open = cli.open_dataset

    def open_dataset(spec, split="train", size=None):
        s = real_open(spec, split, size)
        keep = s.labels != 9 if split == "train" else slice(None)
        return dataclasses.replace(s, images=s.images[keep], labels=s.labels[keep], fingerprint=f"{s.fingerprint}-{split}")
    monkeypatch.setattr(cli, "open_dataset", open_dataset)
    monkeypatch.setattr(cli, "trained_model", lambda name, split, recipe, device=None: build_model(
        "resnet8", num_classes=10, in_channels=split.images.shape[1]))
    assert main(["--model", "resnet8", "--dataset", "digits", "--no-cache", "--device", "cpu"]) == 1
    assert "classes [9] have no training images" in capsys.readouterr().err


def test_the_json_holds_one_value_a_line_and_the_runs_seconds_to_a_tenth(tmp_path, monkeypatch):
    """The seconds are the whole run's, from the arguments checked to the result (a clock that reads 1000.0 then
    1012.34 gives 12.3); the JSON is indented (one value a line: two runs' files compare line by line)."""
    from types import SimpleNamespace

    from classfilters import cli
    clock = iter([1000.0, 1012.34])
    monkeypatch.setattr(cli, "time", SimpleNamespace(time=lambda: next(clock)))
    out = tmp_path / "r.json"
    assert main([*checkpoint_file(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert json.loads(text)["seconds"] == 12.3
    assert text == json.dumps(json.loads(text), indent=1)


def test_cli_on_digits(tmp_path):
    out = tmp_path / "digits.json"
    assert main(["--model", "resnet8", "--dataset", "digits", "--train-epochs", "3", "--k", "5", "--k-prime", "0.8",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == [str(c) for c in range(10)]
    assert len(result["indices"]) == 10 and result["k_prime"] == 0.8
    test = result["test"]
    assert 0.5 < test["acc_full"] <= 1 and 0 < test["acc_decomposed"] <= 1
    assert abs(test["relative"] - test["acc_decomposed"] / test["acc_full"]) < 1e-9
    assert test["multiply_adds_full"] == 640 and test["multiply_adds_decomposed"] == sum(map(len, result["indices"]))
    assert InfluentialFeatures.from_dict(result).num_features == 64
    # k' = 0.8 by hand from the histograms: each class's smallest set of most-counted features holding 80 % of
    # its k x n_c picks (ties among equal counts may order either way)
    from classfilters import open_dataset
    per_class = open_dataset("digits", "train").labels.bincount(minlength=10).tolist()
    for c, (counts, chosen) in enumerate(zip(result["histograms"], result["indices"])):
        assert sum(counts) == 5 * per_class[c]
        ranked = sorted(counts, reverse=True)
        m = next(m for m in range(1, 65) if sum(ranked[:m]) >= 0.8 * sum(counts))
        assert len(chosen) == m and sorted((counts[j] for j in chosen), reverse=True) == ranked[:m]


def test_cli_reports_bad_k():
    proc = subprocess.run([sys.executable, "-m", "classfilters", "--model", "resnet8", "--dataset", "digits",
                           "--k", "abc"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "neither a count" in proc.stderr


def test_cli_json_from_a_safetensors_checkpoint_with_and_without_the_cache(tmp_path):
    """The JSON of a run on given weights (issue 16: .safetensors checkpoints, --no-cache, provenance): the
    index sets and histograms are Algorithm 1 on the train split's features, the provenance names what made
    them, --no-cache writes no features to the cache, and the cached run gives the same JSON."""
    import os
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from classfilters import build_model, extract_features, influential_features, open_dataset
    from classfilters.cifar_resnet import CifarResNet
    torch.manual_seed(3)
    save_file(CifarResNet(8, num_classes=10, in_channels=1).state_dict(), tmp_path / "m.safetensors")
    root = Path(os.environ["CLASSFILTERS_CACHE"])

    def cached():  # the features and their saved parts, with each file's modification time
        return {p: p.stat().st_mtime_ns for kind in ("features", "features-part") for p in (root / kind).glob("*")}

    before = cached()
    args = ["--model", "resnet8", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", "digits",
            "--k", "3", "--k-prime", "5", "--device", "cpu"]
    assert main([*args, "--no-cache", "--out", str(tmp_path / "a.json")]) == 0
    assert cached() == before                                  # --no-cache: no features written
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    after = cached()
    assert len(after) == len(before) + 2                       # train and test features cached
    assert main([*args, "--out", str(tmp_path / "c.json")]) == 0
    assert cached() == after                                   # read back from the cache, nothing rewritten
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    for result in (b, c):
        assert {k: v for k, v in result.items() if k != "seconds"} == {k: v for k, v in a.items() if k != "seconds"}
    train = open_dataset("digits", "train")
    model = build_model("resnet8", tmp_path / "m.safetensors", num_classes=10, in_channels=1)
    expected = influential_features(extract_features(model, train, device="cpu", use_cache=False), train.labels, 3, 5)
    assert a["indices"] == expected.indices and a["histograms"] == expected.histograms.tolist()
    assert (a["k"], a["k_prime"], a["rank_by"], a["num_features"]) == (3, 5, expected.rank_by, 64)
    prov = a["provenance"]
    assert (prov["model"], prov["checkpoint"], prov["dataset"]) == ("resnet8", str(tmp_path / "m.safetensors"),
                                                                     "digits")
    assert prov["torch"] == torch.__version__ and prov["classfilters"] == __import__("classfilters").__version__
    import platform
    assert prov == {"model": "resnet8", "checkpoint": str(tmp_path / "m.safetensors"), "dataset": "digits",
                    "classfilters": prov["classfilters"], "torch": torch.__version__,
                    "python": platform.python_version(), "num_train": len(train)}
    for result in (a, b, c):  # wall seconds of the whole run, to a tenth
        assert 0 <= result["seconds"] < 600 and result["seconds"] == round(result["seconds"], 1)


def test_pretrained_weights_load_offline_from_torchvision_cache(tmp_path, monkeypatch, capsys):
    """--pretrained reads torchvision's weights where torchvision keeps them ($TORCH_HOME/hub/checkpoints; the
    file stands in for the download), with the preprocessing its metadata names; the CLI passes --pretrained
    through and compares the weights' 1000 classes with the dataset's before any work (issue 16)."""
    import torch
    import torchvision
    from test_security import CLASSES, jpeg_tree

    from classfilters import build_model
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, folder / weights.url.rsplit("/", 1)[1])
    model = build_model("resnet18", pretrained="IMAGENET1K_V1")
    assert torch.equal(model.head.weight, state["fc.weight"]) and model.num_classes == 1000
    assert list(model.mean) == list(weights.transforms().mean) and list(model.std) == list(weights.transforms().std)
    preset = weights.transforms()
    assert model.input_size == (preset.resize_size[0], preset.crop_size[0], preset.interpolation.value)
    root = jpeg_tree(tmp_path / "tree", {"train": CLASSES, "val": CLASSES})
    assert main(["--model", "resnet18", "--pretrained", "--dataset", f"imagefolder:{root}", "--device", "cpu"]) == 1
    assert "error: resnet18 predicts 1000 classes but the train split has 3" in capsys.readouterr().err  # no checkpoint named


# --------------------------------------------------------------------------------------
# Arguments: every problem said at once, before any work, each with what to do

def parsed(*extra):
    from classfilters.cli import parse_args
    return parse_args(["--model", "resnet8", "--dataset", "digits", *extra])


def test_sizes_parse_as_counts_or_fractions():
    import argparse

    import pytest

    from classfilters.cli import size
    assert size("5") == 5 and isinstance(size("5"), int)
    assert size("0.9") == 0.9 and isinstance(size("0.9"), float)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'abc' is neither a count \(5\) nor a fraction of mass"):
        size("abc")
    args = parsed()
    from classfilters.sizes import DEFAULT_K
    assert (args.k, args.k_prime, args.batch_size, args.pretrained, args.train_epochs, args.no_cache) == \
        (DEFAULT_K, DEFAULT_K, 256, False, None, False)
    assert parsed("--pretrained").pretrained is True and parsed("--pretrained", "IMAGENET1K_V1").pretrained == "IMAGENET1K_V1"


def test_every_bad_argument_is_said_in_order(tmp_path):
    from classfilters.cli import parse_args, validate
    args = parse_args(["--model", "resnet8", "--dataset", "cifar10:/no/such/place", "--k", "0", "--k-prime", "1.5",
                       "--batch-size", "0", "--train-epochs", "0", "--checkpoint", str(tmp_path / "missing.th"),
                       "--device", "warp-drive", "--out", str(tmp_path)])
    errors = validate(args)
    assert errors == [
        "--k=0 is out of range: a count must lie between 1 and D (or give a fraction of mass in (0, 1], e.g. 0.9)",
        "--k-prime=1.5 is out of range: a fraction of mass must lie in (0, 1] (or give a count, e.g. 5)",
        "--batch-size 0: must be at least 1",
        ("--train-epochs 0: must be at least 1 (an untrained model gives meaningless features; pass --checkpoint or "
         "--pretrained for given weights)"),
        f"--checkpoint {tmp_path / 'missing.th'}: no such file",
        "--dataset cifar10:/no/such/place: /no/such/place does not exist",
        "--device warp-drive: not a device name; use cpu, cuda or cuda:<index>",
        f"--out {tmp_path}: is a folder; give a file name, e.g. {tmp_path / 'result.json'}"]
    assert validate(parsed("--k", "1", "--k-prime", "1.0", "--batch-size", "1", "--train-epochs", "1")) == []


def test_train_epochs_with_given_weights_is_refused(tmp_path):
    from classfilters.cli import validate
    checkpoint = tmp_path / "w.th"
    checkpoint.write_bytes(b"x")
    said = "--train-epochs applies only when the model is trained here: drop it, or drop --checkpoint / --pretrained"
    assert validate(parsed("--checkpoint", str(checkpoint), "--train-epochs", "3")) == [said]
    assert validate(parsed("--pretrained", "--train-epochs", "3")) == [said]
    assert validate(parsed("--checkpoint", str(checkpoint))) == []


def test_dataset_specs(tmp_path, monkeypatch):
    from classfilters.cli import _dataset_errors
    assert _dataset_errors("digits") == [] and _dataset_errors("cifar10") == []
    assert _dataset_errors(f"imagefolder:{tmp_path}") == [] and _dataset_errors(f"cifar10:{tmp_path}") == []
    assert _dataset_errors("mnist") == [("--dataset mnist: unknown kind 'mnist'; use digits, cifar10, cifar10:<path> "
                                         "or imagefolder:<path>")]
    assert _dataset_errors("digits:x") == [("--dataset digits:x: digits takes no path (it is scikit-learn's bundled "
                                            "set); pass 'digits'")]
    for spec in ("imagefolder", "imagefolder:"):
        assert _dataset_errors(spec) == [f"--dataset {spec}: imagefolder needs a path, e.g. imagefolder:/data/imagenet"]
    assert _dataset_errors(f"imagefolder:{tmp_path / 'gone'}") == [
        f"--dataset imagefolder:{tmp_path / 'gone'}: {tmp_path / 'gone'} does not exist"]
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    assert _dataset_errors("imagefolder:~/data") == []  # ~ is the home folder


def test_device_names(monkeypatch):
    import types

    import torch

    from classfilters.cli import _device_errors
    assert _device_errors(None) == [] and _device_errors("cpu") == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device_errors("cuda") == ["--device cuda: no CUDA GPU is available here; use --device cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _device_errors("cuda") == [] and _device_errors("cuda:1") == []
    assert _device_errors("cuda:2") == ["--device cuda:2: there are 2 CUDA GPUs (cuda:0..cuda:1)"]
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert _device_errors("xpu") == ["--device xpu: no xpu device is available here"]
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    assert _device_errors("xpu:0") == []
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    assert _device_errors("mps") == ["--device mps: no mps device is available here"]
    assert _device_errors("meta") == ["--device meta: no meta device is available here"]  # no backend at all
    monkeypatch.delattr(torch, "mps")  # a backend found under torch.backends only
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _device_errors("mps") == []
    monkeypatch.setattr(torch.backends, "mps", types.SimpleNamespace())  # a backend that cannot say: not available
    assert _device_errors("mps") == ["--device mps: no mps device is available here"]


def test_output_paths(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from classfilters.cli import _out_errors
    assert _out_errors(None) == [] and _out_errors(tmp_path / "new" / "deeper" / "r.json") == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _out_errors(a_file) == []  # overwritten
    said = f"--out {a_file / 'r.json'}: cannot be written (check the folder's permissions)"
    assert _out_errors(a_file / "r.json") == [said]
    from classfilters import cli
    asked = []

    def refuse(path, mode):  # as for a folder or file we may not write (root may write anything)
        asked.append((Path(path), mode))
        return False
    monkeypatch.setattr(cli.os, "access", refuse)
    assert _out_errors(tmp_path / "r.json") == [(f"--out {tmp_path / 'r.json'}: cannot be written (check the folder's "
                                                 "permissions)")]
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != a_file)  # the folder yes, the file no
    assert _out_errors(a_file) == [f"--out {a_file}: cannot be written (check the folder's permissions)"]


# --------------------------------------------------------------------------------------
# main: the exit codes and what it prints

def checkpoint_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from classfilters.cifar_resnet import CifarResNet
    torch.manual_seed(5)
    save_file(CifarResNet(8, num_classes=10, in_channels=1).state_dict(), tmp_path / "m.safetensors")
    return ["--model", "resnet8", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", "digits",
            "--k", "3", "--k-prime", "4", "--device", "cpu"]


def test_bad_arguments_exit_2_with_one_line_each(tmp_path, capsys):
    assert main(["--model", "resnet8", "--dataset", "mnist", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m classfilters: error: --batch-size 0: must be at least 1",
        ("python -m classfilters: error: --dataset mnist: unknown kind 'mnist'; use digits, cifar10, cifar10:<path> "
         "or imagefolder:<path>")]


def test_the_json_goes_to_stdout_without_out_and_the_summary_to_stderr(tmp_path, capsys):
    assert main(checkpoint_file(tmp_path)) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    test = result["test"]
    assert captured.err.splitlines()[-1] == (
        f"resnet8 on digits: full {test['acc_full']:.4f}, decomposed {test['acc_decomposed']:.4f}, relative "
        f"{test['relative']:.4f}, multiply-adds {test['multiply_adds_full']} -> {test['multiply_adds_decomposed']}")
    assert test["multiply_adds_full"] == 640 and test["multiply_adds_decomposed"] == 4 * 10


def test_only_rank_0_writes(tmp_path, capsys, monkeypatch):
    from classfilters import cli
    monkeypatch.setattr(cli, "init_distributed", lambda: (1, 1))
    assert main([*checkpoint_file(tmp_path), "--out", str(tmp_path / "r.json")]) == 0
    assert not (tmp_path / "r.json").exists() and capsys.readouterr().out == ""


def test_errors_during_the_work_are_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    import pytest

    from classfilters import cli
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--model", "resnet8", "--dataset", f"imagefolder:{empty}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m classfilters: error: ") and "\n" not in err and "--debug" not in err

    def boom(*a):
        raise RuntimeError("kernel\n   failed")
    monkeypatch.setattr(cli, "compute", boom)
    assert main(args) == 1
    assert capsys.readouterr().err == ("python -m classfilters: error: kernel failed (RuntimeError; run with --debug "
                                       "for the traceback)\n")
    with pytest.raises(RuntimeError, match="kernel"):
        main([*args, "--debug"])


def test_warnings_are_printed_as_one_line(tmp_path, capsys, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(blocked))
    assert main(checkpoint_file(tmp_path)) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"python -m classfilters: warning: the cache folder {blocked}") for line in err)


def test_the_readme_lists_every_option_as_the_help_says_it(monkeypatch):
    """README's option list is the parser's options, metavars, required marks and help texts (so the README is
    never stale and no help text goes astray); `--help` prints each of them under the module's one-line summary."""
    import re

    from conftest import options_text, readme_options

    from classfilters import cli
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at the terminal's width, breaking at hyphens
    parser = cli.parser()
    listed = readme_options("python -m classfilters")
    assert listed == options_text(parser)
    assert [line.split()[0] for line in listed.splitlines() if not line.startswith(" ")] == [
        "--model", "--checkpoint", "--trust-checkpoint", "--pretrained", "--dataset", "--k", "--k-prime",
        "--train-epochs", "--batch-size", "--device", "--no-cache", "--out", "--debug"]
    assert "--model MODEL (required)" in listed and "--dataset DATASET (required)" in listed
    assert listed.count("(required)") == 2 and "--pretrained [WEIGHTS]" in listed
    said = " ".join(parser.format_help().split())
    assert said.startswith("usage: python -m classfilters [-h] --model MODEL")
    assert ("Command line: influential features of a model on a dataset, with test accuracies, as JSON. options:"
            in said)
    for a in parser._actions:
        assert " ".join(a.help.split()) in said, a.dest
    assert re.search(r"--k K features kept per image: .*\(default 5\)", said)


def test_the_model_is_trained_with_the_recipe_the_arguments_say(tmp_path, monkeypatch, capsys):
    """Without weights: --train-epochs (else 30) on the train split, flipped except for the digits (8x8 glyphs
    are not mirror-symmetric), on --device; an untrained copy is checked first."""
    from test_security import CLASSES, jpeg_tree

    from classfilters import Recipe, cli, open_dataset
    asked = []

    def trained_model(name, split, recipe, device=None):
        asked.append((name, split.fingerprint, recipe, device))
        raise RuntimeError("stop here")
    monkeypatch.setattr(cli, "trained_model", trained_model)
    assert main(["--model", "resnet8", "--dataset", "digits", "--train-epochs", "3", "--device", "cpu"]) == 1
    assert main(["--model", "resnet8", "--dataset", "digits"]) == 1
    root = jpeg_tree(tmp_path / "tree", {"train": CLASSES, "test": CLASSES})
    assert main(["--model", "resnet8", "--dataset", f"cifar10:{root}", "--train-epochs", "2"]) == 1
    digits, tree = open_dataset("digits", "train").fingerprint, open_dataset(f"cifar10:{root}", "train").fingerprint
    assert asked == [("resnet8", digits, Recipe(epochs=3, flip=False), "cpu"),
                     ("resnet8", digits, Recipe(epochs=30, flip=False), None),
                     ("resnet8", tree, Recipe(epochs=2, flip=True), None)]
    assert capsys.readouterr().err.count("stop here") == 3


def test_under_torchrun_the_group_is_left_and_the_process_ends_with_the_code(tmp_path, monkeypatch, capsys):
    """With several ranks, main leaves the process group, flushes and ends the process with the exit code (not the
    interpreter's teardown, which gloo's threads sometimes abort), whether the work succeeded or failed."""
    import pytest
    import torch

    from classfilters import cli
    left, ended = [], []

    def end(code):
        ended.append(code)
        raise SystemExit(code)
    monkeypatch.setattr(cli, "init_distributed", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: left.append(True))
    monkeypatch.setattr(cli.os, "_exit", end)
    with pytest.raises(SystemExit):
        main([*checkpoint_file(tmp_path), "--out", str(tmp_path / "r.json")])
    assert (left, ended) == ([True], [0]) and json.loads((tmp_path / "r.json").read_text())["k"] == 3
    monkeypatch.setattr(cli, "compute", lambda *a: 1 / 0)
    with pytest.raises(SystemExit):
        main(checkpoint_file(tmp_path))
    assert (left, ended) == ([True, True], [0, 1]) and "ZeroDivisionError" in capsys.readouterr().err
    monkeypatch.setattr(cli, "init_distributed", lambda: (0, 1))  # one process: a plain return, nothing left
    monkeypatch.setattr(cli, "compute", lambda *a: 0)
    assert main(checkpoint_file(tmp_path)) == 0 and (left, ended) == ([True, True], [0, 1])


def test_the_json_goes_into_new_folders_and_k_prime_is_checked_against_d(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "r.json"
    assert main([*checkpoint_file(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["k_prime"] == 4
    capsys.readouterr()
    assert main([*checkpoint_file(tmp_path), "--k-prime", "65"]) == 1
    assert capsys.readouterr().err == ("python -m classfilters: error: --k-prime=65 is out of range: a count must lie "
                                       "between 1 and D=64 (or give a fraction of mass in (0, 1], e.g. 0.9)\n")
