"""Shared helpers for the benchmarks: timing, machine description, recording results."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from classfilters.provenance import cpu_info

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeat: int = 3, sync=None) -> float:
    """Fastest wall time of `repeat` calls, in seconds."""
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> dict:
    """Where a result was measured: the CPU (vendor, family, model, name), cores, load, threads, GPU, versions,
    commit."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_info(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}  # runnable processes: > cores means a busy machine
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        pass
    return info


def machine_slug(device: str | None = None) -> str:
    """A file-name part that differs between machines: the GPU's name, or the CPU's vendor, family and
    model (e.g. cpu-amd-f25-m17 for a Zen 4 EPYC), so results from different machines never overwrite.
    `device`: the one measured (e.g. the `--device` flag; default: cuda where there is one)."""
    kind = torch.device(device).type if device else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    cpu = cpu_info()
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(cpu["vendor"], str(cpu["vendor"]).lower())
    return f"cpu-{vendor}-f{cpu['family']}-m{cpu['model']}"


def record(name: str, rows: list[dict], device: str | None = None) -> Path:
    """Write the rows and the machine to benchmarks/results/<name>-<machine_slug(device)>.json and print them."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{machine_slug(device)}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows}, indent=1))
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"recorded in {path}")
    return path
