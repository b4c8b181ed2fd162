"""The decomposed head: equals the full head with every index, the grid equals pair-by-pair."""
import pytest
import torch
from conftest import planted
from torch import nn

from classfilters import DecomposedHead, evaluate, finetune_head, grid_accuracy, influential_features


def random_head(d, c, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c)


def test_all_indices_equal_the_full_head():
    features, labels = planted()
    head = random_head(32, 6)
    full = influential_features(features, labels, 5, 32)
    decomposed = DecomposedHead(head, full)
    assert torch.equal(decomposed(features), head(features))
    assert torch.allclose(decomposed.decomposed_softmax(features), head(features).softmax(-1))
    assert decomposed.multiply_adds == 32 * 6


def test_compact_path_equals_masked_path_and_costs_sum_of_set_sizes():
    features, labels = planted()
    influence = influential_features(features, labels, 0.5, 0.6)
    head = DecomposedHead(random_head(32, 6), influence)
    assert torch.allclose(head.forward_compact(features), head(features), atol=1e-5)
    assert head.multiply_adds == sum(len(i) for i in influence.indices) < 32 * 6


def test_decomposed_logit_uses_only_its_class_set():
    features, labels = planted()
    influence = influential_features(features, labels, 2, 2)
    head = DecomposedHead(random_head(32, 6), influence)
    bumped = features.clone()
    bumped[:, 3 * 2] += 10.0  # feature 6 belongs to class 2 only
    delta = head(bumped) - head(features)
    assert delta[:, 2].abs().min() > 0
    assert torch.equal(delta[:, [0, 1, 3, 4, 5]], torch.zeros(len(features), 5))


def test_grid_equals_evaluating_each_pair():
    gen = torch.Generator().manual_seed(0)
    train, train_y = planted(n_per_class=60, seed=1, strength=1.0)
    test, test_y = planted(n_per_class=30, seed=2, strength=1.0)
    train = train + torch.rand(train.shape, generator=gen)
    head = random_head(32, 6, seed=3)
    head.weight.data[torch.arange(6), 3 * torch.arange(6)] += 2.0
    ks, kps = [1, 2, 4, 8, 32], [1, 3, 5, 32]
    grid = grid_accuracy(train, train_y, test, test_y, head, ks, kps, chunk_elements=5000)
    for a, k in enumerate(ks):
        for b, kp in enumerate(kps):
            expected = evaluate(head, influential_features(train, train_y, k, kp), test, test_y)["acc_decomposed"]
            assert grid[a, b].item() == pytest.approx(expected, abs=1e-6), (k, kp)
    full = evaluate(head, influential_features(train, train_y, 1, 32), test, test_y)["acc_full"]
    assert torch.allclose(grid[:, -1], torch.full((len(ks),), full))


def test_mismatched_index_sets_are_refused():
    features, labels = planted()
    with pytest.raises(ValueError, match="computed for another model"):
        DecomposedHead(nn.Linear(64, 6), influential_features(features, labels, 2, 2))


def test_finetuning_keeps_the_decomposition_and_recovers_accuracy():
    features, labels = planted(strength=1.0)
    head = random_head(32, 6, seed=1)
    influence = influential_features(features, labels, 3, 3)
    decomposed = DecomposedHead(head, influence)
    history = finetune_head(decomposed, features, labels, epochs=30, lr=1e-2)
    assert history[-1]["train_acc"] > max(history[0]["train_acc"], 0.9)
    outside = ~decomposed.mask[0]  # after training, class 0's logit still ignores features outside I_0
    bumped = features.clone()
    bumped[:, outside] += 5.0
    with torch.no_grad():
        assert torch.equal(decomposed(bumped)[:, 0], decomposed(features)[:, 0])


