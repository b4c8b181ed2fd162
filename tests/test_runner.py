"""The runner (runner.py) beside test_structure's resume tests: choosing notebooks, the kernels' environment,
the parameters a notebook gets, and a failing notebook stopping the run with its error recorded."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from classfilters import runner


def notebook(folder: Path, name: str, body: str, params: str = "profile = 'demo'\nout_dir = None\nk = None") -> Path:
    folder.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / name)
    return folder / name


def test_the_readme_lists_every_option_as_the_help_says_it(monkeypatch):
    from conftest import options_text, readme_options
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at the terminal's width, breaking at hyphens
    parser = runner.parser()
    listed = readme_options("python -m classfilters.runner")
    assert listed == options_text(parser)
    assert [line.split()[0] for line in listed.splitlines() if not line.startswith(" ")] == [
        "--profile", "--only", "--resume", "--set", "--figures", "--runs"]
    assert "--set KEY=VALUE" in listed and "(required)" not in listed
    shipped = sorted(p.stem for p in (runner.repo_root() / "profiles").glob("*.yaml"))
    named = parser._option_string_actions["--profile"].help.split(", or the path")[0].split(" | ")
    assert sorted(named) == shipped and parser.parse_args([]).profile == "demo"  # every profile shipped, by name
    said = " ".join(parser.format_help().split())
    assert said.startswith("usage: python -m classfilters.runner [-h] [--profile PROFILE]")
    assert ("Run the paper notebooks in order for a profile with papermill; every table and figure lands in "
            "figures/<profile>/. options:") in said
    for a in parser._actions:
        assert " ".join(a.help.split()) in said, a.dest


def test_defaults_folders_and_what_papermill_is_asked(tmp_path, monkeypatch):
    """Without folders: notebooks/ of the repository, figures/<name>/ and runs/<name>/ beside it (made with their
    parents); papermill executes each notebook in the repository with the python3 kernel over local sockets in a
    private folder under /tmp, with a progress bar on stderr unless `progress=False`; no resume unless asked.
    papermill is replaced by a recorder here (the kernels run in the tests above)."""
    import sys
    import time

    import papermill
    from jupyter_client.manager import KernelManager
    root = tmp_path / "repo"
    root.mkdir()
    notebook(root / "notebooks", "01_a.ipynb", "pass", params="profile = 'demo'\nout_dir = None\nk = None")
    monkeypatch.setattr(runner, "repo_root", lambda: root)
    import tempfile
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "elsewhere"))  # what $TMPDIR would set
    calls = []

    def execute(input_path, output_path, **kw):
        km = kw["kernel_manager_class"](kernel_name="python3")
        sockets = Path(km.ip).parent
        calls.append({"input": input_path, "output": output_path, **kw, "ipc": (km.transport, km.ip),
                      "sockets_exist": sockets.is_dir()})
        time.sleep(1.33 if len(calls) == 1 else 0)  # seconds are recorded to a tenth: 1.3, neither 1 nor 1.33
        Path(output_path).write_text("{}")
    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.delenv("CLASSFILTERS_COMMIT", raising=False)
    log = []
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 7}, log=log.append) == 0
    assert log[0].startswith(f"note: {root} is no git checkout, and neither $CLASSFILTERS_COMMIT")  # said to `log`
    call = calls[0]
    figures, runs = root / "figures" / "t", root / "runs" / "t"
    assert (call["input"], call["output"]) == (str(root / "notebooks" / "01_a.ipynb"), str(runs / "01_a.ipynb"))
    assert call["parameters"] == {"k": 7, "profile": str(runs / "profile.yaml"), "out_dir": str(figures)}
    assert (call["kernel_name"], call["cwd"], call["log_output"]) == ("python3", str(root), False)
    assert call["progress_bar"] == {"desc": "01_a", "unit": "cell"} and call["stderr_file"] is sys.stderr
    assert issubclass(call["kernel_manager_class"], KernelManager)
    transport, ip = call["ipc"]  # under /tmp, wherever $TMPDIR points (a socket's path must stay short)
    assert transport == "ipc" and Path(ip).parent.parent == Path("/tmp") and call["sockets_exist"]
    assert Path(ip).parent.name.startswith("classfilters-kernels-") and not Path(ip).parent.exists()  # removed after
    prov = json.loads((figures / "provenance.json").read_text())
    entry = prov["notebooks"]["01_a"]
    assert entry["status"] == "ok" and 1.3 <= entry["seconds"] < 600 and entry["seconds"] == round(entry["seconds"], 1)
    assert entry["seconds"] <= prov["total_seconds_this_run"] < 600  # wall seconds, to a tenth (no bound on the time taken)
    assert prov["total_seconds_this_run"] == round(prov["total_seconds_this_run"], 1)
    assert (runs / "profile.yaml").is_file() and log[-1].startswith("[t] all done in ") and log[-1].endswith(
        f" s: tables and figures in {figures}")
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 7}, progress=False, log=log.append) == 0
    assert len(calls) == 2  # run again: no resume unless asked
    assert calls[1]["progress_bar"] is False and calls[1]["stderr_file"] is None


def test_a_full_run_records_what_it_ran_and_only_other_settings_are_called_other(tmp_path, monkeypatch):
    """A run of every notebook starts a fresh record (a notebook it did not reach is not carried from before); a
    run of one notebook keeps the others' records and names only those made under other settings."""
    import time

    import papermill
    folder = tmp_path / "nbs"
    for name in ("01_a.ipynb", "02_b.ipynb", "03_c.ipynb"):
        notebook(folder, name, "pass")
    failing = set()

    def execute(input_path, output_path, **kw):
        if Path(input_path).stem in failing:
            time.sleep(0.33)
            raise RuntimeError("broken")
        Path(output_path).write_text("{}")
    monkeypatch.setattr(papermill, "execute_notebook", execute)
    log = []
    kw = {"figures_dir": tmp_path / "figures", "runs_dir": tmp_path / "runs", "notebooks_dir": folder,
          "progress": False, "log": log.append}

    def recorded():
        return json.loads((tmp_path / "figures" / "provenance.json").read_text())["notebooks"]
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 3}, **kw) == 0
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 3}, only="03", **kw) == 0
    assert not any("other settings" in line for line in log) and recorded().keys() == {"01_a", "02_b", "03_c"}
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 4}, only="03", **kw) == 0
    assert "[t] 01_a, 02_b: made under other settings; their records are kept, tagged with them " \
           "(provenance.json#settings)" in log
    failing.add("01_a")
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 4}, **kw) == 1
    assert recorded().keys() == {"01_a"} and recorded()["01_a"]["error"] == "RuntimeError: broken"
    total = json.loads((tmp_path / "figures" / "provenance.json").read_text())["total_seconds_this_run"]
    assert 0.3 <= total < 600 and total == round(total, 1) and isinstance(total, float)  # written at the failure


