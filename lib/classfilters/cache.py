"""On-disk cache of tensors: keyed by everything that affects them, written atomically.

Entries are safetensors files named by a hash of their key (a dict of plain values); the
key itself is stored in the file's metadata and checked on read, so a changed model,
dataset, split or transform can never return a stale entry. Writes go to a temporary
file in the same folder and are renamed into place, so an interrupted run leaves either
the old entry or the new one, never half a file. The folder is `$CLASSFILTERS_CACHE`
or `~/.cache/classfilters`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

CACHE_FORMAT = 1  # bump when what is cached changes meaning


def cache_dir() -> Path:
    return Path(os.environ.get("CLASSFILTERS_CACHE", Path.home() / ".cache" / "classfilters"))


def key_text(key: dict) -> str:
    return json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, default=str)


def key_hash(key: dict) -> str:
    return hashlib.sha256(key_text(key).encode()).hexdigest()[:24]


def entry_path(kind: str, key: dict) -> Path:
    return cache_dir() / kind / f"{key_hash(key)}.safetensors"


def load(kind: str, key: dict) -> dict[str, torch.Tensor] | None:
    """The cached tensors for `key`, or None when absent, unreadable or for another key."""
    path = entry_path(kind, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored != key_text(key):
            return None
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a corrupt entry is recomputed, not trusted


def save(kind: str, key: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path = entry_path(kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"key": key_text(key)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (used to key caches of archives and checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(root: str | Path, suffixes: tuple[str, ...]) -> str:
    """Hash of the relative path, size and mtime of every matching file under `root`."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in suffixes and p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
