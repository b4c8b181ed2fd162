"""The `data/` folder: the default home of datasets and checkpoints, checked against data/manifest.json.

`data/` (at the repository root) is where downloaded or linked datasets live: torchvision's CIFAR-10
is downloaded there by default (`$CLASSFILTERS_DATA` moves it), and profiles may name files there
(`cifar10:data/cifar10-jpeg.tar.gz`, `imagefolder:data/imagenet`). Git ignores everything in it but
its README and the manifest, which lists the files the profiles expect, with size and SHA-256.

    python -m classfilters.datafiles            # each manifest entry: ok, missing or DIFFERENT
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(folder: Path = DATA) -> dict[str, str]:
    """path -> "ok", "missing" or "different (size or checksum)" for each manifest entry."""
    manifest = json.loads((folder / "manifest.json").read_text())
    status = {}
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            status[entry["path"]] = "missing"
        elif path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            status[entry["path"]] = "DIFFERENT (size or checksum): not the file the profiles expect"
        else:
            status[entry["path"]] = "ok"
    return status


def main() -> int:
    status = check()
    for path, state in status.items():
        print(f"{state:>8}  data/{path}")
    return 1 if any(s.startswith("DIFFERENT") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