def test_a_socket_folder_that_cannot_be_removed_does_not_fail_the_run(tmp_path, monkeypatch):
    """The kernels' socket folder is removed after the run; an error removing it (a socket still busy) loses
    nothing: the run's results and its exit status stand."""
    import shutil
    import tempfile

    import papermill
    notebook(tmp_path / "nbs", "01_a.ipynb", "pass")
    monkeypatch.setattr(papermill, "execute_notebook", lambda i, o, **kw: Path(o).write_text("{}"))
    real, refused = shutil.rmtree, []

    def busy(path, *args, onerror=None, onexc=None, **kw):  # as rmtree reports a failure to remove a folder
        if not Path(path).name.startswith("classfilters-kernels-"):
            return real(path, *args, onerror=onerror, **kw) if onexc is None else real(path, *args, onexc=onexc, **kw)
        refused.append(path)
        error = OSError(16, "Device or resource busy")
        if onexc is not None:
            onexc(os.rmdir, path, error)
        else:
            onerror(os.rmdir, path, (OSError, error, None))
    monkeypatch.setattr(tempfile._shutil, "rmtree", busy)
    try:
        assert runner.run_notebooks("demo", overrides={"name": "t"}, figures_dir=tmp_path / "figures",
                                    runs_dir=tmp_path / "runs", notebooks_dir=tmp_path / "nbs", progress=False,
                                    log=lambda line: None) == 0
        assert len(refused) == 1 and (tmp_path / "figures" / "provenance.json").is_file()
    finally:  # the folder the fake kept, whatever failed
        for path in refused:
            real(path, ignore_errors=True)


