"""Class-Specific Gates (csg.py) and the Table 7 maps (visualize.py) on small inputs and the digits model."""
import pytest
import torch
from torch import nn

from classfilters import Recipe, csg, extract_features, influential_features, map_figure, open_dataset, visualize
from classfilters.data import ImageSplit
from classfilters.models import FeatureModel


def test_gate_rules():
    g = torch.tensor([[0.2, 0.4], [0.0, 0.0], [3.0, -1.0]])
    csg.normalize_gates_(g)
    assert torch.allclose(g, torch.tensor([[0.5, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert csg.sparsity_loss(torch.full((10, 10), 0.2), 1.0) == 0              # at the 20 % budget: free
    assert csg.sparsity_loss(torch.full((10, 10), 0.5), 0.1).item() == torch.tensor(3.0).item()
    assert csg.sparsity_loss(torch.full((10, 10), 0.2), 1.0, budget=0.1).item() == pytest.approx(10.0)  # 20 - 10
    assert csg.sparsity_loss(torch.full((10, 10), 0.2), 1.0, budget=0.3) == 0
    gates = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.7, 0.3]])      # (D=4, C=2)
    assert csg.gate_mask(gates, 2, "highest").tolist() == [[True, False, False, True], [False, True, True, False]]
    assert csg.gate_mask(gates, 2, "lowest").tolist() == [[False, True, True, False], [True, False, False, True]]
    phi = torch.ones(2, 4)
    assert torch.equal(csg.gate(phi, gates, torch.tensor([0, 1])), gates.T)
    g = torch.tensor([[0.2, 0.4], [-0.1, 0.0], [3.0, -1.0]])
    csg.clip_gates_(g)
    assert torch.equal(g, torch.tensor([[0.2, 0.4], [0.0, 0.0], [1.0, 0.0]]))
    assert csg.l1_density(g) == pytest.approx(1.6 / 6) and csg.nonzero_fraction(g) == pytest.approx(3 / 6)


def planted_csg_case(num_classes=4, d=12, n=64):
    """Features as 1x1 'images' (identity body): class c has feature 3c on; the head reads 3c for c."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(n)
    x = torch.randint(0, 60, (len(labels), d), generator=gen)
    x[torch.arange(len(labels)), 3 * labels] += 190
    split = ImageSplit(labels, [str(c) for c in range(num_classes)], "planted", "planted-csg-v1",
                       images=x.to(torch.uint8)[:, :, None, None], mean=(0.0,) * d, std=(1.0,) * d)
    head = nn.Linear(d, num_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[torch.arange(num_classes), 3 * torch.arange(num_classes)] = 1.0
    return FeatureModel(nn.Identity(), head, name="planted"), split


def test_csg_gates_of_features_a_class_does_not_use_close():
    """With the gates clipped (not divided by their row's max), every gate but the planted G[3c, c] goes to 0:
    the L1-density falls from 0.5 to 1/12, and both paths still classify every image."""
    model, split = planted_csg_case()
    recipe = Recipe(epochs=10, batch_size=32, lr=1e-3, crop_padding=0, flip=False, weight_decay=0)
    gated = csg.train_csg(model, split, recipe, lam=0.01, gate_lr=0.05, device="cpu")
    g = gated.gates.detach()
    planted = torch.zeros_like(g, dtype=torch.bool)
    planted[3 * torch.arange(4), torch.arange(4)] = True
    assert (g[planted] > 0.9).all()
    assert g[~planted].max() < 0.05
    assert csg.l1_density(g) < 0.1 and csg.nonzero_fraction(g) < 0.2
    features = extract_features(gated.model, split, progress=False)
    assert csg.path_accuracies(gated, features, split.labels) == {"standard": 1.0, "gated": 1.0}
    # the official row-max rule on the same data: rows the loss says nothing about stay open (no sparsity there)
    official = csg.train_csg(model, split, recipe, lam=0.01, gate_lr=0.05, device="cpu", gate_rule="row_max")
    unused = torch.ones(12, dtype=torch.bool)
    unused[3 * torch.arange(4)] = False
    assert (official.gates.detach()[unused] > 0.9).all() and csg.l1_density(official.gates) > 0.5
    with pytest.raises(ValueError, match="gate_rule"):
        csg.train_csg(model, split, recipe, gate_rule="max")
    with pytest.raises(ValueError, match="budget"):
        csg.train_csg(model, split, recipe, budget=1.5)


def test_csg_budget_sets_where_the_l1_term_stops():
    """A budget of 1 (the L1 term never costs): nothing closes the gates of features the head barely reads, so many
    stay open (Adam drives them to 0 or 1 on tiny gradients); the official 0.2 closes all of them (test above)."""
    model, split = planted_csg_case()
    recipe = Recipe(epochs=10, batch_size=32, lr=1e-3, crop_padding=0, flip=False, weight_decay=0)
    free = csg.train_csg(model, split, recipe, lam=0.01, gate_lr=0.05, device="cpu", budget=1.0).gates.detach()
    unused = torch.ones(12, dtype=torch.bool)
    unused[3 * torch.arange(4)] = False
    assert (free[unused] > 0.5).sum() >= 8 and csg.l1_density(free) > 0.3


def test_untrained_model_is_seeded():
    train = open_dataset("digits", "train")
    a, b = csg.untrained_model("resnet8", train, seed=3), csg.untrained_model("resnet8", train, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.num_classes == 10 and not torch.equal(a.head.weight, csg.untrained_model("resnet8", train, 4).head.weight)


def test_csg_training_keeps_gates_normalised(digits_model):
    train = open_dataset("digits", "train").subset(torch.arange(256))
    gated = csg.train_csg(digits_model, train, Recipe(epochs=1, batch_size=64, lr=0.02, flip=False), lam=0.01,
                          gate_rule="row_max")
    g = gated.gates.detach()
    assert g.shape == (64, 10) and g.min() >= 0 and g.max() <= 1
    assert torch.allclose(g.amax(1)[g.amax(1) > 0], torch.ones(1))            # every live row peaks at 1
    assert not torch.equal(gated.model.head.weight, digits_model.head.weight)  # a copy was trained
    features = extract_features(gated.model, train, progress=False)
    acc = csg.path_accuracies(gated, features, train.labels)
    assert set(acc) == {"standard", "gated"} and all(0 <= v <= 1 for v in acc.values())


def test_maps_over_the_images(digits_model):
    test = open_dataset("digits", "test")
    train = open_dataset("digits", "train")
    influence = influential_features(extract_features(digits_model, train, progress=False), train.labels, 5, 5)
    index = visualize.example_index(test.labels, 4)
    assert test.labels[index].tolist() == [0, 1, 2, 3]
    assert all((test.labels[:i] != test.labels[i]).all() for i in index.tolist())  # the first of each class
    images = visualize.fetch_images(test, index)
    maps, raw = visualize.class_maps(digits_model, test, images, test.labels[index], influence)
    assert maps.shape == (4, 3, 8, 8) and maps.min() >= 0 and maps.max() <= 1 and raw.shape == (4, 3)
    assert visualize.image_correlation(images, maps).abs().max() <= 1 + 1e-5
    fig = map_figure.overlay_figure(images, maps, ["a", "b", "c", "d"])
    assert len(fig.axes) == 4 * 4 + 1                  # image + 3 maps per row, and one shared colour bar
    assert fig.axes[-1].get_label() == "<colorbar>"


def test_csg_out_of_memory_goes_on_in_micro_batches(digits_model, monkeypatch, capsys):
    """A simulated CUDA out-of-memory on batches over 20 images: CSG redoes the step in halves and goes on."""
    forward, sizes = csg.GatedModel.forward, []

    def small_memory(self, x, labels=None):
        sizes.append(len(x))
        if len(x) > 20:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, x, labels)

    monkeypatch.setattr(csg.GatedModel, "forward", small_memory)
    train = open_dataset("digits", "train").subset(torch.arange(256))
    gated = csg.train_csg(digits_model, train, Recipe(epochs=1, batch_size=64, lr=0.02, flip=False), lam=0.01)
    assert max(s for s in sizes if s <= 20) == 16 and sizes.count(64) == 1  # backed off once, then stayed there
    assert "micro-batches of 16" in capsys.readouterr().err
    g = gated.gates.detach()
    assert g.min() >= 0 and g.max() <= 1 and not torch.equal(gated.model.head.weight, digits_model.head.weight)


class Doubled(nn.Identity):
    """No weights, like nn.Identity, but other code: the same fingerprint of weights, another computation."""
    def forward(self, x):
        return 2 * x


def test_cached_csg_takes_train_csgs_defaults():
    import inspect
    train, cached = (inspect.signature(f).parameters for f in (csg.train_csg, csg.trained_csg))
    assert {n: p.default for n, p in cached.items()} == {n: p.default for n, p in train.items()}
    assert (train["lam"].default, train["gate_lr"].default, train["budget"].default) == (0.01, 0.01, 0.2)


def test_csg_cache_returns_only_what_the_same_inputs_made(monkeypatch):
    """`trained_csg` is a cache hit for the same inputs (the same gates back) and trains anew when anything that
    changes the gates changes: lam, budget, the gates' rule or lr, the seed, the recipe, the starting weights, the
    data, csg.py's code (issue 16: the CSG cache's staleness)."""
    import dataclasses
    model, split = planted_csg_case()
    recipe = Recipe(epochs=1, batch_size=64, lr=1e-3, crop_padding=0, flip=False, weight_decay=0)
    calls = []
    real = csg.train_csg
    monkeypatch.setattr(csg, "train_csg", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    base = {"lam": 0.01, "gate_lr": 0.05, "device": "cpu"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = csg.trained_csg(model, split, recipe, **base)
    again = csg.trained_csg(model, split, recipe, **base)
    assert len(calls) == 1 and torch.equal(again.gates, first.gates)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    csg.trained_csg(model, split, recipe, gate_lr=0.05, device="cpu")  # lam's default is 0.01: the same entry
    assert len(calls) == 1
    defaults = csg.trained_csg(model, split, recipe, device="cpu")     # gate_lr's default, 0.01: another one
    assert len(calls) == 2 and torch.equal(csg.trained_csg(model, split, recipe, lam=0.01, gate_lr=0.01,
                                                           device="cpu").gates, defaults.gates)
    assert len(calls) == 2
    calls.clear()
    calls.append(1)
    assert not torch.equal(first.gates, torch.ones_like(first.gates))  # trained: the hit returned trained gates
    other_head = FeatureModel(nn.Identity(), nn.Linear(12, 4), name="planted")
    other_split = split.subset(torch.arange(0, len(split.labels), 2))
    changes = [({**base, "lam": 0.02}, model, split, recipe), ({**base, "budget": 0.5}, model, split, recipe),
               ({**base, "gate_rule": "row_max"}, model, split, recipe), ({**base, "gate_lr": 0.1}, model, split, recipe),
               ({**base, "seed": 1}, model, split, recipe), (base, model, split, dataclasses.replace(recipe, lr=2e-3)),
               (base, other_head, split, recipe), (base, model, other_split, recipe),
               (base, FeatureModel(Doubled(), model.head, name="planted"), split, recipe)]  # other forward code
    for n, (kw, m, s, r) in enumerate(changes, start=2):
        csg.trained_csg(m, s, r, **kw)
        assert len(calls) == n, kw
    budget = {**base, "budget": 0.5}  # what the cache holds is what train_csg makes with every setting passed on
    assert torch.equal(csg.trained_csg(model, split, recipe, **budget).gates, real(model, split, recipe, **budget).gates)
    assert len(calls) == len(changes) + 1
    monkeypatch.setattr(csg, "SOURCE_DIGEST", "edited")
    csg.trained_csg(model, split, recipe, **base)
    assert len(calls) == len(changes) + 2
    from classfilters import device as device_module
    from classfilters.device import training_precision
    assert recipe.precision == "auto"  # resolved per machine: bf16 where the CPU has it natively, else fp32
    flipped = training_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(device_module, "native_cpu_bf16", lambda: flipped)  # the same cache on the other CPU
    csg.trained_csg(model, split, recipe, **base)
    assert len(calls) == len(changes) + 3


def test_csg_settings_are_checked_before_any_training():
    model, split = planted_csg_case()
    for kwargs, said in (({"gate_lr": 0}, r"gate_lr must be > 0 and lam >= 0, got gate_lr=0, lam=0.01"),
                         ({"lam": -1}, r"gate_lr=0.01, lam=-1"),
                         ({"budget": 1.5}, r"budget is the gates' L1-density in \[0, 1\] .* got 1.5"),
                         ({"budget": -0.1}, r"got -0.1"),
                         ({"gate_rule": "max"}, r"gate_rule must be one of \('clip', 'row_max'\), got 'max'"),
                         ({"recipe": Recipe(optimizer="adam")}, r"recipe.optimizer must be 'sgd', got 'adam'")):
        with pytest.raises(ValueError, match=said):
            csg.train_csg(model, split, device="cpu", **kwargs)
    with pytest.raises(ValueError, match=r"order must be 'highest' or 'lowest', got 'middle'"):
        csg.gate_mask(torch.rand(4, 2), 1, "middle")
    assert csg.gate_mask(torch.rand(4, 2), 0).sum() == 0 and csg.gate_mask(torch.rand(4, 2), 4).all()


class Streamed(torch.utils.data.Dataset):
    """A split's images served one by one (as a folder is), not held in memory."""
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_streamed_splits_are_shuffled_whole_and_fetched_by_index():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 1, 2, 2), generator=gen, dtype=torch.uint8)
    labels = torch.arange(10) % 3
    in_memory = ImageSplit(labels, ["a", "b", "c"], "t", "t-v1", images=images)
    streamed = ImageSplit(labels, ["a", "b", "c"], "t", "t-v1", dataset=Streamed(images, labels))
    batches = []
    for split in (in_memory, streamed):
        rng = torch.get_rng_state()
        seen = list(csg.shuffled_batches(split, 4, torch.Generator().manual_seed(0), "cpu"))
        assert torch.equal(torch.get_rng_state(), rng)  # the global generator untouched (dropout draws from it)
        batches.append(seen)
        assert [len(b[1]) for b in seen] == [4, 4, 2]
        got_images, got_labels = torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen])
        order = torch.argsort(got_images.flatten(1).long() @ (256 ** torch.arange(4)))  # each image is unique
        expected = torch.argsort(images.flatten(1).long() @ (256 ** torch.arange(4)))
        assert torch.equal(got_images[order], images[expected]) and torch.equal(got_labels[order], labels[expected])
        assert not torch.equal(got_labels, labels)  # shuffled
        index = torch.tensor([7, 2, 5])
        assert torch.equal(visualize.fetch_images(split, index), images[index])
    for (a, y), (b, z) in zip(*batches, strict=True):  # the same batches in the same order, wherever the images are
        assert torch.equal(a, b) and torch.equal(y, z)


