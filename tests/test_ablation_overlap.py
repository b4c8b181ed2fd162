"""Noise ablation (Table 8) and index-set overlap (Jaccard, mutual information)."""
import pytest
import torch
from conftest import planted
from sklearn.metrics import mutual_info_score
from torch import nn

from classfilters import influential_features, jaccard_matrix, mean_pairwise, mutual_information_matrix, noise_ablation
from classfilters.ablation import non_influential_mask


def planted_head(d=32, c=6):
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[torch.arange(c), 3 * torch.arange(c)] = 1.0
    return head


def test_noise_on_influential_features_hurts_far_more():
    train, train_y = planted(seed=0)
    test, test_y = planted(seed=1)
    influence = influential_features(train, train_y, 2, 2)
    rows = {(r["variant"], r["head"], r["replaced"]): r["accuracy"] for r in noise_ablation(
        planted_head(), influence, test, test_y, train)}
    assert rows[("none", "full", "nothing")] == 1.0
    for variant, head in (("authors", "full"), ("matched", "full"), ("matched", "decomposed")):
        assert rows[(variant, head, "non-influential")] > 0.95
        assert rows[(variant, head, "influential")] < rows[(variant, head, "non-influential")] - 0.3
    # unscaled N(0, 1) noise is far below the planted feature's scale: it destroys it outright
    assert rows[("authors", "full", "influential")] < 0.4


def test_non_influential_sets_are_disjoint_and_matched_in_size():
    train, train_y = planted()
    influence = influential_features(train, train_y, 3, 0.7)
    other = non_influential_mask(influence, seed=1)
    assert not (other & influence.mask).any()
    assert torch.equal(other.sum(1), influence.mask.sum(1))
    assert torch.equal(other, non_influential_mask(influence, seed=1))


def test_jaccard():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    j = jaccard_matrix(mask)
    assert j[0, 1] == 1 and j[0, 2] == 0 and j[0, 3] == pytest.approx(1 / 3)
    assert torch.equal(j, j.T)


def test_mutual_information_matches_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 64, generator=gen) < 0.1
    mi = mutual_information_matrix(mask)
    for a in range(5):
        for b in range(5):
            assert mi[a, b].item() == pytest.approx(mutual_info_score(mask[a].numpy(), mask[b].numpy()), abs=1e-12)
    assert mean_pairwise(mi) == pytest.approx(mi[~torch.eye(5, dtype=torch.bool)].mean().item())


def test_grid_noise_and_heads_stay_on_the_features_device(monkeypatch):
    """grid_accuracy, with_noise and noise_ablation build their tensors on the features' device and
    never move the head they are given. Checked without a GPU: under a `meta` default device every
    tensor made without an explicit device would be a meta tensor and the CPU computation would fail."""
    from conftest import planted
    from torch import nn

    from classfilters import influential_features
    from classfilters.ablation import noise_ablation, with_noise
    from classfilters.decomposed import evaluate, grid_accuracy
    features, labels = planted()
    torch.manual_seed(0)
    head = nn.Linear(32, 6)
    influence = influential_features(features, labels, 3, 3)
    replace, mean, std = torch.rand(features.shape) < 0.3, features.mean(0), features.std(0)
    mask = influence.mask  # influence.py makes its CPU masks on the default device: made here, beforehand
    monkeypatch.setattr(type(influence), "mask", property(lambda self: mask))
    grid = grid_accuracy(features, labels, features, labels, head, [1, 3], [1, 2])
    noisy = with_noise(features, replace, mean, std)
    rows = noise_ablation(head, influence, features, labels, features)
    scores = evaluate(head, influence, features, labels)
    with torch.device("meta"):
        assert torch.equal(grid_accuracy(features, labels, features, labels, head, [1, 3], [1, 2]), grid)
        assert torch.equal(with_noise(features, replace, mean, std), noisy)
        assert noise_ablation(head, influence, features, labels, features) == rows
        assert evaluate(head, influence, features, labels) == scores
    head.double()  # the head given is copied, never converted (or moved) in place
    noise_ablation(head, influence, features, labels, features)
    evaluate(head, influence, features, labels)
    assert head.weight.dtype == torch.float64
