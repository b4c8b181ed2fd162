"""The tensor cache (cache.py) on its own: keys, checksums, atomic writes, the clean-up of killed writes and
the code hashes that key results, each against an independent expectation (hashlib over the bytes, a
file written by hand, two versions of a function that differ in one place)."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from classfilters import cache


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))
    return tmp_path


def leftovers(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------
# Entries: what goes in comes out, under its own key only

def test_an_entry_round_trips_exactly_and_leaves_no_temporary(folder):
    tensors = {"a": torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),  # not contiguous
               "b": torch.tensor([1, -2], dtype=torch.int8), "empty": torch.zeros(0, 5)}
    path = cache.save("features", {"x": 1}, tensors)
    assert path == folder / "features" / f"{cache.key_hash({'x': 1})}.safetensors"
    back = cache.load("features", {"x": 1})
    assert sorted(back) == ["a", "b", "empty"]
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t)
    assert leftovers(folder / "features") == []
    assert cache.load("features", {"x": 2}) is None and cache.load("other", {"x": 1}) is None


def test_the_key_text_holds_the_format_and_ignores_the_order_of_fields():
    assert cache.key_text({"b": 1, "a": [1, 2]}) == '{"a": [1, 2], "b": 1, "format": 2}'
    assert cache.key_text({"p": Path("/x/y")}) == '{"format": 2, "p": "/x/y"}'  # paths and the like as text
    assert cache.key_hash({"b": 1, "a": 2}) == cache.key_hash({"a": 2, "b": 1})
    assert len({cache.key_hash({"a": 1}), cache.key_hash({"a": "1"}), cache.key_hash({"a": 1, "b": None})}) == 3
    assert cache.key_hash({}) == hashlib.sha256(b'{"format": 2}').hexdigest()[:24]


def test_an_entry_written_for_another_key_is_a_miss(folder):
    """Two keys whose file names collided: the key stored in the file decides."""
    mine, theirs = {"model": "a"}, {"model": "b"}
    path = cache.save("features", theirs, {"f": torch.ones(3)})
    path.rename(cache.entry_path("features", mine))
    assert cache.load("features", mine) is None


def test_an_entry_replaced_while_it_is_read_gives_one_whole_version(folder, monkeypatch, recwarn):
    """Another process finishing the same entry (os.replace) between reading the key and the tensors: the
    reader gets the version it opened, with its own checksum, and no warning (nothing is corrupt)."""
    key = {"model": "a"}
    cache.save("features", key, {"f": torch.zeros(4)})
    opened = cache.safe_open

    def open_then_replace(*args, **kwargs):
        handle = opened(*args, **kwargs)
        if not getattr(open_then_replace, "done", False):
            open_then_replace.done = True
            cache.save("features", key, {"f": torch.ones(4)})  # a second writer's (nondeterministic) result
        return handle

    monkeypatch.setattr(cache, "safe_open", open_then_replace)
    back = cache.load("features", key)
    assert back is not None and torch.equal(back["f"], torch.zeros(4)) and len(recwarn) == 0
    assert torch.equal(cache.load("features", key)["f"], torch.ones(4))  # the next read sees the new version


def test_a_cache_folder_deleted_during_a_session_is_made_again(folder, recwarn):
    import shutil
    cache.save("features", {"x": 1}, {"f": torch.ones(2)})  # the folder is checked (and remembered) here
    shutil.rmtree(folder / "features")
    assert cache.save("features", {"x": 2}, {"f": torch.zeros(2)}) is not None and len(recwarn) == 0
    assert torch.equal(cache.load("features", {"x": 2})["f"], torch.zeros(2))


def test_an_unreadable_entry_is_warned_about_and_rewritten(folder):
    key = {"k": 1}
    path = cache.entry_path("features", key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 64)  # not a safetensors file
    with pytest.warns(cache.CacheWarning, match="unreadable"):
        assert cache.load("features", key) is None
    cache.save("features", key, {"f": torch.full((2,), 7.0)})
    assert torch.equal(cache.load("features", key)["f"], torch.full((2,), 7.0))


def test_an_entry_without_a_checksum_is_a_miss(folder):
    key = {"k": 2}
    path = cache.entry_path("features", key)
    path.parent.mkdir(parents=True)
    save_file({"f": torch.ones(2)}, str(path), metadata={"key": cache.key_text(key)})
    with pytest.warns(cache.CacheWarning, match="checksum"):
        assert cache.load("features", key) is None


def test_a_failed_write_is_warned_about_and_leaves_nothing(folder, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache, "save_file", full_disk)
    with pytest.warns(cache.CacheWarning, match="could not write the cache entry .*No space left"):
        assert cache.save("features", {"k": 3}, {"f": torch.ones(2)}) is None
    assert list((folder / "features").iterdir()) == []


def test_the_failed_writes_warning_names_the_entry_and_the_error(folder, monkeypatch):
    def no_space(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache, "save_file", no_space)
    with pytest.warns(cache.CacheWarning) as caught:
        cache.save("features", {"k": 3}, {"f": torch.ones(2)})
    assert [str(w.message) for w in caught] == [
        (f"could not write the cache entry {cache.entry_path('features', {'k': 3})} (OSError: [Errno 28] No space "
         "left on device): going on without it")]


def test_an_entry_is_written_beside_its_place_then_renamed(folder, monkeypatch):
    """The temporary lies in the entry's own folder (a rename across file systems is not atomic), named by host
    and process."""
    written, real = [], cache.save_file

    def record(tensors, filename, metadata=None):
        written.append(Path(filename))
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(cache, "save_file", record)
    path = cache.save("features", {"k": 5}, {"f": torch.ones(2)})
    assert written[0].parent == path.parent == folder / "features" and cache._OUR_TEMP.match(written[0].name)
    assert not written[0].exists() and torch.equal(cache.load("features", {"k": 5})["f"], torch.ones(2))


def test_the_whole_cache_deleted_during_a_session_is_made_again(folder, recwarn):
    import shutil
    cache.save("features", {"x": 1}, {"f": torch.ones(2)})  # the folder is checked (and remembered) here
    shutil.rmtree(folder)
    assert cache.save("features", {"x": 2}, {"f": torch.zeros(2)}) == folder / "features" / (
        cache.key_hash({"x": 2}) + ".safetensors") and len(recwarn) == 0


def test_a_kind_whose_folder_cannot_be_written_is_said_by_its_folder(folder):
    """The cache folder itself is fine but one kind's folder is a file: saving that kind says so, once, by the
    kind's folder, and other kinds are written."""
    (folder / "features").write_text("x")
    with pytest.warns(cache.CacheWarning) as caught:
        assert cache.save("features", {"k": 1}, {"f": torch.ones(1)}) is None
    assert [str(w.message).split(" (")[0] for w in caught] == [f"the cache folder {folder / 'features'} cannot be written"]
    assert cache.save("models", {"k": 1}, {"f": torch.ones(1)}) is not None


