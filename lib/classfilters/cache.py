"""On-disk cache of tensors: keyed by everything that affects them, written atomically, checked on read.

Entries are safetensors files named by a hash of their key (a dict of plain values). The key
itself and a sha256 of the tensors (names, dtypes, shapes and bytes) are stored in the file's
metadata and checked on read: a changed model, dataset, split or transform can never return a
stale entry, and an entry whose bytes changed on disk is a miss (with a one-line warning) and is
recomputed. Writes go to a temporary file in the same folder and are renamed into place, so an
interrupted run leaves either the old entry or the new one, never half a file; the temporaries
a killed run leaves behind (ours, named by host and process id, and safetensors' own `.tmpXXXXXX`)
are removed on the next start, once their writer is provably gone (dead process) or they are
old. A cache folder that cannot be written is reported once and the run goes on without it.

The folder is `$CLASSFILTERS_CACHE` or `~/.cache/classfilters`. `code_identity(obj)` hashes what a
function or module computes (its class, source code and settings) and `source_digest(*modules)` the
source files of Python modules, for keys that must change when the code does.

About 310 lines: keys, atomic writes, checksums on read, the clean-up of killed writes and the code
hashes are one guarantee (never a stale or half-written entry) and are kept together.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import socket
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

CACHE_FORMAT = 2  # bump when what is cached changes meaning (2: a checksum in every entry)
STALE_SECONDS = 3600  # a temporary untouched this long has no live writer (writes touch it continuously)
_AGED_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$|^\.probe-\w+$")  # safetensors' (Rust tempfile); our probes
_OUR_TEMP = re.compile(r"^\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


class CacheWarning(UserWarning):
    """The cache could not be used as asked: a folder that cannot be written, a corrupt entry."""


def cache_dir() -> Path:
    return Path(os.environ.get("CLASSFILTERS_CACHE", Path.home() / ".cache" / "classfilters"))


def key_text(key: dict) -> str:
    return json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, default=str)


def key_hash(key: dict) -> str:
    return hashlib.sha256(key_text(key).encode()).hexdigest()[:24]


def entry_path(kind: str, key: dict) -> Path:
    return cache_dir() / kind / f"{key_hash(key)}.safetensors"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _warn(message: str) -> None:
    """A CacheWarning pointed at the caller of the cache function that warns. Not mutated (`pragma: no mutate`):
    under mutmut its trampolines are frames between, so the test of the warning's location runs outside it."""
    warnings.warn(message, CacheWarning, stacklevel=3)  # pragma: no mutate


@functools.cache
def _writable(folder: Path) -> str | None:
    """None when `folder` can be written (created if needed); else why not. Checked once per folder,
    which is also when the stale temporaries of killed writes in it are removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    for sub in (folder, *(p for p in folder.iterdir() if p.is_dir())) if folder == cache_dir() else (folder,):
        remove_stale_temporaries(sub)
    return None


def writable(kind: str | None = None) -> bool:
    """Whether the cache (or its folder for `kind`) can be written; says once, as a CacheWarning, when not."""
    folder = cache_dir() / kind if kind else cache_dir()
    reason = _writable(folder)
    if reason is not None and cache_dir() not in _warned:  # once per cache, whichever kind
        _warned.add(cache_dir())
        _warn(f"the cache folder {folder} cannot be written ({reason}): going on without a cache "
              "(results are recomputed next time); set CLASSFILTERS_CACHE to a writable folder")
    return reason is None


_warned: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporaries that killed writes left in `folder`: ours when their process (on this
    host) is gone or they are older than STALE_SECONDS, safetensors' when older than STALE_SECONDS.
    A temporary a live process is writing is never removed. Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = _host()
    for name in names:
        ours = _OUR_TEMP.match(name)
        if not ours and not _AGED_TEMP.match(name):
            continue
        path = folder / name
        try:
            old = now - path.stat().st_mtime > STALE_SECONDS
            dead = bool(ours) and ours["host"] == host and not _pid_alive(int(ours["pid"]))
            if old or dead:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def load(kind: str, key: dict) -> dict[str, torch.Tensor] | None:
    """The cached tensors for `key`, or None when absent, unreadable, for another key or corrupt."""
    path = entry_path(kind, key)
    if not path.is_file():
        return None
    try:  # one open: the key, checksum and tensors come from the same file even if another process replaces it
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != key_text(key):
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- a safetensors handle, not a dict
    except (SafetensorError, OSError, ValueError) as e:
        _warn(f"cache entry {path} is unreadable ({type(e).__name__}): recomputing it")
        return None
    if metadata.get("sha256") != tensors_digest(tensors):
        _warn(f"cache entry {path} does not match its checksum (changed on disk): recomputing it")
        return None
    return tensors


def save(kind: str, key: dict, tensors: dict[str, torch.Tensor]) -> Path | None:
    """Store `tensors` under `key`; None (after one warning) when the cache cannot be written."""
    if not writable(kind):
        return None
    path = entry_path(kind, key)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"key": key_text(key), "sha256": tensors_digest(tensors)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # again: the folder may have been deleted since it was checked
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_host()}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, SafetensorError) as e:  # a full disk, a folder made read-only meanwhile
        _warn(f"could not write the cache entry {path} ({type(e).__name__}: {e}): going on without it")
        return None
    return path


def discard(kind: str, key: dict) -> None:
    """Remove the entry for `key`, if any (and if the cache can be written)."""
    try:
        entry_path(kind, key).unlink(missing_ok=True)
    except OSError:
        pass


def code_identity(obj) -> str:
    """A hash of what `obj` computes: for a module, every submodule's class, forward source and
    settings (plain attributes; not the weights); for a function or callable, its qualified name,
    source (or bytecode), constants, defaults, bound arguments and closure (a decorated function: the one it
    wraps, by its code); for a bound method, its object too; for a callable object, its state (`__dict__` and
    slots). Changes when the code does; the same in every process (no addresses, paths or hash-seed orders)."""
    try:
        return _digest(obj, {})[:24]
    except RecursionError:
        raise ValueError(f"{type(obj).__name__} nests callables too deeply to be identified for the cache; "
                         "pass use_cache=False (or --no-cache)") from None


def source_digest(*modules) -> str:
    """A hash of the source files of `modules` (Python modules): for keys of results that code in them produced,
    e.g. a trained model's weights and the training loop that made them."""
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(inspect.getfile(module)).read_bytes())
    return h.hexdigest()[:24]


