"""Feature extraction: independent of batch size, cached without staleness, resumable."""
import pytest
import torch

from classfilters import extract_features, influential_features, open_dataset
from classfilters.data import ImageSplit
from classfilters.features import check_features


def test_results_do_not_depend_on_batch_size(digits_model):
    test = open_dataset("digits", "test")
    a = extract_features(digits_model, test, batch_size=7, use_cache=False, progress=False)
    b = extract_features(digits_model, test, batch_size=360, use_cache=False, progress=False)
    assert torch.allclose(a, b, atol=1e-5)
    ia, ib = influential_features(a, test.labels, 5, 5), influential_features(b, test.labels, 5, 5)
    assert ia.indices == ib.indices


def test_cache_is_reused_and_never_stale(digits_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))  # an empty cache, whatever ran before
    test = open_dataset("digits", "test")
    calls = []
    hook = digits_model.body.register_forward_hook(lambda *a: calls.append(1))
    first = extract_features(digits_model, test, progress=False)
    n_calls = len(calls)
    assert n_calls > 0
    assert torch.equal(extract_features(digits_model, test, progress=False), first)
    assert len(calls) == n_calls  # served from the cache
    with torch.no_grad():
        digits_model.body.model.layer3[0].conv2.weight.mul_(1.5)
    try:
        changed = extract_features(digits_model, test, progress=False)
        assert len(calls) > n_calls and not torch.allclose(changed, first)
    finally:
        with torch.no_grad():
            digits_model.body.model.layer3[0].conv2.weight.div_(1.5)
        hook.remove()


class Exploding(torch.utils.data.Dataset):
    """Images of a digits split that raise once `fail_at` is reached (an interrupted run). Every index read is
    appended to the file `log` when given: the DataLoader's worker processes read them, not this process."""

    def __init__(self, split, fail_at=None, log=None):
        self.split, self.fail_at, self.log = split, fail_at, log

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"{i}\n")
        if self.fail_at is not None and i >= self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.split.images[i], int(self.split.labels[i])


def test_interrupted_extraction_resumes(digits_model, tmp_path):
    """The streamed path as it runs (a DataLoader with worker processes, no mock): an interrupted extraction keeps
    its saved parts and the next call reads only the rest."""
    test = open_dataset("digits", "test")
    direct = extract_features(digits_model, test, use_cache=False, progress=False)
    log = tmp_path / "interrupted.txt"
    streamed = ImageSplit(test.labels, test.classes, "streamed-digits", "streamed-digits-fp",
                          dataset=Exploding(test, fail_at=200, log=log), mean=test.mean, std=test.std)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        extract_features(digits_model, streamed, batch_size=50, checkpoint_every=100, progress=False)
    streamed.dataset.fail_at = None
    streamed.dataset.log = log = tmp_path / "resumed.txt"  # a new file: the first run's workers may still write theirs
    resumed = extract_features(digits_model, streamed, batch_size=50, checkpoint_every=100, progress=False)
    seen = sorted(map(int, log.read_text().split()))
    assert seen == list(range(200, len(test)))  # the first 200 images came from the saved parts, the rest once
    assert torch.allclose(resumed, direct, atol=1e-5)


def _serial_batches(split, batch_size, start=0, stop=None, num_workers=0, device=None):
    stop = len(split) if stop is None else stop
    for i in range(start, stop, batch_size):
        items = [split.dataset[j] for j in range(i, min(i + batch_size, stop))]
        yield torch.stack([x for x, _ in items])


