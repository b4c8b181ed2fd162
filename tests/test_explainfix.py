"""ExplainFix: DCT basis, fixed filters, spectra, saliency, ChannelPrune, class-subset export, bad input."""
import copy
import json
import math
import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from classfilters import (
    INITS,
    FeatureModel,
    Recipe,
    as_feature_model,
    build_model,
    channel_prune,
    class_subset_model,
    dct_basis,
    diagonal_order,
    export_subset_model,
    fill_zero,
    filter_saliency,
    fix_spatial_filters,
    layer_spectrum,
    load_subset_model,
    low_frequency_share,
    macs_and_params,
    mask_prunable,
    open_dataset,
    prune_channels,
    resolve_classes,
    restrict_head,
    spatial_convs,
    spectra,
    spectra_figure,
    train_classifier,
    trainable_parameters,
    zero_least_salient,
)


@pytest.fixture(scope="module")
def digits():
    return open_dataset("digits", "train"), open_dataset("digits", "test")


def small_resnet(seed=0, in_channels=1):
    torch.manual_seed(seed)
    return build_model("resnet8", num_classes=10, in_channels=in_channels).eval()


def depthwise_model():
    body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.ReLU())
    return FeatureModel(body, nn.Linear(16, 10))


def randomise_batchnorm(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


# --------------------------------------------------------------------------------------------- DCT basis

@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_dct_basis_is_orthonormal_and_zero_mean(k):
    basis = dct_basis(k).reshape(k * k, k * k)
    assert torch.allclose(basis @ basis.T, torch.eye(k * k, dtype=basis.dtype), atol=1e-12)
    assert torch.allclose(basis[0], torch.full((k * k,), 1 / k, dtype=basis.dtype))
    assert basis[1:].sum(1).abs().max() < 1e-12


def test_dct_basis_raster_convention_and_diagonal_order():
    b = dct_basis(3)
    assert torch.allclose(b[1][:, 0], -b[1][:, 2]) and b[1][:, 1].abs().max() < 1e-12  # (ky=0, kx=1): varies along columns
    assert torch.allclose(b[3], b[1].T)                                              # (1, 0): the same, vertically
    assert diagonal_order(3) == [0, 1, 3, 2, 6, 4, 5, 7, 8]
    assert diagonal_order(5) == [0, 1, 5, 2, 10, 6, 3, 15, 7, 11, 4, 20, 8, 16, 12, 9, 21, 13, 17, 14, 22, 18, 19, 23, 24]


# --------------------------------------------------------------------------------------------- fixed filters

@pytest.mark.parametrize("init", ["DCT2", "GHaar", "Psine", "Unchanged", "KRandom"])
def test_every_spatial_conv_is_fixed_and_the_rest_learns(init):
    model = depthwise_model()
    before = {n: c.weight.detach().clone() for n, c in spatial_convs(model)}
    fix_spatial_filters(model, init, seed=1)
    again = fix_spatial_filters(depthwise_model(), init, seed=1) if init != "Unchanged" else None
    convs = spatial_convs(model)
    assert [n for n, _ in convs] == ["body.0", "body.3"]  # the stem and the depthwise conv, not the 1×1
    for name, conv in convs:
        assert not conv.weight.requires_grad and not conv.bias.requires_grad
        if init == "Unchanged":
            assert torch.equal(conv.weight, before[name])
        else:
            assert not torch.equal(conv.weight, before[name])
            assert torch.equal(conv.weight, dict(spatial_convs(again))[name].weight)  # seeded
    assert model.body[6].weight.requires_grad and model.body[1].weight.requires_grad and model.head.weight.requires_grad
    assert trainable_parameters(model) == 16 * 8 + 16 + 16 * 10 + 10 + 4 * 8  # 1×1, head, two BN


def test_initialisations_have_their_form():
    model = small_resnet()
    fix_spatial_filters(model, "DCT2")
    basis = dct_basis(3).float().reshape(9, 9)
    for _, conv in spatial_convs(model):
        flat = conv.weight.reshape(-1, 9)
        assert torch.allclose((flat @ basis.T).abs().amax(1), torch.ones(len(flat)), atol=1e-5)  # one basis filter each
    fix_spatial_filters(model, "Psine")
    for _, conv in spatial_convs(model):
        assert torch.allclose(conv.weight.flatten(2).norm(dim=2), torch.ones(conv.weight.shape[:2]), atol=1e-5)
    fix_spatial_filters(model, "GHaar")
    for _, conv in spatial_convs(model):  # h·a1ᵀ + v·1aᵀ + d·aaᵀ: rank at most 2
        assert (torch.linalg.matrix_rank(conv.weight.double().reshape(-1, 3, 3), atol=1e-6) <= 2).all()
    fix_spatial_filters(model, "KRandom")
    for _, conv in spatial_convs(model):
        assert conv.weight.abs().max() <= 1 / math.sqrt(conv.weight[0].numel())


def test_guided_steer_draws_from_the_source_layer_density():
    source = small_resnet(seed=3)
    pattern = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])  # Sobel: every source filter c·P
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, conv in spatial_convs(source):
            conv.weight.copy_(torch.randn(conv.weight.shape[:2], generator=gen)[..., None, None] * pattern)
    model = fix_spatial_filters(small_resnet(seed=4), "guidedsteer", source=source, seed=0)
    unit = pattern.flatten() / pattern.norm()
    for (_, conv), (_, src) in zip(spatial_convs(model), spatial_convs(source)):
        flat = conv.weight.reshape(-1, 9)
        cosine = (flat @ unit).abs() / flat.norm(dim=1)
        assert cosine.min() > 0.999                                       # new filters lie along P
        assert not torch.equal(conv.weight, src.weight)
        ratio = flat.norm(dim=1).std() / src.weight.reshape(-1, 9).norm(dim=1).std()
        assert 0.5 < ratio < 2                                            # with the source's spread