def test_whole_network_finetuning_keeps_the_decomposition(digits_model):
    """finetune_network: body and decomposed head trained together; the head stays decomposed."""
    import copy

    from classfilters import Recipe, extract_features, finetune_network, open_dataset
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    model = copy.deepcopy(digits_model)
    influence = influential_features(extract_features(model, train, progress=False), train.labels, 3, 3)
    before = evaluate(model.head, influence, extract_features(model, test, progress=False), test.labels)
    body_before = [p.detach().clone() for p in model.body.parameters()]
    finetune_network(model, influence, train, Recipe(epochs=3, batch_size=64, lr=0.02, flip=False), device="cpu",
                     progress=False)
    assert isinstance(model.head, DecomposedHead) and torch.equal(model.head.mask, influence.mask)
    assert any(not torch.equal(a, b) for a, b in zip(body_before, model.body.parameters()))  # the body trained too
    phi = extract_features(model, test, use_cache=False, progress=False)
    with torch.no_grad():
        logits = model.head(phi)
        bumped = phi.clone()
        bumped[:, ~influence.mask[0]] += 5.0
        assert torch.equal(model.head(bumped)[:, 0], logits[:, 0])  # class 0 still reads only I_0
    assert (logits.argmax(1) == test.labels).float().mean() > before["acc_decomposed"]  # retraining recovers accuracy


def test_the_authors_adam_fine_tuning_takes_steps_of_exactly_lr(digits_model):
    """Recipe(optimizer="adam"): Adam at a constant rate. Its first step moves every weight with a gradient by
    lr (bias-corrected m / sqrt(v) = g / |g|), which SGD's steps (lr times the gradient) do not."""
    import copy

    from classfilters import Recipe, open_dataset, train_classifier
    split = open_dataset("digits", "train").subset(torch.arange(64))
    one_step = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "crop_padding": 0, "flip": False}
    steps = {}
    for optimizer in ("adam", "sgd"):
        model = copy.deepcopy(digits_model)
        conv = model.body.model.conv1.weight
        before = conv.detach().clone()
        train_classifier(model, split, Recipe(**one_step, optimizer=optimizer), device="cpu", progress=False)
        steps[optimizer] = (conv.detach() - before).abs().flatten()
    moved = steps["adam"][steps["adam"] > 0]
    assert len(moved) > 0.9 * len(steps["adam"]) and torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-2)
    assert steps["sgd"].std() > 10 * steps["adam"][steps["adam"] > 0].std()      # SGD's steps vary with the gradient
    with pytest.raises(ValueError, match="optimizer must be"):
        Recipe(optimizer="rmsprop")


def test_decomposed_softmax_by_hand_below_full_width():
    """k' < D: each class scored in its own subspace, z_c = sum_{j in I_c} W[c, j] phi_j + b_c, then a softmax."""
    from classfilters import InfluentialFeatures
    head = nn.Linear(3, 2)
    head.weight.data = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    head.bias.data = torch.tensor([0.5, -0.5])
    influence = InfluentialFeatures([[2], [0, 1]], torch.zeros(2, 3, dtype=torch.int64), 1, 2)
    phi = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
    z = torch.tensor([[3.0 + 0.5, 4.0 + 5.0 - 0.5], [3.0 + 0.5, 10.0 - 0.5]])
    expected = torch.exp(z) / torch.exp(z).sum(1, keepdim=True)
    decomposed = DecomposedHead(head, influence)
    assert torch.allclose(decomposed(phi), z)
    assert torch.allclose(decomposed.decomposed_softmax(phi), expected)
    assert not torch.allclose(decomposed.decomposed_softmax(phi), head(phi).softmax(-1))


