"""One command that checks the library's GPU paths on a bare GPU machine, section by section.

Each section is independent and prints PASS, FAIL (with the reason) or SKIP:
  topk      the Triton kernel (topk_gpu.py) against torch.topk + bincount, at full ImageNet scale
            (1,281,167 x 2048, k = 50, 1000 classes) and on edge cases (ties, k = 1, k = D,
            signed features, a width that is not a power of two, bf16 and fp16 features)
  decode    nvJPEG batches against the per-image CPU path in grey levels: RGB, grayscale and CMYK
            JPEGs (CMYK goes through the CPU fallback) and a PNG
  race      the decode race: decoding while the current stream is busy with large kernels, every
            batch compared with the CPU path
  oom       the out-of-memory back-off under a memory cap (torch.cuda.set_per_process_memory_fraction):
            extraction with a batch that cannot fit equals extraction in small batches
  pooling   bf16 extraction pools in float32: features equal the float32 mean of the body's bf16
            maps, and rounding makes no ties
  compile   `Recipe(compile=True)` (CUDA graphs) trains the same model as eager for a few steps

`--dry` runs every section's CPU-possible part on the CPU (synthetic data only, under 30 s): the
same comparisons with the CPU kernels, a simulated out-of-memory error and a simulated nvJPEG
refusal; CI runs it (tests/test_gpu_smoke.py). Exit status 1 when any section fails.

    python benchmarks/gpu_smoke.py [--dry] [--only topk,decode] [--scale 0.1]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SECTIONS = {}


class Skip(Exception):
    """The section cannot run here (says why)."""


def section(fn):
    SECTIONS[fn.__name__.removeprefix("check_")] = fn
    return fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- topk

def reference_histograms(features, labels, num_classes, k, chunk=65536):
    """torch.topk (ties to the lower index) + bincount, chunked: the plain reading of Algorithm 1."""
    from classfilters.influence import topk_indices
    n, d = features.shape
    counts = torch.zeros(num_classes * d, dtype=torch.int64, device=features.device)
    signed = bool((features < 0).any())
    for start in range(0, n, chunk):
        scores = features[start:start + chunk].float()
        scores = scores.abs() if signed else scores
        flat = labels[start:start + chunk, None].to(features.device) * d + topk_indices(scores, k)
        counts += torch.bincount(flat.flatten(), minlength=num_classes * d)
    return counts.view(num_classes, d)


@section
def check_topk(device, dry, scale):
    from classfilters import topk_gpu
    from classfilters.influence import class_histograms
    gen = torch.Generator(device=device).manual_seed(0)
    n = 2000 if dry else max(1000, int(1_281_167 * scale))
    cases = [("imagenet scale", n, 2048, 1000, 50, torch.float32, "rand")]
    small = 3000
    cases += [("ties (4 levels)", small, 256, 10, 50, torch.float32, "ties"),
              ("k = 1", small, 512, 10, 1, torch.float32, "rand"), ("k = D", small, 64, 10, 64, torch.float32, "rand"),
              ("signed (magnitude)", small, 512, 10, 20, torch.float32, "signed"),
              ("D = 1000 (not 2^n)", small, 1000, 10, 50, torch.float32, "rand"),
              ("bf16", small, 2048, 10, 50, torch.bfloat16, "rand"), ("fp16", small, 2048, 10, 50, torch.float16, "rand")]
    done = []
    for name, rows, d, c, k, dtype, kind in cases:
        if kind == "ties":
            x = torch.randint(0, 4, (rows, d), device=device, generator=gen).float()
        elif kind == "signed":
            x = torch.randn(rows, d, device=device, generator=gen)
        else:
            x = torch.rand(rows, d, device=device, generator=gen)
        x = x.to(dtype)
        y = torch.randint(0, c, (rows,), device=device, generator=gen)
        if device.type == "cuda" and not topk_gpu.available(x):
            raise AssertionError("the Triton kernel is not available for CUDA features (is Triton installed?)")
        sync(device)
        start = time.perf_counter()
        ours, _ = class_histograms(x, y, c, k)
        sync(device)
        seconds = time.perf_counter() - start
        expected = reference_histograms(x, y, c, k)
        if not torch.equal(ours.cpu(), expected.cpu()):
            bad = (ours.cpu() != expected.cpu()).sum().item()
            raise AssertionError(f"{name}: {bad} histogram entries differ from topk + bincount")
        done.append(f"{name} ({rows}x{d}, {seconds:.2f} s)")
    return "equal to topk + bincount: " + "; ".join(done)


# ---------------------------------------------------------------------------------------------- decode

def write_images(folder: Path, count: int = 6) -> list[Path]:
    """RGB, grayscale and CMYK JPEGs and a PNG of random smooth images, of several sizes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        h, w = 200 + 17 * i, 260 - 9 * i
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)  # smooth: JPEG keeps it well
        for mode, suffix in (("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "png")):
            path = folder / f"{i:02d}-{mode}.{suffix}"
            img.convert(mode).save(path, quality=95) if suffix == "JPEG" else img.convert(mode).save(path)
            files.append(path)
    return files


def compare_batches(folder_images, device, batch_size, busy=None):
    """(max, mean) grey-level difference of the batched decode on `device` to the per-image CPU path."""
    from classfilters.decode import decode_folder_batches
    worst, total, count = 0, 0.0, 0
    start = 0
    for batch in decode_folder_batches(folder_images, batch_size, 0, len(folder_images), device):
        if busy is not None:
            busy()  # queue large kernels on the current stream right behind the decode
        batch = batch.cpu()
        reference = torch.stack([folder_images[i][0] for i in range(start, start + len(batch))])
        diff = (batch.int() - reference.int()).abs()
        worst, total, count = max(worst, int(diff.max())), total + float(diff.float().sum()), count + diff.numel()
        start += len(batch)
    return worst, total / count


@section
def check_decode(device, dry, scale):
    import warnings

    from classfilters import decode
    from classfilters.data import FolderImages
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), 3 if dry else 6)
        folder = FolderImages(files, [0] * len(files))
        refused = []
        patch = contextlib.nullcontext()
        if dry:  # no nvJPEG: simulate its refusal of CMYK so that the fallback path runs
            original = decode._decode_jpeg_batch

            def refusing(blobs, dev):
                if any(b"Adobe" in bytes(b[:200].tolist()) for b in blobs):
                    refused.append(len(blobs))
                    raise RuntimeError("NVJPEG_STATUS_JPEG_NOT_SUPPORTED (simulated)")
                return original(blobs, dev)
            patch = _patched(decode, "_decode_jpeg_batch", refusing)
        with patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            worst, mean = compare_batches(folder, device, 8)
        fallbacks = len(refused) if dry else sum("refused a batch" in str(w.message) for w in caught)
    limit_max, limit_mean = (0, 0.0) if device.type == "cpu" else (40, 1.5)  # nvJPEG's IDCT and GPU resampling
    if worst > limit_max or mean > limit_mean:
        raise AssertionError(f"batched decode differs from the CPU path: max {worst}, mean {mean:.3f} grey levels")
    if not fallbacks:
        raise AssertionError("no batch went through the CMYK fallback: were the CMYK files decoded on the GPU?")
    return f"RGB, grayscale, CMYK, PNG: max {worst}, mean {mean:.3f} grey levels off the CPU path; " \
           f"{fallbacks} batches fell back to the CPU (CMYK)"


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@section
def check_race(device, dry, scale):
    from classfilters.data import FolderImages
    big = torch.randn(256 if dry else 8192, 256 if dry else 8192, device=device)

    def busy():
        for _ in range(1 if dry else 4):
            big.matmul(big)

    with tempfile.TemporaryDirectory() as tmp:
        files = [f for f in write_images(Path(tmp), 4) if "RGB.JPEG" in f.name] * (2 if dry else 16)
        folder = FolderImages(files, [0] * len(files))
        worst, mean = compare_batches(folder, device, 4, busy)
    if mean > (0.0 if device.type == "cpu" else 1.5) or worst > (0 if device.type == "cpu" else 40):
        raise AssertionError(f"decoded under load differs from the CPU path: max {worst}, mean {mean:.3f}")
    return f"{len(files)} images decoded behind busy kernels: max {worst}, mean {mean:.3f} grey levels off"


