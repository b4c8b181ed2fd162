"""The depth study's feature extraction: one decode pass feeding every model, against each model
alone on random input (the floor: what the models cost without any data) and against the
straightforward way (each model with its own torchvision-style PIL DataLoader).

Images: the real photos in ../shared/data/imagenet-sample, listed until there are `--images`,
resized to 256 and centre-cropped to 224. Models: the 13 of the paper's ImageNet depth study
(random weights; the time does not depend on them), bf16 and channels_last on a GPU.
Printed: the seconds of each path, `efficiency` = the models' own time / the one-pass time
(goal >= 0.8) and `speedup` = the per-model PIL pipelines' time / the one-pass time.

    python benchmarks/bench_study.py [--images 1000] [--models resnet50,densenet121] [--device cuda]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHARED, PilFolder
from common import record

from classfilters import build_model, extract_features_many, open_dataset
from classfilters.profile import load_profile


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@torch.no_grad()
def run_model(model, batches, device, bf16):
    for x in batches:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.forward_features(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--models", default=",".join(load_profile("imagenet").models))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    photos = sorted((SHARED / "imagenet-sample").glob("*.JPEG"))
    if not photos:
        raise SystemExit(f"no photos in {SHARED / 'imagenet-sample'} (set CLASSFILTERS_SHARED_DATA)")
    files = [photos[i % len(photos)] for i in range(args.images)]
    names = args.models.split(",")
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build_model(name, num_classes=1000).eval().to(device).to(memory_format=torch.channels_last)

    with tempfile.TemporaryDirectory() as tmp:  # an image folder of the photos, as a user's would be
        folder = Path(tmp) / "val" / "n00000000"
        folder.mkdir(parents=True)
        for i, photo in enumerate(files):
            os.symlink(photo, folder / f"{i:06d}.JPEG")
        split = open_dataset(f"imagefolder:{tmp}", "val")
        n, bs = len(split), args.batch_size
        # exactly n images, as the one pass sees (n // bs full batches and the rest)
        full = torch.randn(min(bs, n), 3, 224, 224, device=device)
        random_batches = [full] * (n // bs) + ([full[:n % bs]] if n % bs else [])
        for m in models.values():  # warm-up (cuDNN picks its algorithms) outside every timing
            run_model(m, random_batches[:1], device, bf16)

        own = {name: timed(lambda m=m: run_model(m, random_batches, device, bf16), sync) for name, m in models.items()}
        # use_cache=False: no fingerprint() of the models (hashing every weight) inside the timing
        one_pass = timed(lambda: extract_features_many(models, split, bs, device, use_cache=False, progress=False), sync)
        mean, std = torch.tensor(split.mean, device=device)[:, None, None], torch.tensor(split.std, device=device)[:, None, None]

        def pil_pipeline(m):
            loader = DataLoader(PilFolder(files), batch_size=bs, num_workers=os.cpu_count(), pin_memory=bf16)
            run_model(m, ((images.to(device).float() / 255 - mean) / std for images, _ in loader), device, bf16)

        per_model_pil = {name: timed(lambda m=m: pil_pipeline(m), sync) for name, m in models.items()}

    rows = [{"path": f"{name} alone on random input", "images": n, "seconds": t} for name, t in own.items()]
    rows += [{"path": f"{name} with its own PIL DataLoader", "images": n, "seconds": t} for name, t in per_model_pil.items()]
    total_own, total_pil = sum(own.values()), sum(per_model_pil.values())
    rows.append({"path": f"{len(models)} models, own time on random input (sum)", "images": n, "seconds": total_own})
    rows.append({"path": f"{len(models)} models, one PIL DataLoader each (sum, baseline)", "images": n, "seconds": total_pil})
    rows.append({"path": f"{len(models)} models from one decode pass (extract_features_many)", "images": n,
                 "seconds": one_pass, "efficiency": total_own / one_pass, "speedup": total_pil / one_pass})
    record("study", rows, device=args.device)


if __name__ == "__main__":
    main()