def test_shared_checkpoint_guides_a_cifar_resnet20(shared_data):
    source = build_model("resnet20", shared_data / "weights" / "resnet20-12fca82f.th")
    model = fix_spatial_filters(build_model("resnet20"), "GuidedSteer", source=source)
    src = spatial_convs(source)[5][1].weight.reshape(-1, 9)
    new = spatial_convs(model)[5][1].weight.reshape(-1, 9)
    assert torch.allclose(new.mean(0), src.mean(0), atol=3 * float(src.std(0).max().detach()) / math.sqrt(len(src)) + 0.02)


def test_training_leaves_fixed_filters_bit_identical(digits):
    train, _ = digits
    model = fix_spatial_filters(small_resnet(), "DCT2")
    fixed = {n: c.weight.detach().clone() for n, c in spatial_convs(model)}
    bn, head = model.body.model.bn1.weight.detach().clone(), model.head.weight.detach().clone()
    part = train.subset(torch.arange(256))
    train_classifier(model, part, Recipe(epochs=1, batch_size=64, lr=0.05, flip=False), device="cpu", progress=False)
    for name, conv in spatial_convs(model):
        assert torch.equal(conv.weight.detach().contiguous(), fixed[name].contiguous()), name
        assert not conv.weight.requires_grad
    assert not torch.equal(model.body.model.bn1.weight, bn) and not torch.equal(model.head.weight, head)


# --------------------------------------------------------------------------------------------- spectra

def test_a_low_pass_filter_puts_its_energy_at_low_frequencies():
    box = torch.ones(4, 2, 3, 3) + 0.01 * torch.randn(4, 2, 3, 3)
    ed, e1, e0 = layer_spectrum(box)
    assert ed.shape == (9,) and e1.shape == (6,) and e0.shape == (3,)
    assert ed[0] > 0.9 * ed.sum() and e0[0] == e0.max()
    checker = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).expand(4, 2, 3, 3)
    ed, _, e0 = layer_spectrum(checker)
    assert ed.argmax() == 8 and e0.argmax() == 2  # the (2, 2) basis filter, last in diagonal order
    model = depthwise_model()
    with torch.no_grad():
        for _, conv in spatial_convs(model):
            conv.weight.copy_(torch.ones_like(conv.weight))
    table = low_frequency_share(model, null_draws=50)
    assert (table.low_share > 0.99).all() and table.above_null.all()
    assert ((table.null_mean - 1 / 3).abs() < 0.05).all()  # i.i.d. filters: every basis filter alike


