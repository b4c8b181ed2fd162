"""tables.py: every table checked against values computed here, by hand or by a plain loop.

The subjects are small synthetic ones (C = 3 classes, D = 8 features, class c planted on features
2c and 2c + 1, an imperfect random head) built without any training, so that Algorithm 1, the
decomposed logits z_c = sum_{j in I_c} W[c, j] phi_j + b_c and their accuracies can be recomputed
here independently of the library. Nothing trains a network: the whole-network arms of
`retrain_network` run through spies that record what they are given.
"""
import dataclasses
import math
import statistics

import pandas as pd
import pytest
import torch
from torch import nn

import classfilters as cf
from classfilters import tables
from classfilters.ablation import noise_ablation, non_influential_mask
from classfilters.csg import GatedModel
from classfilters.profile import Profile
from classfilters.recipe import Recipe
from classfilters.session import Study, Subject
from classfilters.train import finetune_head
from classfilters.uncertainty import bootstrap_accuracy

C, D = 3, 8
CLASSES = ["ant", "bee", "cat"]


# ------------------------------------------------------------------------------------------ helpers


def planted_features(n_per_class: int, seed: int, strength: float = 1.5):
    """Non-negative (N, D) features: class c has feature 2c switched on and 2c + 1 partly on."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(n_per_class)
    features = torch.rand(len(labels), D, generator=gen)
    rows = torch.arange(len(labels))
    features[rows, 2 * labels] += strength
    features[rows, 2 * labels + 1] += strength * torch.rand(len(labels), generator=gen)
    return features, labels


def split_of(labels: torch.Tensor, tag: str) -> cf.ImageSplit:
    return cf.ImageSplit(labels, list(CLASSES), "toy", f"toy-{tag}")


def make_subject(name: str = "resnet8", seed: int = 0, n_train: int = 20, n_test: int = 15) -> Subject:
    """A subject with planted features and a random head whose full accuracy lies strictly in (0, 1)."""
    x_train, y_train = planted_features(n_train, seed)
    x_test, y_test = planted_features(n_test, seed + 100)
    order = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(seed))  # classes interleaved
    x_test, y_test = x_test[order], y_test[order]
    gen = torch.Generator().manual_seed(seed + 50)
    head = nn.Linear(D, C)
    with torch.no_grad():
        weight = torch.randn(C, D, generator=gen)
        weight[torch.arange(C), 2 * torch.arange(C)] += 1.5
        head.weight.copy_(weight)
        head.bias.copy_(0.3 * torch.randn(C, generator=gen))
    model = cf.FeatureModel(nn.Identity(), head)
    return Subject(name, model, split_of(y_train, f"train{seed}"), split_of(y_test, f"test{seed}"), x_train, x_test)


def head_params(subject: Subject):
    return subject.model.head.weight.detach().clone(), subject.model.head.bias.detach().clone()


def reference_indices(features: torch.Tensor, labels: torch.Tensor, k: int, k_prime: int) -> list[list[int]]:
    """Algorithm 1 as a plain loop: each image votes for its k largest features, I_c = the k' most voted."""
    d = features.shape[1]
    votes = [[0] * d for _ in range(int(labels.max()) + 1)]
    for row, c in zip(features.tolist(), labels.tolist()):
        for j in sorted(range(d), key=lambda j: (-row[j], j))[:k]:
            votes[c][j] += 1
    return [sorted(range(d), key=lambda j: (-h[j], j))[:k_prime] for h in votes]


def full_logits(subject: Subject, features: torch.Tensor) -> torch.Tensor:
    w, b = head_params(subject)
    return features @ w.T + b


def decomposed_logits(subject: Subject, features: torch.Tensor, indices) -> torch.Tensor:
    w, b = head_params(subject)
    return torch.stack([features[:, idx] @ w[c, idx] + b[c] for c, idx in enumerate(indices)], 1)


def hand_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return sum(int(p == y) for p, y in zip(logits.argmax(1).tolist(), labels.tolist())) / len(labels)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1) == labels


def influence_of(indices, k=2, k_prime=2, d=D) -> cf.InfluentialFeatures:
    return cf.InfluentialFeatures([list(i) for i in indices], torch.zeros(len(indices), d, dtype=torch.int64),
                                  k, k_prime)


def reference_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def reference_mi(a: set, b: set, d: int) -> float:
    """Mutual information (nats) of two indicator vectors over d features, from the joint counts."""
    total = 0.0
    for u in (0, 1):
        for v in (0, 1):
            joint = sum(1 for j in range(d) if (j in a) == u and (j in b) == v) / d
            pa = sum(1 for j in range(d) if (j in a) == u) / d
            pb = sum(1 for j in range(d) if (j in b) == v) / d
            if joint > 0:
                total += joint * math.log(joint / (pa * pb))
    return total


def study_of(tmp_path, subjects, **settings) -> Study:
    """A real `Study` whose subjects are already loaded (nothing is built, trained or extracted)."""
    profile = Profile(**{"name": "toy", "models": [s.name for s in subjects], "device": "cpu", "progress": False,
                         **settings})
    study = Study(profile, tmp_path)
    study._subjects.update({s.name: s for s in subjects})
    return study


