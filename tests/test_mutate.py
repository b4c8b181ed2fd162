"""benchmarks/mutate.py (`make mutate`): the staged project and the score, without running mutmut."""
import importlib.util
import sys
from pathlib import Path

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