def test_spectra_table_and_figure(digits):
    train, _ = digits
    model = small_resnet()
    plain = spectra(model)
    assert set(plain.spectrum) == {"ed", "e1", "e0"} and len(plain) == 7 * (9 + 6 + 3) and not plain.weighted.any()
    weighted = spectra(model, train, classes=[0, 1], max_images=64)
    assert weighted.weighted.all() and not torch.allclose(torch.tensor(plain.energy.values), torch.tensor(weighted.energy.values))
    fig = spectra_figure(weighted)
    assert len(fig.axes) >= 3
    import matplotlib.pyplot as plt
    plt.close(fig)


# --------------------------------------------------------------------------------------------- saliency

def test_saliency_matches_a_manual_gradient(digits):
    train, _ = digits
    model = randomise_batchnorm(small_resnet())
    classes = [2, 5]
    got_wg = filter_saliency(model, train, "weight_grad", classes=classes, max_images=40, batch_size=40)
    got_g = filter_saliency(model, train, "grad", classes=classes, max_images=40, batch_size=40)
    index = torch.nonzero(torch.isin(train.labels, torch.tensor(classes))).flatten()[:40]
    logits = model(train.normalize(train.images[index]))
    conv = model.body.model.layer2[0].conv1
    (grad,) = torch.autograd.grad(logits.gather(1, train.labels[index][:, None]).sum(), [conv.weight])
    name = "body.model.layer2.0.conv1"
    assert torch.allclose(got_wg[name].float(), (conv.weight * grad).abs().sum((2, 3)), rtol=1e-4, atol=1e-7)
    assert torch.allclose(got_g[name].float(), grad.abs().sum((2, 3)), rtol=1e-4, atol=1e-7)
    assert conv.weight.requires_grad  # flags restored


# --------------------------------------------------------------------------------------------- ChannelPrune

def test_zeroing_is_global_and_counts(digits):
    model = small_resnet()
    gen = torch.Generator().manual_seed(1)
    sal = {n: torch.rand(c.weight.shape[:2], generator=gen) for n, c in spatial_convs(model)}
    total = sum(s.numel() for s in sal.values())
    counts = zero_least_salient(model, sal, 37.5)
    assert counts["zeroed"] == math.floor(0.375 * total)
    threshold = torch.cat([s.flatten() for s in sal.values()]).sort().values[counts["zeroed"] - 1]
    for name, conv in spatial_convs(model):
        zero = conv.weight.abs().sum((2, 3)) == 0
        assert torch.equal(zero, sal[name] <= threshold)


def test_the_bottleneck_resnet_fixes_its_3x3_filters_and_keeps_its_1x1_convs_learning():
    torch.manual_seed(0)
    model = build_model("resnet11_bottleneck", num_classes=10, in_channels=1)
    fix_spatial_filters(model, "DCT2", seed=0)
    assert [n for n, _ in spatial_convs(model)] == ["body.model.conv1", "body.model.layer1.0.conv2",
                                                     "body.model.layer2.0.conv2", "body.model.layer3.0.conv2"]
    # by hand, one block a stage (in -> width -> 4 width, projection in -> 4 width): 1x1 weights, BN, head
    one_by_one = (16 * 16 + 16 * 64 + 16 * 64) + (64 * 32 + 32 * 128 + 64 * 128) + (128 * 64 + 64 * 256 + 128 * 256)
    batchnorm = 2 * (16 + (16 + 16 + 64 + 64) + (32 + 32 + 128 + 128) + (64 + 64 + 256 + 256))
    assert trainable_parameters(model) == one_by_one + batchnorm + 256 * 10 + 10
    assert model.num_features == 256 and model.has_spatial_maps


def _row_saliency(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(c.weight.shape[0], 1, generator=gen) + 0.01 * torch.rand(c.weight.shape[:2], generator=gen)
            for n, c in spatial_convs(model)}