# ------------------------------------------------------------------------------------------ names


def test_family_is_the_architectures_family_with_the_tag_kept():
    assert tables.family("resnet20") == "ResNet (CIFAR)"
    assert tables.family("resnet20@shared") == "ResNet (CIFAR), shared"
    assert tables.family("wide_resnet50_2@ft") == "Wide ResNet, ft"


def test_slug_lowercases_and_joins_runs_of_other_characters_with_one_underscore():
    assert tables.slug("ResNet (CIFAR), shared") == "resnet_cifar_shared"
    assert tables.slug("(x)") == "x"
    assert tables.slug("__A--b__") == "a_b"
    assert tables.slug("Wide ResNet 50") == "wide_resnet_50"
    assert tables.slug("abc123") == "abc123"
    only_other = [tables.slug(name) for name in ("模型", "モデル")]  # no ASCII letter or digit
    assert all(part.startswith("name_") and len(part) == 13 for part in only_other)
    assert len(set(only_other)) == 2 and tables.slug("模型") == only_other[0]  # distinct and stable
    partly = tables.slug("ResNet 模型"), tables.slug("ResNet モデル")
    assert all(part.startswith("resnet_") for part in partly) and partly[0] != partly[1]
    assert tables.slug("--") == "" and tables.slug("x\udcff").startswith("x_")  # a surrogate-escaped name too


# ------------------------------------------------------------------------------------------ Fig 2, overlap


def test_index_table_lists_each_class_set_its_size_and_the_mass_it_covers():
    histograms = torch.tensor([[5, 0, 3, 2], [0, 1, 0, 0], [0, 0, 0, 0]])
    influence = cf.InfluentialFeatures([[2, 0], [1, 3], [3]], histograms, 2, 2)
    table = tables.index_table(influence, CLASSES)
    assert list(table.columns) == ["class", "indices", "size", "mass_covered"]
    assert table["class"].tolist() == CLASSES
    assert table["indices"].tolist() == ["2 0", "1 3", "3"]        # I_c in its own order
    assert table["size"].tolist() == [2, 2, 1]
    # (5 + 3) / 10; a histogram of total 1 fully covered; an empty histogram covers nothing (not NaN)
    assert table["mass_covered"].tolist() == pytest.approx([0.8, 1.0, 0.0])


MASK_SETS = [{0, 1, 2}, {1, 2, 4}, {5}]


def mask_of(sets, d=6) -> torch.Tensor:
    mask = torch.zeros(len(sets), d, dtype=torch.bool)
    for c, s in enumerate(sets):
        mask[c, sorted(s)] = True
    return mask


def test_overlap_frames_are_the_labelled_jaccard_and_mutual_information_matrices():
    jaccard, mi = tables.overlap_frames(mask_of(MASK_SETS), CLASSES)
    for frame in (jaccard, mi):
        assert list(frame.index) == CLASSES and list(frame.columns) == CLASSES
    for i, a in enumerate(MASK_SETS):
        for j, b in enumerate(MASK_SETS):
            assert jaccard.iloc[i, j] == pytest.approx(reference_jaccard(a, b))
            assert mi.iloc[i, j] == pytest.approx(reference_mi(a, b, 6))
    assert jaccard.loc["ant", "bee"] == pytest.approx(2 / 4)       # by hand: {1, 2} of {0, 1, 2, 4}
    assert mi.loc["cat", "cat"] == pytest.approx(-(1 / 6) * math.log(1 / 6) - (5 / 6) * math.log(5 / 6))


def test_overlap_summary_averages_mi_over_all_ordered_pairs_and_over_distinct_pairs():
    influence = influence_of([sorted(s) for s in MASK_SETS], k=4, k_prime=3, d=6)
    table = tables.overlap_summary(influence)
    assert list(table.columns) == ["k", "k_prime", "mean_jaccard_distinct_pairs", "mutual_information_paper",
                                   "mutual_information_distinct_pairs"]
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["k"], row["k_prime"]) == (4, 3)
    pairs = [(a, b) for a in range(3) for b in range(3)]
    distinct = [(a, b) for a, b in pairs if a != b]
    mi = {(a, b): reference_mi(MASK_SETS[a], MASK_SETS[b], 6) for a, b in pairs}
    jac = [reference_jaccard(MASK_SETS[a], MASK_SETS[b]) for a, b in distinct]
    assert row["mean_jaccard_distinct_pairs"] == pytest.approx(sum(jac) / 6)
    assert row["mutual_information_paper"] == pytest.approx(sum(mi.values()) / 9)          # C^2, self-pairs too
    assert row["mutual_information_distinct_pairs"] == pytest.approx(sum(mi[p] for p in distinct) / 6)
    assert row["mutual_information_paper"] > row["mutual_information_distinct_pairs"] + 0.05


# ------------------------------------------------------------------------------------------ Fig 3


