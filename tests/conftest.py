"""Shared fixtures: a per-session cache folder, the shared data location, small planted data."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLASSFILTERS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """Every test run starts from an empty cache, so nothing depends on what an earlier run left."""
    old = os.environ.get("CLASSFILTERS_CACHE")
    os.environ["CLASSFILTERS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CLASSFILTERS_CACHE", None)
    else:
        os.environ["CLASSFILTERS_CACHE"] = old


class _NoExitOs:
    """The os module, except that `_exit` raises: `cli.main` ends a torchrun rank with os._exit, and a test that
    reached it by mistake would end pytest there with the command's code (0 would read as a pass)."""
    def __getattr__(self, name):
        return getattr(os, name)

    def _exit(self, code):
        raise AssertionError(f"the command line called os._exit({code}) in a test")


@pytest.fixture(autouse=True, scope="session")
def _no_exit_from_the_cli():
    from classfilters import cli
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "os", _NoExitOs())
        yield


@pytest.fixture(autouse=True, scope="session")
def _cpu_by_default():
    """The library's default device is the GPU (bf16) where there is one; the tests' tolerances are
    float32 CPU ones, so they run on the CPU there too (benchmarks/gpu_smoke.py checks the GPU paths).
    CLASSFILTERS_TEST_DEVICE=default keeps the library's choice."""
    if os.environ.get("CLASSFILTERS_TEST_DEVICE") == "default":
        yield
        return
    import importlib
    with pytest.MonkeyPatch.context() as patch:
        for module in ("features", "train", "csg"):
            patch.setattr(importlib.import_module(f"classfilters.{module}"), "default_device",
                          lambda: torch.device("cpu"))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $CLASSFILTERS_SHARED_DATA): skipped where absent, required in CI."""
    if not (SHARED_DATA / "weights").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared data folder {SHARED_DATA} is missing")
        pytest.skip(f"needs the shared data folder {SHARED_DATA} (set CLASSFILTERS_SHARED_DATA)")
    return SHARED_DATA


def planted(n_per_class=40, num_classes=6, d=32, seed=0, strength=4.0):
    """Non-negative features where class c has feature 3c (and weaker 3c+1) switched on."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = torch.rand(len(labels), d, generator=gen)
    features[torch.arange(len(labels)), 3 * labels] += strength
    features[torch.arange(len(labels)), 3 * labels + 1] += strength / 2
    return features, labels


@pytest.fixture(scope="session")
def digits_model():
    """A ResNet-8 trained briefly on the digits' train split (cached for the session)."""
    from classfilters import Recipe, open_dataset, trained_model
    train = open_dataset("digits", "train")
    return trained_model("resnet8", train, Recipe(epochs=4, batch_size=64, lr=0.05, flip=False), progress=False)


def options_text(parser) -> str:
    """A parser's options as the README lists them: `--name METAVAR (required)`, then its help indented."""
    lines = []
    for a in parser._actions:
        if "--help" in a.option_strings:
            continue
        meta = "" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}" if a.nargs is None else f" [{a.metavar}]"
        lines.append(f"{a.option_strings[-1]}{meta}{' (required)' if a.required else ''}\n    {a.help}")
    return "\n".join(lines)


def readme_options(command: str) -> str:
    """The README's list of `command`'s options (the text block after "Its options (`<command> --help`")."""
    readme = (REPO / "README.md").read_text()
    return readme.split(f"Its options (`{command} --help`")[1].split("```text\n")[1].split("\n```")[0]
