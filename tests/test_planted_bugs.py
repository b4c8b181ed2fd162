"""Tests written against behaviour that a deliberate one-line bug would break (issue 16).

Each test names the planted bug it kills; expected values come from hand-built cases or from an
independent recomputation, never from the output under test.
"""
import json

import pytest
import torch
from torch import nn

import classfilters as cf
import classfilters.cli
from classfilters.ablation import non_influential_mask
from classfilters.visualize import class_maps


def test_from_dict_keeps_every_field():
    """Planted bug: `InfluentialFeatures.from_dict` ignores `rank_by` (a saved magnitude ranking reloads as value)."""
    features = torch.randn(60, 12, generator=torch.Generator().manual_seed(1))  # negative entries: magnitude
    labels = torch.arange(3).repeat_interleave(20)
    influence = cf.influential_features(features, labels, k=3, k_prime=2, provenance={"who": "test"})
    assert influence.rank_by == "magnitude"
    back = cf.InfluentialFeatures.from_dict(json.loads(json.dumps(influence.to_dict())))
    assert back.rank_by == "magnitude"
    assert (back.k, back.k_prime, back.provenance, back.indices) == (3, 2, influence.provenance, influence.indices)
    assert back.provenance["who"] == "test"
    assert torch.equal(back.histograms, influence.histograms)


class ConstantMaps(nn.Module):
    """A body whose channel j is the constant map values[j] (4 x 4) for every image."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values.float())

    def forward(self, x):
        return self.values[None, :, None, None].expand(len(x), -1, 4, 4).clone()


def test_table7_maps_average_exactly_their_channels():
    """Planted bug: Table 7's "influential" map averages all channels instead of those of I_y."""
    d, num_classes = 10, 3
    influence = cf.InfluentialFeatures([[0, 3], [1, 4], [2, 5]], torch.zeros(num_classes, d, dtype=torch.int64),
                                       2, 2)
    split = cf.open_dataset("digits", "test")
    index = torch.tensor([0, 1, 2])
    images, labels = split.images[index], torch.tensor([0, 1, 2])
    values = torch.arange(1, d + 1).float()           # channel j is worth j + 1
    model = cf.FeatureModel(ConstantMaps(values), nn.Linear(d, num_classes))
    _, raw = class_maps(model, split, images, labels, influence, seed=0)
    expected_influential = torch.tensor([values[[0, 3]].mean(), values[[1, 4]].mean(), values[[2, 5]].mean()])
    assert torch.allclose(raw[:, 2], expected_influential)
    assert torch.allclose(raw[:, 0], values.mean().expand(3))
    chosen = non_influential_mask(influence, seed=0)[labels]
    assert not (chosen & influence.mask[labels]).any() and (chosen.sum(1) == 2).all()
    assert torch.allclose(raw[:, 1], (values * chosen).sum(1) / 2)


def test_trained_model_cache_key_holds_the_recipe():
    """Planted bug: the trained-model cache key leaves out the recipe (a new recipe returns the old model)."""
    split = cf.open_dataset("digits", "train").subset(torch.arange(64))
    trained = cf.trained_model("resnet8", split, cf.Recipe(epochs=1, batch_size=32, lr=0.05, flip=False),
                               device="cpu", progress=False)
    frozen = cf.trained_model("resnet8", split, cf.Recipe(epochs=1, batch_size=32, lr=0.0, weight_decay=0.0,
                                                          flip=False), device="cpu", progress=False)
    torch.manual_seed(0)  # trained_model's seeded initialisation
    init = cf.build_model("resnet8", num_classes=10, in_channels=1)
    conv = next(name for name, p in init.named_parameters() if p.dim() == 4)
    assert torch.equal(dict(frozen.named_parameters())[conv], dict(init.named_parameters())[conv])  # lr 0: untouched
    assert not torch.equal(dict(trained.named_parameters())[conv], dict(init.named_parameters())[conv])