def test_csg_trains_a_streamed_split_as_the_same_split_in_memory(monkeypatch):
    """A split read from a dataset (a folder) trains exactly as the same images in memory: the same order, the
    same crops (padding width // 8 of the images' own width when the recipe gives none) and flips. (The loader
    reads in this process: worker processes forked in the middle of a training lose mutmut's coverage record;
    the test above reads through the workers.)"""
    monkeypatch.setattr(csg, "STREAM_WORKERS", 0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=gen, dtype=torch.uint8)
    labels = torch.arange(40) % 4
    in_memory = ImageSplit(labels, list("abcd"), "t", "t-v1", images=images)
    streamed = ImageSplit(labels, list("abcd"), "t", "t-v1", dataset=Streamed(images, labels))
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = FeatureModel(body, nn.Linear(6, 4), name="tiny")
    trained = {}
    for name, split, padding in (("memory", in_memory, None), ("streamed", streamed, None), ("padding 2", in_memory, 2),
                                 ("padding 1", in_memory, 1)):
        recipe = Recipe(epochs=2, batch_size=8, lr=0.05, crop_padding=padding, flip=True, precision="fp32")
        trained[name] = csg.train_csg(model, split, recipe, lam=0.01, seed=1, device="cpu").state_dict()
    for name in ("streamed", "padding 2"):
        for key, value in trained["memory"].items():
            assert torch.equal(value, trained[name][key]), (name, key)
    assert not torch.equal(trained["memory"]["gates"], trained["padding 1"]["gates"])  # the crops matter