def _digest(fn, memo: dict) -> str:
    """sha256 of the callable's text. A callable inside another enters its text by this digest, each one written
    once per key (`memo`: id -> (object, digest); holding the object keeps its id from being reused), so the text
    stays small however deep the nesting; one met again inside itself (a recursive inner function, a module holding
    its own method) is "(itself)"."""
    if id(fn) in memo:
        return memo[id(fn)][1] or "(itself)"
    memo[id(fn)] = (fn, None)
    digest = hashlib.sha256(_callable_text(fn, memo).encode()).hexdigest()
    memo[id(fn)] = (fn, digest)
    return digest


def _module_text(model: torch.nn.Module, memo: dict) -> str:
    """Every submodule's name, class and settings (not the weights)."""
    return "".join(f"{name}|{_callable_text(type(module), memo)}|{_settings(module, memo)}\n"
                   for name, module in model.named_modules())


def _settings(module: torch.nn.Module, memo: dict | None = None) -> str:
    """The module's plain attributes (e.g. a pooling's kernel size, a wrapper's method name)."""
    memo = {} if memo is None else memo
    items = []
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") or k == "training" or isinstance(v, torch.nn.Module):
            continue
        items.append(f"{k}={_value_text(v, memo)}")
    return ";".join(items)


def _plain(value) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # no memory addresses (upper-case hex on Windows)


def _value_text(value, memo: dict) -> str:
    """A value inside a callable (a closure cell, an attribute, a setting, a constant): a callable by its digest (a
    decorator's closure holds the function it wraps), a module by its name, code by its bytecode, containers item
    by item (sets in a fixed order); anything else by its repr."""
    if callable(value):
        return _digest(value, memo)[:16]
    if inspect.ismodule(value):
        return f"module {value.__name__}"  # (its repr holds its path)
    if inspect.iscode(value):
        return _code_text(value, memo)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if id(value) in memo:
            return "(itself)"
        memo[id(value)] = (value, None)  # (a list holding itself)
        if isinstance(value, dict):
            items = sorted(f"{_value_text(k, memo)}: {_value_text(v, memo)}" for k, v in value.items())
        else:
            items = [_value_text(v, memo) for v in value]
            items = sorted(items) if isinstance(value, (set, frozenset)) else items
        del memo[id(value)]
        return f"{type(value).__name__}[{', '.join(items)}]"
    return _plain(value)


def _code_text(code, memo: dict) -> str:
    """Bytecode, names and constants; a nested function's code (a comprehension's, a lambda's) likewise, not by its
    repr (which holds the file's path)."""
    return f"{code.co_code.hex()}|{code.co_names}|{_value_text(code.co_consts, memo)}"


def _state(obj) -> dict:
    """An object's attributes: its `__dict__` and its slots (a class with `__slots__` has no `__dict__`), read
    without running its own attribute lookup; values a `functools.cached_property` stored are results, not state."""
    try:
        state = dict(object.__getattribute__(obj, "__dict__"))
    except (AttributeError, TypeError):
        state = {}
    for cls in type(obj).__mro__:
        for name, member in vars(cls).items():
            if isinstance(member, types.MemberDescriptorType) and not name.endswith("__"):  # a slot (or a C member)
                try:
                    state[name] = member.__get__(obj, type(obj))
                except AttributeError:  # never set
                    continue
    return {k: v for k, v in state.items() if not isinstance(inspect.getattr_static(type(obj), k, None),
                                                               functools.cached_property)}


