"""Paired bootstrap intervals over test images (uncertainty.py)."""
import pytest
import torch
from conftest import planted
from torch import nn

from classfilters import bootstrap_accuracy, correct_predictions, influential_features
from classfilters.uncertainty import diagonal_intervals


def correctness(n, p_full=0.85, p_lost=0.08, seed=0):
    """The full head right with probability p_full; the decomposed head loses a share p_lost of those."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.rand(n, generator=gen) < p_full
    return full, full & (torch.rand(n, generator=gen) >= p_lost)


def test_intervals_contain_the_point_estimates():
    full, dec = correctness(2000)
    r = bootstrap_accuracy(full, dec, resamples=1000, seed=1)
    assert r["acc_full"] == pytest.approx(full.double().mean().item())
    assert r["relative"] == pytest.approx(dec.double().mean().item() / full.double().mean().item())
    for name in ("acc_full", "acc_decomposed", "relative"):
        assert r[f"{name}_lo"] < r[name] < r[f"{name}_hi"]
    assert (r["n"], r["resamples"], r["level"]) == (2000, 1000, 0.95)


def test_width_shrinks_with_the_number_of_images():
    widths = []
    for n in (200, 2000, 20000):
        r = bootstrap_accuracy(*correctness(n), resamples=500, seed=0)
        widths.append({k: r[f"{k}_hi"] - r[f"{k}_lo"] for k in ("acc_full", "acc_decomposed", "relative")})
    for k in widths[0]:
        assert widths[0][k] > 2 * widths[1][k] > 4 * widths[2][k] > 0      # ~1/sqrt(n): a factor ~3.2 per step


def test_deterministic_with_a_seed_and_paired():
    full, dec = correctness(1000)
    assert bootstrap_accuracy(full, dec, 300, seed=7) == bootstrap_accuracy(full, dec, 300, seed=7)
    assert bootstrap_accuracy(full, dec, 300, seed=7) != bootstrap_accuracy(full, dec, 300, seed=8)
    same = bootstrap_accuracy(full, full, 300, seed=0)              # paired: identical heads, relative exactly 1
    assert same["relative_lo"] == same["relative_hi"] == 1.0
    wider = bootstrap_accuracy(full, dec, 300, level=0.99, seed=0)
    narrower = bootstrap_accuracy(full, dec, 300, level=0.8, seed=0)
    assert wider["relative_hi"] - wider["relative_lo"] > narrower["relative_hi"] - narrower["relative_lo"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same length"):
        bootstrap_accuracy(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="level"):
        bootstrap_accuracy(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool), level=95)


def test_correct_predictions_on_a_planted_case():
    train, train_y = planted(seed=0)
    test, test_y = planted(seed=1)
    head = nn.Linear(32, 6)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[torch.arange(6), 3 * torch.arange(6)] = 1.0
    full, dec = correct_predictions(head, influential_features(train, train_y, 2, 2), test, test_y)
    assert full.all() and dec.all() and full.dtype == torch.bool and len(full) == len(test_y)


def test_diagonal_intervals_follow_the_decomposition():
    train, train_y = planted(seed=0)
    test, test_y = planted(seed=1)
    head = nn.Linear(32, 6)
    with torch.no_grad():
        head.weight.copy_(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * 0.1)
        head.weight[torch.arange(6), 3 * torch.arange(6)] += 1.0
    rows = diagonal_intervals(head, train, train_y, test, test_y, [1, 2, 32], resamples=200, seed=0)
    assert [r["k"] for r in rows] == [1, 2, 32]
    for r, k in zip(rows, (1, 2, 32)):
        _, dec = correct_predictions(head, influential_features(train, train_y, k, k), test, test_y)
        assert r["acc_decomposed"] == pytest.approx(dec.double().mean().item())
        assert r["relative_lo"] <= r["relative"] <= r["relative_hi"]
    assert rows[-1]["relative"] == 1.0                     # k' = D: the decomposed head is the full one
