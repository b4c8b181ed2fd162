"""provenance.json: what produced a profile's figures, and whether a notebook's results are still current.

Recorded per run: the profile's values, the git commit (and whether lib/, notebooks/ or profiles/
differ from it), a SHA-256 of the library's sources, the device and library versions; per
notebook: its status, seconds, the hash of the notebook file and of every output it wrote.

`--resume` skips a notebook only when its results are provably current: it succeeded, the library
sources and the notebook hash as they did then (so uncommitted edits count), its executed copy
exists and every output it wrote is there with the same bytes. A tree without `.git` (a copy on
a GPU box) records the commit from $CLASSFILTERS_COMMIT or a COMMIT file at the root, else
"unknown" and says so; the source hash does not need git.

The file is written atomically (a temporary file renamed over it); a corrupt one is an error that
names it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "matplotlib", "seaborn",
             "papermill", "ipywidgets", "timm")
PACKAGE = Path(__file__).resolve().parent


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_hash(package: Path = PACKAGE) -> str:
    """SHA-256 over the library's Python sources (relative names and bytes, in sorted order)."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def git_commit(root: Path, log=print) -> tuple[str, bool | None]:
    """(commit, dirty): HEAD and whether lib/, notebooks/ or profiles/ differ from it (untracked files in
    lib/ included). Without git: $CLASSFILTERS_COMMIT, else a COMMIT file at `root`, else "unknown"
    (dirty None: not known)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], check=False, cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git installed
            return ""
    checkout = (root / ".git").exists()
    commit = git("rev-parse", "HEAD") if checkout else ""
    if commit:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "notebooks", "profiles")
                     or git("status", "--porcelain", "--untracked-files=all", "lib"))
        return commit, dirty
    commit = os.environ.get("CLASSFILTERS_COMMIT", "").strip()
    if not commit and (root / "COMMIT").is_file():
        commit = (root / "COMMIT").read_text().strip()
    if not commit:
        where = (f"{root} is a git checkout but git could not name its HEAD (no git program, or git refusing a "
                 "checkout owned by another user)") if checkout else f"{root} is no git checkout"
        log(f"note: {where}, and neither $CLASSFILTERS_COMMIT nor a COMMIT file names the commit: provenance "
            f"records 'unknown' (the library's source hash still identifies the code)")
    return commit or "unknown", None


def code_state(root: Path, log=print) -> dict:
    commit, dirty = git_commit(root, log)
    return {"git_commit": commit, "git_dirty": dirty, "source_hash": source_hash()}


def settings_digest(values: dict) -> str:
    """A short hash of a resolved profile's values: the settings a notebook's results were made under."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def carried(previous: dict) -> tuple[dict, dict]:
    """(notebooks, settings) of an earlier record, every entry tagged with the digest of the settings it ran
    under (records written before entries carried one: the record's `profile_values`), and digest -> values.
    A run of some notebooks thus keeps the others' records, whatever settings they were made under."""
    settings = dict(previous.get("settings", {}))
    values = previous.get("profile_values")
    default = None
    if values is not None:
        default = settings_digest(values)
        settings.setdefault(default, values)
    notebooks = {stem: {"settings": default, **entry} for stem, entry in previous.get("notebooks", {}).items()}
    return notebooks, settings


def entry_state(code: dict, notebook: Path, out_dir: Path, started: float) -> dict:
    """What identifies one notebook's results: the code, the notebook and the outputs it wrote since `started`;
    with the machine it ran on (a record's top-level `device` is its latest run's, not every notebook's)."""
    outputs = {p.name: file_hash(p) for p in sorted(out_dir.iterdir())
               if p.is_file() and p.name != "provenance.json" and p.stat().st_mtime >= started}
    return {"commit": code["git_commit"], "source_hash": code["source_hash"], "notebook_hash": file_hash(notebook),
            "outputs": outputs, "device": device_name(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def why_stale(entry: dict, code: dict, notebook: Path, executed: Path, out_dir: Path, settings: str | None = None) -> str:
    """Why a notebook must run again ("" when its results are current); `settings`: the digest of this run's."""
    if entry.get("status") != "ok":
        return "not done" if not entry else f"last status {entry.get('status')}"
    if settings is not None and entry.get("settings") != settings:
        return "the profile's settings changed"
    if entry.get("source_hash") != code["source_hash"]:
        return "the library's sources changed"
    if entry.get("notebook_hash") != file_hash(notebook):
        return "the notebook changed"
    if not executed.is_file():
        return f"its executed copy {executed} is missing"
    for name, digest in entry.get("outputs", {}).items():
        path = out_dir / name
        if not path.is_file():
            return f"its output {name} is missing"
        if file_hash(path) != digest:
            return f"its output {name} was changed"
    return ""


def read(path: Path) -> dict:
    """A provenance file ({} when there is none); a corrupt one is an error naming it."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}): delete it, or run without --resume / --only") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object): delete it, or run without --resume / --only")  # noqa: TRY004 -- a bad file, not a bad argument
    return record


def write(path: Path, record: dict) -> None:
    """`record` as JSON at `path`, atomically: a reader sees the old file or the new one, never half of one.
    The temporary is created as any new file is (mode 0o666 less the umask), so the record is an ordinary file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    from .device import native_cpu_bf16
    cpu = cpu_info()
    bf16 = "native bf16" if native_cpu_bf16() else "no native bf16"  # what precision "auto" trains in
    return f"cpu: {cpu['name']} (family {cpu['family']}, model {cpu['model']}; {os.cpu_count()} cores; {bf16})"


def versions() -> dict:
    import torch

    from . import __version__
    out = {"python": platform.python_version(), "classfilters": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out.update(torch=torch.__version__, cuda=torch.version.cuda)  # the build tag (+cu130, +cpu) matters
    return out
