"""Run a profile's notebooks without Jupyter: for a bare machine with only torch, torchvision, timm,
pandas, seaborn and matplotlib (no papermill, nbformat, nbclient or ipykernel).

    python -m classfilters.barerun --profile cifar10 [--only 03] [--set key=value ...]

Each notebook's JSON is read; the parameters are injected as papermill does (a cell assigning what
the cell tagged `parameters` declares: `profile`, `out_dir` and the notebook's knobs, placed right
after it; the runner's `notebook_parameters`, with the declared names read by `ast`); the code
cells are executed in order in this process, in one namespace per notebook, with matplotlib's Agg
backend. Tables and figures land in figures/<profile>/ as with `classfilters.runner`, each
notebook's printed output in runs/<profile>/<notebook>.log, and provenance.json records the commit
(from git, else $CLASSFILTERS_COMMIT, else a COMMIT file at the repository root: provenance.py),
device, library versions and seconds per notebook. A cell that needs an interactive-only module (ipywidgets,
IPython) is skipped, saying so; any other failure stops the run, naming notebook and cell.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import provenance, runner
from .cpu_memory import keep_freed_memory
from .profile import SETTINGS, load_profile, parse_set, repo_root, save_profile


def declared_parameters(notebook: Path) -> list[str]:
    """The names the cell tagged `parameters` assigns (what papermill.inspect_notebook reads)."""
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)]
    return []


def notebook_parameters(notebook: Path, profile_file: Path, out_dir: Path, values: dict) -> dict:
    """What the notebook gets: its declared knobs with this run's values, the profile file and out_dir."""
    declared = declared_parameters(notebook)
    unknown = [n for n in declared if n not in runner.RESERVED and n not in SETTINGS]
    if unknown:
        raise ValueError(f"{notebook.name}: parameters {unknown} are neither {runner.RESERVED} nor settings of "
                         "classfilters.Profile")
    return {**{n: values[n] for n in declared if n in SETTINGS}, "profile": str(profile_file), "out_dir": str(out_dir)}


def code_cells(notebook: Path, parameters: dict) -> list[str]:
    """The notebook's code cells, with a cell setting `parameters` after the one tagged `parameters`
    (first when none is tagged, as papermill does)."""
    cells = json.loads(notebook.read_text())["cells"]
    sources = [("".join(c["source"]), "parameters" in c.get("metadata", {}).get("tags", []))
               for c in cells if c["cell_type"] == "code"]
    injected = "# Parameters (injected)\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    at = next((i + 1 for i, (_, tagged) in enumerate(sources) if tagged), 0)
    out = [src for src, _ in sources]
    out.insert(at, injected)
    return [_without_magics(src) for src in out]


def _without_magics(source: str) -> str:
    """IPython magics and shell escapes (`%...`, `!...`) become comments: plain Python runs the rest."""
    return "\n".join(f"# {line}" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def display(*objects, **_):
    """Jupyter's `display`, printed: DataFrames as text, anything else by `print`."""
    for obj in objects:
        print(obj.to_string() if hasattr(obj, "to_string") else obj)


INTERACTIVE_ONLY = ("ipywidgets", "IPython", "ipykernel")  # nothing to show without a notebook front end


def execute(notebook: Path, parameters: dict, log_path: Path, cwd: Path) -> list[str]:
    """Run the code cells of `notebook` in order; raises RuntimeError naming the failing cell.
    Returns the cells skipped for want of an interactive-only module."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    namespace = {"__name__": "__main__", "display": display}
    skipped = []
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        with log_path.open("w") as log:
            for number, source in enumerate(code_cells(notebook, parameters), 1):
                buffer = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buffer):
                        exec(compile(source, f"{notebook.name}[cell {number}]", "exec"), namespace)  # noqa: S102
                except ModuleNotFoundError as e:
                    if (e.name or "").split(".")[0] not in INTERACTIVE_ONLY:
                        raise
                    skipped.append(f"cell {number}: needs {e.name} (interactive only)")
                    buffer.write(f"skipped: {skipped[-1]}\n")
                finally:
                    log.write(f"----- cell {number}\n{buffer.getvalue()}")
                    log.flush()
    except Exception as e:
        raise RuntimeError(f"{notebook.stem}, {e.__class__.__name__}: {e}\n{traceback.format_exc(limit=-4)}") from e
    finally:
        os.chdir(old_cwd)
        plt.close("all")
    return skipped


def run(profile: str, only: str | None = None, overrides: dict | None = None, figures_dir: Path | None = None,
        runs_dir: Path | None = None, notebooks_dir: Path | None = None, log=print) -> int:
    """Execute the notebooks; 0 when all succeeded, 1 at the first failure (after saving provenance)."""
    root = repo_root()
    settings = load_profile(profile, overrides)
    values, name = settings.to_dict(), settings.name
    figures_dir = Path(figures_dir or root / "figures" / name).resolve()
    runs_dir = Path(runs_dir or root / "runs" / name).resolve()
    figures_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    profile_file = save_profile(settings, runs_dir / "profile.yaml")
    all_notebooks = runner.notebooks(Path(notebooks_dir or root / "notebooks"))
    todo = [runner.pick(all_notebooks, only)] if only else all_notebooks
    code = provenance.code_state(root, log)
    prov_path = figures_dir / "provenance.json"
    done, settings = provenance.carried(provenance.read(prov_path)) if only else ({}, {})  # --only keeps the others
    digest = provenance.settings_digest(values)
    record = {"profile": name, "profile_values": values, **code, "runner": "classfilters.barerun (no Jupyter)",
              "device": provenance.device_name(), "libraries": provenance.versions(), "notebooks": done,
              "settings": {**settings, digest: values}}
    os.environ["MPLBACKEND"] = "Agg"
    started = time.time()
    for nb in todo:
        log(f"[{name}] {nb.stem} ...")
        t0 = time.time()
        try:
            parameters = notebook_parameters(nb, profile_file, figures_dir, values)
            skipped = execute(nb, parameters, runs_dir / f"{nb.stem}.log", root)
            entry = {"status": "ok", **({"skipped": skipped} if skipped else {})}
            for note in skipped:
                log(f"[{name}] {nb.stem}: {note}, skipped")
        except (RuntimeError, ValueError) as e:
            entry = {"status": "failed", "error": str(e).splitlines()[0]}
            log(f"[{name}] {nb.stem} FAILED: {e}\n  printed output: {runs_dir / (nb.stem + '.log')}")
        entry.update(provenance.entry_state(code, nb, figures_dir, t0), settings=digest, seconds=round(time.time() - t0, 1),
                     finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        record["notebooks"][nb.stem] = entry
        record["total_seconds_this_run"] = round(time.time() - started, 1)
        provenance.write(prov_path, record)
        if entry["status"] != "ok":
            return 1
        log(f"[{name}] {nb.stem} ok in {entry['seconds']} s")
    log(f"[{name}] all done in {record['total_seconds_this_run']} s: tables and figures in {figures_dir}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m classfilters.barerun", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo", help="a profile in profiles/ or the path of a YAML profile")
    p.add_argument("--only", help="run just this notebook (number, name or part of it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile value")
    p.add_argument("--figures", type=Path, help="output folder (default figures/<profile>/)")
    p.add_argument("--runs", type=Path, help="printed output folder (default runs/<profile>/)")
    args = p.parse_args(argv)
    keep_freed_memory()  # CPU training in this process: no fresh pages faulted in every step (cpu_memory.py)
    return run(args.profile, args.only, parse_set(args.set), args.figures, args.runs)


if __name__ == "__main__":
    sys.exit(main())