@pytest.mark.parametrize("family", ["cifar_resnet8", "cifar_bottleneck11", "torchvision_resnet", "torchvision_densenet"])
def test_pruned_model_computes_the_zeroed_function_with_fewer_parameters(family):
    torch.manual_seed(0)
    if family == "cifar_resnet8":
        model, x = small_resnet(in_channels=3), torch.randn(3, 3, 16, 16)
    elif family == "cifar_bottleneck11":
        model, x = build_model("resnet11_bottleneck").eval(), torch.randn(3, 3, 16, 16)
    elif family == "torchvision_resnet":
        model = as_feature_model(tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
        x = torch.randn(3, 3, 32, 32)
    else:
        model = as_feature_model(tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                              num_classes=10)).eval()
        x = torch.randn(3, 3, 32, 32)
    randomise_batchnorm(model)
    zeroed = copy.deepcopy(model)
    zero_least_salient(zeroed, _row_saliency(zeroed), 40)
    masked = mask_prunable(zeroed, x[:1]).eval()
    pruned, info = prune_channels(zeroed, x[:1])
    pruned.eval()
    assert info["channels_removed"] > 0
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), atol=1e-5)
    macs, params = macs_and_params(model, x[:1])
    small_macs, small_params = macs_and_params(pruned, x[:1])
    assert small_params < params and small_macs < macs


def test_channels_only_ignored_by_consumers_go_without_changing_the_function():
    model = randomise_batchnorm(small_resnet(in_channels=3))
    x = torch.randn(2, 3, 16, 16)
    conv2 = model.body.model.layer2[0].conv2
    with torch.no_grad():
        conv2.weight[:, [1, 4, 7]] = 0  # the block's inner channels 1, 4, 7 are read by nobody
    pruned, info = prune_channels(model, x[:1])
    assert pruned.body.model.layer2[0].conv1.out_channels == 32 - 3 and info["channels_removed"] == 3
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), model(x), atol=1e-5)


def test_pruning_keeps_fixed_filters_fixed_and_protected_features():
    model = fix_spatial_filters(small_resnet(in_channels=3), "DCT2")
    zero_least_salient(model, _row_saliency(model, 2), 50)
    x = torch.randn(2, 3, 16, 16)
    protect = list(range(64))
    pruned, _ = prune_channels(model, x[:1], protect={model.head: protect})
    assert pruned.head.in_features == 64
    assert all(not c.weight.requires_grad for _, c in spatial_convs(pruned))
    assert pruned.head.weight.requires_grad


def test_reset_and_fill_zero(digits):
    model = small_resnet()
    original = {n: c.weight.detach().clone() for n, c in spatial_convs(model)}
    zero_least_salient(model, _row_saliency(model), 30, fill="reset")
    for name, conv in spatial_convs(model):
        zero_rows = conv.weight.abs().sum((1, 2, 3)) == 0
        assert torch.equal(conv.weight[~zero_rows], original[name][~zero_rows])  # survivors keep their values
    fill_zero(model)
    for _, conv in spatial_convs(model):
        assert (conv.weight.abs() > 1e-8).all()


def test_channel_prune_on_a_trained_model(digits_model, digits):
    train, _ = digits
    pruned, report = channel_prune(digits_model, train, 90, "grad", max_images=128)
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert report["spatial_filters_after"] < report["filters"]
    assert pruned(train.normalize(train.images[:4])).shape == (4, 10)


# --------------------------------------------------------------------------------------------- class subset