def test_an_untrained_model_fits_the_splits_classes_and_channels():
    """CSG from scratch starts from a model with the split's classes and image channels (1 for grey images held in
    memory, 3 for a streamed folder), seeded (0 unless said)."""
    labels = torch.arange(6) % 3
    grey = ImageSplit(labels, ["a", "b", "c"], "t", "t-v1", images=torch.zeros(6, 1, 8, 8, dtype=torch.uint8))
    streamed = ImageSplit(labels, ["a", "b", "c"], "t", "t-v1",
                          dataset=Streamed(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), labels))
    for split, channels in ((grey, 1), (streamed, 3)):
        model = csg.untrained_model("resnet8", split)
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert model.num_classes == 3 and model.head.out_features == 3 and first.in_channels == channels
    seeded = csg.untrained_model("resnet8", grey, seed=0)
    assert torch.equal(csg.untrained_model("resnet8", grey).head.weight, seeded.head.weight)


def test_gate_masks_are_boolean_and_ties_go_to_the_lower_index():
    gates = torch.tensor([[0.5, 0.2], [0.5, 0.2], [0.5, 0.9], [0.1, 0.2]])  # (D=4, C=2), ties in both columns
    high, low = csg.gate_mask(gates, 2, "highest"), csg.gate_mask(gates, 2, "lowest")
    assert high.dtype == torch.bool and low.dtype == torch.bool
    assert high.tolist() == [[True, True, False, False], [True, False, True, False]]
    assert low.tolist() == [[True, False, False, True], [True, True, False, False]]


