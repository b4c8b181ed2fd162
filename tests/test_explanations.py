"""Explanations (explanations.py), the grid pointing game (mosaic.py), their metrics and the search."""
import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from classfilters import (
    CanonizationError,
    CifarResNet,
    FeatureModel,
    as_feature_model,
    evaluate,
    evaluate_explanations,
    explain,
    grid_mosaics,
    grid_pointing_game,
    grid_pointing_score,
    influential_features,
    make_mosaic,
    open_dataset,
    search_explanations,
)
from classfilters.explanation_metrics import aopc, mask_tiles, pixel_step, second_moment_normalise, summarize
from classfilters.explanations import layer_groups, started_model
from classfilters.mosaic import tile_masks
from classfilters.search import configurations
from classfilters.visualize import class_maps


def relu_toy(seed=0, classes=4, width=6):
    """conv (no bias) -> ReLU -> mean -> linear: z_c^N is positively homogeneous in x."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.ReLU())
    return FeatureModel(body, nn.Linear(width, classes), name="toy").eval()


def toy_mask(classes=4, width=6):
    mask = torch.zeros(classes, width, dtype=torch.bool)
    for c in range(classes):
        mask[c, [c, (c + 1) % width]] = True
    return mask


@pytest.mark.parametrize("method", ["gradient_x_input", "integrated_gradients"])
def test_influential_and_non_influential_attributions_add_up_to_the_full_one(method):
    model, mask = relu_toy(), toy_mask()
    x = torch.randn(5, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3, 0])
    full, infl, rest = (explain(model, x, target, method, start, mask, canonize=False)
                        for start in ("full", "influential", "non_influential"))
    torch.testing.assert_close(infl + rest, full, atol=1e-6, rtol=1e-5)
    assert (infl - full).abs().max() > 1e-3                      # the parts differ from the whole
    if method == "gradient_x_input":                            # Euler: sum of grad * x = the bias-free logit
        z_rest = started_model(model, mask, "non_influential")(x)[torch.arange(5), target]
        torch.testing.assert_close(rest.sum((1, 2, 3)), z_rest.detach(), atol=1e-5, rtol=1e-4)


def test_a_decomposed_head_is_explained_through_its_effective_weights():
    from classfilters import DecomposedHead
    model, mask = relu_toy(), toy_mask()
    model.head = DecomposedHead(model.head, mask)
    with torch.no_grad():
        model.head.weight.add_(1.0)                  # raw weights outside I_c no longer zero; the forward masks them
    x = torch.randn(3, 3, 8, 8)
    full = explain(model, x, 2, "gradient_x_input", "full", mask, canonize=False)
    torch.testing.assert_close(explain(model, x, 2, "gradient_x_input", "influential", mask, canonize=False), full)
    assert explain(model, x, 2, "gradient_x_input", "non_influential", mask, canonize=False).abs().max() == 0


def test_every_public_name_resolves():
    import classfilters
    assert all(getattr(classfilters, name) is not None for name in classfilters.__all__)
    assert callable(classfilters.explain) and callable(classfilters.canonize)    # functions, not the modules


def zero_shift_resnet8(seed=0):
    """ResNet-8 whose BatchNorms have zero shift (folding adds no bias) and nontrivial scales; head bias 0."""
    torch.manual_seed(seed)
    model = CifarResNet(8)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
        model.linear.bias.zero_()
    return as_feature_model(model.eval())


def test_lrp_epsilon_conserves_relevance_on_the_canonized_model_only():
    model = zero_shift_resnet8()
    x = torch.randn(4, 3, 32, 32)
    z = model(x)[:, 3].detach()
    canon = explain(model, x, 3, "lrp_epsilon", canonize=True, epsilon=1e-9).sum((1, 2, 3))
    torch.testing.assert_close(canon, z, rtol=1e-3, atol=1e-5)              # sum R_input = z_c
    raw = explain(model, x, 3, "lrp_epsilon", canonize=False, epsilon=1e-9).sum((1, 2, 3))
    assert ((raw - z).abs() > 0.5 * z.abs()).any()          # residual adds copy relevance into both branches
    after = model(x)[:, 3]
    assert torch.equal(after.detach(), z)                                    # explaining left the model as it was


def test_lrp_epsilon_conservation_on_a_canonized_torchvision_resnet():
    torch.manual_seed(0)
    model = as_feature_model(tvm.resnet18(num_classes=10).eval())     # fresh BatchNorms: no shift; fc bias zeroed
    with torch.no_grad():
        model.head.bias.zero_()
    x = torch.randn(2, 3, 32, 32)
    z = model(x)[:, 1].detach()
    canon = explain(model, x, 1, "lrp_epsilon", canonize=True, epsilon=1e-9).sum((1, 2, 3))
    torch.testing.assert_close(canon, z, rtol=1e-3, atol=1e-5)
    raw = explain(model, x, 1, "lrp_epsilon", canonize=False, epsilon=1e-9).sum((1, 2, 3))
    assert ((raw - z).abs() > 10 * z.abs()).all()


@pytest.mark.parametrize("make", [tvm.densenet121, tvm.efficientnet_b0])
def test_lrp_on_canonized_densenet_and_efficientnet(make):
    torch.manual_seed(0)
    model = make(num_classes=10).eval()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.3)
                bn.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    for method in ("lrp_epsilon_plus", "lrp_gamma"):
        r = explain(model, x, 3, method, canonize=True)
        assert r.shape == x.shape and torch.isfinite(r).all() and r.abs().sum() > 0
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("method", ["lrp_epsilon_plus", "lrp_epsilon_gamma_box", "lrp_alpha2_beta1", "lrp_gamma",
                                    "gradient", "smoothgrad"])
def test_every_method_gives_finite_relevance_of_the_input_shape(method):
    model = zero_shift_resnet8()
    x = torch.randn(2, 3, 32, 32)
    r = explain(model, x, [1, 2], method, gammas={"low": 0.5, "classifier": 0.0}, n_steps=4)
    assert r.shape == x.shape and torch.isfinite(r).all() and r.abs().sum() > 0


def test_layer_groups_split_the_convolutions_in_order():
    groups = layer_groups(zero_shift_resnet8())
    convs = groups["low"] + groups["mid"] + groups["high"]
    assert len(convs) == 7 and groups["classifier"] == ["head"]              # ResNet-8: stem + 3 blocks x 2
    assert groups["low"][0].endswith("conv1") and "layer3" in groups["high"][-1]


def test_channel_maps_are_table_7s_maps(digits_model):
    test = open_dataset("digits", "test")
    train = open_dataset("digits", "train")
    with torch.no_grad():
        feats = digits_model.forward_features(train.normalize(train.images))
    influence = influential_features(feats, train.labels, 5, 5)
    images, labels = test.images[:6], test.labels[:6]
    table7, _ = class_maps(digits_model, test, images, labels, influence)
    for col, start in ((0, "full"), (2, "influential")):
        m = explain(digits_model, test.normalize(images), labels, "channel_maps", start, influence)[:, 0]
        lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
        torch.testing.assert_close((m - lo) / (hi - lo).clamp(min=1e-8), table7[:, col], atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_before_any_work():
    model, mask = relu_toy(), toy_mask()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown method 'lrp_magic'.*lrp_epsilon_plus"):
        explain(model, x, 0, "lrp_magic", canonize=False)
    with pytest.raises(ValueError, match="class 4 is outside the model.*0..3"):
        explain(model, x, 4, "gradient", canonize=False)
    with pytest.raises(ValueError, match="unknown start"):
        explain(model, x, 0, "gradient", "partial", mask, canonize=False)
    with pytest.raises(ValueError, match="needs the class index sets"):
        explain(model, x, 0, "gradient", "influential", canonize=False)
    with pytest.raises(ValueError, match="another model"):
        explain(model, x, 0, "gradient", "influential", torch.ones(4, 7, dtype=torch.bool), canonize=False)
    with pytest.raises(ValueError, match="float tensor"):
        explain(model, (x * 50).to(torch.uint8), 0, "gradient", canonize=False)
    with pytest.raises(ValueError, match="unknown layer groups"):
        explain(model, x, 0, "lrp_gamma", canonize=False, gammas={"top": 1.0})
    with pytest.raises(CanonizationError, match="toy.*supported families"):
        explain(model, x, 0, "lrp_epsilon_plus", canonize=True)


# ---------------------------------------------------------------- mosaics


def test_mosaic_tiles_and_masks():
    images = [torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (1, 2, 3, 4)]
    m = make_mosaic(images)
    assert m.tolist() == [[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]
    masks = tile_masks((4, 4), torch.arange(4))
    for t in range(4):
        assert (m[0][masks[t, 0]] == t + 1).all() and masks[t].sum() == 4
    assert mask_tiles(masks).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="share one size"):
        make_mosaic([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)])


def test_grid_pointing_score_by_hand():
    r = torch.zeros(2, 4, 4)
    r[0, 0, 0], r[0, 0, 3], r[0, 3, 3], r[0, 1, 1] = 3.0, 1.0, -5.0, 1.0      # tile 0 holds 4 of 5 positive
    score = grid_pointing_score(r, torch.tensor([0, 1]))
    assert score[0].item() == pytest.approx(0.8)
    assert torch.isnan(score[1])                                              # no positive relevance at all


def test_grid_mosaics_are_reproducible_and_hold_four_classes():
    test = open_dataset("digits", "test")
    a, b = grid_mosaics(test, 5, seed=3), grid_mosaics(test, 5, seed=3)
    assert torch.equal(a.images, b.images) and a.images.shape == (5, 1, 16, 16)
    assert all(len(set(row.tolist())) == 4 for row in a.tile_classes)
    assert torch.equal(test.labels[a.source], a.tile_classes)
    assert torch.equal(a.images[2, :, 8:, :8], test.images[a.source[2, 2]])  # tile 2 = bottom left
    assert not torch.equal(grid_mosaics(test, 5, seed=4).images, a.images)


def test_figures_and_the_pointing_table(digits_model):
    from classfilters import explanation_figure, grid_pointing_games
    test = open_dataset("digits", "test")
    mask = torch.rand(10, digits_model.num_features, generator=torch.Generator().manual_seed(0)) < 0.1
    fig = explanation_figure(digits_model, test.normalize(test.images[:2]), test.labels[:2], mask)
    assert len(fig.axes) == 2 * 7                                     # image + 3 starts x canonized or not
    table = grid_pointing_games(digits_model, grid_mosaics(test, 2), starts=("full", "influential"), influence=mask)
    assert len(table) == 8 * 2 * 2 and set(table.start) == {"full", "influential"}


def test_trained_digits_model_points_at_the_right_tile_above_chance(digits_model):
    mosaics = grid_mosaics(open_dataset("digits", "test"), 12, seed=0)
    scores = grid_pointing_game(digits_model, mosaics, "lrp_epsilon_plus")
    assert len(scores) == 48 and scores.grid_pointing.between(0, 1).all()
    assert scores.grid_pointing.mean() > 0.3                                 # chance is 0.25


# ---------------------------------------------------------------- metrics


def test_metric_helpers_by_hand():
    assert aopc(np.array([2.0]), np.array([[1.0, 0.0, -1.0]]))[0] == pytest.approx(2.0)   # (1 + 2 + 3) / 3
    a = np.array([[[[3.0, 4.0]]]])
    assert second_moment_normalise(a)[0, 0, 0].tolist() == pytest.approx([3 / np.sqrt(12.5), 4 / np.sqrt(12.5)])
    assert pixel_step(256) == 16 and 1024 % pixel_step(1024) == 0 and pixel_step(7) == 1
    import quantus
    assert quantus.helpers.utils.calculate_auc(np.array([0.0, 1.0, 2.0])) == pytest.approx(2.0)  # the np.trapz shim


def test_aggregate_score_by_hand():
    import pandas as pd

    from classfilters import aggregate_score
    table = pd.DataFrame({"grid_pointing": [0.5, 1.0], "avg_sensitivity": [0.2, 0.4]})
    # row 0: (0.5 / 1.0 + 0.2 / 0.2) / 2 = 0.75; row 1: (1.0 + 0.2 / 0.4) / 2 = 0.75
    assert aggregate_score(table, ("grid_pointing", "avg_sensitivity")).tolist() == pytest.approx([0.75, 0.75])
    assert aggregate_score(table, ("grid_pointing",)).tolist() == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError, match="missing"):
        aggregate_score(table, ("sparseness",))


def test_summarize_intervals():
    import pandas as pd
    frame = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 4, "start": "full", "canonized": True,
                          "sparseness": [0.5] * 4 + [0.0, 1.0, 0.0, 1.0]})
    table = summarize(frame)
    assert table.loc[0, "sparseness"] == table.loc[0, "sparseness_lo"] == table.loc[0, "sparseness_hi"] == 0.5
    assert table.loc[1, "sparseness_lo"] < 0.5 < table.loc[1, "sparseness_hi"] and table.loc[1, "n"] == 4


def test_summarize_counts_only_scored_rows():
    import pandas as pd
    frame = pd.DataFrame({"method": "a", "start": "full", "canonized": False,
                          "grid_pointing": [1.0, np.nan, 0.0, np.nan, np.nan]})
    (row,) = summarize(frame).to_dict("records")
    assert row["n"] == 2 and row["rows"] == 5 and row["grid_pointing"] == 0.5


def test_quantus_localisation_matches_a_hand_computation(digits_model):
    mosaics = grid_mosaics(open_dataset("digits", "test"), 2, seed=1)
    m, t, c = mosaics.expanded()
    x, masks = mosaics.normalize(mosaics.images[m]), mosaics.masks(t)
    frame = evaluate_explanations(digits_model, x, c, "gradient_x_input", masks=masks,
                                  metrics=("relevance_mass", "grid_pointing", "sparseness", "pixel_flipping_aopc"))
    r = explain(digits_model, x, c, "gradient_x_input").sum(1)
    mass = (r.abs() * masks[:, 0]).sum((1, 2)) / r.abs().sum((1, 2))
    np.testing.assert_allclose(frame.relevance_mass, mass.numpy(), rtol=1e-4)
    np.testing.assert_allclose(frame.grid_pointing, grid_pointing_score(r, t).numpy(), rtol=1e-5)
    assert frame.sparseness.between(0, 1).all() and np.isfinite(frame.pixel_flipping_aopc).all()
    randomised = evaluate_explanations(digits_model, x[:4], c[:4], "lrp_epsilon_plus",
                                       metrics=("model_randomisation", "random_logit", "avg_sensitivity"))
    assert randomised.model_randomisation.between(-1, 1).all() and randomised.random_logit.between(-1, 1).all()
    assert (randomised.avg_sensitivity >= 0).all()
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_explanations(digits_model, x, c, metrics=("beauty",))


# ---------------------------------------------------------------- search


def test_configurations_grid_or_seeded_sample():
    space = {"low": (0, 1, 2), "canonize": (True, False)}
    assert len(configurations(space, 10)) == 6
    sample = configurations(space, 4, seed=1)
    assert len(sample) == 4 and len({tuple(s.items()) for s in sample}) == 4
    assert sample == configurations(space, 4, seed=1)


def test_search_returns_scored_configurations_and_the_best(digits_model):
    mosaics = grid_mosaics(open_dataset("digits", "test"), 4, seed=0)
    space = {"low": (0.0, 1.0), "classifier": (0.0,), "canonize": (True, False)}
    result = search_explanations(digits_model, mosaics, space, budget=4, max_tiles=8, floor=-1.0)
    assert len(result.frame) == 4 and result.frame.feasible.all()
    assert result.best.grid_pointing == result.frame.grid_pointing.max()
    assert result.worst.grid_pointing == result.frame.grid_pointing.min()
    strict = search_explanations(digits_model, mosaics, space, budget=2, max_tiles=8, floor=2.0)
    assert not strict.frame.feasible.any()                       # a correlation never reaches 2
    agg = search_explanations(digits_model, mosaics, space, budget=2, max_tiles=4, objective="aggregate",
                              aggregate_of=("grid_pointing", "sparseness"), floor=-1.0)
    assert agg.frame["aggregate"].between(0, 1).all() and agg.best["aggregate"] == agg.frame["aggregate"].max()
    train = open_dataset("digits", "train")
    with torch.no_grad():
        feats = digits_model.forward_features(train.normalize(train.images))
    ks = search_explanations(digits_model, mosaics, {"k": (3,), "k_prime": (2, 8)}, max_tiles=4, floor=-1.0,
                             train_features=feats, train_labels=train.labels)
    assert sorted(ks.frame.k_prime) == [2, 8] and ks.frame.grid_pointing.notna().all()
    assert ks.frame.grid_pointing.nunique() == 2                   # different index sets, different explanations
    test = open_dataset("digits", "test")
    with torch.no_grad():
        test_feats = digits_model.forward_features(test.normalize(test.images))
    space = {"k": (1, 3), "k_prime": (1, 8)}
    scored = search_explanations(digits_model, mosaics, space, max_tiles=4, floor=-1.0, train_features=feats,
                                 train_labels=train.labels, test_features=test_feats, test_labels=test.labels,
                                 accuracy_floor=0.9)
    for row in scored.frame.itertuples():                          # each row's accuracy, computed independently
        sets = influential_features(feats, train.labels, row.k, row.k_prime)
        expected = evaluate(digits_model.head, sets, test_feats, test.labels)
        assert row.acc_decomposed == expected["acc_decomposed"] and row.relative == expected["relative"]
        assert row.feasible == (row.relative >= 0.9)                # the faithfulness floor (-1) passes all
    assert scored.frame.relative.nunique() > 1 and not scored.frame.feasible.all()
    with pytest.raises(ValueError, match="accuracy_floor needs"):
        search_explanations(digits_model, mosaics, space, max_tiles=4, train_features=feats,
                            train_labels=train.labels, accuracy_floor=0.9)
    with pytest.raises(ValueError, match="unknown search parameters"):
        search_explanations(digits_model, mosaics, {"alpha": (1,)})
    with pytest.raises(ValueError, match="train_features"):
        search_explanations(digits_model, mosaics, {"k": (3,)})


# relative accuracy here: (1, 1) and (3, 1) ~0.66, (1, 8) ~0.83, (3, 8) ~0.89: all four, two, none feasible
@pytest.mark.parametrize("floor, n_feasible", [(0.6, 4), (0.8, 2), (0.95, 0)])
def test_k_search_marks_the_best_explanation_at_the_accuracy_floor_and_the_most_accurate(digits_model, floor,
                                                                                        n_feasible):
    from types import SimpleNamespace

    from classfilters import explanation_study as ex
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    with torch.no_grad():
        phi_train, phi_test = (digits_model.forward_features(s.normalize(s.images)) for s in (train, test))
    subject = SimpleNamespace(model=digits_model, name="resnet8", train=train, test=test,
                              train_features=phi_train, test_features=phi_test)
    mosaics = grid_mosaics(test, 4, seed=0)
    result = ex.k_search(subject, mosaics, [1, 3], [1, 8], 4, "grid_pointing", -1.0, 4, accuracy_floor=floor,
                         log=lambda *a: None)
    f = result.frame
    feasible = f[f.feasible]
    assert len(feasible) == n_feasible and (feasible.relative >= floor).all() and (f[~f.feasible].relative < floor).all()
    explanation = f[f.best.str.contains("explanation")]
    accuracy = f[f.best.str.contains("accuracy")]
    assert len(accuracy) == 1 and accuracy.relative.iloc[0] == f.relative.max()
    if len(feasible):
        assert len(explanation) == 1 and explanation.grid_pointing.iloc[0] == feasible.grid_pointing.max()
        assert (explanation.relative >= floor).all()
    else:
        assert explanation.empty
    assert (f.best == "-").sum() == len(f) - len(set(explanation.index) | set(accuracy.index))
    if floor == 0.6:  # every row feasible: the best explanation is not where accuracy is best
        assert explanation.index[0] != accuracy.index[0] and f.best.iloc[0] == "explanation"


@pytest.mark.slow
def test_cifar10_mosaics_and_the_shared_resnet20(shared_data):
    from classfilters import build_model
    model = build_model("resnet20", shared_data / "weights" / "resnet20-12fca82f.th")
    test = open_dataset(f"cifar10:{shared_data / 'cifar10-jpeg.tar.gz'}", "test")
    mosaics = grid_mosaics(test, 4, seed=0)
    assert mosaics.images.shape == (4, 3, 64, 64)                    # JPEG CIFAR-10 test images -> 64x64 mosaics
    scores = grid_pointing_game(model, mosaics, "lrp_epsilon_plus")   # global pooling accepts 64x64
    assert scores.grid_pointing.mean() > 0.4                          # chance 0.25; 0.68 on 8 mosaics here