def test_grid_table_matches_a_hand_decomposition_of_every_cell_and_drops_values_above_d(capsys):
    subject = make_subject()
    table = tables.grid_table(subject, [4, 1, 2, D + 12], [3, 1, D + 1])
    out = capsys.readouterr().out
    assert f"k values [{D + 12}] dropped" in out and f"k' values [{D + 1}] dropped" in out
    assert list(table.columns) == ["k", "k_prime", "acc_decomposed", "acc_full", "relative", "multiply_adds"]
    assert list(zip(table.k, table.k_prime)) == [(1, 1), (1, 3), (2, 1), (2, 3), (4, 1), (4, 3)]
    x, y = subject.test_features, subject.test.labels
    full = hand_accuracy(full_logits(subject, x), y)
    assert 0 < full < 1                                                     # relative != acc_decomposed
    expected = [hand_accuracy(decomposed_logits(subject, x, reference_indices(
        subject.train_features, subject.train.labels, k, kp)), y) for k, kp in zip(table.k, table.k_prime)]
    assert len(set(expected)) >= 4                                          # the cells differ
    assert table.acc_decomposed.tolist() == pytest.approx(expected)
    assert table.acc_full.tolist() == pytest.approx([full] * 6)
    assert table.relative.tolist() == pytest.approx([a / full for a in expected])
    assert table.multiply_adds.tolist() == [kp * C for kp in table.k_prime]


def test_relative_accuracy_is_nan_when_the_full_head_scores_nothing():
    from classfilters.decomposed import relative_accuracy
    assert relative_accuracy(0.3, 0.6) == pytest.approx(0.5) and math.isnan(relative_accuracy(0.3, 0.0))
    assert relative_accuracy(pd.Series([0.2, 0.4]), 0.8).tolist() == pytest.approx([0.25, 0.5])
    assert relative_accuracy(pd.Series([0.2, 0.0]), 0.0).isna().all()
    subject = make_subject()
    with torch.no_grad():
        subject.model.head.bias.copy_(torch.tensor([1e6, 0.0, 0.0]))         # always class 0 ...
    subject = dataclasses.replace(subject, test=split_of(torch.ones(len(subject.test), dtype=torch.long), "ones"))
    assert subject.full_accuracy == 0                                       # ... on a test split of class 1 only
    table = tables.grid_table(subject, [1, 2], [1, 2])
    assert table.relative.isna().all() and table.acc_full.eq(0).all()


# ------------------------------------------------------------------------------------------ Tables 2-6, Fig 4


DEPTH_KEYS = ["family", "model", "D", "C", "k", "k_prime", "k'/C", "k'/D", "acc_decomposed", "acc_full", "relative",
              "acc_full_lo", "acc_full_hi", "acc_decomposed_lo", "acc_decomposed_hi", "relative_lo", "relative_hi",
              "n_test", "multiply_adds_full", "multiply_adds_decomposed"]


def expected_depth(subject: Subject, k: int, seed: int) -> dict:
    """The depth row's accuracies by hand and its intervals from those hand-made correctness vectors."""
    x, y = subject.test_features, subject.test.labels
    full = correct(full_logits(subject, x), y)
    dec = correct(decomposed_logits(subject, x, reference_indices(subject.train_features, subject.train.labels,
                                                                  k, k)), y)
    boot = bootstrap_accuracy(full, dec, seed=seed)
    return {"acc_full": full.double().mean().item(), "acc_decomposed": dec.double().mean().item(),
            **{key: boot[key] for key in DEPTH_KEYS if key.endswith(("_lo", "_hi"))}}


def check_depth_row(row: dict, subject: Subject, k: int, seed: int, family: str):
    expected = expected_depth(subject, k, seed)
    assert row["family"] == family and row["model"] == subject.name
    assert (row["D"], row["C"], row["k"], row["k_prime"]) == (D, C, k, k)
    assert row["k'/C"] == pytest.approx(k / C) and row["k'/D"] == pytest.approx(k / D)
    assert row["n_test"] == len(subject.test.labels) != len(subject.train.labels)
    assert row["multiply_adds_full"] == C * D and row["multiply_adds_decomposed"] == C * k
    assert row["acc_full"] == pytest.approx(expected["acc_full"])
    assert row["acc_decomposed"] == pytest.approx(expected["acc_decomposed"])
    assert row["relative"] == pytest.approx(expected["acc_decomposed"] / expected["acc_full"])
    for name in ("acc_full", "acc_decomposed", "relative"):
        lo, hi = row[f"{name}_lo"], row[f"{name}_hi"]
        assert lo <= row[name] <= hi and lo < hi
        assert (lo, hi) == pytest.approx((expected[f"{name}_lo"], expected[f"{name}_hi"]))


def test_depth_row_reports_sizes_ratios_accuracies_and_their_intervals(tmp_path):
    subject = make_subject("resnet8@x", seed=0)
    study = study_of(tmp_path, [subject], seed=0)
    assert expected_depth(subject, 2, 5) != expected_depth(subject, 2, 0)   # the seed shows in the intervals
    row = tables.depth_row(study, subject, 2, seed=5)
    assert list(row) == DEPTH_KEYS
    check_depth_row(row, subject, 2, 5, "ResNet (CIFAR), x")
    assert expected_depth(subject, 3, 0)["acc_decomposed"] != expected_depth(subject, 2, 0)["acc_decomposed"]
    assert expected_depth(subject, 3, 1) != expected_depth(subject, 3, 0)
    check_depth_row(tables.depth_row(study, subject, 3), subject, 3, 0, "ResNet (CIFAR), x")   # default seed 0


