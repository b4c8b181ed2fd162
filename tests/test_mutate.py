"""benchmarks/mutate.py (`make mutate`): the staged project and the score, without running mutmut."""
import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("mutate", BENCH / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_names_the_modules_and_their_tests(tmp_path):
    mutate = load()
    mutate.stage(tmp_path, ["overlap", "cli"])
    config = (tmp_path / "pyproject.toml").read_text()
    assert 'only_mutate = ["src/classfilters/overlap.py", "src/classfilters/cli.py"]' in config
    for test in ("tests/test_ablation_overlap.py", "tests/test_cli.py", "tests/test_security.py"):
        assert f'"{test}"' in config and (tmp_path / test).is_file()
    assert (tmp_path / "src" / "classfilters" / "overlap.py").is_file()
    assert 'also_copy = ["figures", "profiles"' in config and (tmp_path / "figures" / "demo").is_dir()


def test_score_counts_killed_and_timeouts_against_survivors_and_untested():
    mutate = load()
    found = {"classfilters.overlap.x__mutmut_1": "killed", "classfilters.overlap.x__mutmut_2": "killed",
             "classfilters.overlap.x__mutmut_3": "timeout", "classfilters.overlap.x__mutmut_4": "survived",
             "classfilters.overlap.x__mutmut_5": "no tests", "classfilters.cli.y__mutmut_1": "survived"}
    out = mutate.summarise(found, ["overlap", "cli"])
    assert out["overlap"]["score"] == 0.6 and out["cli"]["score"] == 0.0
    assert out["overlap"]["survivors"] == ["classfilters.overlap.x__mutmut_4", "classfilters.overlap.x__mutmut_5"]


def test_a_survivor_is_equivalent_only_when_its_name_and_its_change_match_the_review():
    mutate = load()
    record = {"killed": 6, "timeout": 1, "survived": 3, "no tests": 0,
              "survivors": ["m.f__mutmut_1", "m.f__mutmut_2", "m.f__mutmut_3"], "killed_since": ["m.f__mutmut_3"]}
    diffs = {"m.f__mutmut_1": "-    x.sort(stable=True)\n+    x.sort(stable=None)",
             "m.f__mutmut_2": "-    a + b\n+    a - b", "m.f__mutmut_3": "-    k\n+    k + 1"}
    equivalent = {"m.f__mutmut_1": {"diff": diffs["m.f__mutmut_1"], "why": "stable on the CPU"},
                  "m.f__mutmut_2": {"diff": "-    a * b\n+    a / b", "why": "a mutant of older code"},  # renumbered
                  "m.f__mutmut_3": {"diff": diffs["m.f__mutmut_3"], "why": "wrongly listed: a test kills it"}}
    out = mutate.review(record, diffs, equivalent)
    assert out["equivalent"] == ["m.f__mutmut_1"] and out["unexplained"] == ["m.f__mutmut_2"]
    assert out["score_without_equivalent"] == round((6 + 1 + 1) / (10 - 1), 4)  # _3 counted once, as killed
    assert mutate.review(record, {**diffs, "m.f__mutmut_1": None}, equivalent)["unexplained"] == [
        "m.f__mutmut_1", "m.f__mutmut_2"]  # a diff mutmut could not show matches nothing
    assert out["survivors"] == record["survivors"] and out["killed"] == 6  # the raw counts are kept


def test_the_reviewed_equivalents_are_well_formed_and_the_record_agrees_with_them():
    """Every entry of mutation_equivalent.json names a mutant of its module, its exact change (lines removed and
    added) and a reason; a module's recorded `equivalent` survivors are listed there with a change, and its
    `unexplained` ones are the other survivors not killed since."""
    listed = json.loads((BENCH / "mutation_equivalent.json").read_text())
    record = json.loads((BENCH / "results" / "mutation.json").read_text())["modules"]
    for module, entries in listed.items():
        if module.startswith("_"):
            continue
        assert module in load().MODULES, module
        for name, entry in entries.items():
            assert name.startswith(f"classfilters.{module}.") and "__mutmut_" in name
            lines = entry["diff"].splitlines()
            assert any(x.startswith(("-", "+")) for x in lines), name  # a line removed, added, or both
            assert len(entry["why"]) > 20, name
    for module, r in record.items():
        if "equivalent" not in r:
            continue
        assert set(r["equivalent"]) <= set(listed.get(module, {})) and set(r["equivalent"]) <= set(r["survivors"])
        explained = set(r["equivalent"]) | set(r.get("killed_since", ()))
        assert r["unexplained"] == sorted(set(r["survivors"]) - explained), module
        stale = set(r["unexplained"]) & set(listed.get(module, {}))
        assert not stale, f"{module}: listed as equivalent but not matched (edited since?): review again {stale}"
        gone = set(listed.get(module, {})) - set(r["survivors"])
        assert not gone, f"{module}: listed as equivalent but no longer a survivor (killed or renumbered): {gone}"


def test_the_committed_table_is_made_from_the_record():
    """results/mutation.md is `table(mutation.json)`: no number in it is typed by hand or left stale."""
    mutate = load()
    record = json.loads((BENCH / "results" / "mutation.json").read_text())
    assert (BENCH / "results" / "mutation.md").read_text().endswith(mutate.table(record))
    rows = {line.split(" | ")[0].strip("| "): line for line in mutate.table(record).splitlines()[2:]}
    assert list(rows) == list(mutate.MODULES)
    for module, r in record["modules"].items():
        assert f" {r['score']:.3f} " in rows[module] and f" {r['commit']} |" in rows[module]


def test_every_function_of_the_mutated_modules_is_mutated_but_the_few_named():
    """mutmut 3 skips decorated functions silently (a `@torch.no_grad()` once hid `noise_ablation`, `class_maps`,
    `evaluate`, `grid_accuracy` and `softmax_table` from it), and those whose header says `pragma: no mutate
    block`: only those in NOT_MUTATED may do either."""
    mutate = load()
    lib = BENCH.parent / "lib" / "classfilters"
    for module in mutate.MODULES:
        text = (lib / f"{module}.py").read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        skipped = sorted(f.name for f in functions
                         if [ast.unparse(d) for d in f.decorator_list] not in ([], ["staticmethod"], ["classmethod"])
                         or any("pragma: no mutate block" in line for line in lines[f.lineno - 1:f.body[0].lineno - 1]))
        assert skipped == sorted(mutate.NOT_MUTATED.get(module, [])), module


def test_a_recheck_writes_only_its_own_modules(tmp_path, monkeypatch):
    """Two rechecks running side by side: the one that ends last must not write back the other's module as it read
    it when it started."""
    mutate = load()
    monkeypatch.setattr(mutate, "RESULTS", tmp_path)
    monkeypatch.setattr(mutate, "table", lambda record: "table\n")
    started_with = {"tool": "mutmut 3", "modules": {"a": {"v": 0}, "b": {"v": 0}}}
    (tmp_path / "mutation.json").write_text(json.dumps(started_with))
    mutate.save_modules({"a": {"v": 1}})  # the first recheck ends
    mutate.save_modules({"b": {"v": 2}})  # the second, which read {"a": 0} when it began
    assert json.loads((tmp_path / "mutation.json").read_text())["modules"] == {"a": {"v": 1}, "b": {"v": 2}}


def test_status_names_the_records_whose_module_changed_since(tmp_path, monkeypatch):
    """--status: a record is current while its module's source is unchanged since the commit it measured; a commit
    touching the module (not another file) makes it stale, named; unexplained survivors fail it too."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    mutate = load()
    for name in ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE"):  # as when the tests run from a git hook
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")

    def git(*args):
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    lib = tmp_path / "lib" / "classfilters"
    lib.mkdir(parents=True)
    (lib / "overlap.py").write_text("x = 1\n")
    (lib / "csg.py").write_text("y = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    measured = git("rev-parse", "--short", "HEAD")
    record = {"modules": {m: {"commit": measured, "unexplained": []} for m in ("overlap", "csg")}}
    assert mutate.stale(record, tmp_path) == {}
    assert mutate.status(record, tmp_path) == ((f"csg: measured at {measured}, current; 0 unexplained survivor(s)\n"
                                                f"overlap: measured at {measured}, current; 0 unexplained survivor(s)"),
                                               True)
    (lib / "overlap.py").write_text("x = 2\n")
    (tmp_path / "README.md").write_text("other\n")
    git("add", ".")
    git("commit", "-q", "-m", "two")
    changed = git("rev-parse", "--short", "HEAD")
    assert mutate.stale(record, tmp_path) == {"overlap": [changed]}
    text, ok = mutate.status(record, tmp_path)
    assert not ok and f"overlap: measured at {measured}, changed since by {changed};" in text
    record["modules"]["overlap"]["commit"] = changed
    assert mutate.status(record, tmp_path)[1]
    record["modules"]["csg"]["unexplained"] = ["classfilters.csg.x_gate__mutmut_5"]
    text, ok = mutate.status(record, tmp_path)
    assert not ok and "csg: measured at" in text and "; 1 unexplained survivor(s)" in text
    record["modules"]["csg"]["commit"] = "0000000"
    assert mutate.stale(record, tmp_path) == {"csg": ["0000000 (unknown to git)"]}
    record["modules"]["csg"]["commit"] = measured
    (lib / "overlap.py").write_text("x = 3\n")                      # edited, not committed
    assert mutate.stale(record, tmp_path) == {"overlap": ["uncommitted changes"]}
    (lib / "overlap.py").write_text("x = 2\n")
    git("checkout", "-q", "-b", "side", measured)                   # measured on a branch HEAD does not hold
    (lib / "csg.py").write_text("y = 2\n")
    git("commit", "-q", "-am", "side")
    side = git("rev-parse", "--short", "HEAD")
    git("checkout", "-q", "-")
    record["modules"]["csg"]["commit"] = side
    assert mutate.stale(record, tmp_path) == {"csg": [f"{side} (not in HEAD's history)"]}
    (lib / "csg.py").write_text("y = 2\n")                         # the same source as measured: current
    assert mutate.stale(record, tmp_path) == {}