def test_nan_features_are_reported():
    with pytest.raises(ValueError, match="NaN or inf"):
        check_features(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


class Sizes(list):
    """The batch sizes a model saw, and (`handling`) the exception being handled at each call."""
    handling: list


def limit_memory(monkeypatch, model, method, largest):
    """Make `model.method` raise CUDA out-of-memory above `largest` images; returns the sizes it saw.
    Each call also records whether an exception was being handled (a retry inside an `except`)."""
    import sys
    original = getattr(model, method)
    sizes = Sizes()
    sizes.handling = []

    def small_memory(x, *args):
        sizes.append(len(x))
        sizes.handling.append(sys.exc_info()[0])
        if len(x) > largest:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(x, *args)

    monkeypatch.setattr(model, method, small_memory)
    return sizes


def test_out_of_memory_backs_off_and_goes_on(digits_model, monkeypatch, capsys):
    test = open_dataset("digits", "test")
    direct = extract_features(digits_model, test, use_cache=False, progress=False)
    sizes = limit_memory(monkeypatch, digits_model, "pool_output", 40)
    backed_off = extract_features(digits_model, test, batch_size=128, use_cache=False, progress=True)
    assert torch.allclose(backed_off, direct, atol=1e-5)
    assert max(s for s in sizes if s <= 40) == 32
    assert "out of GPU memory at batch size 128: going on with 64" in capsys.readouterr().err
    # the reduced size is carried to the next batches: 128 and 64 were tried once, never again
    assert sizes[:3] == [128, 64, 32] and max(sizes[3:]) == 32
    # every retry ran after the handler (no exception being handled), so the failed pass was freed
    assert all(h is None for h in sizes.handling)


def _ties(features: torch.Tensor) -> int:
    """Rows in which two non-zero features are equal."""
    return sum(len(set(r[r != 0].tolist())) < int((r != 0).sum()) for r in features)


def test_features_are_pooled_in_float32_under_bf16_autocast():
    """bf16 extraction (CPU autocast stands in for the GPU's): the body runs in bf16, the pooling in
    float32, so the features equal the float32 mean of the body's bf16 maps and rounding makes no ties."""
    from classfilters import build_model
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=3).eval()
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    split = ImageSplit(torch.zeros(200, dtype=torch.long), [str(c) for c in range(10)], "noise", "noise-32px",
                       images=images)
    phi = extract_features(model, split, batch_size=200, device="cpu", bf16=True, use_cache=False, progress=False)
    x = split.normalize(images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model.forward_maps(x)
    assert maps.dtype == torch.bfloat16 and maps.shape[-2:] == (8, 8)  # autocast did reach the body
    assert phi.dtype == torch.float32
    assert torch.equal(phi, maps.float().mean((2, 3)))
    assert _ties(maps.mean((2, 3)).float()) > len(split) // 2  # what pooling in bf16 gives
    assert _ties(phi) <= len(split) // 100  # float32 pooling: a coincidence at most (1 row here)


def test_training_is_repeatable(tmp_path, monkeypatch):
    from classfilters import Recipe, trained_model
    from classfilters.models import fingerprint
    train = open_dataset("digits", "train").subset(torch.arange(0, 1437, 5))
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)
    prints = []
    for run in range(2):  # two cold runs: empty cache each time
        monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path / f"cache{run}"))
        prints.append(fingerprint(trained_model("resnet8", train, recipe, seed=3, progress=False)))
    assert prints[0] == prints[1]


def test_one_pass_for_several_models_equals_each_alone(digits_model):
    from classfilters import build_model, extract_features_many
    torch.manual_seed(1)
    other = build_model("resnet14", num_classes=10, in_channels=1)
    test = open_dataset("digits", "test")
    reads = []
    streamed = ImageSplit(test.labels, test.classes, "streamed-digits", "streamed-digits-many",
                          dataset=Exploding(test), mean=test.mean, std=test.std)
    from classfilters import features

    def counting(split, batch_size, start=0, stop=None, num_workers=0, device=None):
        for images in _serial_batches(split, batch_size, start, stop):
            reads.append(len(images))
            yield images

    original = features.batches
    features.batches = counting
    try:
        both = extract_features_many({"a": digits_model, "b": other}, streamed, batch_size=64, progress=False)
    finally:
        features.batches = original
    assert sum(reads) == len(test)  # the images were read once for both models
    for name, model in (("a", digits_model), ("b", other)):
        alone = extract_features(model, test, use_cache=False, progress=False)
        assert torch.allclose(both[name], alone, atol=1e-5)


def test_training_out_of_memory_goes_on_in_micro_batches(monkeypatch, capsys):
    from classfilters import Recipe, build_model, train_classifier
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    sizes = limit_memory(monkeypatch, model, "forward", 20)
    train = open_dataset("digits", "train").subset(torch.arange(0, 1437, 4))
    train_classifier(model, train, Recipe(epochs=3, batch_size=64, lr=0.05, flip=False), device="cpu", progress=False)
    assert max(s for s in sizes if s <= 20) == 16
    assert "micro-batches of 16" in capsys.readouterr().err
    assert sizes.count(64) == 1 and max(sizes[3:]) == 16  # the reduced size is carried on
    assert all(h is None for h in sizes.handling)  # retried after the handler: the failed pass was freed
    monkeypatch.undo()
    test = open_dataset("digits", "test")
    phi = extract_features(model, test, use_cache=False, progress=False, device="cpu")
    assert (model.head(phi).argmax(1) == test.labels).float().mean() > 0.5


