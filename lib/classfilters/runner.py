"""Run the paper notebooks in order for a profile with papermill; every table and figure lands in figures/<profile>/.

    python -m classfilters.runner --profile demo              # all notebooks (the demo: a few minutes on a CPU)
    python -m classfilters.runner --profile demo --resume     # skip notebooks whose results are provably current
    python -m classfilters.runner --profile demo --only 04    # re-run one notebook (number or name)
    python -m classfilters.runner --profile my.yaml --set k=10 --set train.epochs=20 --set 'models=[resnet8]'

The runner resolves the profile once (`extends`, `${VAR:-default}`, `--set`; profile.py), writes it
to runs/<profile>/profile.yaml and passes each notebook only what its `parameters` cell declares:
`profile` (that file), `out_dir` (figures/<profile>/) and its knobs (k, k_prime, model, ...).
Executed notebooks, with their figures embedded, go to runs/<profile>/ (not committed); tables
(CSV + Markdown) and figures (PNG + PDF) to figures/<profile>/, with provenance.json (provenance.py).
Training and extraction progress reaches this console. The run stops at the first failing
notebook, names it and its error, and keeps everything produced so far.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from . import provenance
from .cpu_memory import child_environment
from .profile import SETTINGS, load_profile, parse_set, repo_root, save_profile

RESERVED = ("profile", "out_dir")  # parameters every notebook takes besides its knobs


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


@contextmanager
def kernel_environment():
    """What the kernels inherit while the runner executes them: figures embedded as PNG (never the Agg
    backend's `<Figure size ...>` text), progress bars as text that papermill forwards to this console,
    freed memory kept in the process (cpu_memory.py). This process's environment is
    restored after."""
    values = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "CLASSFILTERS_PROGRESS": "text",
              "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5"), **child_environment(os.environ)}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def notebook_parameters(nb: Path, profile_file: Path, out_dir: Path, values: dict) -> dict:
    """What a notebook gets: the names its `parameters` cell declares, with this run's values."""
    import papermill
    declared = papermill.inspect_notebook(str(nb))
    unknown = [name for name in declared if name not in RESERVED and name not in SETTINGS]
    if unknown:
        raise ValueError(f"{nb.name}: parameters {unknown} are neither {RESERVED} nor settings of "
                         f"classfilters.Profile")
    params = {name: values[name] for name in declared if name in SETTINGS}
    return {**params, "profile": str(profile_file), "out_dir": str(out_dir)}


def run_notebooks(profile: str, only: str | None = None, resume: bool = False, overrides: dict | None = None,
                  figures_dir: Path | None = None, runs_dir: Path | None = None, notebooks_dir: Path | None = None,
                  log=print, progress: bool = True) -> int:
    """Execute the notebooks; 0 when all succeeded, 1 at the first failure (after saving provenance).
    `progress`: papermill's bar over each notebook's cells and the notebooks' own progress, on stderr."""
    import papermill
    from jupyter_client.manager import KernelManager

    class LocalKernelManager(KernelManager):
        """On POSIX, kernels talk over local sockets (IPC), not TCP ports: no port to race for, nothing on
        the network (and no warning about unencrypted TCP from ipykernel). The sockets live in a private
        temporary folder, not as kernel-ipc-N files in the working directory (left behind when a run is
        killed)."""
        def __init__(self, **kwargs):
            ipc = {"transport": "ipc", "ip": os.path.join(sockets, "kernel")} if os.name == "posix" else {}
            super().__init__(**ipc, **kwargs)

    root = repo_root()
    settings = load_profile(profile, overrides)
    values, name = settings.to_dict(), settings.name
    figures_dir = Path(figures_dir or root / "figures" / name).resolve()
    runs_dir = Path(runs_dir or root / "runs" / name).resolve()
    figures_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    profile_file = save_profile(settings, runs_dir / "profile.yaml")
    all_notebooks = notebooks(Path(notebooks_dir or root / "notebooks"))
    todo = [pick(all_notebooks, only)] if only else all_notebooks
    code = provenance.code_state(root, log)
    prov_path = figures_dir / "provenance.json"
    previous = provenance.read(prov_path) if (resume or only) else {}
    done, settings = provenance.carried(previous)
    digest = provenance.settings_digest(values)
    running = {nb.stem for nb in todo}
    if other := sorted(stem for stem, e in done.items() if e.get("settings") != digest and stem not in running):
        log(f"[{name}] {', '.join(other)}: made under other settings; their records are kept, tagged with them "
            f"(provenance.json#settings)")
    record = {"profile": name, "profile_values": values, **code, "device": provenance.device_name(),
              "libraries": provenance.versions(), "notebooks": done, "settings": {**settings, digest: values}}
    started = time.time()
    status = 0
    # under /tmp on POSIX: a socket's path must stay under ~104 bytes, which a long $TMPDIR (macOS) can exceed
    with kernel_environment(), tempfile.TemporaryDirectory(prefix="classfilters-kernels-", ignore_cleanup_errors=True,
                                                           dir="/tmp" if os.name == "posix" else None) as sockets:
        for nb in todo:
            entry = done.get(nb.stem, {})
            if resume and not only:
                stale = provenance.why_stale(entry, code, nb, runs_dir / nb.name, figures_dir, digest)
                if not stale:
                    log(f"[{name}] {nb.stem}: current (same library sources, notebook and outputs), skipped")
                    continue
                if entry:
                    log(f"[{name}] {nb.stem}: run again ({stale})")
            log(f"[{name}] {nb.stem} ...")
            t0 = time.time()
            try:
                papermill.execute_notebook(str(nb), str(runs_dir / nb.name), kernel_name="python3", cwd=str(root),
                                           parameters=notebook_parameters(nb, profile_file, figures_dir, values),
                                           progress_bar=progress and {"desc": nb.stem, "unit": "cell"},
                                           stderr_file=sys.stderr if progress else None,
                                           log_output=False, kernel_manager_class=LocalKernelManager)
                entry = {"status": "ok"}
            except Exception as e:  # noqa: BLE001 -- any failure is recorded; PapermillExecutionError carries the cell's error
                ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
                entry = {"status": "failed", "error": f"{ename}: {evalue}"}
                log(f"[{name}] {nb.stem} FAILED: {ename}: {evalue}\n  executed copy: {runs_dir / nb.name}")
                status = 1
            entry.update(provenance.entry_state(code, nb, figures_dir, t0), settings=digest,
                         seconds=round(time.time() - t0, 1))
            done[nb.stem] = entry
            record["total_seconds_this_run"] = round(time.time() - started, 1)
            provenance.write(prov_path, record)
            if status:
                return status
            log(f"[{name}] {nb.stem} ok in {entry['seconds']} s")
        record["total_seconds_this_run"] = round(time.time() - started, 1)
        provenance.write(prov_path, record)
        log(f"[{name}] all done in {record['total_seconds_this_run']} s: tables and figures in {figures_dir}")
        return status


def parser() -> argparse.ArgumentParser:
    """The options (the README's list of them is checked against these)."""
    p = argparse.ArgumentParser(prog="python -m classfilters.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="demo", help="demo | cifar10-shared | cifar10-cpu-resnet20 | cifar10 | imagenet, or the path of a YAML profile")
    p.add_argument("--only", help="run just this notebook (number, name or part of it)")
    p.add_argument("--resume", action="store_true",
                   help="skip notebooks whose results are current: same library sources, notebook, profile, outputs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (a field of classfilters.Profile; train.epochs=20 for the Recipe)")
    p.add_argument("--figures", type=Path, help="output folder (default figures/<profile>/)")
    p.add_argument("--runs", type=Path, help="executed notebooks folder (default runs/<profile>/)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run_notebooks(args.profile, args.only, args.resume, parse_set(args.set), args.figures, args.runs)
    except (FileNotFoundError, ValueError) as e:  # no such profile, a misspelt setting, a corrupt provenance.json
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