def test_notebooks_are_the_numbered_ones_in_order(tmp_path):
    for name in ("10_last.ipynb", "02_b.ipynb", "01_a.ipynb", "scratch.ipynb", "3_short.ipynb", "04_x.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in runner.notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb", "10_last.ipynb"]


def test_only_picks_by_number_stem_name_or_a_unique_part():
    nbs = [Path(n) for n in ("01_influence.ipynb", "02_k_sweep.ipynb", "04_decomposition_retrain.ipynb",
                             "10_explanations.ipynb")]
    for only in ("4", "04", "004", "04_decomposition_retrain", "04_decomposition_retrain.ipynb", "retrain"):
        assert runner.pick(nbs, only) == nbs[2], only
    assert runner.pick(nbs, "10") == nbs[3] and runner.pick(nbs, "1") == nbs[0]
    with pytest.raises(SystemExit, match=r"--only 'in' matches \['01_influence', '04_decomposition_retrain'\]; choose one of"):
        runner.pick(nbs, "in")
    with pytest.raises(SystemExit, match=r"--only '7' matches no notebook; choose one of \['01_influence'"):
        runner.pick(nbs, "7")


def test_the_kernels_environment_is_set_inside_and_restored_after(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("CLASSFILTERS_PROGRESS", raising=False)
    monkeypatch.setenv("TQDM_MININTERVAL", "1")
    with pytest.raises(RuntimeError), runner.kernel_environment():
        assert os.environ["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
        assert os.environ["CLASSFILTERS_PROGRESS"] == "text"
        assert os.environ["TQDM_MININTERVAL"] == "1"  # the user's choice is kept
        raise RuntimeError("a failing run restores it too")
    assert os.environ["MPLBACKEND"] == "Agg" and "CLASSFILTERS_PROGRESS" not in os.environ
    monkeypatch.delenv("TQDM_MININTERVAL")
    with runner.kernel_environment():
        assert os.environ["TQDM_MININTERVAL"] == "5"
    assert "TQDM_MININTERVAL" not in os.environ


def test_a_notebook_gets_exactly_what_its_parameters_cell_declares(tmp_path):
    nb = notebook(tmp_path / "nbs", "01_a.ipynb", "pass", params="profile = 'demo'\nout_dir = None\nk_prime = None")
    values = {"k": 3, "k_prime": 7, "model": "resnet8"}
    assert runner.notebook_parameters(nb, tmp_path / "p.yaml", tmp_path / "out", values) == {
        "k_prime": 7, "profile": str(tmp_path / "p.yaml"), "out_dir": str(tmp_path / "out")}
    bad = notebook(tmp_path / "nbs", "02_b.ipynb", "pass", params="profile = 'demo'\nout_dir = None\nkk = 1")
    with pytest.raises(ValueError, match=r"02_b.ipynb: parameters \['kk'\] are neither \('profile', 'out_dir'\) nor "
                                         "settings of classfilters.Profile"):
        runner.notebook_parameters(bad, tmp_path / "p.yaml", tmp_path / "out", values)


def test_a_failing_notebook_stops_the_run_with_its_error_recorded(tmp_path):
    folder = tmp_path / "nbs"
    notebook(folder, "01_ok.ipynb", "import os\nfrom pathlib import Path\nPath(out_dir, 'a.csv').write_text(os.getcwd())")
    notebook(folder, "02_fails.ipynb", "1 / 0")
    notebook(folder, "03_never.ipynb", "from pathlib import Path\nPath(out_dir, 'c.csv').write_text('c')")
    log = []
    kw = {"figures_dir": tmp_path / "figures", "runs_dir": tmp_path / "runs", "notebooks_dir": folder,
          "progress": False, "log": log.append}
    assert runner.run_notebooks("demo", overrides={"name": "t"}, **kw) == 1
    said = "\n".join(log)
    assert "[t] 02_fails FAILED: ZeroDivisionError: division by zero" in said
    assert f"executed copy: {tmp_path / 'runs' / '02_fails.ipynb'}" in said and "03_never" not in said
    prov = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    assert prov["notebooks"]["01_ok"]["status"] == "ok" and prov["notebooks"]["01_ok"]["outputs"].keys() == {"a.csv"}
    failed = prov["notebooks"]["02_fails"]
    assert failed["status"] == "failed" and failed["error"] == "ZeroDivisionError: division by zero"
    assert "03_never" not in prov["notebooks"] and not (tmp_path / "figures" / "c.csv").exists()
    assert (tmp_path / "runs" / "profile.yaml").is_file()
    assert (tmp_path / "figures" / "a.csv").read_text() == str(runner.repo_root())  # kernels run in the repository
    assert 0 <= failed["seconds"] < 600 and 0 <= prov["total_seconds_this_run"] < 600
    assert failed["seconds"] <= prov["total_seconds_this_run"]
    from classfilters import provenance
    assert (prov["profile"], prov["device"], prov["libraries"]) == ("t", provenance.device_name(), provenance.versions())
    assert prov["profile_values"]["name"] == "t" and prov["source_hash"] == provenance.source_hash()
    log.clear()  # --resume runs the failed one again (and what follows), not the one that succeeded
    assert runner.run_notebooks("demo", overrides={"name": "t"}, resume=True, **kw) == 1
    assert "01_ok: current" in "\n".join(log) and "02_fails: run again (last status failed)" in "\n".join(log)


def test_only_runs_the_notebook_even_when_it_is_current(tmp_path):
    folder = tmp_path / "nbs"
    notebook(folder, "01_ok.ipynb", "from pathlib import Path\nPath(out_dir, 'a.csv').write_text(str(k))")
    log = []
    kw = {"figures_dir": tmp_path / "figures", "runs_dir": tmp_path / "runs", "notebooks_dir": folder,
          "progress": False, "log": log.append}
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 2}, **kw) == 0
    log.clear()
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 2}, only="1", resume=True, **kw) == 0
    assert "[t] 01_ok ..." in log and not any("current" in line for line in log)
    assert (tmp_path / "figures" / "a.csv").read_text() == "2"