def test_restricted_head_gives_the_full_logits_of_the_subset():
    model = small_resnet(in_channels=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(restrict_head(model, [3, 5])(x), model(x)[:, [3, 5]])


def test_class_subset_model_exports_and_loads_back(digits_model, digits, tmp_path):
    train, test = digits
    small, report = class_subset_model(digits_model, train, "3,8", pct=80, test=test, max_images=256,
                                       recipe=Recipe(epochs=1, batch_size=64, lr=0.02, flip=False))
    assert small.num_classes == 2 and report["classes"] == ["3", "8"]
    assert report["params_small"] < report["params_full"] and report["macs_small"] < report["macs_full"]
    assert report["features_after"] >= len(report["protected_features"])
    assert 0.5 < report["acc_full"] <= 1 and 0 <= report["acc_finetuned"] <= 1
    with warnings.catch_warnings():  # torch.export.save warns of weights it cannot store whole (channels_last)
        warnings.filterwarnings("error", message="No complete tensor found")
        paths = export_subset_model(small, tmp_path, train, "resnet8")
    images = test.images[:10].float() / 255
    with torch.no_grad():
        expected = small(test.normalize(test.images[:10]))
        program = torch.export.load(str(paths["pt2"])).module()
        assert torch.allclose(program(images), expected, atol=1e-5)
        assert torch.allclose(load_subset_model(tmp_path)(images), expected, atol=1e-5)
    assert json.loads(paths["json"].read_text())["classes"] == ["3", "8"]


def test_cli_prune_writes_a_loadable_model(tmp_path, monkeypatch):
    from classfilters.cli_prune import main
    out = tmp_path / "subset"
    assert main(["--model", "resnet8", "--dataset", "digits", "--classes", "0,1", "--pct", "75", "--train-epochs", "1",
                 "--finetune-epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["0", "1"] and (out / "model.pt2").is_file()
    with pytest.raises(SystemExit, match="unknown class 'cat'.*0, 1, 2"):
        main(["--model", "resnet8", "--dataset", "digits", "--classes", "cat", "--out", str(out)])


# --------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_any_work(digits):
    train, _ = digits
    no_spatial = FeatureModel(nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU()), nn.Linear(4, 10))
    for call in (lambda: fix_spatial_filters(no_spatial, "DCT2"), lambda: spectra(no_spatial),
                 lambda: channel_prune(no_spatial, train, 50)):
        with pytest.raises(ValueError, match="no spatial convolution"):
            call()
    with pytest.raises(ValueError, match="unknown initialisation 'dct3'.*" + ", ".join(INITS)):
        fix_spatial_filters(small_resnet(), "dct3")
    for pct in (0, 100, -5, 150, True):
        with pytest.raises(ValueError, match="strictly between 0 and 100"):
            channel_prune(small_resnet(), train, pct)
    with pytest.raises(ValueError, match="unknown class 'cat': the classes are 0, 1, 2"):
        resolve_classes("cat,3", train.classes)
    with pytest.raises(ValueError, match="another architecture"):
        fix_spatial_filters(small_resnet(), "GuidedSteer", source=build_model("resnet14", in_channels=1))
    with pytest.raises(ValueError, match="GuidedSteer needs source"):
        fix_spatial_filters(small_resnet(), "GuidedSteer")
    grouped = FeatureModel(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=2)), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="not depthwise"):
        channel_prune(grouped, train, 50)


def test_zeroing_that_would_empty_a_layer_is_refused_and_changes_nothing():
    model = small_resnet()
    sal = {n: torch.ones(c.weight.shape[:2]) for n, c in spatial_convs(model)}
    sal["body.model.conv1"] = torch.zeros_like(sal["body.model.conv1"])  # the stem's 16 filters are the least salient
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="would empty body.model.conv1.*keep_per_layer"):
        zero_least_salient(model, sal, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    zero_least_salient(model, sal, 1, keep_per_layer=2)  # spares the two most salient stem filters
    assert int((model.body.model.conv1.weight.abs().sum((1, 2, 3)) > 0).sum()) == 2


# --------------------------------------------------------------------------------------------- one-line tables

def test_tables_for_the_notebooks(digits, digits_model):
    from classfilters import class_specific_table, compare_initialisations, low_frequency_table, prune_sweep
    train, test = digits
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)
    table = compare_initialisations("resnet8", train.subset(torch.arange(512)), test, ("learned", "DCT2"), recipe)
    assert list(table.init) == ["learned", "DCT2"]
    assert table.trainable_params[1] < table.trainable_params[0] == table.params[0]
    assert table.seconds_per_epoch.gt(0).all() and table.relative.between(0, 2).all()
    again = compare_initialisations("resnet8", train.subset(torch.arange(512)), test, ("DCT2",), recipe)
    assert again.acc[0] == table.acc[1]  # from the cache
    sweep = prune_sweep(digits_model, train, test, (50, 99), recipe=Recipe(epochs=0), max_images=128, keep_per_layer=1)
    assert list(sweep.pct) == [0, 50, 99] and sweep.params.is_monotonic_decreasing and sweep.macs.is_monotonic_decreasing
    assert list(sweep.model) == ["unpruned", "pruned 50%", "pruned 99%"]  # no epochs: no fine-tuned control
    assert sweep.kernels.is_monotonic_decreasing and sweep.acc[0] > 0.5
    low = low_frequency_table({"trained": digits_model, "random": small_resnet()}, null_draws=20)
    assert set(low.model) == {"trained", "random"} and len(low) == 14
    spec = class_specific_table({"trained": digits_model}, train, test)
    assert 0 < spec.relative[0] <= 1.5
    with pytest.raises(ValueError, match="unknown initialisation"):
        compare_initialisations("resnet8", train, test, ("learned", "nope"))