def test_a_chunks_loss_is_its_share_of_the_batch_mean_through_the_path_asked():
    """The gated path multiplies phi by G[:, y]; the standard path does not; a chunk of 3 images in a batch of 8
    gives the sum of its 3 cross-entropies divided by 8."""
    model, split = planted_csg_case()
    gated = csg.GatedModel(model)
    with torch.no_grad():
        gated.gates.zero_()  # closed: the gated logits are the head's bias alone
    x, labels = split.normalize(split.images[:3]), split.labels[:3]
    standard = nn.functional.cross_entropy(model(x), labels, reduction="sum") / 8
    closed = nn.functional.cross_entropy(model.head.bias.expand(3, -1), labels, reduction="sum") / 8
    assert torch.allclose(csg._chunk_loss(gated, False, 8, False, x, labels), standard)
    assert torch.allclose(csg._chunk_loss(gated, True, 8, False, x, labels), closed)
    assert not torch.allclose(standard, closed)


def test_csg_runs_without_the_sparsity_term_or_with_a_zero_budget():
    model, split = planted_csg_case(n=8)
    recipe = Recipe(epochs=1, batch_size=16, lr=1e-3, crop_padding=0, flip=False, weight_decay=0)
    for lam, budget in ((0.0, 0.2), (0.01, 0.0)):
        gated = csg.train_csg(model, split, recipe, lam=lam, budget=budget, device="cpu")
        assert gated.gates.shape == (12, 4)