def test_discard_removes_the_entry_and_never_raises(folder, monkeypatch):
    cache.save("features", {"k": 4}, {"f": torch.ones(1)})
    cache.save("features", {"k": 5}, {"f": torch.ones(1)})
    cache.discard("features", {"k": 4})
    assert cache.load("features", {"k": 4}) is None and cache.load("features", {"k": 5}) is not None
    cache.discard("features", {"k": 4})  # gone already

    def refused(self, missing_ok=False):
        raise PermissionError(13, "read-only")
    with monkeypatch.context() as m:
        m.setattr(type(folder), "unlink", refused)
        cache.discard("features", {"k": 5})
    assert cache.entry_path("features", {"k": 5}).exists()


def test_the_checksum_covers_names_dtypes_shapes_and_bytes():
    def digest_by_hand(tensors):
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()
    base = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    assert cache.tensors_digest(base) == digest_by_hand(base)
    assert cache.tensors_digest(dict(reversed(list(base.items())))) == cache.tensors_digest(base)
    variants = [{**base, "b": base["b"].reshape(3, 2)}, {**base, "b": base["b"].double()},
                {"c": base["b"], "a": base["a"]},
                {**base, "a": torch.tensor([1, 3])}, {**base, "e": torch.zeros(0)}]
    digests = {cache.tensors_digest(v) for v in variants} | {cache.tensors_digest(base)}
    assert len(digests) == len(variants) + 1


# --------------------------------------------------------------------------------------
# Killed writes: what is removed and what is kept

def aged(path, seconds):
    path.write_bytes(b"x")
    os.utime(path, (time.time() - seconds, time.time() - seconds))
    return path