def test_a_fixed_network_is_retrained_when_the_code_that_made_it_changes_and_only_then(digits, monkeypatch):
    """The cache key of `train_fixed` holds the source of the training code (fixed_training, fixed_filters, train):
    an edit of any of them retrains; an edit of the tables built on top (explainfix_tables) does not."""
    from classfilters import fixed_filters, fixed_training
    from classfilters import train as train_module
    train, _ = digits
    train = train.subset(torch.arange(128))
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)
    trained = []
    real = fixed_training.train_classifier
    monkeypatch.setattr(fixed_training, "train_classifier", lambda *a, **k: (trained.append(1), real(*a, **k))[1])
    fixed_training.train_fixed("resnet8", train, "DCT2", recipe, seed=5)
    assert len(trained) == 1
    fixed_training.train_fixed("resnet8", train, "DCT2", recipe, seed=5)
    assert len(trained) == 1  # the same code: from the cache
    import subprocess
    import sys
    loaded = subprocess.run([sys.executable, "-c", ("import sys, classfilters.fixed_training; "
                             "print(sorted(m for m in sys.modules if m.startswith('classfilters.')))")],
                            capture_output=True, text=True, check=True).stdout
    assert "classfilters.fixed_training" in loaded and "explainfix_tables" not in loaded  # no part of the key
    for module in (fixed_training, fixed_filters, train_module):
        with monkeypatch.context() as m:
            m.setattr(module, "SOURCE_DIGEST", f"edited {module.__name__}")
            before = len(trained)
            fixed_training.train_fixed("resnet8", train, "DCT2", recipe, seed=5)
            assert len(trained) == before + 1, module.__name__


def test_the_sweeps_control_is_the_unpruned_model_fine_tuned_by_the_same_recipe(digits, digits_model):
    """The row "unpruned, fine-tuned" equals fine-tuning a copy of the model by hand with the sweep's recipe and
    seed; it is left out without epochs or when not asked for."""
    import copy

    from classfilters import prune_sweep
    from classfilters.class_subset import predict
    from classfilters.decomposed import accuracy
    from classfilters.train import train_classifier
    train, test = digits
    train = train.subset(torch.arange(256))
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)
    sweep, models = prune_sweep(digits_model, train, test, (50,), recipe=recipe, max_images=64, keep_per_layer=1,
                                seed=3, return_models=True)
    assert list(sweep.model) == ["unpruned", "unpruned, fine-tuned", "pruned 50%"] and list(models) == list(sweep.model[1:])
    by_hand = copy.deepcopy(digits_model).cpu().eval()
    train_classifier(by_hand, train, recipe, None, 3, progress=False)
    expected = accuracy(predict(by_hand.cpu().eval(), test), test.labels)
    control = sweep.set_index("model").loc["unpruned, fine-tuned"]
    assert control.acc == expected and control.acc_before_finetune == sweep.acc[0]
    assert (control.params, control.kernels, control.macs) == tuple(sweep.loc[0, ["params", "kernels", "macs"]])
    assert control.acc != sweep.acc[0]  # one epoch on 256 images moves it
    plain = prune_sweep(digits_model, train, test, (50,), recipe=recipe, max_images=64, keep_per_layer=1, seed=3,
                        control=False)
    assert list(plain.model) == ["unpruned", "pruned 50%"] and plain.acc[1] == sweep.acc[2]