def test_trained_model_cache_key_holds_the_code_and_versions(monkeypatch):
    """A cached model is never returned for other code: a changed forward or another torch trains anew."""
    import classfilters.cache as cache_module
    import classfilters.train as train_module
    from classfilters.cifar_resnet import BasicBlock
    split = cf.open_dataset("digits", "train").subset(torch.arange(32))
    recipe = cf.Recipe(epochs=1, batch_size=32, lr=0.05, flip=False)
    calls = []
    real = train_module.train_classifier
    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(2):
        cf.trained_model("resnet8", split, recipe, seed=5, device="cpu", progress=False)
    assert len(calls) == 1                                   # the second call is a cache hit
    original = BasicBlock.forward
    monkeypatch.setattr(BasicBlock, "forward", lambda self, x: original(self, x) * 1.0)
    cache_module._class_source_hash.cache_clear()                # as a new process after the edit would
    cf.trained_model("resnet8", split, recipe, seed=5, device="cpu", progress=False)
    assert len(calls) == 2                                   # another forward: trained again
    monkeypatch.setattr(BasicBlock, "forward", original)
    cache_module._class_source_hash.cache_clear()
    monkeypatch.setattr(train_module, "library_versions", lambda: {"torch": "0.0", "torchvision": "0.0"})
    cf.trained_model("resnet8", split, recipe, seed=5, device="cpu", progress=False)
    assert len(calls) == 3                                   # another torch: trained again
    monkeypatch.setattr(train_module, "SOURCE_DIGEST", "edited")
    cf.trained_model("resnet8", split, recipe, seed=5, device="cpu", progress=False)
    assert len(calls) == 4                                   # train.py edited: trained again


def test_cli_scores_the_test_split(tmp_path):
    """Planted bug: the CLI scores on the train split instead of the test split."""
    out = tmp_path / "digits.json"
    assert cf.cli.main(["--model", "resnet8", "--dataset", "digits", "--train-epochs", "2", "--device", "cpu",
                        "--k", "4", "--k-prime", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    train, test = cf.open_dataset("digits", "train"), cf.open_dataset("digits", "test")
    model = cf.trained_model("resnet8", train, cf.Recipe(epochs=2, flip=False), device="cpu")  # the CLI's (cached)
    influence = cf.InfluentialFeatures.from_dict(result)
    features = cf.extract_features(model, test, device="cpu")
    with torch.no_grad():
        logits = model.head.float()(features)
    assert result["test"]["acc_full"] == (logits.argmax(1) == test.labels).float().mean().item()
    masked = features @ (model.head.weight.float() * influence.mask).T + model.head.bias.float()
    assert result["test"]["acc_decomposed"] == (masked.argmax(1) == test.labels).float().mean().item()


def test_decomposed_softmax_table_scores_each_class_in_its_subspace():
    """Planted bug: the "decomposed" softmax table computed from the full head's logits."""
    from classfilters import tables
    from classfilters.session import Subject
    head = nn.Linear(3, 2)
    head.weight.data = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    head.bias.data = torch.tensor([0.5, -0.5])
    influence = cf.InfluentialFeatures([[2], [0, 1]], torch.zeros(2, 3, dtype=torch.int64), 1, 2)
    phi = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    split = cf.ImageSplit(torch.tensor([0, 1, 0]), ["a", "b"], "toy", "toy", images=torch.zeros(3, 1, 2, 2,
                                                                                                   dtype=torch.uint8))
    subject = Subject("toy", cf.FeatureModel(nn.Identity(), head), split, split, phi, phi)
    table = tables.softmax_table(subject, cf.DecomposedHead(head, influence), n=3)
    z = torch.stack([phi[:, 2] * 3.0 + 0.5, phi[:, 0] * 4.0 + phi[:, 1] * 5.0 - 0.5], 1)  # by hand
    expected = z.softmax(1)
    assert table["p_decomposed"].tolist() == pytest.approx(expected.max(1).values.tolist())
    assert table["pred_decomposed"].tolist() == [["a", "b"][i] for i in expected.argmax(1)]
    with torch.no_grad():
        full = head(phi).softmax(1)
    assert table["p_full"].tolist() == pytest.approx(full.max(1).values.tolist())
    assert table["p_full"].tolist() != pytest.approx(table["p_decomposed"].tolist())
