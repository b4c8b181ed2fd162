"""Mutation testing of the modules that hold the paper's logic, with mutmut 3 (`make mutate`).

mutmut imports mutated code from `src/` (or the project root) only, so this stages a scratch copy
(`lib/classfilters` as `src/classfilters`, plus `tests/`) and runs `mutmut run` there: every
function of the chosen modules is mutated one small change at a time, and each mutant runs the
tests that reach it. A mutant the tests still pass ("survived") is a bug they would miss.

    python benchmarks/mutate.py                        # every module below (an hour or more on 2 cores)
    python benchmarks/mutate.py --modules overlap      # one module
    python benchmarks/mutate.py --keep /tmp/mut        # keep the scratch copy (then `mutmut browse` there)
    python benchmarks/mutate.py --keep /tmp/mut --recheck   # that run's survivors against the tests as they are now
    python benchmarks/mutate.py --keep /tmp/mut --review    # that run's survivors against the reviewed equivalents
    python benchmarks/mutate.py --status               # is each module's record current? (no mutants run)

Writes `benchmarks/results/mutation.json`: per module the mutants killed, survived, timed out and
not covered, the score (killed / (killed + survived + no tests)), the surviving mutants' names, and
the commit and machine of the run that measured that module; after `--recheck`, the survivors killed since by
new tests and the score counting them (with the commit of the tests); `results/mutation.md` is the table made
from the record. Every survivor is either killed by a new test or reviewed as equivalent. Not run in CI (too
slow on 2 cores).

Equivalent mutants (a change no correct test can see: a default passed explicitly, a NaN spelled otherwise, ...)
are listed in `benchmarks/mutation_equivalent.json`, each with its diff (`mutmut show`: the whole mutated
function, before and after) and why it is equivalent. A survivor counts as equivalent only when its name *and*
its diff match an entry: any edit of the function makes the entry stale (it then matches nothing and the
mutant is unexplained until reviewed again). Reasons that rest on other modules (a callee's default) are not
invalidated by edits there: a full run re-reviews them only by name and diff. Per module the record then holds
`equivalent`, `unexplained` (survivors neither equivalent nor killed since) and `score_without_equivalent`,
the usual mutation score: (killed + timeout + killed since) / (mutants checked - equivalent); `score` is
(killed + timeout) / mutants checked.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine

REPO = Path(__file__).resolve().parents[1]

# test_structure.py's runs of the runner (its other tests check this repository's layout, not a scratch copy's)
RESUME = [f"test_structure.py::{name}" for name in (
    "test_resume_reruns_what_is_not_provably_current",
    "test_a_run_of_one_notebook_keeps_the_others_records_under_other_settings",
    "test_kernel_sockets_stay_out_of_the_working_directory")]

# test_security.py's tests of the cache (the others train and extract: each would run for every mutant of the keys)
CACHE_SECURITY = [f"test_security.py::{name}" for name in (
    "test_a_model_pooled_differently_gets_its_own_features", "test_overwritten_bytes_in_an_entry_are_detected",
    "test_a_cache_that_cannot_be_written_is_reported_once_and_skipped",
    "test_a_killed_writes_temporaries_are_removed_on_the_next_start")]

# module -> the test files that exercise it (the fast ones: each mutant runs those reaching its function)
MODULES = {
    "influence": ["test_influence.py", "test_planted_bugs.py"],
    "decomposed": ["test_decomposed.py"],
    "ablation": ["test_ablation_overlap.py"],
    "overlap": ["test_ablation_overlap.py"],
    "visualize": ["test_csg_visualize.py", "test_planted_bugs.py"],
    "csg": ["test_csg_visualize.py"],
    "cache": ["test_cache.py", *CACHE_SECURITY],  # the cache's own tests (every test that extracts reaches it)
    "cli": ["test_cli.py", "test_security.py", "test_planted_bugs.py"],
    "runner": ["test_runner.py", *RESUME, "test_planted_bugs.py"],            # --resume
    "provenance": ["test_provenance.py", "test_planted_bugs.py"],  # what --resume trusts, unit by unit (RESUME's
    # kernels would make each of its ~360 mutants a minute; they run for `runner`)
    "tables": ["test_tables.py", "test_planted_bugs.py"],  # the study tables (test_notebooks.py runs them too, too slow per mutant)
}
# mutmut 3 leaves decorated functions alone (other than static and class methods): the functions of the modules
# above compute under `with torch.no_grad():` instead of the decorator; these few stay decorated (small, and their
# behaviour is tested directly), unmutated, as are those whose `def` says `# pragma: no mutate block`
# (tests/test_mutate.py keeps the list exact)
NOT_MUTATED = {
    "influence": ["num_classes", "num_features", "mask", "multiply_adds",  # properties of InfluentialFeatures
                  "_stacklevel_outside_package"],  # its test cannot run under mutmut (trampolines are frames)
    "decomposed": ["multiply_adds"],                                        # DecomposedHead's property
    "cache": ["_writable", "_class_source_hash"],                           # functools.cache
    "runner": ["kernel_environment"],                                       # a context manager
}
ALSO_COPY = ("figures", "profiles", "notebooks", "data", "benchmarks", "README.md", "RESULTS.md", "Makefile")
COUNTED = {"killed", "survived", "timeout", "no tests", "suspicious", "segfault"}
EQUIVALENT = Path(__file__).resolve().parent / "mutation_equivalent.json"


def stage(scratch: Path, modules: list[str]) -> None:
    """src/classfilters, tests/ and a pyproject whose [tool.mutmut] names the modules and their tests."""
    shutil.copytree(REPO / "lib" / "classfilters", scratch / "src" / "classfilters",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ALSO_COPY:  # what the tests read beside the code (committed figures, profiles, notebooks, ...)
        (scratch / name).symlink_to(REPO / name)
    shared = REPO.parent / "shared"  # ../shared beside the checkout, where the tests look for it
    if shared.is_dir() and not (scratch / "shared").exists():
        (scratch / "shared").symlink_to(shared.resolve())
    tests = sorted({f"tests/{t}" for m in modules for t in MODULES[m]})
    only = ", ".join(f'"src/classfilters/{m}.py"' for m in modules)
    selection = ", ".join(f'"{t}"' for t in tests)
    (scratch / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = [{only}]\n"
        f"pytest_add_cli_args_test_selection = [{selection}]\n"
        f"also_copy = [{', '.join(repr(n).replace(chr(39), chr(34)) for n in ALSO_COPY)}]\n"
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider"]\n'
        'process_isolation = "forkserver"\n'  # torch is not fork-safe after the stats run
        "mutate_only_covered_lines = true\n")


def statuses(scratch: Path) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true` ("name: status" lines)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=scratch,
                         capture_output=True, text=True, check=True).stdout
    pairs = (line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    return {name: status for name, status in pairs}


def summarise(found: dict[str, str], modules: list[str]) -> dict:
    out = {}
    for module in modules:
        mine = {n: s for n, s in found.items() if n.startswith(f"classfilters.{module}.")}
        counts = Counter(mine.values())
        scored = counts["killed"] + counts["timeout"] + counts["survived"] + counts["no tests"]
        out[module] = {**{s: counts[s] for s in sorted(COUNTED | set(counts))},
                       "score": round((counts["killed"] + counts["timeout"]) / scored, 4) if scored else None,
                       "survivors": sorted(n for n, s in mine.items() if s in ("survived", "no tests"))}
    return out


def mutant_diff(scratch: Path, name: str) -> str | None:
    """The mutant's diff as `mutmut show` prints it (the whole function, before and after), without its status
    and file lines; None when mutmut cannot show it."""
    run = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=scratch, capture_output=True, text=True,
                         check=False)
    lines = run.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("@@")), None)
    return "\n".join(lines[start:]) if run.returncode == 0 and start is not None else None


def review(record: dict, diffs: dict[str, str], equivalent: dict[str, dict]) -> dict:
    """`record` (one module's) with its survivors sorted into equivalent (name and change match a reviewed entry),
    and unexplained (neither equivalent nor killed since), and the score without the equivalent ones."""
    killed_since = set(record.get("killed_since", ()))  # killed: not equivalent, whatever the file says
    same = sorted(n for n in record["survivors"] if n not in killed_since and n in equivalent
                  and diffs.get(n) is not None and equivalent[n]["diff"] == diffs[n])
    unexplained = sorted(n for n in record["survivors"] if n not in same and n not in killed_since)
    scored = record["killed"] + record["timeout"] + record["survived"] + record["no tests"] - len(same)
    killed = record["killed"] + record["timeout"] + len(killed_since)
    return {**record, "equivalent": same, "unexplained": unexplained,
            "score_without_equivalent": round(killed / scored, 4) if scored else None}


def table(record: dict) -> str:
    """results/mutation.md: one row per module (in the order of MODULES), from the record."""
    rows = [("| module | checked | killed + timeout | survived | equivalent | unexplained | score | "
            "score without equivalent | not checked | commit |"), "|" + "---|" * 10]
    for module in MODULES:
        r = record["modules"].get(module)
        if r is None:
            rows.append(f"| {module} | 0 | | | | | | | all | never measured |")
            continue
        since = f" + {len(r['killed_since'])} since ({r['recheck_commit']})" if r.get("killed_since") else ""
        cells = [module, r["killed"] + r["timeout"] + r["survived"] + r["no tests"], f"{r['killed'] + r['timeout']}{since}",
                 r["survived"] + r["no tests"], len(r["equivalent"]) if "equivalent" in r else "not reviewed",
                 len(r["unexplained"]) if "unexplained" in r else "", f"{r['score']:.3f}",
                 f"{r['score_without_equivalent']:.3f}" if r.get("score_without_equivalent") is not None else "",
                 r.get("not checked", 0), r["commit"]]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows) + "\n"


def save(record: dict) -> None:
    """results/mutation.json and the table made from it, results/mutation.md."""
    (RESULTS / "mutation.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "mutation.md").write_text(
        "Mutation testing (`benchmarks/mutate.py`, from `mutation.json`; equivalents reviewed in "
        "`benchmarks/mutation_equivalent.json`)\n\n" + table(record))


def save_modules(modules: dict[str, dict]) -> None:
    """These modules' records into results/mutation.json as it is now: a recheck or review of one module running
    beside another's must not write back the other's record as it was when it started."""
    current = json.loads((RESULTS / "mutation.json").read_text())
    current["modules"].update(modules)
    save(current)


def check_recorded(scratch: Path, found: dict[str, str], recorded: dict, module: str) -> None:
    """Refuse a kept run whose survivors of `module` are not the recorded ones (another run, or code since)."""
    if summarise(found, [module])[module]["survivors"] != recorded["survivors"]:
        raise SystemExit(f"{scratch} is not the run recorded for {module} (other survivors); "
                         "use the run that measured it, or run it again")


def reviewed_equivalents() -> dict[str, dict]:
    """mutant name -> {"diff", "why"} from mutation_equivalent.json (all modules)."""
    if not EQUIVALENT.exists():
        return {}
    listed = json.loads(EQUIVALENT.read_text())
    return {name: entry for module, entries in listed.items() if not module.startswith("_")
            for name, entry in entries.items()}


def recheck(scratch: Path, modules: list[str], found: dict[str, str], env: dict, skip=frozenset()) -> dict:
    """The survivors of a kept run against the current tests: each mutant switched on (MUTANT_UNDER_TEST) with the
    mutated sources first on the path, its module's test files run (stopping at the first failure). Per module:
    the mutants killed since, those still surviving, and the score with them counted. `skip`: survivors not to
    run (reviewed as equivalent: no test can kill them)."""
    tests = scratch / "mutants" / "tests"
    shutil.rmtree(tests, ignore_errors=True)
    shutil.copytree(REPO / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    tested, out = commit(), {}
    for module in modules:
        names = sorted(n for n, s in found.items()
                       if n.startswith(f"classfilters.{module}.") and s == "survived" and n not in skip)
        selection = [f"tests/{t}" for t in MODULES[module]]
        started = time.monotonic()
        clean = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                               cwd=scratch / "mutants", capture_output=True, text=True, check=False,
                               env={**env, "PYTHONPATH": "src"})
        if clean.returncode != 0:  # else every mutant would be "killed" by a test that fails anyway
            raise SystemExit(f"{module}: its tests fail without a mutant; fix them first:\n{clean.stdout[-2000:]}")
        limit = 60 + 5 * (time.monotonic() - started)  # past it, a timeout: killed, as mutmut counts them
        killed = []
        for name in names:
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                      *selection], cwd=scratch / "mutants", capture_output=True, check=False,
                                     env={**env, "PYTHONPATH": "src", "MUTANT_UNDER_TEST": name}, timeout=limit)
            except subprocess.TimeoutExpired:  # (an endless loop: a cycle walked forever)
                killed.append(name)
                continue
            if run.returncode != 0:
                killed.append(name)
        before = summarise(found, [module])[module]
        scored = before["killed"] + before["timeout"] + before["survived"] + before["no tests"]
        out[module] = {"killed_since": killed, "still_surviving": [n for n in names if n not in killed],
                       "score_with_recheck": round((before["killed"] + before["timeout"] + len(killed)) / scored, 4)
                       if scored else None, "recheck_commit": tested}
    return out


def stale(record: dict, repo: Path = REPO) -> dict[str, list[str]]:
    """Per module whose source (as it is now in the working tree) differs from the commit its record measured:
    what changed it, the commits since that commit, "uncommitted changes", or why no commit can be named (the
    measured commit is not in HEAD's history, or git does not know it). Modules left out are current."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)

    out = {}
    for module, r in record["modules"].items():
        path, measured = f"lib/classfilters/{module}.py", r["commit"]
        if git("cat-file", "-e", f"{measured}^{{commit}}").returncode != 0:
            out[module] = [f"{measured} (unknown to git)"]
            continue
        if git("diff", "--quiet", measured, "--", path).returncode == 0:
            continue  # the file as it is now is the file measured
        why = git("log", "--format=%h", f"{measured}..HEAD", "--", path).stdout.split()
        if git("diff", "--quiet", "HEAD", "--", path).returncode != 0:
            why.append("uncommitted changes")
        out[module] = why or [f"{measured} (not in HEAD's history)"]
    return out


def status(record: dict, repo: Path = REPO) -> tuple[str, bool]:
    """A line per module (current or changed since by which commits, unexplained survivors), and whether every
    record is current with no unexplained survivor (what an issue touching these modules needs to be resolved)."""
    changed, lines = stale(record, repo), []
    for module, r in sorted(record["modules"].items()):
        unexplained = len(r.get("unexplained", ()))
        state = f"changed since by {', '.join(changed[module])}" if module in changed else "current"
        lines.append(f"{module}: measured at {r['commit']}, {state}; {unexplained} unexplained survivor(s)")
    return "\n".join(lines), not changed and all(not r.get("unexplained") for r in record["modules"].values())


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="+", choices=sorted(MODULES),
                   help="default: every module (a run); those the kept run measured and the record holds (--recheck, "
                        "--review)")
    p.add_argument("--keep", type=Path, help="stage here and keep it (default: a temporary folder, removed)")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    p.add_argument("--recheck", action="store_true",
                   help="with --keep of an earlier run: run its survivors against the current tests (no new mutants)")
    p.add_argument("--review", action="store_true",
                   help="with --keep of the run recorded: sort its survivors by mutation_equivalent.json (no new mutants)")
    p.add_argument("--status", action="store_true",
                   help="say whether each module's record is current (its source unchanged since) and fully "
                        "explained; exit 1 if not (no mutants run)")
    args = p.parse_args(argv)
    if args.status:
        text, ok = status(json.loads((RESULTS / "mutation.json").read_text()))
        print(text)
        return 0 if ok else 1
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="classfilters-mutate-"))
    env = {**os.environ, "CLASSFILTERS_SHARED_DATA": os.environ.get("CLASSFILTERS_SHARED_DATA",
                                                                     str(REPO.parent / "shared" / "data"))}
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/src first; nothing may shadow it
    if (args.recheck or args.review) and not (args.keep and (scratch / "mutants").is_dir()):
        raise SystemExit("--recheck and --review need --keep <folder of an earlier run>")
    if args.recheck or args.review:
        record, found = json.loads((RESULTS / "mutation.json").read_text()), statuses(scratch)
        ran = {m for m in MODULES for n in found if n.startswith(f"classfilters.{m}.")}
        modules = args.modules or sorted(ran & set(record["modules"]))
        for module in modules:
            if module not in record["modules"]:
                raise SystemExit(f"{module}: no record to recheck or review; run it first")
            check_recorded(scratch, found, record["modules"][module], module)
    else:
        modules = args.modules or sorted(MODULES)
    if args.recheck:
        equivalent = reviewed_equivalents()
        diffs = {n: mutant_diff(scratch, n) for m in modules for n in record["modules"][m]["survivors"]}
        same = {n for n, d in diffs.items() if d is not None and n in equivalent and equivalent[n]["diff"] == d}
        for module, r in recheck(scratch, modules, found, env, skip=same).items():
            record["modules"][module] = review({**record["modules"][module], **r}, diffs, equivalent)
            print(f"{module}: killed since {len(r['killed_since'])}, still surviving {len(r['still_surviving'])}, "
                  f"score with them {r['score_with_recheck']}")
        save_modules({m: record["modules"][m] for m in modules})
        return 0
    if args.review:
        equivalent = reviewed_equivalents()
        for module in modules:
            mine = record["modules"][module]
            diffs = {n: mutant_diff(scratch, n) for n in mine["survivors"]}
            record["modules"][module] = r = review(mine, diffs, equivalent)
            print(f"{module}: {len(r['equivalent'])} equivalent, {len(r['unexplained'])} unexplained, "
                  f"score without equivalent {r['score_without_equivalent']}")
        save_modules({m: record["modules"][m] for m in modules})
        return 0
    if scratch.exists() and any(scratch.iterdir()) and not (scratch / "mutants").is_dir():
        raise SystemExit(f"{scratch} exists and is not an earlier mutation run: choose an empty folder")
    shutil.rmtree(scratch / "src", ignore_errors=True)
    shutil.rmtree(scratch / "tests", ignore_errors=True)
    for name in ALSO_COPY:
        (scratch / name).unlink(missing_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    stage(scratch, modules)
    staged = commit()  # the code and tests measured (a commit made during the run is not theirs)
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)], cwd=scratch,
                   env=env, check=False)
    stamp = {"commit": staged, "machine": machine()}  # per module: modules are measured in separate runs
    measured = {m: r for m, r in summarise(statuses(scratch), modules).items() if r["score"] is not None}
    path = RESULTS / "mutation.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {**old, "tool": "mutmut 3", "modules": {**old.get("modules", {}),  # an unreached module (a run
              **{m: {**r, **stamp} for m, r in measured.items()}}}               # stopped early) keeps its record
    save(merged)  # the run's counts first: a failure of the review below loses nothing
    equivalent = reviewed_equivalents()
    for m, r in measured.items():
        merged["modules"][m] = review(merged["modules"][m], {n: mutant_diff(scratch, n) for n in r["survivors"]},
                                      equivalent)
    save(merged)
    result = {"modules": {m: merged["modules"][m] for m in measured}}
    for module, r in result["modules"].items():
        print(f"{module}: score {r['score']}, killed {r['killed']}, survived {r['survived']}, "
              f"no tests {r['no tests']}, timeout {r['timeout']}; {len(r['equivalent'])} equivalent, "
              f"{len(r['unexplained'])} unexplained, score without equivalent {r['score_without_equivalent']}")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