def test_depth_table_has_one_row_per_profile_model_in_order_with_the_profile_seed(tmp_path):
    subjects = [make_subject("resnet14", seed=3), make_subject("resnet8@tag", seed=1)]
    study = study_of(tmp_path, subjects, seed=4)
    table = tables.depth_table(study, 2)
    assert list(table.columns) == DEPTH_KEYS
    assert table.model.tolist() == ["resnet14", "resnet8@tag"]
    for row, subject, family in zip(table.to_dict("records"), subjects, ["ResNet (CIFAR)", "ResNet (CIFAR), tag"]):
        assert expected_depth(subject, 2, 4) != expected_depth(subject, 2, 0)
        check_depth_row(row, subject, 2, 4, family)


def test_depth_curves_follow_k_equal_k_prime_per_model_with_intervals_and_drop_k_above_d(tmp_path, capsys):
    subjects = [make_subject("resnet20", seed=2), make_subject("resnet8@b", seed=5)]
    study = study_of(tmp_path, subjects, seed=3)
    curves = tables.depth_curves(study, [3, 1, D + 5])
    assert f"k of resnet20 values [{D + 5}] dropped" in capsys.readouterr().out
    assert curves.model.tolist() == ["resnet20", "resnet20", "resnet8@b", "resnet8@b"]
    assert curves.family.tolist() == ["ResNet (CIFAR)"] * 2 + ["ResNet (CIFAR), b"] * 2
    assert curves.k.tolist() == [1, 3, 1, 3] and curves.k_prime.tolist() == [1, 3, 1, 3]
    assert list(curves.index) == [0, 1, 2, 3]
    for row in curves.to_dict("records"):
        subject = subjects[0] if row["model"] == "resnet20" else subjects[1]
        expected = expected_depth(subject, row["k"], 3)
        assert expected != expected_depth(subject, row["k"], 0)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value), key
        assert row["relative"] == pytest.approx(expected["acc_decomposed"] / expected["acc_full"])
        assert row["n"] == len(subject.test.labels)


# ------------------------------------------------------------------------------------------ seeds


SEED_COLUMNS = ["model", "family", "seed", "k", "acc_full", "acc_decomposed", "relative"]


def seeded_study(tmp_path, seed=2, other=7, weights="train"):
    """A study of "resnet8" (trained here by default) whose seeded copies are already loaded."""
    base, copy = make_subject("resnet8", seed=0), make_subject("resnet8", seed=4)
    study = study_of(tmp_path, [base], seed=seed, weights=weights)
    study._subjects[f"resnet8#seed{other}"] = copy
    return study, base, copy


def test_seed_curves_evaluate_every_seed_of_every_trained_model_along_the_diagonal(tmp_path, capsys):
    study, base, copy = seeded_study(tmp_path)
    curves = tables.seed_curves(study, [3, D + 1, 1], [2, 7])
    assert f"note: k of resnet8 values [{D + 1}] dropped from the grid" in capsys.readouterr().out  # named per model
    assert list(curves.columns) == SEED_COLUMNS
    assert list(zip(curves.seed, curves.k)) == [(2, 1), (2, 3), (7, 1), (7, 3)]
    assert set(curves.model) == {"resnet8"} and set(curves.family) == {"ResNet (CIFAR)"}
    for row in curves.to_dict("records"):
        subject = base if row["seed"] == 2 else copy
        expected = expected_depth(subject, row["k"], 0)
        assert row["acc_full"] == pytest.approx(expected["acc_full"])
        assert row["acc_decomposed"] == pytest.approx(expected["acc_decomposed"])
        assert row["relative"] == pytest.approx(expected["acc_decomposed"] / expected["acc_full"])
    assert curves.acc_full.nunique() == 2                                   # the two seeds' models differ


def test_seed_curves_are_empty_for_one_seed_or_no_model_trained_here(tmp_path):
    study, _, _ = seeded_study(tmp_path / "a")
    for frame in (tables.seed_curves(study, [1, 2], [2]),
                  tables.seed_curves(seeded_study(tmp_path / "b", weights="random")[0], [1, 2], [2, 7])):
        assert frame.empty and list(frame.columns) == SEED_COLUMNS