def test_image_correlation_is_pearsons_r_per_image_and_map():
    """Against numpy's corrcoef over the pixels, for colour images (brightness: the channels' mean) and maps
    whose means differ from image to image."""
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 5, 4), generator=gen, dtype=torch.uint8)
    maps = torch.rand(3, 3, 5, 4, generator=gen) + torch.tensor([0.0, 5.0, -2.0])[:, None, None, None]
    maps[1, 2] = images[1].float().mean(0) * 2 + 7  # a map that is the brightness, rescaled: r = 1
    got = visualize.image_correlation(images, maps)
    for n in range(3):
        brightness = images[n].float().mean(0).flatten().numpy()
        for m in range(3):
            expected = np.corrcoef(brightness, maps[n, m].flatten().numpy())[0, 1]
            assert got[n, m].item() == pytest.approx(expected, abs=1e-5)
    assert got[1, 2].item() == pytest.approx(1.0, abs=1e-6)


def test_the_overlay_figure_draws_each_map_over_the_grey_image():
    """What the figure holds, read back from matplotlib: per row the picture (RGB in [0, 1]), then per map its grey
    copy (brightness, vmin 0, vmax 1) under the map in `inferno` whose opacity is `alpha` x the map's value; titles,
    row labels, no ticks, one colour bar; pixels drawn as pixels on small images."""
    import matplotlib.pyplot as plt
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    cases = ((1, 8, 8, 2, "nearest"), (3, 40, 40, 2, "antialiased"), (3, 32, 32, 1, "nearest"),
             (1, 8, 40, 2, "antialiased"), (1, 40, 8, 1, "antialiased"))  # (channels, height, width, rows, drawn as)
    for channels, height, width, n, interpolation in cases:
        images = torch.randint(0, 256, (n, channels, height, width), generator=gen, dtype=torch.uint8)
        maps = torch.rand(n, 3, height, width, generator=gen)
        titles = ["first", "second"][:n]
        fig = map_figure.overlay_figure(images, maps, titles, alpha=0.5)
        axes = fig.axes
        assert len(axes) == n * 4 + 1 and axes[-1].get_label() == "<colorbar>"
        assert axes[-1].get_ylabel().startswith("map value")
        bar = axes[-1]._colorbar.mappable  # the bar's scale is the maps' [0, 1] in the overlay's colours
        assert (bar.norm.vmin, bar.norm.vmax, bar.cmap.name) == (0, 1, "inferno")
        assert [axes[c].get_title() for c in range(4)] == ["image", *visualize.MAP_NAMES]
        assert [axes[4 * r].get_ylabel() for r in range(n)] == titles
        inferno = plt.get_cmap("inferno")

        def drawn(image):  # what imshow holds, every value present (matplotlib masks NaN)
            array = image.get_array()
            assert not np.ma.is_masked(array)
            return np.ma.getdata(array)
        for r in range(n):
            picture = images[r].permute(1, 2, 0).float().numpy() / 255
            shown = axes[4 * r].images[0]
            assert np.allclose(drawn(shown), np.broadcast_to(picture, (height, width, 3)))
            assert shown.get_interpolation() == interpolation
            for c in range(3):
                ax = axes[4 * r + c + 1]
                grey, overlay = ax.images
                assert np.allclose(drawn(grey), picture.mean(-1)) and grey.get_clim() == (0, 1)
                assert grey.get_cmap().name == "gray" and grey.get_interpolation() == interpolation
                expected = inferno(maps[r, c].numpy())
                expected[..., 3] = 0.5 * maps[r, c].numpy()
                assert np.allclose(drawn(overlay), expected)
        assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in axes[:-1])
        plt.close(fig)