def test_main_says_what_is_wrong_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*no-such-profile"):
        runner.main(["--profile", "no-such-profile", "--figures", str(tmp_path / "f"), "--runs", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match=r"^error: .*not_a_setting"):
        runner.main(["--set", "not_a_setting=1", "--figures", str(tmp_path / "f"), "--runs", str(tmp_path / "r")])


def test_a_notebook_with_unknown_parameters_is_recorded_as_failed(tmp_path):
    folder = tmp_path / "nbs"
    notebook(folder, "01_bad.ipynb", "pass", params="profile = 'demo'\nout_dir = None\nkk = 1")
    log = []
    assert runner.run_notebooks("demo", overrides={"name": "t"}, figures_dir=tmp_path / "figures",
                                runs_dir=tmp_path / "runs", notebooks_dir=folder, progress=False, log=log.append) == 1
    entry = json.loads((tmp_path / "figures" / "provenance.json").read_text())["notebooks"]["01_bad"]
    assert entry["status"] == "failed" and entry["error"].startswith("ValueError: 01_bad.ipynb: parameters ['kk']")


def test_main_passes_every_option_on(tmp_path, monkeypatch):
    seen = {}

    def run(*args):
        seen["args"] = args
        return 3
    monkeypatch.setattr(runner, "run_notebooks", run)
    assert runner.main(["--profile", "p.yaml", "--only", "04", "--resume", "--set", "k=7", "--set", "train.epochs=2",
                        "--figures", str(tmp_path / "f"), "--runs", str(tmp_path / "r")]) == 3
    assert seen["args"] == ("p.yaml", "04", True, {"k": 7, "train": {"epochs": 2}}, tmp_path / "f", tmp_path / "r")
    runner.main([])
    assert seen["args"] == ("demo", None, False, {}, None, None)
