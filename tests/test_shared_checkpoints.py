"""The shared CIFAR-10 checkpoints load exactly: 20/20 lossless PNGs, 81.0 % on the JPEG test split."""
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_image

from classfilters import build_model, evaluate, extract_features, influential_features, open_dataset
from classfilters.data import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINTS = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
               56: "resnet56-4bfd9763.th"}
EXPECTED_PNG = {20: 20, 32: 19, 44: 20, 56: 20}  # ../shared/data/README.md


@pytest.mark.parametrize("depth", sorted(CHECKPOINTS))
def test_lossless_pngs(shared_data, depth):
    model = build_model(f"resnet{depth}", shared_data / "weights" / CHECKPOINTS[depth]).eval()
    files = sorted((shared_data / "cifar10-lossless-sample").glob("*.png"))
    images = torch.stack([decode_image(str(f)) for f in files]).float() / 255
    x = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    labels = torch.tensor([int(Path(f).stem.split("_")[-1]) for f in files])
    with torch.no_grad():
        assert (model(x).argmax(1) == labels).sum().item() == EXPECTED_PNG[depth]


@pytest.mark.slow
def test_resnet20_on_the_jpeg_test_split(shared_data):
    model = build_model("resnet20", shared_data / "weights" / CHECKPOINTS[20])
    test = open_dataset(f"cifar10:{shared_data / 'cifar10-jpeg.tar.gz'}", "test")
    assert len(test) == 10_000 and test.classes[3] == "cat"
    features = extract_features(model, test, progress=False)
    # Algorithm 1 on the test features only to exercise the real shapes; accuracy uses the full head
    result = evaluate(model.head, influential_features(features, test.labels, 5, 5), features, test.labels)
    assert result["acc_full"] == pytest.approx(0.810, abs=0.003)
    assert 0.5 < result["relative"] <= 1.05


def test_checkpoint_that_does_not_match(shared_data, tmp_path):
    with pytest.raises(ValueError, match="ResNet-32, not the requested ResNet-20"):
        build_model("resnet20", shared_data / "weights" / CHECKPOINTS[32])
    with pytest.raises(ValueError, match="does not match"):
        build_model("resnet50", shared_data / "weights" / CHECKPOINTS[20])
    cut = tmp_path / "cut.th"
    cut.write_bytes((shared_data / "weights" / CHECKPOINTS[20]).read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not be read"):
        build_model("resnet20", cut)
