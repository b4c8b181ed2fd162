"""Run the paper notebooks in order for a profile with papermill; every table and figure lands in figures/<profile>/.

    python -m classfilters.runner --profile demo              # all notebooks (the demo: a few minutes on a CPU)
    python -m classfilters.runner --profile demo --resume     # skip notebooks already done at this commit
    python -m classfilters.runner --profile demo --only 04    # re-run one notebook (number or name)
    python -m classfilters.runner --profile my.yaml --set k=10 --set models='[resnet8]'

Executed notebooks go to runs/<profile>/ (not committed); tables (CSV + Markdown) and
figures (PNG + PDF) to figures/<profile>/, with provenance.json: git commit, device,
library versions and wall time per notebook. The run stops at the first failing notebook,
names it and its error, and keeps everything produced so far.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from .study import load_profile, profile_path, repo_root

LIBRARIES = ("classfilters", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "matplotlib", "seaborn",
             "papermill", "ipywidgets", "timm")


def notebooks(folder: Path) -> list[Path]:
    """The numbered notebooks, in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def pick(all_notebooks: list[Path], only: str) -> Path:
    """A notebook by number ("4", "04"), stem ("04_retrain") or part of its name ("retrain")."""
    for p in all_notebooks:
        number = p.stem.split("_")[0]
        if only in (p.stem, p.name) or (only.isdigit() and int(only) == int(number)):
            return p
    matches = [p for p in all_notebooks if only in p.stem]
    if len(matches) == 1:
        return matches[0]
    raise SystemExit(f"--only {only!r} matches {[p.stem for p in matches] or 'no notebook'}; "
                     f"choose one of {[p.stem for p in all_notebooks]}")


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit, dirty): the checkout's HEAD and whether tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], check=False, cwd=root, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit, bool(git("status", "--porcelain", "--untracked-files=no", "lib", "notebooks", "profiles"))


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it: vendor, family, model, name (and whether it has AVX-512).
    Family and model tell CPU generations apart (AMD Zen 4 is family 25, model 17 among others)."""
    info = {"vendor": platform.machine(), "family": None, "model": None, "name": platform.processor() or platform.machine()}
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "name"}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return info
    for line in first.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in fields:
            info[fields[key]] = int(value) if key in ("cpu family", "model") and value.isdigit() else value
        if key == "flags":
            info["avx512"] = "avx512f" in value.split()
    return info


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    cpu = cpu_info()
    return f"cpu: {cpu['name']} (family {cpu['family']}, model {cpu['model']}; {os.cpu_count()} cores)"


def versions() -> dict:
    import torch
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out.update(torch=torch.__version__, cuda=torch.version.cuda)  # the build tag (+cu130, +cpu) matters
    return out


def parse_set(items: list[str]) -> dict:
    """--set key=value (value parsed as YAML; dotted keys reach into nested settings)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return out


def run(profile: str, only: str | None = None, resume: bool = False, overrides: dict | None = None,
        figures_dir: Path | None = None, runs_dir: Path | None = None, notebooks_dir: Path | None = None,
        log=print, progress: bool = True) -> int:
    """Execute the notebooks; 0 when all succeeded, 1 at the first failure (after saving provenance).
    `progress`: papermill's bar over each notebook's cells, on stderr."""
    import papermill
    from jupyter_client.manager import KernelManager

    class LocalKernelManager(KernelManager):
        """On POSIX, kernels talk over local sockets (IPC), not TCP ports: no port to race for, nothing on
        the network (and no warning about unencrypted TCP from ipykernel)."""
        def __init__(self, **kwargs):
            super().__init__(**({"transport": "ipc"} if os.name == "posix" else {}), **kwargs)

    root = repo_root()
    values = load_profile(profile, overrides)
    name = values["name"]
    figures_dir = Path(figures_dir or root / "figures" / name).resolve()
    runs_dir = Path(runs_dir or root / "runs" / name).resolve()
    figures_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    all_notebooks = notebooks(Path(notebooks_dir or root / "notebooks"))
    todo = [pick(all_notebooks, only)] if only else all_notebooks
    commit, dirty = git_commit(root)
    prov_path = figures_dir / "provenance.json"
    previous = json.loads(prov_path.read_text()) if prov_path.is_file() and (resume or only) else {}
    done = previous.get("notebooks", {}) if previous.get("profile_values") == values else {}
    provenance = {"profile": name, "profile_values": values, "git_commit": commit, "git_dirty": dirty,
                  "device": device_name(), "libraries": versions(), "notebooks": done}
    os.environ["MPLBACKEND"] = "Agg"  # the kernels inherit it: no display needed
    started = time.time()
    status = 0
    for nb in todo:
        entry = done.get(nb.stem, {})
        if resume and not only and entry.get("status") == "ok" and entry.get("commit") == commit \
                and (runs_dir / nb.name).is_file():
            log(f"[{name}] {nb.stem}: done at this commit, skipped")
            continue
        log(f"[{name}] {nb.stem} ...")
        t0 = time.time()
        try:
            papermill.execute_notebook(str(nb), str(runs_dir / nb.name), kernel_name="python3", cwd=str(root),
                                       parameters={"profile": str(profile_path(profile)), "overrides": values,
                                                   "out_dir": str(figures_dir)},
                                       progress_bar=progress and {"desc": nb.stem, "unit": "cell"},
                                       log_output=False, kernel_manager_class=LocalKernelManager)
            entry = {"status": "ok"}
        except Exception as e:  # noqa: BLE001 -- any failure is recorded; PapermillExecutionError carries the cell's error
            ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
            entry = {"status": "failed", "error": f"{ename}: {evalue}"}
            log(f"[{name}] {nb.stem} FAILED: {ename}: {evalue}\n  executed copy: {runs_dir / nb.name}")
            status = 1
        entry.update(seconds=round(time.time() - t0, 1), commit=commit,
                     finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        done[nb.stem] = entry
        provenance["total_seconds_this_run"] = round(time.time() - started, 1)
        prov_path.write_text(json.dumps(provenance, indent=1))
        if status:
            return status
        log(f"[{name}] {nb.stem} ok in {entry['seconds']} s")
    provenance["total_seconds_this_run"] = round(time.time() - started, 1)
    prov_path.write_text(json.dumps(provenance, indent=1))
    log(f"[{name}] all done in {provenance['total_seconds_this_run']} s: tables and figures in {figures_dir}")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m classfilters.runner", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo", help="demo | cifar10-shared | cifar10 | imagenet, or the path of a YAML profile")
    p.add_argument("--only", help="run just this notebook (number, name or part of it)")
    p.add_argument("--resume", action="store_true", help="skip notebooks already done for this profile and commit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile value")
    p.add_argument("--figures", type=Path, help="output folder (default figures/<profile>/)")
    p.add_argument("--runs", type=Path, help="executed notebooks folder (default runs/<profile>/)")
    args = p.parse_args(argv)
    try:
        return run(args.profile, args.only, args.resume, parse_set(args.set), args.figures, args.runs)
    except (FileNotFoundError, ValueError) as e:  # no such profile, a misspelt setting
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