def test_class_maps_are_the_chosen_channels_means_upsampled_and_scaled_to_0_1():
    """Against a reference built here: per image, the mean of its standard / non-influential / influential channels
    (the ablation's sets for the non-influential ones), upsampled bilinearly to the image and min-max scaled."""
    from classfilters.ablation import non_influential_mask
    from classfilters.influence import InfluentialFeatures
    test = open_dataset("digits", "test")
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 12, 3, stride=2, padding=1), nn.ReLU())  # 4 x 4 maps of 8 x 8 digits
    model = FeatureModel(body, nn.Linear(12, 10)).eval()
    index = torch.tensor([0, 5, 9])
    images, labels = visualize.fetch_images(test, index), test.labels[index]
    with torch.no_grad():
        channel_maps = body(test.normalize(images)).float()
    for size in (1, 2):  # one channel per set: its own mean, not halved
        sets = [list(range(c, c + size)) for c in range(10)]
        influence = InfluentialFeatures(sets, torch.zeros(10, 12, dtype=torch.int64), size, size)
        maps, raw = visualize.class_maps(model, test, images, labels, influence, seed=4)
        outside = non_influential_mask(influence, 4)
        for n, y in enumerate(labels.tolist()):
            assert outside[y].sum() == size and not (outside[y] & influence.mask[y]).any()
            for m, chosen in enumerate((torch.ones(12, dtype=torch.bool), outside[y], influence.mask[y])):
                mean = channel_maps[n, chosen].mean(0)
                assert torch.allclose(raw[n, m], mean.mean(), atol=1e-6), (size, n, m)
                up = nn.functional.interpolate(mean[None, None], size=(8, 8), mode="bilinear",
                                               align_corners=False)[0, 0]
                expected = (up - up.min()) / (up.max() - up.min())
                assert torch.allclose(maps[n, m], expected, atol=1e-5), (size, n, m)