# ---------------------------------------------------------------------------------------------- models

def noise_split(n, size, channels=3, classes=10):
    from classfilters.data import ImageSplit
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return ImageSplit(labels, [str(c) for c in range(classes)], "noise", f"noise-{n}-{size}", images=images)


@section
def check_oom(device, dry, scale):
    from classfilters import build_model, extract_features
    from classfilters.models import FeatureModel
    torch.manual_seed(0)
    model = build_model("resnet8" if dry else "resnet50", num_classes=10)
    split = noise_split(48 if dry else 384, 32 if dry else 224)
    small = extract_features(model, split, batch_size=16, device=device, use_cache=False, progress=False)
    messages = []
    if dry:  # simulated: the pooling step raises CUDA out-of-memory above 16 images
        original = FeatureModel.pool_output

        def capped(self, x):
            if len(x) > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(self, x)
        cap = _patched(FeatureModel, "pool_output", capped)
    else:  # a real cap: what ResNet-50 needs for about 64 images at 224 px in bf16
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = (torch.cuda.memory_allocated(device) + 6 * 2 ** 30) / total
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        cap = contextlib.nullcontext()
    from classfilters import features as features_module
    try:
        with cap, _patched(features_module.tqdm, "write", staticmethod(lambda s, **kw: messages.append(s))):
            big = extract_features(model, split, batch_size=len(split), device=device, use_cache=False, progress=False)
    finally:
        if not dry:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    if not messages:
        raise AssertionError("no out-of-memory back-off happened: the cap was too loose")
    if not torch.allclose(big, small, atol=1e-2 if device.type == "cuda" else 1e-5, rtol=1e-2):
        raise AssertionError(f"backed-off features differ by {(big - small).abs().max():.3g}")
    return f"{len(messages)} back-offs ({messages[-1].strip()}); features equal the small-batch ones"


