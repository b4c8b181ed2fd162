"""Canonization (canonize.py): the same function, every BatchNorm folded, refused when not exact, undone bit for bit."""
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from classfilters import (
    CanonizationError,
    CifarBottleneckResNet,
    CifarResNet,
    FeatureModel,
    as_feature_model,
    canonization_check,
    canonize,
)
from classfilters.canonization import bn_is_identity, zennit_resnet_error


def random_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh models have mean 0, var 1), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                bn.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1)   # some negative scales too
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


FAMILIES = {  # label: (family, model, residual sums)
    "cifar_resnet8": ("cifar_resnet", lambda: CifarResNet(8), 3),
    "cifar_bottleneck20": ("cifar_resnet", lambda: CifarBottleneckResNet(20), 6),
    "resnet18": ("resnet", lambda: tvm.resnet18(), 8),
    "wide_bottleneck": ("resnet", lambda: tvm.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128), 4),
    "densenet121": ("densenet", lambda: tvm.densenet121(), 0),
    "efficientnet_b0": ("efficientnet", lambda: tvm.efficientnet_b0(), 9),
}


@pytest.mark.parametrize("label", list(FAMILIES))
def test_canonized_model_is_the_same_function_and_removal_restores_it_bit_for_bit(label):
    family, make, sums = FAMILIES[label]
    torch.manual_seed(0)
    model = as_feature_model(random_stats(make()))
    x = torch.randn(3, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        before = model(x)
        with canonize(model, x) as c:
            during = model(x)
            bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            assert c.family == family
            assert all(bn_is_identity(bn) for bn in bns)                      # every BN folded, eps included
            assert c.folded == len(bns)
            assert c.sums == sums                                              # residual additions as modules
            assert (during - before).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())
            assert any(type(m).__name__ == "GlobalAvgPool" for m in model.modules())   # pooling as a module
        after = model(x)
    assert torch.equal(before, after)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [n for n, _ in model.named_modules()] == names
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_folding_sets_eps_to_zero_where_zennit_0_5_1_leaves_it():
    torch.manual_seed(0)
    model = as_feature_model(random_stats(tvm.resnet18())).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), canonize(model, x, rtol=1e-12) as c:
        pass
    assert c.max_error < 1e-10                          # exact up to float64 rounding
    assert zennit_resnet_error(model, x) > 1e-7        # zennit's own canonizer: the eps it leaves shifts the logits


def test_check_table_has_one_row_per_model():
    table = canonization_check({"r8": random_stats(CifarResNet(8)), "r18": random_stats(tvm.resnet18())})
    assert list(table.model) == ["r8", "r18"]
    assert table.restored_exactly.all()
    assert (table.max_rel_dz <= 1e-5).all()
    assert table.loc[1, "zennit_0.5.1_dz"] > table.loc[1, "max_abs_dz"]


class ReluBeforeBatchNorm(CifarResNet):
    """conv1 -> ReLU -> bn1: leaf order still says conv1, bn1, but folding bn1 into conv1 is wrong."""

    def forward_maps(self, x):
        x = F.relu(self.bn1(F.relu(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def test_a_mis_merge_is_refused_and_the_model_restored():
    model = as_feature_model(random_stats(ReluBeforeBatchNorm(8)))
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CanonizationError, match="changed the logits"):
        canonize(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unsupported_family_is_refused_with_the_supported_ones():
    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model = FeatureModel(body, nn.Linear(8, 4), name="tiny_vgg").eval()
    with pytest.raises(CanonizationError, match="tiny_vgg.*CIFAR ResNet.*DenseNet.*EfficientNet"):
        canonize(model)


def test_training_mode_and_zero_scale_densenet_bn_are_refused():
    with pytest.raises(CanonizationError, match="eval"):
        canonize(CifarResNet(8).train())
    model = as_feature_model(random_stats(tvm.densenet121()))
    with torch.no_grad():
        model.body.features.denseblock1.denselayer1.norm1.weight[0] = 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CanonizationError, match="weight 0"):
        canonize(model)
    assert list(model.state_dict()) == list(state)          # the parts applied before the refusal were undone
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("label", ["cifar_resnet8", "densenet121", "efficientnet_b0"])
def test_explaining_inside_a_canonization_leaves_it_intact(label):
    from classfilters import explain
    _, make, _ = FAMILIES[label]
    torch.manual_seed(0)
    model = as_feature_model(random_stats(make()))
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    with canonize(model, x):
        inside = explain(model, x, 1, "lrp_epsilon_plus", canonize=True)   # the body is canonized already
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    torch.testing.assert_close(inside, explain(model, x, 1, "lrp_epsilon_plus", canonize=True))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
