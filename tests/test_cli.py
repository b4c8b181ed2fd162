"""The command line end to end on digits: trains, finds the features, writes the JSON."""
import json
import subprocess
import sys

from classfilters import InfluentialFeatures
from classfilters.cli import main


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


def test_pretrained_weights_load_offline_from_torchvision_cache(tmp_path, monkeypatch, capsys):
    """--pretrained reads torchvision's weights where torchvision keeps them ($TORCH_HOME/hub/checkpoints; the
    file stands in for the download), with the preprocessing its metadata names; the CLI passes --pretrained
    through and compares the weights' 1000 classes with the dataset's before any work (issue 16)."""
    import torch
    import torchvision

    from classfilters import build_model
    from test_security import CLASSES, jpeg_tree
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
    assert "predicts 1000 classes but the train split has 3" in capsys.readouterr().err