def test_seed_summary_gives_mean_sample_std_min_max_and_seed_count_per_model_and_k():
    rows = [("b", 10, 0, [0.9, 0.6, 0.5]), ("b", 10, 1, [0.8, 0.7, 0.9]), ("b", 10, 2, [0.4, 0.1, 0.25]),
            ("a", 5, 0, [0.7, 0.35, 0.5]), ("b", 5, 0, [0.6, 0.3, 0.5]), ("a", 5, 1, [0.5, 0.45, 0.9]),
            ("b", 5, 1, [0.2, 0.2, 1.0])]
    curves = pd.DataFrame([{"model": m, "family": f"F{m}", "seed": s, "k": k, "acc_full": v[0],
                            "acc_decomposed": v[1], "relative": v[2]} for m, k, s, v in rows])
    summary = tables.seed_summary(curves)
    names = ("acc_full", "acc_decomposed", "relative")
    stats = [f"{n}_{s}" for n in names for s in ("mean", "std", "min", "max")]
    assert list(summary.columns) == ["model", "family", "k", *stats, "n_seeds"]
    groups = [("b", 10), ("a", 5), ("b", 5)]                                # in the order they first come
    assert list(zip(summary.model, summary.k)) == groups
    assert summary.family.tolist() == ["Fb", "Fa", "Fb"]
    for row, (model, k) in zip(summary.to_dict("records"), groups):
        members = [v for m, kk, _, v in rows if (m, kk) == (model, k)]
        assert row["n_seeds"] == len(members)
        for i, name in enumerate(names):
            values = [v[i] for v in members]
            assert row[f"{name}_mean"] == pytest.approx(statistics.mean(values))
            assert row[f"{name}_std"] == pytest.approx(statistics.stdev(values))     # ddof 1
            assert row[f"{name}_min"] == min(values) and row[f"{name}_max"] == max(values)


def test_seed_summary_of_no_curves_is_empty_with_every_column():
    summary = tables.seed_summary(pd.DataFrame(columns=SEED_COLUMNS))
    stats = [f"{n}_{s}" for n in ("acc_full", "acc_decomposed", "relative") for s in ("mean", "std", "min", "max")]
    assert summary.empty and list(summary.columns) == ["model", "family", "k", *stats, "n_seeds"]


# ------------------------------------------------------------------------------------------ §5.2.3


def test_retrain_fine_tunes_the_decomposed_head_and_prices_the_layers():
    subject = make_subject(n_train=50)                                      # 150 images: two batches of 128
    influence = influence_of([[0], [2, 3], [4, 5, 1]], k=3, k_prime=3)
    history, cost, head = tables.retrain(subject, influence, epochs=2, lr=0.05, seed=3)
    x, y = subject.test_features, subject.test.labels
    full = hand_accuracy(full_logits(subject, x), y)
    assert history.epoch.tolist() == [0, 1, 2]
    assert history.test_acc.iloc[0] == pytest.approx(hand_accuracy(decomposed_logits(subject, x, influence.indices), y))
    assert history.acc_full.tolist() == pytest.approx([full] * 3)
    assert history.relative.tolist() == pytest.approx((history.test_acc / full).tolist())
    assert history.attrs["lr"] == 0.05
    # the same fine-tuning run by hand: Adam on the masked head, seed 3, the test split scored each epoch
    def tuned(seed):
        own = cf.DecomposedHead(subject.head, influence)
        rows = finetune_head(own, subject.train_features, subject.train.labels, epochs=2, lr=0.05, seed=seed,
                             eval_features=x, eval_labels=y)
        return own, rows
    own, rows = tuned(3)
    assert not torch.allclose(own.weight, tuned(0)[0].weight)              # the seed matters here
    assert torch.allclose(head.weight, own.weight) and torch.allclose(head.bias, own.bias)
    assert history.train_acc.tolist() == pytest.approx([r["train_acc"] for r in rows])
    assert history.test_acc.tolist() == pytest.approx([r["test_acc"] for r in rows])
    assert torch.equal(head.mask, influence.mask) and (head.weight[~influence.mask] == 0).all()
    assert cost.to_dict("records") == [{"layer": "full", "multiply_adds": C * D, "fraction": 1.0},
                                       {"layer": "decomposed", "multiply_adds": 6, "fraction": 6 / (C * D)}]


def hand_history():
    history = pd.DataFrame({"epoch": [0, 1, 3], "test_acc": [0.25, 0.5, 0.75]})
    history.attrs["lr"] = 0.003
    return history


RETRAIN_KEYS = ["retrained", "head", "authors", "optimizer", "epochs", "lr", "test_acc", "relative"]


def check_first_three_rows(table, full):
    assert list(table.columns) == RETRAIN_KEYS
    assert table.retrained.tolist()[:3] == ["nothing (full head)", "nothing (masked weights)",
                                            "head only (cached features)"]
    assert table["head"].tolist()[:3] == ["full", "decomposed", "decomposed"]
    assert table.optimizer.tolist()[:3] == ["", "", "Adam"]
    assert table.epochs.tolist()[:3] == [0, 0, 3]
    assert math.isnan(table.lr[0]) and math.isnan(table.lr[1]) and table.lr[2] == 0.003
    assert table.test_acc.tolist()[:3] == pytest.approx([full, 0.25, 0.75])
    assert table.relative.tolist() == pytest.approx((table.test_acc / full).tolist(), nan_ok=True)
    assert table.retrained.tolist()[3:] == ["whole network", "whole network", "whole network (control)"]
    assert table["head"].tolist()[3:] == ["decomposed", "decomposed", "full"]
    assert table.authors.tolist() == [False, False, False, True, False, True]
    assert table.optimizer.tolist()[3:] == ["Adam, constant", "SGD + Nesterov, one-cycle", "Adam, constant"]