def test_compiled_training_equals_eager():
    """`Recipe(compile=True)` (torch.compile; CUDA graphs on a GPU) trains the same model (in float32: under
    bf16 autocast the compiled graph's fusions round differently, ~1e-3 here)."""
    from classfilters import Recipe, build_model, train_classifier
    train = open_dataset("digits", "train").subset(torch.arange(0, 256))
    states = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet8", num_classes=10, in_channels=1)
        recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False, compile=compiled, precision="fp32")
        train_classifier(model, train, recipe, device="cpu", progress=False)
        states.append(model.state_dict())
    torch.manual_seed(0)
    initial = build_model("resnet8", num_classes=10, in_channels=1).state_dict()
    assert not torch.allclose(states[0]["head.weight"], initial["head.weight"], atol=1e-3)  # it did train
    for name, value in states[0].items():
        assert torch.allclose(value.float(), states[1][name].float(), atol=1e-4), name


def test_compiled_training_sees_equal_batches_and_marks_steps(monkeypatch):
    """`Recipe(compile=True)`: every step gets exactly batch_size images (100 = 64 + 36: the last batch is
    topped up), so CUDA graphs are recorded once, and each step is marked for them. torch.compile is
    replaced by a recorder here: the batching is what is under test."""
    from classfilters import Recipe, build_model, train_classifier
    seen, marks = [], []

    def recording_compile(net, mode=None):
        def run(x):
            seen.append(len(x))
            return net(x)
        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    train = open_dataset("digits", "train").subset(torch.arange(100))
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    train_classifier(model, train, Recipe(epochs=2, batch_size=64, lr=0.05, compile=True), device="cpu",
                     progress=False)
    assert seen == [64] * 4 and len(marks) == 4
    seen.clear()
    train_classifier(model, train, Recipe(epochs=1, batch_size=64, lr=0.05), device="cpu", progress=False)
    assert seen == []  # not compiled: nothing recorded (and eager batches keep their natural sizes)


def test_training_loss_is_float32_on_bf16_logits(monkeypatch):
    """The cross-entropy gets float32 logits even when the network returns bf16 ones (outside autocast)."""
    import torch.nn.functional as F

    from classfilters import train
    dtypes = []
    original = F.cross_entropy

    def recording(logits, *args, **kwargs):
        dtypes.append(logits.dtype)
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", recording)
    net = torch.nn.Linear(4, 3).to(torch.bfloat16)
    x, y = torch.randn(5, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 0, 1])
    loss = train._chunk_loss(net, net, 5, x, y, weight=1 / 5, smoothing=0.0, bf16=False)
    assert dtypes == [torch.float32] and loss.dtype == torch.float32


def test_training_precision_is_checked_resolved_and_used(tmp_path, monkeypatch):
    """"auto" is bf16 on a CPU with native bf16 and float32 on one without; an explicit precision is used as
    given; the convolutions of a training step run in that precision; the cache keeps the two apart."""
    from classfilters import Recipe, device, train, trained_model
    with pytest.raises(ValueError, match="precision must be one of"):
        Recipe(precision="fp16")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(device, "native_cpu_bf16", lambda native=native: native)
        assert device.training_precision("auto", "cpu") == expected
        assert device.training_precision("fp32", "cpu") == "fp32" and device.training_precision("bf16", "cpu") == "bf16"
    assert device.training_precision("auto", "meta") == "fp32"  # neither a GPU nor a CPU

    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))
    split = open_dataset("digits", "train").subset(torch.arange(0, 1437, 5))
    models, conv_dtypes = {}, {}
    original = train.train_classifier
    for precision in ("fp32", "bf16"):
        seen = conv_dtypes.setdefault(precision, set())

        def recording(model, *args, seen=seen, **kwargs):
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            handle = conv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
            try:
                return original(model, *args, **kwargs)
            finally:
                handle.remove()

        monkeypatch.setattr(train, "train_classifier", recording)
        recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False, precision=precision)
        models[precision] = trained_model("resnet8", split, recipe, seed=3, progress=False)
        again = trained_model("resnet8", split, recipe, seed=3, progress=False)  # a cache hit: not trained again
        assert all(torch.equal(a, b) for a, b in zip(models[precision].state_dict().values(), again.state_dict().values()))
    assert conv_dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 2
    monkeypatch.setattr(train, "train_classifier", original)
    auto = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)  # "auto": its resolution is part of the key
    for native in (False, True):
        monkeypatch.setattr(device, "native_cpu_bf16", lambda native=native: native)
        trained_model("resnet8", split, auto, seed=3, device="cpu", progress=False)
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 4
    assert not all(torch.equal(a, b) for a, b in zip(models["fp32"].state_dict().values(), models["bf16"].state_dict().values()))
