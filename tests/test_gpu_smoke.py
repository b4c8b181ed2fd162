"""benchmarks/gpu_smoke.py --dry: every section's CPU part passes (the GPU run uses the same code)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_smoke_dry_run_passes():
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--dry"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("topk", "decode", "race", "oom", "pooling", "compile"):
        assert f"PASS {name}" in proc.stdout, proc.stdout