def test_feature_ranks_by_hand_for_each_ranking():
    """Positions in each row's ranking (0 = largest; ties to the lower index): by value for non-negative
    features, by magnitude as soon as one is negative ("auto"), or as asked."""
    from classfilters.decomposed import feature_ranks
    nonneg = torch.tensor([[0.5, 2.0, 0.5, 1.0]])
    assert feature_ranks(nonneg).tolist() == [[2, 0, 3, 1]]
    signed = torch.tensor([[0.5, -3.0, 1.0, 0.0]])
    assert feature_ranks(signed).tolist() == [[2, 0, 1, 3]]                      # auto: |x|
    assert feature_ranks(signed, "value").tolist() == [[1, 3, 0, 2]]
    assert feature_ranks(signed, "magnitude").tolist() == feature_ranks(signed).tolist()
    with pytest.raises(ValueError):
        feature_ranks(signed, "AUTO")


def test_evaluate_and_the_grid_refuse_what_does_not_fit():
    features, labels = planted()
    head = random_head(32, 6)
    with pytest.raises(ValueError, match=r"cover 6 classes x 32 features but the head is 6 x 40: they were computed "
                                         "for another model"):
        evaluate(random_head(40, 6), influential_features(features, labels, 2, 2),
                 torch.cat([features, torch.zeros(len(features), 8)], 1), labels)
    with pytest.raises(ValueError, match=r"6 classes x 32 features but the head is 7 x 32"):
        evaluate(random_head(32, 7), influential_features(features, labels, 2, 2), features, labels)
    with pytest.raises(ValueError, match="ks and k_primes must not be empty"):
        grid_accuracy(features, labels, features, labels, head, [], [1])
    with pytest.raises(ValueError, match="ks and k_primes must not be empty"):
        grid_accuracy(features, labels, features, labels, head, [1], [])
    with pytest.raises(TypeError, match="grid_accuracy takes counts for k and k'"):
        grid_accuracy(features, labels, features, labels, head, [1, 0.5], [2])


def test_compact_path_with_sets_of_every_size_equals_the_masked_path():
    """Classes with 0, 1 and all features: the compact path gathers exactly the set of each (an empty set: the bias)."""
    torch.manual_seed(0)
    head = nn.Linear(5, 3).double()
    mask = torch.tensor([[False] * 5, [False, False, False, True, False], [True] * 5])
    decomposed = DecomposedHead(head, mask)
    phi = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.stack([head.bias[0].expand(7), phi[:, 3] * head.weight[1, 3] + head.bias[1],
                            phi @ head.weight[2] + head.bias[2]], 1)
    assert torch.allclose(decomposed(phi), expected) and torch.allclose(decomposed.forward_compact(phi), expected)
    assert decomposed.multiply_adds == 6
    assert torch.allclose(decomposed.decomposed_softmax(phi), expected.softmax(-1))
    no_bias = DecomposedHead(nn.Linear(5, 3, bias=False).double(), mask)
    assert torch.equal(no_bias.bias, torch.zeros(3, dtype=torch.float64))


def test_weights_outside_the_sets_are_ignored_by_both_paths():
    """Weights set outside I_c (by hand, or loaded) never reach a logit, in the masked path or the compact one."""
    torch.manual_seed(1)
    mask = torch.tensor([[True, False, False, False], [True, True, False, False], [False, False, False, True]])
    decomposed = DecomposedHead(nn.Linear(4, 3).double(), mask)
    with torch.no_grad():
        decomposed.weight.copy_(torch.randn(3, 4, dtype=torch.float64))  # nonzero everywhere
    phi = torch.randn(6, 4, dtype=torch.float64)
    expected = phi @ (decomposed.weight * mask).T + decomposed.bias
    assert torch.allclose(decomposed(phi), expected) and torch.allclose(decomposed.forward_compact(phi), expected)


def test_relative_accuracy_is_nan_when_the_full_head_scores_nothing():
    import math

    import pandas as pd

    from classfilters.decomposed import relative_accuracy
    assert relative_accuracy(0.45, 0.9) == pytest.approx(0.5) and math.isnan(relative_accuracy(0.3, 0.0))
    column = relative_accuracy(pd.Series([0.2, 0.4]), 0.0)
    assert column.isna().all() and len(column) == 2


