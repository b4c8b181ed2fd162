"""Provenance (provenance.py) on its own: what identifies a notebook's results and why `--resume` runs one
again, checked against hashes computed here by hand and a real git repository made for the test."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from classfilters import provenance


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_file_and_source_hashes(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "z.py").write_text("Z")
    (pkg / "sub" / "a.py").write_text("A")
    (pkg / "notes.txt").write_text("not code")
    assert provenance.file_hash(pkg / "z.py") == sha(b"Z")
    expected = sha(b"sub/a.py\0A\0" + b"z.py\0Z\0")  # in sorted order, whatever the folder's listing order
    assert provenance.source_hash(pkg) == expected
    (pkg / "notes.txt").write_text("changed")
    assert provenance.source_hash(pkg) == expected
    (pkg / "sub" / "a.py").rename(pkg / "sub" / "c.py")  # a renamed file changes it
    assert provenance.source_hash(pkg) == sha(b"sub/c.py\0A\0" + b"z.py\0Z\0")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for name in ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE"):  # as when the tests run from a git hook
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)  # no signing, hooks or other settings of the user's
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    root = tmp_path / "repo"
    for folder in ("lib", "notebooks", "profiles", "docs"):
        (root / folder).mkdir(parents=True)
        (root / folder / "f.txt").write_text("1")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True)
    return root


def test_the_commit_and_what_makes_it_dirty(repo):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert provenance.git_commit(repo) == (head, False)
    (repo / "docs" / "f.txt").write_text("2")             # outside lib, notebooks and profiles
    (repo / "notebooks" / "new.ipynb").write_text("{}")   # untracked, not in lib
    assert provenance.git_commit(repo) == (head, False)
    (repo / "lib" / "new.py").write_text("")              # untracked in lib
    assert provenance.git_commit(repo) == (head, True)
    (repo / "lib" / "new.py").unlink()
    for folder in ("notebooks", "profiles", "lib"):
        (repo / folder / "f.txt").write_text("changed")
        assert provenance.git_commit(repo) == (head, True), folder
        (repo / folder / "f.txt").write_text("1")
    state = provenance.code_state(repo)
    assert state == {"git_commit": head, "git_dirty": False, "source_hash": provenance.source_hash()}


def test_without_git_the_commit_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    said = []
    monkeypatch.delenv("CLASSFILTERS_COMMIT", raising=False)
    assert provenance.git_commit(tmp_path, said.append) == ("unknown", None)
    assert len(said) == 1 and "no git checkout" in said[0] and "CLASSFILTERS_COMMIT" in said[0]
    (tmp_path / "COMMIT").write_text("abc1234\n")
    assert provenance.git_commit(tmp_path, said.append) == ("abc1234", None)
    monkeypatch.setenv("CLASSFILTERS_COMMIT", " def5678 ")
    assert provenance.git_commit(tmp_path, said.append) == ("def5678", None)
    assert len(said) == 1


def test_a_folder_inside_another_checkout_or_a_broken_one_is_not_read_as_a_checkout(repo, monkeypatch):
    """Only a root holding .git is asked for its commit: a copy inside another repository does not take that
    repository's HEAD, and a .git that git refuses falls back as having no git."""
    monkeypatch.setenv("CLASSFILTERS_COMMIT", "c0ffee1")
    copy = repo / "docs" / "copy"
    copy.mkdir()
    assert provenance.git_commit(copy) == ("c0ffee1", None)
    broken = repo.parent / "broken"
    broken.mkdir()
    (broken / ".git").write_text("gitdir: /nowhere\n")
    said = []
    assert provenance.git_commit(broken, said.append) == ("c0ffee1", None) and said == []
    monkeypatch.delenv("CLASSFILTERS_COMMIT")
    said = []
    assert provenance.code_state(broken, said.append)["git_commit"] == "unknown"
    assert said == [(f"note: {broken} is a git checkout but git could not name its HEAD (no git program, or git "
                    "refusing a checkout owned by another user), and neither $CLASSFILTERS_COMMIT nor a COMMIT file "
                    "names the commit: provenance records 'unknown' (the library's source hash still identifies the "
                    "code)")]


def test_a_checkout_without_the_git_program_falls_back(repo, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "git")
    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    monkeypatch.setenv("CLASSFILTERS_COMMIT", "feedbee")
    assert provenance.git_commit(repo) == ("feedbee", None)
    monkeypatch.delenv("CLASSFILTERS_COMMIT")
    said = []
    assert provenance.git_commit(repo, said.append) == ("unknown", None)
    assert len(said) == 1 and "is a git checkout but git could not name its HEAD" in said[0]


