"""Feature extraction scaled out over processes (torch.distributed, as under `torchrun`): each of
N processes extracts its contiguous slice of the split and the slices are all-gathered in
dataset order, against one process on the same machine, in the same run.

On GPUs each process takes one GPU (NCCL), so the ratio is the speed-up from N GPUs. On the CPU
each process takes cores / N threads (gloo), so the ratio shows what splitting and gathering cost
(about 1 at best), not a speed-up. The N-process features must equal the one-process ones.

    python benchmarks/bench_scaleout.py [--processes 2] [--model resnet20] [--images 10000]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHARED
from common import record

from classfilters import build_model, extract_features, open_dataset
from classfilters.session import limit


def worker(rank, world_size, args, store, out):
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    split = limit(open_dataset(args.data, "test"), args.images)
    torch.manual_seed(0)  # the same random weights in every process
    model = build_model(args.model, num_classes=split.num_classes)
    warm = limit(split, 2 * args.batch_size)
    extract_features(model, warm, args.batch_size, device, use_cache=False, progress=False)
    dist.barrier()
    start = time.perf_counter()
    features = extract_features(model, split, args.batch_size, device, use_cache=False, progress=False)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        torch.save({"features": features, "seconds": seconds}, out)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown


def run(processes, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        mp.spawn(worker, args=(processes, args, str(Path(tmp) / "store"), str(out)), nprocs=processes, join=True)
        return torch.load(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default=f"cifar10:{SHARED / 'cifar10-jpeg.tar.gz'}")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.processes:
        raise SystemExit(f"{args.processes} processes need {args.processes} GPUs; this machine has "
                         f"{torch.cuda.device_count()} (use --device cpu, or fewer --processes)")
    open_dataset(args.data, "test")  # decode (and cache) the split once, before the processes start
    one, many = run(1, args), run(args.processes, args)
    tolerance = 2e-2 if args.device == "cuda" else 1e-5  # bf16 on GPUs; batches start at other images
    difference = (one["features"] - many["features"]).abs().max().item()
    assert many["features"].shape == one["features"].shape, "the gathered features have the wrong shape"
    assert torch.allclose(one["features"], many["features"], atol=tolerance, rtol=tolerance), \
        f"{args.processes} processes disagree with one (max difference {difference})"
    n = len(one["features"])
    record("scaleout", [{"model": args.model, "images": n, "device": args.device, "processes": args.processes,
                         "threads_per_process": 1 if args.device == "cuda" else max(1, (os.cpu_count() or 1)
                                                                                      // args.processes),
                         "one_process_s": one["seconds"], "n_processes_s": many["seconds"],
                         "one_process_img_s": n / one["seconds"], "n_processes_img_s": n / many["seconds"],
                         "speedup": one["seconds"] / many["seconds"], "max_difference": difference}], device=args.device)


if __name__ == "__main__":
    main()