def test_retrain_network_without_images_in_memory_keeps_the_rows_as_nan(tmp_path, capsys):
    subject = make_subject()
    study = study_of(tmp_path, [subject])
    influence = influence_of(reference_indices(subject.train_features, subject.train.labels, 2, 2))
    table = tables.retrain_network(study, subject, influence, hand_history(), epochs=4, lr=0.02, authors_lr=5e-5)
    check_first_three_rows(table, hand_accuracy(full_logits(subject, subject.test_features), subject.test.labels))
    assert table.epochs.tolist()[3:] == [4, 4, 4]
    assert table.lr.tolist()[3:] == [5e-5, 0.02, 5e-5]
    assert table.test_acc[3:].isna().all() and len(table) == 6
    out = capsys.readouterr().out
    note = " skipped: train_classifier needs an in-memory split (digits, CIFAR-10)"
    assert out.count(f"whole network (decomposed head){note}") == 2
    assert out.count(f"whole network (control) (full head){note}") == 1
    assert tables.retrain_network(study, subject, influence, hand_history(), 4, 0.02).lr.tolist()[3] == 1e-4


def test_retrain_network_trains_copies_by_each_recipe_and_scores_the_heads(tmp_path, monkeypatch):
    split = cf.open_dataset("digits", "test").subset(torch.arange(120))
    gen = torch.Generator().manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, D))
    with torch.no_grad():
        body[1].weight.copy_(torch.randn(D, 64, generator=gen) / 8)
        phi = body(split.normalize(split.images))
        means = torch.stack([phi[split.labels == c].mean(0) for c in range(10)])
    head = nn.Linear(D, 10)
    with torch.no_grad():                                                   # nearest class mean, as a linear head
        head.weight.copy_(means)
        head.bias.copy_(-0.5 * means.square().sum(1))
    model = cf.FeatureModel(body, head)
    subject = Subject("resnet8", model, split, split, phi, phi)
    indices = [[c % D, (c + 3) % D] for c in range(10)]
    influence = cf.InfluentialFeatures(indices, torch.zeros(10, D, dtype=torch.int64), 2, 2)
    w, b = head.weight.detach(), head.bias.detach()
    full = hand_accuracy(phi @ w.T + b, split.labels)
    masked = torch.stack([phi[:, i] @ w[c, i] + b[c] for c, i in enumerate(indices)], 1)
    dec = hand_accuracy(masked, split.labels)
    assert 0 < dec < full < 1
    calls = []

    def fake_finetune_network(model, influence, split, recipe, device=None, seed=0, progress=True):
        calls.append(("finetune_network", model, influence, split, recipe, device, seed, progress))
        model.head = cf.DecomposedHead(model.head, influence)
        return model.eval()

    def fake_train_classifier(model, split, recipe, device=None, seed=0, progress=True):
        calls.append(("train_classifier", model, None, split, recipe, device, seed, progress))
        return model.eval()

    monkeypatch.setattr(tables, "finetune_network", fake_finetune_network)
    monkeypatch.setattr(tables, "train_classifier", fake_train_classifier)
    recipe = Recipe(epochs=9, batch_size=32, lr=0.3, weight_decay=1e-3, crop_padding=1, flip=False)
    study = study_of(tmp_path, [subject], seed=7, train=recipe, batch_size=50)
    table = tables.retrain_network(study, subject, influence, hand_history(), epochs=4, lr=0.02, authors_lr=5e-5)
    check_first_three_rows(table, full)
    assert table.test_acc.tolist()[3:] == pytest.approx([dec, dec, full])
    assert table.epochs.tolist()[3:] == [4, 4, 4] and table.lr.tolist()[3:] == [5e-5, 0.02, 5e-5]
    assert [c[0] for c in calls] == ["finetune_network", "finetune_network", "train_classifier"]
    expected = [dataclasses.replace(recipe, epochs=4, lr=5e-5, optimizer="adam", weight_decay=0.0),
                dataclasses.replace(recipe, epochs=4, lr=0.02, optimizer="sgd"),
                dataclasses.replace(recipe, epochs=4, lr=5e-5, optimizer="adam", weight_decay=0.0)]
    for (_, trained, given, data, used, device, seed, progress), want in zip(calls, expected):
        assert trained is not model and data is split
        assert used == want and (device, seed, progress) == ("cpu", 7, False)
    assert calls[0][2] is influence and calls[1][2] is influence
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, w)   # the subject's model untouched