def test_settings_digests_and_carried_records():
    values = {"k": 5, "models": ["a", "b"]}
    digest = sha(b'{"k": 5, "models": ["a", "b"]}')[:16]
    assert provenance.settings_digest(values) == digest == provenance.settings_digest({"models": ["a", "b"], "k": 5})
    assert provenance.settings_digest({"p": Path("/a")}) == sha(b'{"p": "/a"}')[:16]  # paths as text
    assert provenance.settings_digest({**values, "k": 6}) != digest
    assert provenance.carried({}) == ({}, {})
    old = {"profile_values": values, "notebooks": {"01": {"status": "ok"}, "02": {"status": "ok", "settings": "x1"}},
           "settings": {"x1": {"k": 1}}}
    notebooks, settings = provenance.carried(old)
    assert notebooks == {"01": {"status": "ok", "settings": digest}, "02": {"status": "ok", "settings": "x1"}}
    assert settings == {"x1": {"k": 1}, digest: values}
    assert provenance.carried({"notebooks": {"01": {"status": "ok"}}}) == ({"01": {"status": "ok", "settings": None}}, {})


def test_entry_state_records_only_this_runs_outputs(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text("{}")
    old = out / "old.csv"
    old.write_text("old")
    os.utime(old, (time.time() - 100, time.time() - 100))
    started = time.time() - 10
    (out / "new.csv").write_text("new")
    (out / "at_start.csv").write_text("s")
    os.utime(out / "at_start.csv", (started, started))  # written as the notebook started: its output
    (out / "provenance.json").write_text("{}")
    entry = provenance.entry_state({"git_commit": "c", "source_hash": "s"}, notebook, out, started)
    assert entry["outputs"] == {"at_start.csv": sha(b"s"), "new.csv": sha(b"new")}
    assert (entry["commit"], entry["source_hash"], entry["notebook_hash"]) == ("c", "s", sha(b"{}"))
    assert entry["device"] == provenance.device_name() and entry["finished"].endswith("+00:00")


def test_why_a_notebook_runs_again_each_reason_in_turn(tmp_path):
    out, notebook, executed = tmp_path / "out", tmp_path / "nb.ipynb", tmp_path / "nb-run.ipynb"
    out.mkdir()
    notebook.write_text("{}")
    executed.write_text("{}")
    (out / "t.csv").write_text("t")
    code = {"git_commit": "c", "source_hash": "s"}
    entry = {"status": "ok", "settings": "d", "source_hash": "s", "notebook_hash": sha(b"{}"),
             "outputs": {"t.csv": sha(b"t")}}
    assert provenance.why_stale(entry, code, notebook, executed, out, "d") == ""
    assert provenance.why_stale(entry, code, notebook, executed, out) == ""  # no settings to compare
    no_outputs = {key: value for key, value in entry.items() if key != "outputs"}
    assert provenance.why_stale(no_outputs, code, notebook, executed, out, "d") == ""  # a notebook that wrote nothing
    assert provenance.why_stale({}, code, notebook, executed, out, "d") == "not done"
    assert provenance.why_stale({**entry, "status": "failed"}, code, notebook, executed, out, "d") == "last status failed"
    assert provenance.why_stale(entry, code, notebook, executed, out, "e") == "the profile's settings changed"
    assert provenance.why_stale(entry, {**code, "source_hash": "z"}, notebook, executed, out, "d") == \
        "the library's sources changed"
    notebook.write_text("{ }")
    assert provenance.why_stale(entry, code, notebook, executed, out, "d") == "the notebook changed"
    notebook.write_text("{}")
    executed.unlink()
    assert provenance.why_stale(entry, code, notebook, executed, out, "d") == f"its executed copy {executed} is missing"
    executed.write_text("{}")
    (out / "t.csv").write_text("edited")
    assert provenance.why_stale(entry, code, notebook, executed, out, "d") == "its output t.csv was changed"
    (out / "t.csv").unlink()
    assert provenance.why_stale(entry, code, notebook, executed, out, "d") == "its output t.csv is missing"


def test_reading_and_writing_records(tmp_path):
    path = tmp_path / "provenance.json"
    assert provenance.read(path) == {}
    provenance.write(path, {"a": [1, 2]})
    assert provenance.read(path) == {"a": [1, 2]} and json.loads(path.read_text()) == {"a": [1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    before = os.umask(0o027)
    try:
        provenance.write(tmp_path / "other.json", {})
        assert (tmp_path / "other.json").stat().st_mode & 0o777 == 0o640 and os.umask(before) == 0o027
    finally:
        os.umask(before)
    (tmp_path / "other.json").unlink()
    with pytest.raises(TypeError):
        provenance.write(path, {"a": object()})  # not JSON: the old file stays, no temporary is left
    assert provenance.read(path) == {"a": [1, 2]} and sorted(p.name for p in tmp_path.iterdir()) == ["provenance.json"]
    for bad, why in ((b"{not json", "corrupt"), (b"[1, 2]", r"corrupt \(not a JSON object\)"), (b"\xff\xfe", "corrupt")):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}.* {why}.*delete it, or run without --resume / --only"):
            provenance.read(path)


def test_a_record_is_written_one_field_a_line_and_a_failed_write_says_why(tmp_path):
    """Committed records diff line by line (indented JSON); a write that fails before its temporary exists raises
    its own error, not one about removing the temporary."""
    path = tmp_path / "provenance.json"
    record = {"profile": "demo", "notebooks": {"01": {"status": "ok"}}}
    provenance.write(path, record)
    assert path.read_text() == json.dumps(record, indent=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        provenance.write(blocker / "provenance.json", record)  # its folder is a file: nothing could be created


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14 (rev: B1)
flags\t\t: fpu sse avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: SomethingElse
"""


def test_cpu_info_reads_the_first_processor(monkeypatch):
    real = provenance.Path.read_text

    def fake(self, *a, **kw):
        return CPUINFO if str(self) == "/proc/cpuinfo" else real(self, *a, **kw)
    monkeypatch.setattr(provenance.Path, "read_text", fake)
    assert provenance.cpu_info() == {"vendor": "AuthenticAMD", "family": 25, "model": 17,
                                     "name": "AMD EPYC 9B14 (rev: B1)", "avx512": True}  # split at the first colon
    monkeypatch.setattr(provenance.Path, "read_text", lambda self, *a, **kw: CPUINFO.replace("avx512f ", "")
                        .replace("model\t\t: 17", "model\t\t: x1"))
    info = provenance.cpu_info()
    assert info["avx512"] is False and info["model"] == "x1"

    def unreadable(self, *a, **kw):
        raise PermissionError(13, "denied")
    monkeypatch.setattr(provenance.Path, "read_text", unreadable)
    info = provenance.cpu_info()
    assert info["family"] is None and info["model"] is None and "avx512" not in info
    monkeypatch.setattr(provenance.platform, "machine", lambda: "riscv64")
    for processor, name in (("", "riscv64"), ("Some CPU", "Some CPU")):  # no processor name: the machine's
        monkeypatch.setattr(provenance.platform, "processor", lambda processor=processor: processor)
        assert provenance.cpu_info() == {"vendor": "riscv64", "family": None, "model": None, "name": name}


def test_device_names_and_versions(monkeypatch):
    import platform

    import torch

    from classfilters import device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(provenance, "cpu_info", lambda: {"name": "Chip", "family": 6, "model": 143})
    for native, said in ((True, "native bf16"), (False, "no native bf16")):
        monkeypatch.setattr(device, "native_cpu_bf16", lambda native=native: native)
        assert provenance.device_name() == f"cpu: Chip (family 6, model 143; {os.cpu_count()} cores; {said})"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: {0: "NVIDIA H100", 1: "other"}[i])  # the first GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert provenance.device_name() == "cuda: NVIDIA H100 (x2)"
    monkeypatch.setattr(provenance, "LIBRARIES", ("numpy", "no-such-package-here"))
    out = provenance.versions()
    import numpy
    assert out["numpy"] == numpy.__version__ and "no-such-package-here" not in out
    assert out["torch"] == torch.__version__ and out["cuda"] == torch.version.cuda
    assert out["classfilters"] == __import__("classfilters").__version__
    assert out["python"] == platform.python_version()


def test_untracked_code_makes_the_checkout_dirty_whatever_the_users_git_config(repo):
    """`status.showUntrackedFiles no` (a common setting in big repositories) must not hide a new file in lib/."""
    subprocess.run(["git", "config", "status.showUntrackedFiles", "no"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert provenance.git_commit(repo) == (head, False)
    (repo / "lib" / "sub").mkdir()
    (repo / "lib" / "sub" / "new.py").write_text("")
    assert provenance.git_commit(repo) == (head, True)


def test_a_failed_write_raises_its_own_error_and_leaves_nothing(tmp_path, monkeypatch):
    """Whatever fails, even creating the temporary, the caller sees that error (not one from the clean-up),
    and no temporary is left; a long file name (200 characters) is written as any other."""
    def refuse(*args, **kwargs):
        raise RuntimeError("no file today")
    with monkeypatch.context() as m:
        m.setattr(provenance.os, "open", refuse)
        with pytest.raises(RuntimeError, match="no file today"):
            provenance.write(tmp_path / "record.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []
    long = tmp_path / ("r" * 195 + ".json")
    provenance.write(long, {"a": 1})
    assert json.loads(long.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [long]
