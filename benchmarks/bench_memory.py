"""CPU training with freed memory kept in the process (`cf.keep_freed_memory`, the runner's GLIBC_TUNABLES)
against glibc's default malloc, which unmaps every large block when it is freed: `train_classifier` on a
CIFAR ResNet-20 (random JPEG CIFAR-10 training images, batch 512) in child processes that alternate between
the two settings, `--repeat` times each, so that a machine whose speed drifts affects both alike. Printed:
seconds per step and the minor page faults per step of each child (after one warm-up step), and the ratio
of the medians (default / kept).

    python benchmarks/bench_memory.py [--images 4096] [--repeat 2] [--precision fp32]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHARED
from common import record

from classfilters.cpu_memory import TUNABLES

CHILD = """
import json, resource, sys, time, torch
from classfilters import Recipe, build_model, open_dataset, train_classifier
images, precision, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
train = open_dataset(data, "train")
train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:images])
warm = train.subset(torch.arange(512))
recipe = Recipe(epochs=1, batch_size=512, lr=0.2, precision=precision)
torch.manual_seed(0)
train_classifier(build_model("resnet20", num_classes=10), warm, recipe, "cpu", progress=False)
torch.manual_seed(0)
model = build_model("resnet20", num_classes=10)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
train_classifier(model, train, recipe, "cpu", progress=False)
steps = -(-images // 512)
print(json.dumps({"s_per_step": (time.perf_counter() - start) / steps,
                  "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}))
"""


def child(images, precision, data, keep):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | ({"GLIBC_TUNABLES": TUNABLES} if keep else {})
    out = subprocess.run([sys.executable, "-c", CHILD, str(images), precision, data], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    p.add_argument("--data", default=f"cifar10:{SHARED / 'cifar10-jpeg.tar.gz'}")
    args = p.parse_args()
    runs = {"glibc default (baseline)": [], "freed memory kept": []}
    for _ in range(args.repeat):
        for name, keep in (("glibc default (baseline)", False), ("freed memory kept", True)):
            runs[name].append(child(args.images, args.precision, args.data, keep))
    rows = []
    for name, results in runs.items():
        rows.append({"path": name, "images": args.images, "precision": args.precision,
                     "s_per_step": [r["s_per_step"] for r in results],
                     "faults_per_step": [r["faults_per_step"] for r in results],
                     "median_s_per_step": statistics.median(r["s_per_step"] for r in results)})
    rows[1]["speedup"] = rows[0]["median_s_per_step"] / rows[1]["median_s_per_step"]
    record("memory", rows, device="cpu")


if __name__ == "__main__":
    main()