def test_tied_gates_go_to_the_lower_features_in_wide_rows():
    """Clipped gates tie at 0 and 1 all the time: gate_mask keeps the lower features among tied ones, for rows
    wider than the sorts that happen to be stable anyway (64 features)."""
    gates = torch.zeros(64, 3)
    gates[::5] = 1.0                                              # 13 tied ones per class
    highest, lowest = csg.gate_mask(gates, 4), csg.gate_mask(gates, 4, "lowest")
    assert torch.equal(highest[0].nonzero().flatten(), torch.tensor([0, 5, 10, 15]))
    assert torch.equal(lowest[2].nonzero().flatten(), torch.tensor([1, 2, 3, 4]))


def test_csg_training_is_the_alternating_loop_written_out():
    """`train_csg` against its procedure written out step by step (issue 16: the optimisers' settings, the
    schedule, the order of the batches, which steps are gated, the sparsity term and the gate rule are each
    observable): the same seed's order, SGD + Nesterov on body and head under one-cycle, the cross-entropy
    through the true label's gates and the L1 term above the budget on odd steps only, Adam on the gates on
    those steps only, then the rule."""
    import copy

    import torch.nn.functional as F
    model, split = planted_csg_case(n=40)  # 160 images: 10 batches of 16 (one-cycle needs >= 8 steps)
    n, lr, wd, lam, gate_lr, budget = 160, 0.05, 5e-4, 0.02, 0.03, 0.3
    # 10 steps of 16 under one-cycle (both rules), and 5 steps of 32: too few to warm up, a constant rate
    for rule, b in (("clip", 16), ("row_max", 16), ("clip", 32)):
        recipe = Recipe(epochs=1, batch_size=b, lr=lr, crop_padding=0, flip=False, weight_decay=wd, precision="fp32")
        got = csg.train_csg(model, split, recipe, lam=lam, seed=3, device="cpu", gate_lr=gate_lr, gate_rule=rule,
                            budget=budget)
        m, gates = copy.deepcopy(model), torch.full((12, 4), 0.5, requires_grad=True)
        sgd = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
        adam = torch.optim.Adam([gates], lr=gate_lr)
        sched = (torch.optim.lr_scheduler.OneCycleLR(sgd, lr, total_steps=n // b, pct_start=0.25) if n // b >= 8
                 else torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
        for step, start in enumerate(range(0, n, b)):
            idx = perm[start:start + b]
            y = split.labels[idx].long()
            phi = m.forward_features(split.normalize(split.images[idx]))
            gated = step % 2 == 1
            loss = F.cross_entropy(m.head(phi * gates[:, y].T if gated else phi), y)
            if gated:
                loss = loss + lam * F.relu(gates.abs().sum() - budget * gates.numel())
            sgd.zero_grad()
            adam.zero_grad()
            loss.backward()
            sgd.step()
            if gated:
                adam.step()
            sched.step()
            if gated:
                with torch.no_grad():
                    if rule == "row_max":
                        gates.div_(gates.amax(1, keepdim=True).clamp(min=1e-12))
                    gates.clamp_(0, 1)
        assert not torch.equal(gates.detach(), torch.full_like(gates, 0.5))
        assert torch.allclose(got.gates, gates.detach(), atol=1e-5), rule
        for (name, a), c in zip(got.model.named_parameters(), m.parameters()):
            assert torch.allclose(a, c.detach(), atol=1e-5), (rule, name)


def test_the_gated_path_reads_each_images_own_class_gates():
    """`path_accuracies` by hand: closing the gate of class 1's planted feature costs the gated path exactly class
    1's images (the standard path keeps all); closing it in another class's column costs nothing."""
    model, split = planted_csg_case()
    features = split.images[:, :, 0, 0].float()
    gated = csg.GatedModel(model)
    with torch.no_grad():
        gated.gates.fill_(1.0)
        gated.gates[3, 1] = 0.0            # class 1 reads feature 3: closed for class 1's images
        gated.gates[6, 0] = 0.0            # class 2's feature, closed in class 0's column: harmless
    share = (split.labels == 1).float().mean().item()
    assert csg.path_accuracies(gated, features, split.labels) == {"standard": 1.0, "gated": 1.0 - share}


def test_example_images_default_to_eight_classes_and_maps_name_their_table():
    labels = torch.arange(12).repeat(2)
    assert visualize.example_index(labels).tolist() == list(range(8))
    model, split = planted_csg_case()
    flat = FeatureModel(nn.Identity(), model.head, name="flat", spatial_maps=False)
    influence = influential_features(split.images[:, :, 0, 0].float(), split.labels, 1, 1)
    with pytest.raises(ValueError) as error:
        visualize.class_maps(flat, split, split.images[:2], split.labels[:2], influence)
    assert str(error.value).startswith("Table 7's class maps: flat has no spatial feature maps")


def test_image_correlation_holds_for_maps_of_tiny_spread():
    """Pearson's r does not depend on the map's scale: a map 1e-6 x the brightness still correlates 1 (the guard
    against a zero spread must not bite on a small one)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 1, 4, 5), generator=gen, dtype=torch.uint8)
    maps = images.float().expand(1, 3, 4, 5) * torch.tensor([1e-6, -1e-6, 1.0])[None, :, None, None]
    assert visualize.image_correlation(images, maps)[0].tolist() == pytest.approx([1.0, -1.0, 1.0], abs=1e-4)


def test_csg_trains_in_bf16_when_the_recipe_says_so():
    """precision "bf16" runs the forward passes under bf16 autocast (the weights differ from float32's), "fp32" not."""
    model, split = planted_csg_case(n=16)
    trained = {}
    for precision in ("bf16", "fp32"):
        recipe = Recipe(epochs=1, batch_size=16, lr=0.05, crop_padding=0, flip=False, precision=precision)
        trained[precision] = csg.train_csg(model, split, recipe, lam=0.01, device="cpu").model.head.weight
    assert not torch.allclose(trained["bf16"], trained["fp32"], atol=1e-6)


def test_the_gated_product_is_taken_in_the_features_dtype():
    """Under bf16 autocast the backbone hands the head bf16 features while the gates are float32 parameters: the
    gates are cast to the features' dtype, so the gated features stay bf16 (not promoted to float32) and equal the
    product of the bf16-rounded gates."""
    phi = torch.tensor([[1.5, -2.0, 3.0], [0.25, 4.0, -1.0]], dtype=torch.bfloat16)
    gates = torch.tensor([[0.3, 0.9], [1.0, 0.1], [0.7, 0.55]])     # (D=3, C=2), float32
    labels = torch.tensor([1, 0])
    gated = csg.gate(phi, gates, labels)
    assert gated.dtype == torch.bfloat16
    assert torch.equal(gated, phi * gates[:, labels].T.bfloat16())
    assert csg.gate(phi, gates, None) is phi


def test_csg_augments_as_the_recipe_says():
    """CSG's crops and flips follow the recipe: on images 8 high and 16 wide, no crop_padding pads by the width's
    eighth (the same training as crop_padding=2, not 1), and flip=False trains otherwise than flip=True."""
    gen = torch.Generator().manual_seed(0)
    split = ImageSplit(torch.arange(2).repeat(16), ["a", "b"], "wide", "wide-csg-v1",
                       images=torch.randint(0, 256, (32, 3, 8, 16), generator=gen, dtype=torch.uint8),
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    model = FeatureModel(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()), nn.Linear(6, 2), name="wide")

    def trained(padding, flip):
        recipe = Recipe(epochs=1, batch_size=16, lr=0.05, crop_padding=padding, flip=flip, precision="fp32")
        gated = csg.train_csg(model, split, recipe, lam=0.01, device="cpu")
        return torch.cat([p.detach().flatten() for p in gated.parameters()])

    default = trained(None, True)
    assert torch.equal(default, trained(2, True))
    assert not torch.allclose(default, trained(1, True), atol=1e-6)
    assert not torch.allclose(default, trained(None, False), atol=1e-6)