def test_temporaries_are_removed_by_owner_and_age(tmp_path, monkeypatch):
    host, other = cache._host(), "elsewhere"
    dead_pid = 2 ** 22 + 12345  # above the kernel's pid_max: no such process
    dead_here = aged(tmp_path / f".{host}.{dead_pid}.abc.tmp", 0)
    live_here = aged(tmp_path / f".{host}.{os.getpid()}.abc.tmp", 0)
    dead_there_fresh = aged(tmp_path / f".{other}.{dead_pid}.abc.tmp", 0)  # another host's: only age counts
    dead_there_old = aged(tmp_path / f".{other}.{dead_pid}.abd.tmp", 3660)
    probe_young = aged(tmp_path / ".probe-abc", 3540)
    probe_old = aged(tmp_path / ".probe-abd", 3660)
    not_ours = aged(tmp_path / ".tmpTOOLONG1", 3660)  # not a 6-character safetensors name
    entry = aged(tmp_path / "abc.safetensors", 3660)
    removed = cache.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead_here, dead_there_old, probe_old])
    assert all(p.exists() for p in (live_here, dead_there_fresh, probe_young, not_ours, entry))
    t = 1_000_000_000  # an hour exactly is not yet stale; a second more is
    os.utime(live_here, (t, t))
    assert cache.remove_stale_temporaries(tmp_path, now=t + 3600) == [] and live_here.exists()
    assert cache.remove_stale_temporaries(tmp_path, now=t + 3601) == [live_here]
    later = time.time() + 3601
    assert sorted(cache.remove_stale_temporaries(tmp_path, now=later)) == sorted([dead_there_fresh, probe_young])


def test_our_temporaries_are_named_by_host_and_process(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))
    names = []

    def record(tensors, filename, metadata=None):
        names.append(os.path.basename(filename))
        raise OSError(5, "stop here")
    monkeypatch.setattr(cache, "save_file", record)
    monkeypatch.setattr(cache.socket, "gethostname", lambda: "Node-1.Cluster" + "x" * 60)
    with pytest.warns(cache.CacheWarning):
        cache.save("features", {"k": 1}, {"f": torch.ones(1)})
    match = cache._OUR_TEMP.match(names[0])
    assert match and match["host"] == "Node-1_Cluster" + "x" * 26 and match["pid"] == str(os.getpid())
    monkeypatch.setattr(cache.socket, "gethostname", lambda: "")
    assert cache._host() == "host"


def test_a_process_we_may_not_signal_is_alive(tmp_path, monkeypatch):
    sent = []

    def not_permitted(pid, sig):
        sent.append((pid, sig))
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(cache.os, "kill", not_permitted)
    theirs = aged(tmp_path / f".{cache._host()}.4242.abc.tmp", 0)
    assert cache.remove_stale_temporaries(tmp_path) == [] and theirs.exists()
    assert sent == [(4242, 0)]  # signal 0: asks whether it lives, sends nothing


def test_the_cache_folder_is_the_variable_or_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("CLASSFILTERS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "classfilters"
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


def test_a_folder_that_cannot_be_listed_or_a_vanished_temporary_is_skipped(tmp_path, monkeypatch):
    assert cache.remove_stale_temporaries(tmp_path / "missing") == []
    vanishing = aged(tmp_path / ".tmpAbC123", 3660)
    after = aged(tmp_path / ".tmpXyZ789", 3660)
    monkeypatch.setattr(cache.os, "listdir", lambda folder: [vanishing.name, after.name])  # in this order
    real_stat, stats = type(vanishing).stat, []

    def gone(self, **kwargs):
        stats.append(self.name)
        if self.name == vanishing.name:
            raise FileNotFoundError(2, "gone")
        return real_stat(self, **kwargs)
    monkeypatch.setattr(type(vanishing), "stat", gone)
    assert cache.remove_stale_temporaries(tmp_path) == [after]  # the next one is still looked at
    assert stats == [vanishing.name, after.name]


def test_a_cache_path_that_is_a_file_is_said_once(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(blocked))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = (cache.writable("features"), cache.writable("models"), cache.save("features", {"k": 1}, {"f": torch.ones(1)}),
                   cache.writable())
    assert answers == (False, False, None, False)
    assert len(caught) == 1 and caught[0].category is cache.CacheWarning
    assert re.search(f"{re.escape(str(blocked))}.* cannot be written .*CLASSFILTERS_CACHE", str(caught[0].message))
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path / "ok"))
    assert cache.writable("features") is True and (tmp_path / "ok" / "features").is_dir()
    assert cache.writable() is True and sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["features"]


# --------------------------------------------------------------------------------------
# Code hashes: they change when what the code computes changes, and only then