def test_architectures_are_compared_side_by_side_and_all_checked_before_training(digits, monkeypatch):
    from classfilters import compare_architectures, explainfix_tables
    train, test = digits
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)
    table, models = compare_architectures(["resnet8", "resnet11_bottleneck"], train.subset(torch.arange(256)), test,
                                          ("learned", "DCT2"), recipe)
    assert list(zip(table.model, table.init)) == [("resnet8", "learned"), ("resnet8", "DCT2"),
                                                  ("resnet11_bottleneck", "learned"), ("resnet11_bottleneck", "DCT2")]
    assert list(models) == ["resnet8 learned", "resnet8 DCT2", "resnet11_bottleneck learned", "resnet11_bottleneck DCT2"]
    assert table.trainable_params.tolist() == [trainable_parameters(m) for m in models.values()]
    alone = explainfix_tables.compare_initialisations(
        "resnet11_bottleneck", train.subset(torch.arange(256)), test, ("DCT2",), recipe)
    assert alone.acc[0] == table.acc[3] and alone.trainable_params[0] == table.trainable_params[3]
    monkeypatch.setattr(explainfix_tables, "train_fixed", lambda *a, **k: pytest.fail("trained before the checks"))
    with pytest.raises(ValueError, match=r"bottleneck ResNet depth must be 9n\+2 .* got 9"):
        compare_architectures(["resnet8", "resnet9_bottleneck"], train, test, ("learned",), recipe)
    with pytest.raises(ValueError, match="unknown model 'resnet8_bottlenek'"):
        compare_architectures(["resnet8", "resnet8_bottlenek"], train, test, ("learned",), recipe)
    with pytest.raises(ValueError, match="distinct architecture names"):
        compare_architectures(["resnet8", "resnet8"], train, test, ("learned",), recipe)
    with pytest.raises(ValueError, match=r"GuidedSteer .* compare_initialisations\(name, \.\.\., source="):
        compare_architectures(["resnet8"], train, test, ("learned", "GuidedSteer"), recipe)
    monkeypatch.undo()
    one, _ = compare_architectures("resnet11_bottleneck", train.subset(torch.arange(256)), test, ("DCT2",), recipe)
    assert one.model.tolist() == ["resnet11_bottleneck"] and one.acc[0] == table.acc[3]  # a name alone; cached


def test_removing_every_channel_of_a_group_is_refused_unless_one_is_kept():
    model = small_resnet(in_channels=3)
    with torch.no_grad():
        model.body.model.layer2[0].conv2.weight.zero_()  # no inner channel of the block is read any more
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="every channel of body.model.layer2.0.conv1"):
        prune_channels(model, x)
    pruned, _ = prune_channels(model, x, keep_one_channel=True)
    assert pruned.body.model.layer2[0].conv1.out_channels == 1


def test_models_without_spatial_maps_are_refused_before_any_work(digits):
    """phi from a class token or a pooled-then-normed vector: the spatial convs are not ExplainFix's."""
    body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
    model = FeatureModel(body, nn.Linear(16, 10), pool=lambda x: x.mean((2, 3)), spatial_maps=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from classfilters.explainsteer import spectra as spectra_table
    for call in (lambda: fix_spatial_filters(model, "DCT2"), lambda: spectra_table(model),
                 lambda: low_frequency_share(model), lambda: channel_prune(model, digits[0], 50),
                 lambda: filter_saliency(model, digits[0])):
        with pytest.raises(ValueError, match="ExplainFix's spatial convolutions: .*no spatial feature maps"):
            call()
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())
    from classfilters.explainfix_tables import skip_reason
    assert "no spatial feature maps" in skip_reason(model, digits[0])
    assert skip_reason(small_resnet(), digits[0]) is None
