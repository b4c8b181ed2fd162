"""Every torchvision classification family and a spread of timm ones: phi is the input of the final
nn.Linear (seen by a forward hook, independently of the split) and head(phi) is the model's logits.

Random weights, the smallest variant of each family, one or two images at the smallest size it accepts.
"""
import warnings

import pytest
import torch
from torch import nn

from classfilters import FeatureModel, as_feature_model, build_model, influential_features
from classfilters.models import fingerprint, model_family

# family -> (smallest torchvision model, its final nn.Linear, input side, batch, has spatial maps)
TORCHVISION = {
    "alexnet": ("alexnet", "classifier.6", 63, 2, False),
    "convnext": ("convnext_tiny", "classifier.2", 32, 2, False),
    "densenet": ("densenet121", "classifier", 32, 2, True),
    "efficientnet": ("efficientnet_b0", "classifier.1", 32, 2, True),
    "efficientnet_v2": ("efficientnet_v2_s", "classifier.1", 33, 2, True),
    "googlenet": ("googlenet", "fc", 32, 2, True),
    "inception_v3": ("inception_v3", "fc", 75, 2, True),
    "maxvit": ("maxvit_t", "classifier.5", 64, 2, False),
    "mnasnet": ("mnasnet0_5", "classifier.1", 32, 2, False),
    "mobilenet_v2": ("mobilenet_v2", "classifier.1", 32, 2, False),
    "mobilenet_v3": ("mobilenet_v3_small", "classifier.3", 32, 2, False),
    "regnet": ("regnet_x_400mf", "fc", 32, 2, True),
    "resnet": ("resnet18", "fc", 32, 2, True),
    "resnext": ("resnext50_32x4d", "fc", 32, 2, True),
    "shufflenet_v2": ("shufflenet_v2_x0_5", "fc", 32, 2, False),
    "swin": ("swin_t", "head", 32, 2, True),         # LayerNorm'd maps, then an average pool
    "swin_v2": ("swin_v2_t", "head", 32, 2, True),
    "vgg": ("vgg11", "classifier.6", 32, 2, False),
    "vit": ("vit_b_16", "heads.head", 32, 2, False),
    "wide_resnet": ("wide_resnet50_2", "fc", 32, 2, True),
}
EXTRA = {"vit": {"image_size": 32}}  # the same architecture, on 2x2 patches of 16
# maxvit_t's blocks with windows of 2 instead of 7: it then takes 64x64 images instead of 224x224
MAXVIT_T = {"stem_channels": 64, "block_channels": [64, 128, 256, 512], "block_layers": [2, 2, 5, 2], "head_dim": 32,
            "stochastic_depth_prob": 0.2, "partition_size": 2, "input_size": (64, 64)}

# timm name -> (extra arguments for a small input, input side, has spatial maps)
TIMM = {
    "resnet18": ({}, 32, True),
    "convnext_atto": ({}, 32, False),          # pooling, then a LayerNorm
    "efficientnet_b0": ({}, 32, True),
    "regnetx_002": ({}, 32, True),
    "mobilenetv3_small_050": ({}, 32, False),  # pooling, then a 1x1 conv head
    "vit_tiny_patch16_224": ({"img_size": 32}, 32, False),
    "swin_tiny_patch4_window7_224": ({"img_size": 32, "window_size": 4}, 32, False),
    "deit_tiny_patch16_224": ({"img_size": 32}, 32, False),
}


def final_linear_input(model: nn.Module, linear: nn.Module, x: torch.Tensor):
    """(logits, the input the final linear layer received) of one eval forward pass."""
    seen = []
    hook = linear.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        hook.remove()
    assert len(seen) == 1
    return logits, seen[0]