def module_from(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_function_is_identified_by_its_code_constants_defaults_and_closure(tmp_path):
    versions = {"a": "def f(x, scale=2):\n    return x * scale + 1\n",
                "constant": "def f(x, scale=2):\n    return x * scale + 3\n",
                "operator": "def f(x, scale=2):\n    return x - scale + 1\n",
                "default": "def f(x, scale=5):\n    return x * scale + 1\n",
                "comment": "def f(x, scale=2):\n    return x * scale + 1  # the source itself counts\n"}
    ids = {name: cache.code_identity(module_from(tmp_path / name, "same_name", text).f)
           for name, text in versions.items()}
    assert len(set(ids.values())) == len(versions)
    assert cache.code_identity(module_from(tmp_path / "again", "same_name", versions["a"]).f) == ids["a"]
    assert cache.code_identity(module_from(tmp_path / "other", "other_name", versions["a"]).f) != ids["a"]

    def make(offset):
        return lambda x: x + offset
    assert cache.code_identity(make(1)) != cache.code_identity(make(2))
    assert cache.code_identity(make(1)) == cache.code_identity(make(1))

    def not_yet():
        return later
    assert len(cache.code_identity(not_yet)) == 24
    later = 1


def test_partials_builtins_and_callable_objects_are_identified():
    def g(x, y=0):
        return x + y
    p1, p2, p3 = functools.partial(g, 1), functools.partial(g, 2), functools.partial(g, 1, y=3)
    assert len({cache.code_identity(p) for p in (p1, p2, p3)}) == 3
    assert cache.code_identity(functools.partial(g, 1)) == cache.code_identity(p1)
    assert cache.code_identity(len) != cache.code_identity(abs)  # builtins: their names
    no_source = [eval(f"lambda x: x + {i}") for i in (1, 1, 2)]
    assert [cache.code_identity(f) for f in no_source].count(cache.code_identity(no_source[0])) == 2

    class Scale:
        def __init__(self, s):
            self.s = s

        def __call__(self, x):
            return x * self.s
    assert cache.code_identity(Scale(2)) != cache.code_identity(Scale(3))
    assert cache.code_identity(Scale(2)) == cache.code_identity(Scale(2))
    wrapped = [functools.partial(torch.nn.MaxPool2d(k), torch.zeros(1)) for k in (2, 3)]
    assert cache.code_identity(wrapped[0]) != cache.code_identity(wrapped[1])
    import operator
    assert cache.code_identity(operator.itemgetter(1)) != cache.code_identity(operator.itemgetter(2))  # no __dict__
    assert cache.code_identity(str.upper) != cache.code_identity(str.lower)  # a descriptor has no __module__


def test_a_bound_method_is_identified_by_its_function_and_its_object(tmp_path):
    text = "class Pool:\n    dim = -1\n    def reduce(self, x):\n        return x.mean(self.dim)\n"
    one = module_from(tmp_path / "a", "pools", text).Pool()
    two = module_from(tmp_path / "b", "pools", text.replace("mean", "amax")).Pool()  # same names, other code
    assert cache.code_identity(one.reduce) != cache.code_identity(two.reduce)
    again = type(one)()
    assert cache.code_identity(one.reduce) == cache.code_identity(again.reduce)
    again.dim = 0  # the same method on an object set otherwise computes otherwise
    assert cache.code_identity(one.reduce) != cache.code_identity(again.reduce)
    assert cache.code_identity(one.reduce) != cache.code_identity(type(one).reduce)  # the function alone
    pools = [torch.nn.MaxPool2d(k).forward for k in (2, 3, 2)]  # a module's method: the module's settings count
    assert [cache.code_identity(p) for p in pools].count(cache.code_identity(pools[0])) == 2
    assert cache._callable_text(str.upper).startswith(".str.upper:")


def test_a_callable_met_again_enters_by_its_digest_and_a_bound_function_by_its_code(tmp_path):
    """Only a callable met inside itself is "(itself)": one mentioned twice is its digest both times (a closure of
    f, g, f is not one of f, g, g); a function bound to an object by hand is identified by its code, not by the
    repr of the bound method (its name)."""
    import types
    f, g = (module_from(tmp_path / n, "parts", f"def part(x):\n    return x + {n[-1]}\n").part for n in ("f1", "g2"))

    def make(a, b, c):
        return lambda x: c(b(a(x)))
    assert cache.code_identity(make(f, g, f)) != cache.code_identity(make(f, g, g))

    class Holder:
        pass
    holder = Holder()
    bound = [types.MethodType(h, holder) for h in (f, g)]  # same name, module and object; other code
    assert cache.code_identity(bound[0]) != cache.code_identity(bound[1])


def test_slots_are_state(tmp_path):
    """A callable object with `__slots__` has no `__dict__`: its slots (private ones under their stored name) are
    its state, read without the object's own attribute lookup."""
    text = ("class S:\n    __slots__ = ('k', '__secret')\n    def __init__(self, k, secret=0):\n"
            "        self.k, self.__secret = k, secret\n    def __call__(self, x):\n        return x * self.k\n"
            "class One:\n    __slots__ = 'k'\n    def __init__(self, k):\n        self.k = k\n"
            "    def __call__(self, x):\n        return x + self.k\n"
            "class Sub(S):\n    __slots__ = ('extra', '__dict__')\n"
            "class _:\n    __slots__ = ('__p',)\n    def __init__(self, p):\n        self.__p = p\n"
            "    def __call__(self, x):\n        return x\n"
            "class Hidden(One):\n    k = 0\n    def __getattr__(self, name):\n        raise KeyError(name)\n")
    m = module_from(tmp_path, "slotted", text)
    ids = [cache.code_identity(f) for f in (m.S(2), m.S(3), m.S(2, secret=1), m.S(2), m.One(1), m.One(2))]
    assert len(set(ids)) == 5 and ids[0] == ids[3]
    assert cache._state(m.S(2, secret=1)) == {"k": 2, "_S__secret": 1}
    sub = m.Sub(2)
    sub.extra, sub.note = 7, "n"
    assert cache._state(sub) == {"k": 2, "_S__secret": 0, "extra": 7, "note": "n"}
    assert cache._state(m.Sub(2)) == {"k": 2, "_S__secret": 0}  # a slot never set is not state
    half = object.__new__(m.S)
    m.S.k.__set__(half, 5)  # slots are kept in name order: "_S__secret" (unset) first, then "k" (set): still read
    assert list(vars(m.S)).index("_S__secret") < list(vars(m.S)).index("k")
    assert cache._state(half) == {"k": 5}
    assert cache.code_identity(m._(1)) != cache.code_identity(m._(2))  # "_" mangles nothing
    hidden = [object.__new__(m.Hidden) for _ in range(2)]
    for h, k in zip(hidden, (1, 99)):
        m.One.k.__set__(h, k)  # the slot, under a class attribute of the same name
    assert cache.code_identity(hidden[0]) != cache.code_identity(hidden[1])  # and no KeyError from __getattr__


def test_memory_addresses_are_left_out_in_either_case():
    class At:
        def __init__(self, address):
            self.address = address

        def __repr__(self):
            return f"<At at {self.address}>"
    assert {cache._plain(At(a)) for a in ("0x7f3a9c", "0x00007FFA12BC", "0x0000AbCd")} == {"<At>"}
    assert cache._plain(At("0xg1")) == "<At at 0xg1>"  # not an address


def test_a_decorated_function_is_identified_by_the_function_it_wraps(tmp_path):
    """A decorator's wrapper holds the function in its closure or `__wrapped__`: a change to the wrapped body, or to
    its defaults, changes the identity, in a function, a callable object's attribute and a class's (cached)
    methods, however the callables nest."""
    text = ("import functools, torch\n"
            "def logged(fn):\n    def wrapper(*a):\n        return fn(*a)\n    return wrapper\n"
            "@logged\ndef f(x, s=1):\n    return x + 1\n"
            "@functools.cache\ndef g(x):\n    return x + 1\n"
            "def h(x):\n    return x + 1\n"
            "class Apply:\n    def __init__(self, fn):\n        self.fn = fn\n    def __call__(self, x):\n"
            "        return self.fn(x)\n"
            "class Helper:\n    def run(self, x):\n        return x + 1\n"
            "    @functools.cache\n    def apply(self, x):\n        return x + 1\n"
            "class Net(torch.nn.Module):\n    @torch.no_grad()\n    def forward(self, x):\n        return x + 1\n"
            "    @functools.cached_property\n    def offset(self):\n        return 1 + 1\n"
            "    @functools.cache\n    def table(self):\n        return [1] + [1]\n")
    picks = {"decorated": lambda m: m.f, "functools.cache": lambda m: m.g, "attribute": lambda m: m.Apply(m.f),
             "module": lambda m: m.Net(), "cache under a decorator": lambda m: m.logged(m.g),
             "partial under a decorator": lambda m: m.logged(functools.partial(m.h)),
             "object in an object": lambda m: m.Apply(m.Apply(m.h)), "method in a closure": lambda m: m.logged(m.Helper().run),
             "cached method": lambda m: m.Helper().apply}
    versions = {name: module_from(tmp_path / name, "decorated", text.replace(old, new)) for name, old, new in (
        ("a", "", ""), ("body", "x + 1", "x + 2"), ("default", "s=1", "s=2"), ("c", "", ""))}
    for what, pick in picks.items():
        ids = {name: cache.code_identity(pick(m)) for name, m in versions.items()}
        assert ids["a"] != ids["body"] and ids["a"] == ids["c"], what
    assert cache.code_identity(versions["a"].f) != cache.code_identity(versions["default"].f)
    for old, new in (("1 + 1", "1 + 2"), ("[1] + [1]", "[1] + [2]")):  # a cached property's or method's body
        changed = module_from(tmp_path / new.replace(" ", ""), "decorated", text.replace(old, new))
        assert cache._class_source_hash(changed.Net) != cache._class_source_hash(versions["a"].Net)
    over_builtin = functools.wraps(abs)(lambda x: x)
    assert cache._wrapped_layers(over_builtin) == [over_builtin]  # abs has no code to hash
    wrapped = functools.wraps(versions["a"].h)(lambda x: x)
    assert cache._wrapped_layers(wrapped) == [wrapped, versions["a"].h]  # outermost first

    def one():
        pass

    def two():
        pass
    one.__wrapped__, two.__wrapped__ = two, one  # a cycle ends where it began
    assert cache._wrapped_layers(one) == [one, two]
    scaled = [versions["a"].Helper() for _ in range(2)]
    scaled[1].factor = 3
    assert cache.code_identity(scaled[0].apply) != cache.code_identity(scaled[1].apply)  # the object, cached or not


def test_self_reference_is_written_once_and_keys_stay_small():
    """A recursive inner function holds itself in its closure; a module may hold its own method as a setting; deep
    nesting enters each level by its digest, so the key's text does not grow with the depth."""
    def outer(n):
        def count(k):
            return 0 if k == 0 else 1 + count(k - 1)
        return count
    assert cache.code_identity(outer(1)) == cache.code_identity(outer(2))
    f = outer(1)
    assert "(itself)" in cache._callable_text(f, {id(f): (f, None)})

    class Own(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale, self.act = scale, self.double

        def double(self, x):
            return x * self.scale
    assert cache.code_identity(Own(2)) == cache.code_identity(Own(2)) != cache.code_identity(Own(3))
    looped = [1]
    looped.append(looped)
    assert cache._value_text(looped, {}) == "list[1, (itself)]"

    def compose(f, g):
        return lambda x: g(f(x))
    chain = functools.reduce(compose, [abs] * 20)  # (written out whole, each level doubled the text: 1.3 MB here)
    assert len(cache._callable_text(chain)) < 1_000 and len(cache.code_identity(chain)) == 24

    class Block(torch.nn.Module):
        def __init__(self, depth):
            super().__init__()
            self.child = Block(depth - 1) if depth else None
            self.act = self.child.forward if depth else None

        def forward(self, x):
            return x
    assert len(cache._callable_text(Block(16))) < 10_000  # each level's method by its digest
    deep = functools.reduce(compose, [abs] * 5000)
    with pytest.raises(ValueError) as said:
        cache.code_identity(deep)
    assert str(said.value) == ("function nests callables too deeply to be identified for the cache; pass "
                               "use_cache=False (or --no-cache)")


def test_keys_are_the_same_in_every_process_and_folder(tmp_path):
    """Sets (in a constant or an object; their order follows insertion when items collide, and strings' hash seed),
    modules held as attributes and comprehensions (a nested code object, whose repr names its file) do not make keys
    depend on the process or on where the code lies."""
    text = ("import torch.nn.functional as F\n"
            "class Pick:\n    def __init__(self, names):\n        self.names, self.F = names, F\n"
            "    def __call__(self, x):\n        return [n for n in self.names if n in {'alpha', 'delta', 1, 9}]\n")
    here, there = (module_from(tmp_path / folder, "picking", text) for folder in ("a", "b"))
    assert repr({1, 9}) != repr({9, 1})  # 1 and 9 collide in a small set's table: printed in insertion order
    keys = {cache.code_identity(m.Pick(names)) for m, names in ((here, {1, 9}), (here, {9, 1}), (there, {1, 9}))}
    assert len(keys) == 1
    assert cache.code_identity(here.Pick.__call__) == cache.code_identity(there.Pick.__call__)
    assert cache.code_identity(here.Pick({1, 9})) != cache.code_identity(here.Pick({1, 8}))
    assert cache._value_text(sys.modules["torch.nn.functional"], {}) == "module torch.nn.functional"  # not its path
    assert cache._value_text({"b": {3, 1}, "a": (2,)}, {}) == "dict['a': tuple[2], 'b': set[1, 3]]"
    assert cache._value_text({("x", 1): 0}, {}) == "dict[tuple['x', 1]: 0]"  # a key that is itself a container


def test_a_cached_property_value_is_not_state():
    class Lazy:
        def __init__(self, k):
            self.k = k

        @functools.cached_property
        def square(self):
            return self.k ** 2

        def __call__(self, x):
            return x * self.k
    lazy = Lazy(2)
    before = cache.code_identity(lazy)
    assert lazy.square == 4 and "square" in vars(lazy)
    assert cache.code_identity(lazy) == before != cache.code_identity(Lazy(3))


def test_two_lambdas_on_one_line_or_made_by_exec_are_told_apart_by_their_bytecode():
    """The source of a lambda is its whole line, and a function made by exec has none: the bytecode, names and
    constants tell them apart."""
    plus, minus = (lambda x: x + 1), (lambda x: x - 1)  # same line, same constants and names: only the bytecode
    assert cache._source_hash(plus) != cache._source_hash(minus)
    assert cache.code_identity(plus) != cache.code_identity(minus)
    made = []
    for constant in (1, 2, 1):
        scope = {}
        exec(f"def f():\n    return {constant}\n", scope)  # noqa: S102 -- a function without a source file
        made.append(scope["f"])
    hashes = [cache._source_hash(f) for f in made]
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2]  # the constants count (no source to read them from)
    scope = {}
    exec("def g(x, s=2, *, t=1):\n    return x * s + t\n", scope)  # noqa: S102 -- a function without a source file
    g = scope["g"]
    before = cache.code_identity(g)
    g.__defaults__ = (3,)  # the same code, other defaults: another computation
    after_default = cache.code_identity(g)
    g.__kwdefaults__ = {"t": 5}
    assert len({before, after_default, cache.code_identity(g)}) == 3


def test_a_class_level_setting_is_part_of_the_class_hash(tmp_path):
    """Two versions of a class whose methods are the same but whose class attribute differs compute differently."""
    text = ("class Scale:\n    factor = 2\n    def __call__(self, x):\n        return x * self.factor\n")
    one = module_from(tmp_path / "a", "scaling", text).Scale
    two = module_from(tmp_path / "b", "scaling", text.replace("factor = 2", "factor = 3")).Scale
    same = module_from(tmp_path / "c", "scaling", text).Scale
    assert cache._class_source_hash(one) != cache._class_source_hash(two)
    assert cache._class_source_hash(one) == cache._class_source_hash(same)
    assert cache.code_identity(one()) != cache.code_identity(two())
    sets = [module_from(tmp_path / name, "tagged", text.replace("factor = 2", f"factor = 2\n    tags = {{{a}, {b}}}"))
            .Scale for name, a, b in (("d", 1, 9), ("e", 9, 1))]  # colliding in the table: printed in insertion order
    assert repr(sets[0].tags) != repr(sets[1].tags)  # (as strings' order changes with the hash seed)
    assert cache._class_source_hash(sets[0]) == cache._class_source_hash(sets[1])
    variants = {"factor = 2": ["factor = 2\n    act = torch.relu", "factor = 2\n    act = torch.sigmoid",
                               "factor = 2\n    norm = torch.nn.BatchNorm2d", "factor = 2\n    norm = torch.nn.LayerNorm",
                               "factor = 2\n    widths = [16, 32]", "factor = 2\n    widths = [16, 64]",
                               "factor = 2\n    table = {'a': (1, 2)}", "factor = 2\n    table = {'a': (1, 3)}"]}
    hashes = [cache._class_source_hash(module_from(tmp_path / f"v{i}", "variant", "import torch\n" + text.replace(
        "factor = 2", v)).Scale) for i, v in enumerate(variants["factor = 2"])]
    assert len(set(hashes)) == len(hashes)  # callable, class and container settings count
    state = [module_from(tmp_path / f"s{i}", "stateful", "import logging\n" + text.replace(
        "factor = 2", f"factor = 2\n    {line}")).Scale for i, line in enumerate((
            "log = logging.getLogger('x')", "log = logging.getLogger('y')", "registry = {'k': logging}"))]
    bare = module_from(tmp_path / "s3", "stateful", text).Scale
    assert {cache._class_source_hash(c) for c in state} == {cache._class_source_hash(bare)}  # state, not settings


def test_a_module_is_identified_by_its_classes_code_and_settings_not_its_weights(tmp_path):
    text = ("import torch\nclass Block(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.conv = torch.nn.Conv2d(1, 2, 3)\n        self.pool = torch.nn.AvgPool2d(2)\n"
            "        self.act = torch.relu\n    def forward(self, x):\n        return self.pool(self.act(self.conv(x)))\n")
    a = module_from(tmp_path / "a", "blocks", text).Block()
    b = module_from(tmp_path / "b", "blocks", text).Block()
    torch.nn.init.normal_(b.conv.weight)
    assert cache.code_identity(a) == cache.code_identity(b)  # other weights, same computation
    b.pool.kernel_size = 3
    assert cache.code_identity(a) != cache.code_identity(b)  # a setting
    c = module_from(tmp_path / "c", "blocks", text.replace("self.act = torch.relu", "self.act = torch.sigmoid")).Block()
    assert cache.code_identity(a) != cache.code_identity(c)  # a callable setting
    d = module_from(tmp_path / "d", "blocks", text.replace("self.pool(self.act(", "self.pool(-self.act(")).Block()
    assert cache.code_identity(a) != cache.code_identity(d)  # the forward's code
    lambdas = [module_from(tmp_path / f"e{i}", "blocks", text.replace("torch.relu", f"lambda t: t.clamp(min={i})")).Block()
               for i in (0, 1)]  # the same repr ("<function Block.__init__.<locals>.<lambda>>"), other code
    assert cache.code_identity(lambdas[0]) != cache.code_identity(lambdas[1])
    assert cache.code_identity(a.train()) == cache.code_identity(a.eval())  # the mode is not a setting
    assert cache._settings(a) == f"act={cache._digest(torch.relu, {})[:16]}" and cache._settings(a.pool).startswith(
        "ceil_mode=False;count_include_pad=True;divisor_override=None;kernel_size=2;")


def test_a_change_in_an_inherited_method_changes_the_class_hash(tmp_path):
    text = ("import torch\nclass Base(torch.nn.Module):\n    def helper(self, x):\n        return x + 1\n"
            "class Child(Base):\n    def forward(self, x):\n        return self.helper(x)\n")
    one = module_from(tmp_path, "family1", text).Child
    two = module_from(tmp_path, "family2", text.replace("x + 1", "x + 2")).Child
    same = module_from(tmp_path, "family3", text).Child
    assert cache._class_source_hash(one) != cache._class_source_hash(two)
    assert cache._class_source_hash(one) == cache._class_source_hash(same)
    from importlib import metadata
    assert cache._class_source_hash(torch.nn.Conv2d) == hashlib.sha256(
        "".join(f"{base.__module__}.{base.__qualname__}@{metadata.version('torch')}"
                for base in torch.nn.Conv2d.__mro__ if base is not object).encode()).hexdigest()[:16]


def test_source_digest_follows_the_files(tmp_path):
    one = module_from(tmp_path, "src_one", "X = 1\n")
    two = module_from(tmp_path, "src_two", "X = 2\n")
    assert cache.source_digest(one) == hashlib.sha256(b"X = 1\n").hexdigest()[:24]
    assert cache.source_digest(one, two) == hashlib.sha256(b"X = 1\nX = 2\n").hexdigest()[:24]
    assert cache.source_digest(one, two) != cache.source_digest(two, one)


def test_file_and_folder_digests(tmp_path):
    big = tmp_path / "big.bin"
    data = os.urandom((1 << 20) + 12345)  # more than one read block
    big.write_bytes(data)
    assert cache.file_digest(big) == hashlib.sha256(data).hexdigest()
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    image, other = root / "a" / "x.JPG", root / "notes.txt"
    image.write_bytes(b"12")
    other.write_text("n")
    st = image.stat()
    expected = hashlib.sha256(f"a/x.JPG|2|{st.st_mtime_ns}\n".encode()).hexdigest()
    assert cache.folder_digest(root, (".jpg",)) == expected  # suffixes compared in lower case
    other.write_text("changed")
    assert cache.folder_digest(root, (".jpg",)) == expected  # other files do not count
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert cache.folder_digest(root, (".jpg",)) != expected
    (root / "a" / "y.jpg").mkdir()  # a folder with a matching name is not a file
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.folder_digest(root, (".jpg",)) == expected
    second = root / "0.jpg"  # two files: in path order
    second.write_bytes(b"345")
    st2 = second.stat()
    assert cache.folder_digest(root, (".jpg", ".png")) == hashlib.sha256(
        f"0.jpg|3|{st2.st_mtime_ns}\na/x.JPG|2|{st.st_mtime_ns}\n".encode()).hexdigest()


def test_cache_warnings_point_at_the_caller(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSFILTERS_CACHE", str(tmp_path))
    path = cache.entry_path("features", {"k": 1})
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * 16)
    with pytest.warns(cache.CacheWarning) as caught:
        cache.load("features", {"k": 1})
    if "mutmut" not in sys.modules:  # its trampolines are frames between the caller and cache.py (_warn not mutated)
        assert caught[0].filename == __file__
    assert [str(w.message) for w in caught] == [f"cache entry {path} is unreadable (SafetensorError): recomputing it"]