def test_softmax_table_gives_the_first_n_images_full_and_decomposed_top_class():
    subject = make_subject()
    indices = reference_indices(subject.train_features, subject.train.labels, 2, 2)
    table = tables.softmax_table(subject, cf.DecomposedHead(subject.head, influence_of(indices)), n=4)
    assert list(table.columns) == ["image", "true", "pred_full", "p_full", "pred_decomposed", "p_decomposed"]
    x, y = subject.test_features[:4], subject.test.labels[:4]
    assert y.tolist() != subject.train.labels[:4].tolist()
    full, dec = full_logits(subject, x).softmax(1), decomposed_logits(subject, x, indices).softmax(1)
    assert table.image.tolist() == [0, 1, 2, 3]
    assert table.true.tolist() == [CLASSES[i] for i in y]
    assert table.pred_full.tolist() == [CLASSES[i] for i in full.argmax(1)]
    assert table.pred_decomposed.tolist() == [CLASSES[i] for i in dec.argmax(1)]
    assert table.p_full.tolist() == pytest.approx(full.max(1).values.tolist())
    assert table.p_decomposed.tolist() == pytest.approx(dec.max(1).values.tolist())
    assert table.p_full.tolist() != pytest.approx(table.p_decomposed.tolist())
    assert len(tables.softmax_table(subject, cf.DecomposedHead(subject.head, influence_of(indices)))) == 5


# ------------------------------------------------------------------------------------------ Tables 7, 8, 1


def test_ablation_tables_label_every_row_and_summarise_the_draws():
    subject = make_subject()
    indices = reference_indices(subject.train_features, subject.train.labels, 2, 2)
    influence = influence_of(indices)
    long, summary = tables.ablation_tables(subject, influence, seed=5, draws=3)
    assert len(long) == 2 + 3 * 3 * 3                                        # noiseless + draws x arms x 3 scorings
    assert (long.setting == long.noise + ", " + long["head"] + " head").all()
    assert set(long.setting) == {"none, full head", "none, decomposed head", "standard_normal, full head",
                                 "matched, full head", "matched, decomposed head"}
    x, y = subject.test_features, subject.test.labels
    noiseless = long[long.noise == "none"].set_index("head").accuracy
    assert noiseless["full"] == pytest.approx(hand_accuracy(full_logits(subject, x), y))
    assert noiseless["decomposed"] == pytest.approx(hand_accuracy(decomposed_logits(subject, x, indices), y))
    # the draws are those of seeds 5, 6, 7 (not the default 0, 1, ...): as ablation.py draws them
    head = subject.head
    same = pd.DataFrame(noise_ablation(head, influence, x, y, subject.train_features, 5, draws=3))
    other = pd.DataFrame(noise_ablation(head, influence, x, y, subject.train_features, 0, draws=3))
    assert not same.accuracy.equals(other.accuracy)
    assert long.drop(columns="setting").equals(same)
    groups = list(dict.fromkeys(zip(long.noise, long["head"], long.replaced)))
    assert list(zip(summary.noise, summary["head"], summary.replaced)) == groups and len(groups) == 11
    for row in summary.to_dict("records"):
        acc = long[(long.noise == row["noise"]) & (long["head"] == row["head"])
                   & (long.replaced == row["replaced"])].accuracy.tolist()
        assert row["draws"] == len(acc) == (1 if row["noise"] == "none" else 3)
        assert row["mean"] == pytest.approx(statistics.mean(acc))
        assert row["std"] == pytest.approx(statistics.stdev(acc) if len(acc) > 1 else 0.0)
    assert len(tables.ablation_tables(subject, influence)[0]) == 2 + 10 * 9                # default 10 draws