def check_split(wrapped: FeatureModel, model: nn.Module, linear: nn.Module, x: torch.Tensor, spatial: bool):
    logits, oracle = final_linear_input(model, linear, x)
    with torch.no_grad():
        phi = wrapped.forward_features(x)
        assert phi.shape == oracle.shape == (len(x), wrapped.num_features)
        assert torch.allclose(phi, oracle, rtol=1e-5, atol=1e-5 * oracle.abs().max().item())
        assert torch.allclose(wrapped.head(phi), logits, rtol=1e-4, atol=1e-5 * logits.abs().max().item())
    assert wrapped.head is linear and wrapped.num_classes == logits.shape[1]
    # every tensor is registered once, under the wrapper exactly as many as in the model
    assert len(wrapped.state_dict()) == len(model.state_dict())
    assert {t.data_ptr() for t in wrapped.state_dict().values()} == {t.data_ptr() for t in model.state_dict().values()}
    assert wrapped.has_spatial_maps is spatial
    if spatial:
        with torch.no_grad():
            maps = wrapped.forward_maps(x)
        assert maps.dim() == 4 and torch.allclose(maps.mean((2, 3)), phi, rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(ValueError, match="has no spatial feature maps"):
            wrapped.forward_maps(x)
    return phi


@pytest.mark.parametrize("family", sorted(TORCHVISION))
def test_every_torchvision_family(family):
    import torchvision.models as tvm
    name, linear_path, side, batch, spatial = TORCHVISION[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet / inception: "the default weight initialisation will change"
        model = (tvm.MaxVit(num_classes=10, **MAXVIT_T) if family == "maxvit"
                 else tvm.get_model(name, weights=None, num_classes=10, **EXTRA.get(family, {}))).eval()
    x = torch.randn(batch, 3, side, side)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = as_feature_model(model, name, example=x)
    phi = check_split(wrapped, model, model.get_submodule(linear_path), x, spatial)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert isinstance(model.get_submodule(linear_path), nn.Linear)
    if phi.min() < 0:  # LayerNorm'd tokens, SiLU, MLPs: ranked by magnitude, and the result says so
        labels = torch.arange(len(phi)) % 2
        assert influential_features(phi, labels, 1, 1).rank_by == "magnitude"


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_families(name):
    import timm
    kwargs, side, spatial = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, side, side)
    wrapped = as_feature_model(model, name, example=x)
    check_split(wrapped, model, model.get_classifier(), x, spatial)
    assert model.get_classifier() is wrapped.head  # the user's model keeps its classifier


def test_timm_model_registered_once_and_fingerprint_survives_a_round_trip(tmp_path):
    import timm
    torch.manual_seed(0)
    model = build_model("timm:resnet18")
    inner = model.body.model
    assert len(model.state_dict()) == len(timm.create_model("resnet18").state_dict()) == 122
    assert len(list(model.parameters())) == len(list(inner.parameters())) + 2  # the body's, and the head's two
    before = fingerprint(model)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)
    again = build_model("timm:resnet18")
    assert fingerprint(again) != before
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert fingerprint(again) == before


def test_build_model_takes_any_torchvision_name():
    torch.manual_seed(0)
    model = build_model("regnet_y_400mf", num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7) and model.forward_features(x).shape == (2, 440)
    assert model.input_size is None and model.mean is None  # random weights: no preprocessing of their own
    with pytest.raises(ValueError, match=r"no nn\.Linear.*'classifier\.1' = Conv2d.*FeatureModel\(body="):
        build_model("squeezenet1_1")  # its head is a 1x1 convolution
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm:no_such_net")
    with pytest.raises(ValueError, match=r"by the name's tag \(timm:resnet18\.<tag>"):
        build_model("timm:resnet18", pretrained="IMAGENET1K_V1")  # a torchvision entry name, not timm's


