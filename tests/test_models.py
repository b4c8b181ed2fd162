"""Models: every supported family splits into body / pool / linear head that reproduce its logits."""
import pytest
import torch
from torch import nn

from classfilters import FeatureModel, as_feature_model, build_model
from classfilters.models import TORCHVISION_MODELS, CifarResNet, fingerprint

WIDTHS = {"resnet50": 2048, "resnet101": 2048, "resnet152": 2048, "wide_resnet50_2": 2048, "wide_resnet101_2": 2048,
          "densenet121": 1024, "densenet161": 2208, "densenet169": 1664, "densenet201": 1920,
          "efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408, "efficientnet_b3": 1536}


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_family_features_and_logits(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        phi = model.forward_features(x)
        original = model.head  # the wrapped torchvision model's own forward must agree
        reference = _torchvision_forward(name, model, x)
    assert phi.shape == (2, WIDTHS[name]) == (2, model.num_features)
    assert model.num_classes == 1000
    assert torch.allclose(original(phi), reference, atol=1e-4)


def _torchvision_forward(name, feature_model, x):
    import torchvision.models as tvm
    torch.manual_seed(0)
    fresh = tvm.get_model(name, weights=None).eval()
    fresh.load_state_dict(_source_state(feature_model, fresh))
    return fresh(x)


def _source_state(feature_model, fresh):
    # the wrapper holds the same tensors under other prefixes: match them by shape and order of creation
    ours = [t for _, t in feature_model.body.state_dict().items()] + list(feature_model.head.state_dict().values())
    theirs = fresh.state_dict()
    assert len(ours) == len(theirs)
    return {k: v for k, v in zip(theirs, ours)}


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_cifar_resnets(depth):
    model = build_model(f"resnet{depth}").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_maps(x)
        assert maps.shape == (3, 64, 8, 8)
        assert torch.allclose(model(x), model.head(maps.mean((2, 3))))
    assert sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)) == depth - 1


def test_timm_model():
    import timm
    torch.manual_seed(0)
    original = timm.create_model("resnet10t", num_classes=7).eval()
    model = as_feature_model(original)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 512)
        assert torch.allclose(model(x), original(x), atol=1e-5)
    assert isinstance(model.body.model.fc, nn.Identity) and original.fc is model.head  # the original keeps its head


def test_user_model_through_the_adapter():
    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    model = FeatureModel(body, nn.Linear(8, 4), name="mine")
    x = torch.randn(2, 3, 16, 16)
    assert model.forward_features(x).shape == (2, 8) and model(x).shape == (2, 4)
    model.eval()
    assert not body.training  # eval() reaches the body


def test_models_without_a_final_linear_head_are_refused():
    conv_head = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"no nn\.Linear \(its last layer with weights is '0' = Conv2d.*FeatureModel"):
        as_feature_model(conv_head)
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureModel(lambda x: x, nn.Linear(3, 2))
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet_of_my_dreams")


def test_fingerprint_follows_every_weight():
    model = build_model("resnet8")
    before = fingerprint(model)
    assert fingerprint(model) == before
    model.to(memory_format=torch.channels_last)  # as extraction and training leave it: same weights, same hash
    assert fingerprint(model) == before
    with torch.no_grad():
        model.body.model.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(model) != before


def test_torchvision_weights_and_the_sizes_they_expect():
    from classfilters.models import torchvision_weights, weights_input_size
    assert weights_input_size(torchvision_weights("efficientnet_b3", "IMAGENET1K_V1")) == (320, 300, "bicubic")
    assert weights_input_size(torchvision_weights("resnet50", "IMAGENET1K_V1")) == (256, 224, "bilinear")  # the paper's
    assert weights_input_size(torchvision_weights("resnet50", True)) == (232, 224, "bilinear")  # DEFAULT: the newer V2
    with pytest.raises(ValueError, match="no torchvision weights named 'V9'"):
        torchvision_weights("resnet50", "V9")


def test_cifar_resnet_wrapper_computes_the_networks_own_forward():
    """The FeatureModel split of a CIFAR ResNet (body, pooling, head) equals CifarResNet.forward itself."""
    torch.manual_seed(0)
    net = CifarResNet(20, 10).eval()
    with torch.no_grad():
        for bn in net.modules():  # non-trivial statistics, so that a skipped layer shows
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    wrapped = as_feature_model(net, "resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = CifarResNet.forward(net, x)
        assert torch.allclose(wrapped(x), expected, atol=1e-5)
        assert torch.allclose(wrapped.head(wrapped.forward_features(x)), expected, atol=1e-5)
        assert torch.allclose(wrapped.forward_maps(x).mean((2, 3)), wrapped.forward_features(x), atol=1e-6)
