"""Decoding an ImageNet-style folder: our batched path against a torchvision-style PIL DataLoader.

Both produce uint8 224x224 centre crops of the shorter-side-256 resize of the real photos in
../shared/data/imagenet-sample (250 ImageNet JPEGs, 107 kB mean, listed `--repeat` times).
Baseline: `DataLoader` over PIL (`Image.open`, `Resize(256)`, `CenterCrop(224)`, `PILToTensor`)
with one worker per core. Ours: on a GPU, the batched nvJPEG decode + GPU resize of decode.py;
on the CPU, the same batched code on libjpeg, and the per-image torchvision decode in
DataLoader workers (what `extract_features` uses on the CPU). The ratio is images/s over the
baseline's. The ImageNet goal (GPU) is >= 5x.

    python benchmarks/bench_decode.py [--repeat 4] [--device cuda]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from common import record

from classfilters.data import FolderImages
from classfilters.decode import decode_folder_batches

SHARED = Path(os.environ.get("CLASSFILTERS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class PilFolder(Dataset):
    def __init__(self, files):
        from torchvision import transforms
        self.files = files
        self.transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                             transforms.PILToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), 0


def rate(batches, n, sync=None):
    start = time.perf_counter()
    count = 0
    for images in batches:
        count += len(images[0] if isinstance(images, (list, tuple)) else images)
    if sync:
        sync()
    assert count == n
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    files = sorted((SHARED / "imagenet-sample").glob("*.JPEG")) * args.repeat
    if not files:
        raise SystemExit(f"no photos in {SHARED / 'imagenet-sample'} (set CLASSFILTERS_SHARED_DATA)")
    workers = os.cpu_count()
    n, bs = len(files), args.batch_size
    baseline = rate(DataLoader(PilFolder(files), batch_size=bs, num_workers=workers), n)
    folder = FolderImages(files, [0] * n)
    rows = [{"path": "PIL DataLoader (baseline)", "workers": workers, "img_per_s": baseline, "ratio": 1.0}]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    # warm-up outside the timing (CUDA context, nvJPEG handles, lazy kernels), and a check of the
    # device's output against the per-image CPU reference path: grey levels, not just speed
    first = next(iter(decode_folder_batches(folder, bs, 0, min(bs, n), args.device))).cpu()
    reference = torch.stack([folder[i][0] for i in range(len(first))])
    diff = (first.int() - reference.int()).abs()
    if sync:
        sync()
    ours = rate(decode_folder_batches(folder, bs, 0, n, args.device), n, sync)
    rows.append({"path": f"batched decode on {args.device}", "workers": 8, "img_per_s": ours, "ratio": ours / baseline,
                 "max_grey_diff_vs_cpu": int(diff.max()), "mean_grey_diff_vs_cpu": float(diff.float().mean())})
    if diff.float().mean() > 2:
        raise SystemExit(f"the {args.device} decode differs from the CPU path by {diff.float().mean():.2f} grey "
                         "levels on average: not the same images")
    if not sync:
        workers_rate = rate(DataLoader(folder, batch_size=bs, num_workers=workers), n)
        rows.append({"path": "torchvision decode in DataLoader workers", "workers": workers,
                     "img_per_s": workers_rate, "ratio": workers_rate / baseline})
    record("decode", rows, device=args.device)


if __name__ == "__main__":
    main()