def _attribute(obj, name: str, default):
    """getattr that survives an object whose own `__getattr__` raises something else than AttributeError."""
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001 -- a proxy's lookup: the default names it
        return default


def _callable_text(fn, memo: dict | None = None) -> str:
    memo = {} if memo is None else memo
    if isinstance(fn, functools.partial):
        return f"partial({_value_text(fn.func, memo)}, {_value_text(fn.args, memo)}, {_value_text(fn.keywords, memo)})"
    if isinstance(fn, torch.nn.Module):
        return _module_text(fn, memo)
    target = fn.__func__ if inspect.ismethod(fn) else fn  # a bound method: its function, and its object
    name = f"{_attribute(target, '__module__', '')}.{_attribute(target, '__qualname__', type(target).__qualname__)}"
    bound = f":{_digest(fn.__self__, memo)[:16]}" if inspect.ismethod(fn) else ""  # a module, a class, an object
    if inspect.isclass(target):
        return f"{name}:{_class_source_hash(target)}"
    if not inspect.isfunction(target):  # a callable object (functools.cache's wrapper too): its state, or its repr
        state = _state(target)  # (itemgetter(1) is not itemgetter(2): no state, its repr)
        return f"{name}:{_class_source_hash(type(target))}:{_value_text(state, memo) if state else _plain(target)}{bound}"
    closure = [c.cell_contents for c in (target.__closure__ or ()) if _cell_filled(c)]
    return (f"{name}:{_source_hash(target)}:{_value_text(closure, memo)}:{_value_text(target.__defaults__, memo)}:"
            f"{_value_text(target.__kwdefaults__, memo)}{bound}")


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


LIBRARIES_BY_VERSION = ("torch", "torchvision", "timm")  # their classes are identified by name and version


@functools.cache
def _class_source_hash(cls: type) -> str:
    """The code of the class and of its bases (a method it inherits changes it too) and their class-level settings:
    plain values (`expansion = 4`, `widths = [16, 32]`; sets in a fixed order), callables by their repr
    (`act = torch.relu`) and classes by their name (`norm = nn.BatchNorm2d`); other class attributes (loggers,
    registries, caches: state, not settings) are left out. Classes of torch, torchvision and timm are identified by
    their name and the library's version."""
    from importlib import metadata

    def setting_text(value) -> str | None:  # the value's text when it is made of numbers, strings and their containers
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return repr(value)
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [setting_text(v) for v in value]
            ordered = sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
            return None if None in items else f"{type(value).__name__}({', '.join(ordered)})"
        if isinstance(value, dict):
            pairs = [(setting_text(k), setting_text(v)) for k, v in value.items()]
            return None if any(None in pair for pair in pairs) else f"dict({sorted(pairs)})"
        return None

    h = hashlib.sha256()
    for base in cls.__mro__:
        library = base.__module__.split(".")[0]
        if base is object:
            continue
        if library in LIBRARIES_BY_VERSION:
            h.update(f"{base.__module__}.{base.__qualname__}@{metadata.version(library)}".encode())
            continue
        for name, member in sorted(vars(base).items()):
            member = member.func if isinstance(member, functools.cached_property) else member
            member = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
            if inspect.isfunction(member) or hasattr(member, "__wrapped__"):  # a method, decorated or not
                h.update(f"{name}:{':'.join(_source_hash(f) for f in _wrapped_layers(member))}".encode())
            elif name.startswith("__"):
                continue
            elif inspect.isclass(member):
                h.update(f"{name}={member.__module__}.{member.__qualname__}".encode())
            elif callable(member):
                h.update(f"{name}={_plain(member)}".encode())
            elif (text := setting_text(member)) is not None:
                h.update(f"{name}={text}".encode())
    return h.hexdigest()[:16]


def _wrapped_layers(fn) -> list:
    """A decorated function and the functions it wraps (`__wrapped__`, as functools.wraps and functools.cache
    leave it), outermost first: a decorator's wrapper alone would not show a change to the method it wraps."""
    layers, seen = [], set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if inspect.isfunction(fn):
            layers.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    return layers


def _source_hash(fn) -> str:
    """The function's source and bytecode names and constants (two lambdas on one line differ)."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):  # no source file (built in, or made by exec / eval): its bytecode below
        text = _plain(repr(fn))
    code = getattr(fn, "__code__", None)
    if code is not None:
        text += f"|{_code_text(code, {})}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