@section
def check_pooling(device, dry, scale):
    from classfilters import build_model, extract_features
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10).eval()
    split = noise_split(200, 32)
    phi = extract_features(model, split, batch_size=200, device=device, bf16=True, use_cache=False, progress=False)
    x = split.normalize(split.images.to(device)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        maps = model.to(device).forward_maps(x)
    expected = maps.float().mean((2, 3)).cpu()

    def ties(f):
        return sum(len(set(r[r != 0].tolist())) < int((r != 0).sum()) for r in f)

    if maps.dtype != torch.bfloat16 or phi.dtype != torch.float32:
        raise AssertionError(f"maps {maps.dtype}, features {phi.dtype}: expected bf16 maps, float32 features")
    if not torch.allclose(phi, expected, atol=1e-6, rtol=0):
        raise AssertionError(f"features differ from the float32 pooling by {(phi - expected).abs().max():.3g}")
    rounded = ties(maps.mean((2, 3)).float().cpu())
    if ties(phi) > len(split) // 100:
        raise AssertionError(f"{ties(phi)} rows with ties (bf16 pooling would give {rounded})")
    return f"float32 pooling: {ties(phi)} rows with ties (pooled in bf16: {rounded} of {len(split)})"


@section
def check_compile(device, dry, scale):
    from classfilters import Recipe, build_model, train_classifier
    split = noise_split(128 if dry else 512, 32)  # whole batches: eager and compiled see the same steps
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, flip=False)
    patch = contextlib.nullcontext()
    if dry:  # no inductor compile on a CPU in CI: the eager backend checks the plumbing in seconds
        compile_ = torch.compile
        patch = _patched(torch, "compile", lambda net, mode=None: compile_(net, backend="eager"))
    states = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet8" if dry else "resnet20", num_classes=10)
        with patch if compiled else contextlib.nullcontext():
            start = time.perf_counter()
            train_classifier(model, split, Recipe(**{**recipe.__dict__, "compile": compiled}), device=device,
                             progress=False)
            states[compiled] = ({k: v.float().cpu() for k, v in model.state_dict().items()},
                                time.perf_counter() - start)
    eager, graphed = states[False][0], states[True][0]
    worst = max((eager[k] - graphed[k]).abs().max().item() for k in eager if eager[k].is_floating_point())
    tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 kernels fused differently on the GPU
    if worst > tolerance:
        raise AssertionError(f"compiled and eager weights differ by {worst:.3g} (> {tolerance})")
    return f"compiled {states[True][1]:.1f} s (compilation included), eager {states[False][1]:.1f} s, " \
           f"largest weight difference {worst:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="the CPU-possible part of every section, on the CPU")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of ImageNet's 1,281,167 rows for topk")
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry for the CPU part", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    if args.dry:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    failed = 0
    print(f"gpu_smoke on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (dry)'}, "
          f"torch {torch.__version__}", flush=True)
    for name in args.only.split(","):
        start = time.perf_counter()
        try:
            message = SECTIONS[name](device, args.dry, args.scale)
            print(f"PASS {name} ({time.perf_counter() - start:.1f} s): {message}", flush=True)
        except Skip as e:
            print(f"SKIP {name}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 (every section reports and the next one runs)
            failed += 1
            print(f"FAIL {name} ({time.perf_counter() - start:.1f} s): {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=-3)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