def test_cifar_resnet_names_give_the_basic_or_the_bottleneck_variant():
    from torchvision.models.resnet import Bottleneck

    from classfilters.models import BasicBlock, cifar_resnet_name
    assert [cifar_resnet_name(n) for n in ("resnet20", "cifar_resnet50", "resnet50", "resnet29_bottleneck",
                                           "cifar_resnet29_bottleneck", "resnet18_bottleneck", "resnet20x")] == [
        (20, False), (50, False), None, (29, True), (29, True), (18, True), None]
    plain, bottleneck = build_model("resnet20"), build_model("resnet29_bottleneck", num_classes=7)
    assert sum(isinstance(m, BasicBlock) for m in plain.modules()) == 9 and plain.num_features == 64
    blocks = [m for m in bottleneck.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 9 and bottleneck.num_features == 256 and bottleneck.num_classes == 7
    assert [b.downsample is not None for b in blocks] == [True, False, False] * 3  # projections where shapes change
    assert [b.conv2.stride for b in blocks[::3]] == [(1, 1), (2, 2), (2, 2)]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = bottleneck.forward_maps(x)
        assert maps.shape == (2, 256, 8, 8)
        assert torch.allclose(bottleneck(x), bottleneck.body.model(x), atol=1e-6)  # the wrapper is the model
        assert torch.allclose(bottleneck(x), bottleneck.head(maps.mean((2, 3))), atol=1e-6)
    with pytest.raises(ValueError, match=r"bottleneck ResNet depth must be 9n\+2 with n >= 1 .*got 30"):
        build_model("resnet30_bottleneck")
    with pytest.raises(ValueError, match=r"CIFAR ResNet depth must be 6n\+2 .*got 29"):
        build_model("resnet29")


def test_a_bottleneck_checkpoint_loads_by_its_name_and_the_plain_name_says_which(tmp_path):
    from classfilters import CifarBottleneckResNet
    torch.manual_seed(0)
    source = CifarBottleneckResNet(20, num_classes=10).eval()
    torch.save(source.state_dict(), tmp_path / "b.th")
    loaded = build_model("resnet20_bottleneck", tmp_path / "b.th").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    with pytest.raises(ValueError, match=r"bottleneck CIFAR ResNet-20 .*use --model resnet20_bottleneck"):
        build_model("resnet20", tmp_path / "b.th")


def test_models_whose_logits_are_not_the_last_linear_output_are_refused():
    class Scaled(nn.Module):  # logits = 2 * Linear(phi)
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return 2 * self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(ValueError, match=r"not the output of its last nn\.Linear 'fc'.*FeatureModel\(body="):
        as_feature_model(Scaled())

    class PerToken(nn.Module):  # a linear layer on every position, then averaged
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(2).transpose(1, 2)).mean(1)

    with pytest.raises(ValueError, match=r"not the output of its last nn\.Linear 'fc'"):
        as_feature_model(PerToken())
    with pytest.raises(ValueError, match="pass example="):
        as_feature_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))  # no conv: the input shape is unknown


def test_an_mlp_head_gives_the_last_hidden_layer_as_phi():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 3, 2, 2)
    wrapped = as_feature_model(mlp, example=x)
    assert wrapped.head is mlp[3]
    with torch.no_grad():
        assert torch.allclose(wrapped.forward_features(x), mlp[:3](x))


def test_timm_preprocessing_comes_from_its_config():
    import timm

    from classfilters.models import timm_preprocessing
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert timm_preprocessing(model) == ((248, 224, "bicubic"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # crop_pct 0.9


def test_torchvision_preprocessing_includes_mean_and_std():
    from classfilters.models import torchvision_weights, weights_preprocessing
    assert weights_preprocessing(torchvision_weights("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")) == (
        (384, 384, "bicubic"), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize(("name", "family"), [
    ("resnet20", "ResNet (CIFAR)"), ("cifar_resnet50", "ResNet (CIFAR)"), ("resnet50", "ResNet (ImageNet)"),
    ("resnet29_bottleneck", "ResNet bottleneck (CIFAR)"), ("resnet101_bottleneck", "ResNet bottleneck (CIFAR)"),
    ("wide_resnet50_2", "Wide ResNet"), ("resnext50_32x4d", "ResNeXt"), ("densenet121", "DenseNet"),
    ("efficientnet_b0", "EfficientNet"), ("efficientnet_v2_s", "EfficientNetV2"), ("regnet_y_400mf", "RegNet"),
    ("mobilenet_v3_small", "MobileNetV3"), ("vit_b_16", "ViT"), ("swin_v2_t", "Swin V2"), ("swin_t", "Swin"),
    ("convnext_tiny", "ConvNeXt"), ("timm:convnext_atto.d2_in1k", "convnext (timm)"),
    ("timm:mobilenetv3_small_050", "mobilenetv3 (timm)"), ("timm:tf_efficientnet_b0", "efficientnet (timm)"),
])
def test_model_family(name, family):
    assert model_family(name) == family


def test_table7_maps_refuse_a_model_without_spatial_maps():
    import timm

    from classfilters import visualize
    from classfilters.data import ImageSplit
    from classfilters.influence import InfluentialFeatures
    model = as_feature_model(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2),
                             example=torch.zeros(1, 3, 32, 32))
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    split = ImageSplit(torch.tensor([0, 1]), ["a", "b"], "tiny", "tiny", images=images)
    influence = InfluentialFeatures([[0], [1]], torch.zeros(2, 192, dtype=torch.int64), 1, 1)
    with pytest.raises(ValueError, match="Table 7's class maps: .* has no spatial feature maps .*timm CNNs"):
        visualize.class_maps(model, split, images, split.labels, influence)
