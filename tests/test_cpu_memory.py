"""Freed memory kept in the process: no page faults for a large tensor allocated again; the runner's kernels
inherit the setting, a user's own GLIBC_TUNABLES wins."""
import os
import platform
import subprocess
import sys

import pytest

from classfilters import runner
from classfilters.cpu_memory import TUNABLES, child_environment

TRAINING_STEPS = """
import resource, statistics, sys, torch
from classfilters import build_model
from classfilters.cpu_memory import keep_freed_memory
assert keep_freed_memory() if sys.argv[1] == "keep" else True
torch.set_num_threads(1)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
model, x = build_model("resnet8", num_classes=10), torch.randn(256, 3, 32, 32)  # 16 MB activation maps
per_step = []
for step in range(10):
    before = faults()
    model(x).sum().backward()
    per_step.append(faults() - before)
print(statistics.mean(per_step[2:]))  # after two steps of warm-up
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_training_steps_fault_in_no_fresh_pages():
    """A forward and backward pass of a ResNet-8 on 256 CIFAR images, again and again: glibc's default maps
    its large activation maps afresh every step (12,000-61,000 page faults a step here, 29,000-44,000 on
    average); kept, they are reused (none in most steps, but torch's aligned allocations still fault up to
    20,000 times in some: at most 2,600 a step on average in 16 runs here, hence a bound of 8,000 on the mean,
    three times either side)."""
    def faults_per_step(mode, env=None):
        environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | (env or {})
        out = subprocess.run([sys.executable, "-c", TRAINING_STEPS, mode], capture_output=True, text=True,
                             check=True, env=environ)
        return float(out.stdout.split()[-1])
    assert faults_per_step("default") > 8_000
    assert faults_per_step("keep") < 8_000
    assert faults_per_step("default", child_environment({})) < 8_000  # the runner's kernels: set at start


def test_the_runners_kernels_keep_freed_memory_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with runner.kernel_environment():
        inside = os.environ.get("GLIBC_TUNABLES")
    assert "GLIBC_TUNABLES" not in os.environ  # restored
    assert inside == (TUNABLES if platform.system() == "Linux" else None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert child_environment(os.environ) == {}
    with runner.kernel_environment():
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