class ChannelScale(nn.Module):
    """Channel j of the maps is v_j times the (single-channel) image."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", values.float())

    def forward(self, x):
        return x * self.values[None, :, None, None]


def test_visual_table_scores_the_maps_of_the_first_image_of_each_class():
    split = cf.open_dataset("digits", "test")
    d = 24
    values = torch.arange(d).float() - 9.3                                  # no channel set averages to 0
    head = nn.Linear(d, 10)
    model = cf.FeatureModel(ChannelScale(values), head)
    phi = torch.randn(len(split), d, generator=torch.Generator().manual_seed(1))
    subject = Subject("resnet8", model, split, split, phi, phi)
    indices = [[2 * c + 1, 2 * c] for c in range(10)]
    influence = cf.InfluentialFeatures(indices, torch.zeros(10, d, dtype=torch.int64), 2, 2)
    images, maps, table = tables.visual_table(subject, influence, 6, seed=3)
    labels = split.labels.tolist()
    index = [labels.index(c) for c in range(6)]                             # the first image of classes 0..5
    assert table.image.tolist() == index and torch.equal(images, split.images[index])
    assert maps.shape == (6, 3, 8, 8)
    assert table["class"].tolist() == [str(c) for c in range(6)]
    with torch.no_grad():
        expected_pred = (phi[index] @ head.weight.T + head.bias).argmax(1)
    assert table.predicted.tolist() == [str(int(p)) for p in expected_pred]
    assert table.influential.tolist() == [f"{2 * c + 1} {2 * c}" for c in range(6)]
    chosen = non_influential_mask(influence, 3)[:6]
    assert chosen.tolist() != non_influential_mask(influence, 0)[:6].tolist()
    assert table.non_influential.tolist() == [" ".join(map(str, r.nonzero().flatten().tolist())) for r in chosen]
    level = split.normalize(split.images[index]).mean((1, 2, 3))            # the mean of the normalised image
    sets = {"standard": [list(range(d))] * 6, "non_influential": [r.nonzero().flatten().tolist() for r in chosen],
            "influential": indices[:6]}
    for name, rows in sets.items():
        scale = torch.tensor([values[r].mean().item() for r in rows])
        assert table[f"mean_{name}"].tolist() == pytest.approx((scale * level).tolist(), rel=1e-4, abs=1e-5)
        # each map is the image times a constant: correlation +1 or -1 with the image, as that constant's sign
        assert table[f"corr_image_{name}"].tolist() == pytest.approx(scale.sign().tolist(), abs=1e-4)
    assert set(table.corr_image_influential.round(3)) == {-1.0, 1.0}


def test_csg_tables_compare_both_paths_and_the_three_index_sets(tmp_path):
    subject, csg_subject = make_subject("resnet8", seed=0), make_subject("resnet8", seed=6)
    csg_subject.name = "csg copy"
    gen = torch.Generator().manual_seed(2)
    gates = torch.rand(D, C, generator=gen)
    gates[0, 0] = gates[5, 2] = 0.0
    gated = GatedModel(csg_subject.model)
    with torch.no_grad():
        gated.gates.copy_(gates)
    ours = [[0, 1], [3, 2, 4], [5]]
    influence = influence_of(ours, k=2, k_prime=2)
    study = study_of(tmp_path, [subject], k_prime=2)
    table1, overlap = tables.csg_tables(study, subject, gated, csg_subject, influence)
    x, y = csg_subject.test_features, subject.test.labels
    assert list(table1.columns) == ["model", "path", "csg_start", "accuracy", "l1_density", "l1_budget",
                                    "nonzero_fraction"]
    assert table1.model.tolist() == ["resnet8 (standard training)", "resnet8 + CSG", "resnet8 + CSG"]
    assert table1.path.tolist() == ["standard", "standard", "gated (true-label gates)"]
    assert table1.csg_start.tolist() == ["n/a (no CSG)", "from resnet8", "from resnet8"]
    gated_logits = (x * gates[:, y].T) @ head_params(csg_subject)[0].T + head_params(csg_subject)[1]
    assert table1.accuracy.tolist() == pytest.approx([
        hand_accuracy(full_logits(subject, subject.test_features), y), hand_accuracy(full_logits(csg_subject, x), y),
        hand_accuracy(gated_logits, y)])
    assert math.isnan(table1.l1_density[0]) and math.isnan(table1.nonzero_fraction[0])
    assert table1.l1_density.tolist()[1:] == pytest.approx([gates.abs().mean().item()] * 2)
    assert table1.nonzero_fraction.tolist()[1:] == pytest.approx([(D * C - 2) / (D * C)] * 2)
    assert math.isnan(table1.l1_budget[0]) and table1.l1_budget.tolist()[1:] == [0.2, 0.2]  # the official default

    def by_gate(c, highest):
        return sorted(range(D), key=lambda j: -gates[j, c] if highest else gates[j, c])[:2]
    sets = {"ours (Algorithm 1)": (ours, subject),
            "CSG lowest gates (authors' code)": ([by_gate(c, False) for c in range(C)], csg_subject),
            "CSG highest gates (sound)": ([by_gate(c, True) for c in range(C)], csg_subject)}
    assert list(overlap.columns) == ["method", "k_prime", "mutual_information_paper",
                                     "mutual_information_distinct_pairs", "jaccard_distinct_pairs", "acc_decomposed",
                                     "relative"]
    assert overlap.method.tolist() == list(sets) and overlap.k_prime.tolist() == [2, 2, 2]
    for row, (chosen, r) in zip(overlap.to_dict("records"), sets.values()):
        s = [set(i) for i in chosen]
        pairs = [(a, b) for a in range(C) for b in range(C)]
        distinct = [(a, b) for a, b in pairs if a != b]
        acc = hand_accuracy(decomposed_logits(r, r.test_features, chosen), r.test.labels)
        assert row["acc_decomposed"] == pytest.approx(acc)
        assert row["relative"] == pytest.approx(acc / hand_accuracy(full_logits(r, r.test_features), r.test.labels))
        assert row["mutual_information_paper"] == pytest.approx(
            sum(reference_mi(s[a], s[b], D) for a, b in pairs) / C ** 2)
        assert row["mutual_information_distinct_pairs"] == pytest.approx(
            sum(reference_mi(s[a], s[b], D) for a, b in distinct) / len(distinct))
        assert row["jaccard_distinct_pairs"] == pytest.approx(
            sum(reference_jaccard(s[a], s[b]) for a, b in distinct) / len(distinct))
    scratch, overlap = tables.csg_tables(study_of(tmp_path / "f", [subject], k_prime=0.5), subject, gated,
                                         csg_subject, influence, csg_from="scratch", budget=0.08)
    assert scratch.csg_start.tolist()[1:] == ["from scratch", "from scratch"]
    assert scratch.l1_budget.tolist()[1:] == [0.08, 0.08]
    assert overlap.k_prime.tolist() == [3, 3, 3]                            # a fraction: the largest |I_c|
    with pytest.raises(KeyError):
        tables.csg_tables(study, subject, gated, csg_subject, influence, csg_from="other")
