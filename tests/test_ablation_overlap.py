"""Noise ablation (Table 8) and index-set overlap (Jaccard, mutual information)."""
import math
from pathlib import Path

import pytest
import torch
from conftest import planted
from sklearn.metrics import mutual_info_score
from torch import nn

from classfilters import (
    DecomposedHead,
    InfluentialFeatures,
    influential_features,
    jaccard_matrix,
    mean_over_all_class_pairs,
    mean_pairwise,
    mutual_information_matrix,
    noise_ablation,
)
from classfilters.ablation import arm_masks, non_influential_mask, summarize, with_noise


def planted_head(d=32, c=6):
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[torch.arange(c), 3 * torch.arange(c)] = 1.0
    return head


def rows_by_key(rows):
    return {(r["noise"], r["head"], r["replaced"]): r for r in summarize(rows)}


def test_noise_on_influential_features_hurts_far_more():
    train, train_y = planted(seed=0)
    test, test_y = planted(seed=1)
    influence = influential_features(train, train_y, 2, 2)
    rows = noise_ablation(planted_head(), influence, test, test_y, train, draws=10)
    summary = rows_by_key(rows)
    assert summary[("none", "full", "nothing")]["mean"] == 1.0
    for noise, head in (("standard_normal", "full"), ("matched", "full"), ("matched", "decomposed")):
        for arm in ("non_influential_all", "non_influential_matched_size"):
            assert summary[(noise, head, arm)]["mean"] > 0.85, (noise, head, arm)
            assert summary[(noise, head, arm)]["draws"] == 10
        assert summary[(noise, head, "influential")]["mean"] < summary[(noise, head, "non_influential_all")]["mean"] - 0.3
    # unscaled N(0, 1) noise is far below the planted feature's scale: it destroys it outright
    assert summary[("standard_normal", "full", "influential")]["mean"] < 0.4
    # the authors' Table 8 is exactly the two N(0, 1), full-head rows: I_y, and everything outside I_y
    marked = {(r["replaced"]) for r in summarize(rows) if r["authors_table8"] and r["noise"] != "none"}
    assert marked == {"influential", "non_influential_all"}


def test_the_non_influential_arms_really_replace_features():
    """A head that reads only features outside every I_c: noising all of them must destroy it."""
    train, train_y = planted(seed=0)
    test, test_y = planted(seed=1)
    influence = influential_features(train, train_y, 2, 2)
    head = planted_head()
    with torch.no_grad():                                     # the class signal moved to feature 3c + 2
        head.weight.zero_()
        head.weight[torch.arange(6), 3 * torch.arange(6) + 2] = 1.0
    test = test.clone()
    test[torch.arange(len(test_y)), 3 * test_y + 2] += 4.0
    assert not influence.mask[:, 3 * torch.arange(6) + 2].any()
    summary = rows_by_key(noise_ablation(head, influence, test, test_y, train, draws=10))
    assert summary[("none", "full", "nothing")]["mean"] == 1.0
    assert summary[("standard_normal", "full", "influential")]["mean"] == 1.0
    assert summary[("standard_normal", "full", "non_influential_all")]["mean"] < 0.4
    # the size-matched sets are random: across draws they sometimes hit feature 3y + 2, so the mean drops
    # and the draws differ
    assert summary[("standard_normal", "full", "non_influential_matched_size")]["mean"] < 1.0
    assert summary[("standard_normal", "full", "non_influential_matched_size")]["std"] > 0


def test_arms_and_noise_replace_exactly_the_chosen_entries():
    train, train_y = planted()
    influence = influential_features(train, train_y, 2, 2)
    arms = arm_masks(influence, train_y, torch.Generator().manual_seed(0))
    mask = influence.mask[train_y]
    assert torch.equal(arms["influential"], mask)
    assert torch.equal(arms["non_influential_all"], ~mask)
    assert torch.equal(arms["non_influential_matched_size"].sum(1), mask.sum(1))
    assert not (arms["non_influential_matched_size"] & mask).any()
    for where in arms.values():
        noisy = with_noise(train, where, 0.0, 1.0, seed=3)
        assert torch.equal(noisy != train, where)


def test_matched_noise_has_each_features_mean_and_std():
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.linspace(-2, 5, 8), torch.linspace(0.1, 3, 8)
    noisy = with_noise(torch.zeros(20000, 8), torch.ones(20000, 8, dtype=torch.bool), mean, std, gen)
    assert torch.allclose(noisy.mean(0), mean, atol=0.05)
    assert torch.allclose(noisy.std(0), std, rtol=0.03)


