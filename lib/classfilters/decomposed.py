"""The decomposed final layer: each class scored only on its own influential features.

z_c(x) = sum_{j in I_c} W[c, j] phi_j(x) + b_c, prediction argmax_c z_c, decomposed softmax
p_c = exp z_c / sum_c' exp z_c'. `DecomposedHead` is an `nn.Module` (masked weights that
stay masked while fine-tuning; a compact gather path costing sum_c |I_c| multiply-adds).
`grid_accuracy` evaluates the whole (k, k') grid from cached features in one pass per k:
the features' ranks are computed once, histograms for every k come from one cumulative
count, and the decomposed logits for every k' from one cumulative sum.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_features, check_labels, resolve_rank_by
from .influence import InfluentialFeatures
from .progress import tqdm
from .sizes import as_size


class DecomposedHead(nn.Linear):
    """A linear head restricted, class by class, to the index sets I_c. It is an `nn.Linear`
    (whose weight is multiplied by the mask in every forward), so it can replace a
    `FeatureModel`'s head and be trained with the whole network (`train.finetune_network`)."""

    def __init__(self, head: nn.Linear, influence: InfluentialFeatures | torch.Tensor):
        mask = influence.mask if isinstance(influence, InfluentialFeatures) else influence.bool()
        if mask.shape != head.weight.shape:
            raise ValueError(f"index sets cover {tuple(mask.shape)} (classes, features) but the head is "
                             f"{tuple(head.weight.shape)}: they were computed for another model")
        super().__init__(head.in_features, head.out_features, device=head.weight.device, dtype=head.weight.dtype)
        self.register_buffer("mask", mask.to(head.weight.device))
        with torch.no_grad():
            self.weight.copy_(head.weight * self.mask)
            self.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(self.bias))

    @property
    def multiply_adds(self) -> int:
        return int(self.mask.sum())

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return F.linear(phi, self.weight * self.mask, self.bias)

    def forward_compact(self, phi: torch.Tensor) -> torch.Tensor:
        """Same logits touching only the selected features: gather then a per-class dot product."""
        sizes = self.mask.sum(1)
        width = int(sizes.max())
        order = torch.sort(self.mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
        valid = torch.arange(width, device=phi.device)[None, :] < sizes[:, None]
        w = torch.gather(self.weight, 1, order) * valid
        return torch.einsum("nck,ck->nc", phi[:, order], w) + self.bias

    def decomposed_softmax(self, phi: torch.Tensor) -> torch.Tensor:
        return self(phi).softmax(-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


def head_on(head: nn.Linear, device) -> nn.Linear:
    """A float32 copy of `head` on `device`: the model's own head stays where it is (moving it in
    place would leave the model split across devices)."""
    return copy.deepcopy(head).to(device=device, dtype=torch.float32)


def evaluate(head: nn.Linear, influence: InfluentialFeatures, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Full and decomposed accuracy on (test) features, their ratio and the layers' costs.
    Features holding NaN or inf, or labels that are not class indices of the head, are refused."""
    check_inputs(head, features, labels, "test features")
    if influence.num_classes != head.out_features or influence.num_features != head.in_features:
        raise ValueError(f"the index sets cover {influence.num_classes} classes x {influence.num_features} features "
                         f"but the head is {head.out_features} x {head.in_features}: they were computed for another model")
    with torch.no_grad():
        head = head_on(head, features.device)  # a copy: the model's head stays where it is
        full = accuracy(head(features), labels)
        decomposed = accuracy(DecomposedHead(head, influence)(features), labels)
        return {"acc_full": full, "acc_decomposed": decomposed,
                "relative": relative_accuracy(decomposed, full),
                "multiply_adds_full": head.in_features * head.out_features,
                "multiply_adds_decomposed": influence.multiply_adds}


def relative_accuracy(acc, full: float):
    """acc / full (a number or a pandas column); NaN where the full head scores nothing (full = 0)."""
    return acc / full if full else acc * float("nan")


def check_inputs(head: nn.Linear, features: torch.Tensor, labels, what: str) -> torch.Tensor:
    """Finite (N, D) features with D the head's inputs, integer labels (N,) in [0, C): int64 labels."""
    check_features(features, what)
    if features.shape[1] != head.in_features:
        raise ValueError(f"{what} have {features.shape[1]} columns but the head takes {head.in_features} features")
    return check_labels(labels, features.shape[0], head.out_features, f"labels of the {what}")


def feature_ranks(features: torch.Tensor, rank_by: str = "auto") -> torch.Tensor:
    """int (N, D): the position of each feature in its row's ranking (0 = largest; ties to lower index)."""
    rank_by = resolve_rank_by(features, rank_by)
    scores = features.abs() if rank_by == "magnitude" else features
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(features.shape[1], dtype=torch.int32, device=features.device).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(1, order, positions)


def grid_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  test_labels: torch.Tensor, head: nn.Linear, ks, k_primes, rank_by: str = "auto",
                  chunk_elements: int = 1 << 25, progress: bool = False) -> torch.Tensor:
    """Decomposed test accuracy for every (k, k') pair: float (len(ks), len(k_primes)).

    Equals running Algorithm 1 and `evaluate` for each pair separately (integer k, k'). Runs on the
    features' device (the test features are moved there); the result is on the CPU.
    """
    with torch.no_grad():
        ks, k_primes = list(ks), list(k_primes)
        train_labels = check_inputs(head, train_features, train_labels, "training features")
        test_labels = check_inputs(head, test_features, test_labels, "test features")
        if not ks or not k_primes:
            raise ValueError("ks and k_primes must not be empty")
        n, d = train_features.shape
        ks, k_primes = [as_size(k, d, "k") for k in ks], [as_size(k, d, "k'") for k in k_primes]
        if not all(isinstance(v, int) for v in ks + k_primes):
            raise TypeError("grid_accuracy takes counts for k and k'; run influential_features for fractions of mass")
        c = head.out_features
        kmax = max(ks)
        # counts[c, j, r] = #{i in class c : feature j has rank r in image i}, for r < kmax
        rank_by = resolve_rank_by(train_features, rank_by)
        device = train_features.device
        counts = torch.zeros(c * d * kmax, dtype=torch.int64, device=device)
        rows = max(1, chunk_elements // d)
        for start in range(0, n, rows):
            ranks = feature_ranks(train_features[start:start + rows], rank_by).long()
            y = train_labels[start:start + rows].long().to(device)
            keep = ranks < kmax
            cls = y[:, None].expand_as(ranks)[keep]
            j = torch.arange(d, device=device).expand_as(ranks)[keep]
            counts += torch.bincount((cls * d + j) * kmax + ranks[keep], minlength=c * d * kmax)
        cumulative = counts.view(c, d, kmax).cumsum(2)        # histograms for every k at once
        weight, bias = head.weight.detach().float().to(device), head.bias.detach().float().to(device)
        kp_index = torch.tensor(k_primes, device=device) - 1
        test_features, test_labels = test_features.to(device), test_labels.long().to(device)
        result = torch.zeros(len(ks), len(k_primes), device=device)
        test_rows = max(1, chunk_elements // (c * d))
        for a, k in enumerate(tqdm(ks, desc="(k, k') grid", disable=not progress)):
            order = torch.sort(cumulative[:, :, k - 1], dim=1, descending=True, stable=True).indices  # (C, D)
            order_t = order.T.contiguous()                       # (D, C): t-th feature of each class
            w_t = torch.gather(weight, 1, order).T.contiguous()
            correct = torch.zeros(len(k_primes), device=device)
            for start in range(0, len(test_features), test_rows):
                phi = test_features[start:start + test_rows]
                # z[n, t, c]: class c's logit from its t+1 most frequent features (classes last: fast argmax)
                z = (phi[:, order_t] * w_t).cumsum(1)[:, kp_index] + bias
                correct += (z.argmax(2) == test_labels[start:start + test_rows, None]).sum(0)
            result[a] = correct / len(test_features)
        return result.cpu()