def test_bad_test_inputs_are_refused_naming_them():
    features, labels = planted()
    head, influence = random_head(32, 6), influential_features(features, labels, 2, 2)
    bad = labels.clone()
    bad[0] = 6  # not a class of the 6-class head
    with pytest.raises(ValueError, match=r"labels of the test features must lie in \[0, 6\); found 0..6"):
        evaluate(head, influence, features, bad)
    spoiled = features.clone()
    spoiled[1, 1] = float("nan")
    with pytest.raises(ValueError, match="test features"):
        evaluate(head, influence, spoiled, labels)


def test_the_mask_lives_on_the_heads_device():
    """Without a GPU: on PyTorch's "meta" device (shapes, no data) the mask buffer must follow the head's weights,
    or a head moved to a GPU would mix devices in every forward."""
    mask = torch.tensor([[True, False, True], [False, True, False]])
    head = DecomposedHead(nn.Linear(3, 2, device="meta"), mask)
    assert head.mask.device.type == head.weight.device.type == head.bias.device.type == "meta"
    assert head(torch.empty(4, 3, device="meta")).device.type == "meta"


def test_evaluate_reports_both_layers_costs():
    """The full layer costs D x C multiply-adds per image (32 x 6), the decomposed one the sum of its set sizes."""
    features, labels = planted()
    influence = influential_features(features, labels, 0.5, 0.6)
    result = evaluate(random_head(32, 6), influence, features, labels)
    assert result["multiply_adds_full"] == 192
    assert result["multiply_adds_decomposed"] == sum(len(i) for i in influence.indices) < 192


def test_evaluate_scores_a_float32_copy_and_leaves_the_models_head_alone():
    """A float64 head is scored as a float32 copy (the features' dtype): the model's own head keeps its dtype
    and weights, and the result equals that of the same head made in float32."""
    features, labels = planted()
    influence = influential_features(features, labels, 2, 2)
    head = random_head(32, 6).double()
    before = head.weight.detach().clone()
    result = evaluate(head, influence, features, labels)
    assert head.weight.dtype == torch.float64 and torch.equal(head.weight.detach(), before)
    assert result == evaluate(random_head(32, 6), influence, features, labels)


def test_ties_rank_to_the_lower_index_in_wide_rows():
    """feature_ranks' rule (ties to the lower index) holds for rows wider than the sorts that happen to be stable
    anyway: 64 features in tied groups."""
    from classfilters.decomposed import feature_ranks
    features = torch.zeros(3, 64)
    features[:, ::7] = 1.0                                            # ten tied ones, then 54 tied zeros
    ranks = feature_ranks(features)
    expected = torch.cat([torch.arange(0, 64, 7), torch.tensor([i for i in range(64) if i % 7])])
    assert torch.equal(ranks[0].argsort(), expected) and torch.equal(ranks[0], ranks[2])
    assert torch.equal(feature_ranks(torch.zeros(2, 64))[1], torch.arange(64, dtype=torch.int32))


def test_nothing_depends_on_the_default_device():
    """A user's `torch.set_default_device` (the meta device stands in for a GPU) changes no result: every tensor
    the head and the grid make lives on their inputs' device."""
    from classfilters.decomposed import feature_ranks, head_on
    features, labels = planted()
    head = nn.Linear(32, 6)
    influence = influential_features(features, labels, 3, 3)
    decomposed = DecomposedHead(head, influence.mask)
    expected = (feature_ranks(features), decomposed.forward_compact(features),
                grid_accuracy(features, labels, features, labels, head, [1, 3], [1, 3]))
    with torch.device("meta"):
        got = (feature_ranks(features), decomposed.forward_compact(features),
               grid_accuracy(features, labels, features, labels, head, [1, 3], [1, 3]))
    for e, g in zip(expected, got):
        assert g.device.type == "cpu" and torch.equal(e, g)
    moved = head_on(head, "meta")  # a float32 copy where asked; the model's own head stays
    assert moved.weight.is_meta and moved.weight.dtype == torch.float32 and head.weight.device.type == "cpu"