def test_draws_are_reproducible_and_differ():
    train, train_y = planted(seed=0)
    test, test_y = planted(seed=1, strength=1.0)
    influence = influential_features(train, train_y, 2, 2)
    a = noise_ablation(planted_head(), influence, test, test_y, train, seed=5, draws=10)
    assert a == noise_ablation(planted_head(), influence, test, test_y, train, seed=5, draws=10)
    acc = [r["accuracy"] for r in a if (r["noise"], r["replaced"]) == ("matched", "influential") and r["head"] == "full"]
    assert len(acc) == 10 and len(set(acc)) > 1                                    # ten different draws
    with pytest.raises(ValueError, match="draws"):
        noise_ablation(planted_head(), influence, test, test_y, train, draws=0)


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


def test_mutual_information_by_hand_and_both_averages():
    """D = 4, I_a = {0, 1}, I_b = {0}: p(1,1) = p(1,0) = 1/4, p(0,0) = 1/2, p(0,1) = 0."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mi = mutual_information_matrix(mask)
    ab = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    entropy_a, entropy_b = math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert mi[0, 1].item() == pytest.approx(ab) and mi[1, 0].item() == pytest.approx(ab)
    assert mi[0, 0].item() == pytest.approx(entropy_a) and mi[1, 1].item() == pytest.approx(entropy_b)
    assert mean_pairwise(mi) == pytest.approx(ab)                                          # ours: distinct pairs
    assert mean_over_all_class_pairs(mi) == pytest.approx((entropy_a + entropy_b + 2 * ab) / 4)  # the paper's


@pytest.mark.parametrize("folder", ["cifar10-cpu", "cifar10-cpu-resnet20"])
def test_committed_index_sets_under_the_papers_definition(folder):
    """The committed ResNet-20 index sets (k = k' = 5), recomputed from influence.json here, give the mutual
    information the committed table reports under both averagings (RESULTS.md quotes that table)."""
    import pandas as pd
    root = Path(__file__).resolve().parents[1] / "figures" / folder
    influence = InfluentialFeatures.load(root / "influence.json")
    assert (influence.k, influence.k_prime, influence.num_features) == (5, 5, 64)
    mi = mutual_information_matrix(influence.mask)
    table = pd.read_csv(root / "csg_mutual_information.csv").set_index("method").loc["ours (Algorithm 1)"]
    assert mean_over_all_class_pairs(mi) == pytest.approx(table["mutual_information_paper"], abs=1e-9)
    assert mean_pairwise(mi) == pytest.approx(table["mutual_information_distinct_pairs"], abs=1e-9)
    assert mean_over_all_class_pairs(mi) > mean_pairwise(mi)  # the diagonal (entropies) raises the paper's


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


# ------------------------------------------------------------------ mutation survivors killed (make mutate)


def test_summarize_gives_the_sample_standard_deviation_of_each_arm():
    rows = [{"noise": "n", "head": "full", "replaced": "r", "authors_table8": True, "accuracy": a}
            for a in (0.2, 0.4, 0.9)]
    (row,) = summarize(rows)
    assert row["draws"] == 3 and row["mean"] == pytest.approx(0.5)
    assert row["std"] == pytest.approx(((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2) ** 0.5)  # ddof 1, by hand


def test_default_noise_is_standard_normal():
    features = torch.full((20000, 2), 7.0)
    replace = torch.tensor([True, False]).expand(20000, 2)
    noisy = with_noise(features, replace, seed=3)
    assert noisy[:, 0].mean().abs() < 0.03 and (noisy[:, 0].std() - 1).abs() < 0.03  # N(0, 1) by default
    assert torch.equal(noisy[:, 1], features[:, 1])


def test_noise_keeps_the_features_dtype_and_device():
    """bf16 / float16 features stay in their dtype (the noise is rounded to it, not the features promoted), and on
    another device (the meta device stands in for a GPU) the mask and the noise follow the features there."""
    features = torch.rand(64, 8, generator=torch.Generator().manual_seed(0))
    replace = torch.rand(64, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    exact = with_noise(features, replace, mean=2.0, std=0.5, seed=4)
    for dtype in (torch.bfloat16, torch.float16):
        noisy = with_noise(features.to(dtype), replace, mean=2.0, std=0.5, seed=4)
        assert noisy.dtype == dtype
        assert torch.equal(noisy, torch.where(replace, exact.to(dtype), features.to(dtype)))
    on_meta = with_noise(features.to("meta"), replace, mean=torch.zeros(8), std=torch.ones(8), seed=4)
    assert on_meta.device.type == "meta" and on_meta.shape == features.shape


def test_size_matched_sets_are_drawn_anew_for_each_draw():
    features = torch.rand(200, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat_interleave(50)
    influence = influential_features(features, labels, k=3, k_prime=3)
    gen = torch.Generator().manual_seed(0)
    first, second = (arm_masks(influence, labels, gen)["non_influential_matched_size"] for _ in range(2))
    assert not torch.equal(first, second)  # one generator, consumed: another random set per draw


def test_mean_pairwise_of_a_single_class_is_undefined():
    assert math.isnan(mean_pairwise(torch.ones(1, 1)))
    assert mean_pairwise(torch.tensor([[1.0, 0.2], [0.4, 1.0]])) == pytest.approx(0.3)


def test_summarize_with_one_and_two_draws():
    one = summarize([{"noise": "n", "head": "full", "replaced": "r", "authors_table8": True, "accuracy": 0.7}])
    assert one[0]["std"] == 0.0 and one[0]["mean"] == 0.7                      # one draw: no spread
    two = summarize([{"noise": "n", "head": "full", "replaced": "r", "authors_table8": True, "accuracy": a}
                     for a in (0.6, 0.8)])
    assert two[0]["std"] == pytest.approx(0.02 ** 0.5)                         # ddof 1 with two draws


def test_jaccard_of_identical_single_feature_sets_is_one():
    mask = torch.tensor([[True, False, False], [True, False, False], [False, True, False]])
    assert jaccard_matrix(mask).tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_noise_ablation_is_its_procedure_written_out():
    """`noise_ablation` row for row against the procedure written out (issue 16): the two noiseless rows, then per
    draw i a generator seeded seed + i that draws the size-matched sets, then per arm N(0, 1) through the full head
    and N(mean_j, std_j) (each feature's own, over the training features) through both heads; 10 draws by default.
    The features' columns have different means and spreads, so a noise scaled otherwise changes the accuracies."""
    train, train_y = planted(n_per_class=30, seed=1, strength=3.0)
    test, test_y = planted(n_per_class=30, seed=2, strength=3.0)
    scale = torch.linspace(0.2, 3.0, 32)
    train, test = train * scale + scale, test * scale + scale
    torch.manual_seed(0)
    head = nn.Linear(32, 6)
    with torch.no_grad():
        head.weight[torch.arange(6), 3 * torch.arange(6)] += 1.0
    influence = influential_features(train, train_y, 4, 4)

    def written_out(seed, draws):
        mask, decomposed = influence.mask[test_y], DecomposedHead(head, influence)
        heads = {"full": head, "decomposed": decomposed}
        mean, std = train.mean(0), train.std(0)
        with torch.no_grad():
            rows = [{"noise": "none", "head": name, "replaced": "nothing", "draw": 0,
                     "accuracy": (h(test).argmax(1) == test_y).float().mean().item(), "authors_table8": name == "full"}
                    for name, h in heads.items()]
            for draw in range(draws):
                gen = torch.Generator().manual_seed(seed + draw)
                arms = {"influential": mask, "non_influential_all": ~mask,
                        "non_influential_matched_size": non_influential_mask(influence, gen)[test_y]}
                for arm, where in arms.items():
                    noisy = torch.where(where, torch.randn(test.shape, generator=gen), test)
                    rows.append({"noise": "standard_normal", "head": "full", "replaced": arm, "draw": draw,
                                 "accuracy": (head(noisy).argmax(1) == test_y).float().mean().item(),
                                 "authors_table8": arm != "non_influential_matched_size"})
                    noisy = torch.where(where, torch.randn(test.shape, generator=gen) * std + mean, test)
                    rows += [{"noise": "matched", "head": name, "replaced": arm, "draw": draw,
                              "accuracy": (h(noisy).argmax(1) == test_y).float().mean().item(), "authors_table8": False}
                             for name, h in heads.items()]
        return rows

    torch.manual_seed(123)  # the global generator plays no part
    got = noise_ablation(head, influence, test, test_y, train)
    assert len(got) == 2 + 10 * 3 * 3 and got == written_out(0, 10)
    two = noise_ablation(head, influence, test, test_y, train, seed=5, draws=2)
    assert two == written_out(5, 2)
    one = noise_ablation(head, influence, test, test_y, train, seed=6, draws=1)  # one draw is enough
    assert one == written_out(6, 1)
    assert one[2:] == [{**r, "draw": 0} for r in two[2:] if r["draw"] == 1]  # a draw reproducible on its own
    accuracy = {(r["noise"], r["head"], r["replaced"]): r["accuracy"] for r in got if r["draw"] == 0}
    assert accuracy["matched", "full", "influential"] != accuracy["standard_normal", "full", "influential"]
