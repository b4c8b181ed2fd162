"""classfilters.barerun: the notebooks executed in-process without Jupyter, parameters injected as papermill does."""
import json

from classfilters import barerun

TINY = {"name": "tiny", "dataset": "digits", "model": "resnet8", "models": ["resnet8", "resnet14"],
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "flip": False},
        "grid_k": [1, 2, 4, 8], "depth_k": 5, "k": 5, "k_prime": 5, "max_train": 300, "max_test": 200,
        "finetune_epochs": 1, "finetune_lr": 0.001, "vis_images": 2, "csg_epochs": 1}


def _notebook(path, cells):
    path.write_text(json.dumps({"cells": [{"cell_type": kind, "metadata": {"tags": tags}, "source": source}
                                          for kind, tags, source in cells], "nbformat": 4, "nbformat_minor": 5}))


def test_parameters_are_injected_after_the_tagged_cell(tmp_path):
    nb = tmp_path / "01_x.ipynb"
    _notebook(nb, [("markdown", [], "# title"), ("code", [], "a = 1"), ("code", ["parameters"], "profile = 'demo'"),
                   ("code", [], "%matplotlib inline\nb = profile")])
    cells = barerun.code_cells(nb, {"profile": "cifar10", "overrides": {"k": 3}})
    assert cells[0] == "a = 1" and cells[1] == "profile = 'demo'"
    assert "profile = 'cifar10'" in cells[2] and "overrides = {'k': 3}" in cells[2]
    assert cells[3] == "# %matplotlib inline\nb = profile"
    log = tmp_path / "log"
    namespace_probe = tmp_path / "probe.ipynb"
    _notebook(namespace_probe, [("code", ["parameters"], "profile = 'demo'"),
                                ("code", [], f"open({str(tmp_path / 'out')!r}, 'w').write(profile)\nprint('hi')")])
    assert barerun.execute(namespace_probe, {"profile": "cifar10"}, log, tmp_path) == []
    assert (tmp_path / "out").read_text() == "cifar10" and "hi" in log.read_text()


def test_interactive_only_cells_are_skipped_other_failures_named(tmp_path, monkeypatch):
    import sys

    import pytest
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as on a bare machine: not installed
    nb = tmp_path / "02_y.ipynb"
    _notebook(nb, [("code", [], "import ipywidgets"),
                   ("code", [], "x = 1")])
    assert barerun.execute(nb, {}, tmp_path / "log", tmp_path) == ["cell 2: needs ipywidgets (interactive only)"]
    _notebook(nb, [("code", [], "import not_a_module_anywhere")])
    with pytest.raises(RuntimeError, match="02_y, ModuleNotFoundError"):
        barerun.execute(nb, {}, tmp_path / "log", tmp_path)


def test_each_notebook_gets_what_the_runner_would_give(tmp_path):
    """The parameters read with `ast` equal papermill's: the same knobs, the profile file and out_dir."""
    from pathlib import Path

    from classfilters import runner
    from classfilters.profile import load_profile
    values = load_profile("demo").to_dict()
    for nb in runner.notebooks(Path(__file__).resolve().parents[1] / "notebooks"):
        ours = barerun.notebook_parameters(nb, tmp_path / "profile.yaml", tmp_path / "out", values)
        assert ours == runner.notebook_parameters(nb, tmp_path / "profile.yaml", tmp_path / "out", values), nb.name
        assert {"profile", "out_dir"} <= set(ours)


def test_the_first_notebook_runs_without_jupyter(tmp_path):
    logs = []
    status = barerun.run("demo", only="01", overrides=TINY, figures_dir=tmp_path / "figures", runs_dir=tmp_path / "runs",
                         log=logs.append)
    assert status == 0, "\n".join(logs)
    provenance = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    assert provenance["notebooks"]["01_influence"]["status"] == "ok" and provenance["runner"].startswith("classfilters.barerun")
    assert list((tmp_path / "figures").glob("*.csv")) or list((tmp_path / "figures").glob("*.png"))
    assert (tmp_path / "runs" / "01_influence.log").is_file()
    assert provenance["profile_values"]["max_train"] == 300 and provenance["source_hash"]