def test_the_decomposed_softmax_of_one_feature_vector_is_that_row_of_its_batch():
    features, labels = planted()
    head = DecomposedHead(nn.Linear(32, 6), influential_features(features, labels, 3, 3).mask)
    batch = head.decomposed_softmax(features[:4])
    assert torch.allclose(head.decomposed_softmax(features[2]), batch[2]) and torch.allclose(batch.sum(1), torch.ones(4))


def test_the_grid_counts_every_training_image_up_to_the_largest_k_by_the_ranking_asked():
    """grid_accuracy against Algorithm 1 and `evaluate` pair by pair where its shortcuts could slip: signed features
    ranked by magnitude and by value (the grids differ), every k below D (ranks at or beyond max(ks) are not
    counted), one image per chunk, and a class whose only training image is the first (leaving it out changes
    the grid)."""
    gen = torch.Generator().manual_seed(0)
    n, d, c = 40, 8, 3
    train, test = torch.randn(n, d, generator=gen), torch.randn(90, d, generator=gen)
    train_y, test_y = torch.randint(1, c, (n,), generator=gen), torch.randint(0, c, (90,), generator=gen)
    train_y[0] = 0
    head = random_head(d, c, seed=1)
    ks, kps = [1, 2, 3], [1, 2, 4, 8]
    grids = {}
    for rank_by in ("magnitude", "value"):
        grids[rank_by] = grid_accuracy(train, train_y, test, test_y, head, ks, kps, rank_by=rank_by,
                                       chunk_elements=d - 1)
        for a, k in enumerate(ks):
            for b, kp in enumerate(kps):
                influence = influential_features(train, train_y, k, kp, num_classes=c, rank_by=rank_by)
                expected = evaluate(head, influence, test, test_y)["acc_decomposed"]
                assert grids[rank_by][a, b].item() == pytest.approx(expected, abs=1e-6), (rank_by, k, kp)
    assert not torch.equal(grids["magnitude"], grids["value"])
    without_first = grid_accuracy(train[1:], train_y[1:], test, test_y, head, ks, kps, rank_by="magnitude")
    assert not torch.equal(without_first, grids["magnitude"])


def test_the_grid_names_the_input_at_fault():
    """Each refusal says which argument is wrong, in full: the training or the test features or labels, k or k'."""
    features, labels = torch.rand(10, 4), torch.arange(10) % 2
    head, bad = random_head(4, 2), features.clone()
    bad[0, 0] = float("nan")
    nan = (" features: 1 rows hold NaN or inf (first rows [0]); check the checkpoint and the input normalisation, "
           "or use fp32 instead of bf16")
    outside = "must lie in [0, 2); found 5..6"
    range_k = "is out of range: a count must lie between 1 and D=4 (or give a fraction of mass in (0, 1], e.g. 0.9)"
    cases = [((bad, labels, features, labels, [1], [1]), "training" + nan),
             ((features, labels, bad, labels, [1], [1]), "test" + nan),
             ((features, labels + 5, features, labels, [1], [1]), f"labels of the training features {outside}"),
             ((features, labels, features, labels + 5, [1], [1]), f"labels of the test features {outside}"),
             ((features, labels, features, labels, [5], [1]), f"k=5 {range_k}"),
             ((features, labels, features, labels, [1], [5]), f"k'=5 {range_k}"),
             ((features, labels, features, labels, [], [1]), "ks and k_primes must not be empty"),
             ((features, labels, features, labels, [1], [0.5]),
              "grid_accuracy takes counts for k and k'; run influential_features for fractions of mass")]
    for (train, train_y, test, test_y, ks, kps), message in cases:
        with pytest.raises((ValueError, TypeError)) as error:
            grid_accuracy(train, train_y, test, test_y, head, ks, kps)
        assert str(error.value) == message
