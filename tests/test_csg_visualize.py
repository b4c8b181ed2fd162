"""Class-Specific Gates (csg.py) and the Table 7 maps (visualize.py) on small inputs and the digits model."""
import torch

from classfilters import Recipe, csg, extract_features, influential_features, open_dataset, visualize


def test_gate_rules():
    g = torch.tensor([[0.2, 0.4], [0.0, 0.0], [3.0, -1.0]])
    csg.normalize_gates_(g)
    assert torch.allclose(g, torch.tensor([[0.5, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert csg.sparsity_loss(torch.full((10, 10), 0.2), 1.0) == 0              # at the 20 % budget: free
    assert csg.sparsity_loss(torch.full((10, 10), 0.5), 0.1).item() == torch.tensor(3.0).item()
    gates = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.7, 0.3]])      # (D=4, C=2)
    assert csg.gate_mask(gates, 2, "highest").tolist() == [[True, False, False, True], [False, True, True, False]]
    assert csg.gate_mask(gates, 2, "lowest").tolist() == [[False, True, True, False], [True, False, False, True]]
    phi = torch.ones(2, 4)
    assert torch.equal(csg.gate(phi, gates, torch.tensor([0, 1])), gates.T)


def test_csg_training_keeps_gates_normalised(digits_model):
    train = open_dataset("digits", "train").subset(torch.arange(256))
    gated = csg.train_csg(digits_model, train, Recipe(epochs=1, batch_size=64, lr=0.02, flip=False), lam=0.01)
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
    fig = visualize.overlay_figure(images, maps, ["a", "b", "c", "d"])
    assert len(fig.axes) == 16


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
