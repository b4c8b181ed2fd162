"""The house's structure: one policy for k and k', typed profiles, layers that import only downward,
provenance that resumes only what is current, the k panel's numbers, and commands that agree."""
import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import planted
from torch import nn

import classfilters
from classfilters import provenance, runner
from classfilters.profile import Profile, load_profile, parse_set
from classfilters.sizes import as_size, grid_sizes, parse_size

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "lib"


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


# ------------------------------------------------------------------------------------------ k and k'


@pytest.mark.parametrize("value, expected", [(np.int64(5), 5), (torch.tensor(7), 7), (np.float32(0.5), 0.5),
                                             (torch.tensor(0.25), 0.25), (64, 64), (1.0, 1.0)])
def test_sizes_accept_numpy_and_tensor_numbers(value, expected):
    out = as_size(value, 64, "k")
    assert out == expected and type(out) is type(expected)


def test_one_policy_for_k_everywhere(tmp_path):
    """An out-of-range k is the same error in the kernel, the grid, the profile, the panel and the CLI."""
    from classfilters import grid_accuracy, influential_features
    features, labels = planted(d=32)
    head = nn.Linear(32, 6)
    for bad in (0, 33, 1.5, -0.1):
        with pytest.raises(ValueError, match="out of range"):
            as_size(bad, 32, "k")
        with pytest.raises(ValueError, match="out of range"):
            influential_features(features, labels, bad, 5)
        with pytest.raises(ValueError, match="out of range"):
            influential_features(features, labels, 5, bad)
        if isinstance(bad, int):
            with pytest.raises(ValueError, match="out of range"):
                grid_accuracy(features, labels, features, labels, head, [bad], [5])
            with pytest.raises(ValueError, match="out of range"):
                panel_for(features, labels).state(bad, 5)
        if bad != 33:  # the profile does not know D
            with pytest.raises(ValueError, match="out of range"):
                load_profile("demo", {"k": bad})
            with pytest.raises(ValueError, match="out of range"):
                parse_size(str(bad))
            assert parse_size(str(bad), check=False) == bad  # the command line's parse, its range checked later
    for wrong in (True, "5", None):
        with pytest.raises(TypeError):
            as_size(wrong, 32)
    assert influential_features(features, labels, np.int64(3), torch.tensor(4)).k_prime == 4


def test_a_grid_axis_drops_what_does_not_fit_and_says_so():
    notes = []
    assert grid_sizes([1, 64, 2, 100, 2, np.int64(8), 0], 64, "k", log=notes.append) == [1, 2, 8, 64]
    assert len(notes) == 1 and "[100, 0]" in notes[0]
    with pytest.raises(ValueError, match="no k value"):
        grid_sizes([100, 200], 64, log=None)


# ------------------------------------------------------------------------------------------ profiles


def test_every_notebook_setting_is_a_typed_field(tmp_path, monkeypatch):
    p = load_profile("demo", parse_set(["fig2_class=3", "train.epochs=20", "k=0.9", "progress=false"]))
    assert (p.fig2_class, p.train.epochs, p.train.lr, p.k, p.progress) == (3, 20, 0.05, 0.9, False)
    assert load_profile("demo") == Profile()  # the dataclass's defaults are the demo's
    with pytest.raises(ValueError, match=r"setting 'fig2_class' .* must be int, got 'three'"):
        load_profile("demo", {"fig2_class": "three"})
    with pytest.raises(ValueError, match=r"'train.lr' .* must be float"):
        load_profile("demo", {"train": {"lr": "fast"}})
    with pytest.raises(ValueError, match=r"did you mean 'fig2_class'"):
        load_profile("demo", {"fig2_clas": 1})
    monkeypatch.setenv("MY_DATA", "/somewhere")
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: cifar10\nname: mine\ndataset: imagefolder:${MY_DATA}/x\nmax_test: ${UNSET_VAR:-7}\n"
                    "train: {epochs: 2}\n")
    p = load_profile(mine)
    assert p.name == "mine" and p.dataset == "imagefolder:/somewhere/x" and p.train.epochs == 2
    assert p.train.batch_size == 512 and p.models == load_profile("cifar10").models  # merged key by key
    assert p.max_test == 7  # a whole value from a variable is read as YAML
    assert p.replace(k=None, model="resnet8").model == "resnet8" and p.replace(k=None).k == p.k


def test_reading_a_profile_loads_neither_torch_nor_pandas():
    out = python("import sys; from classfilters import runner; from classfilters.profile import load_profile; "
                 "load_profile('cifar10'); runner.main(['--help']) if False else None; "
                 "print(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))")
    assert out.strip() == "[]"


def test_the_algorithm_does_not_import_the_pipeline():
    out = python("import sys; import classfilters.influence, classfilters.decomposed, classfilters.ablation, "
                 "classfilters.overlap; print(sorted(m.split('.')[-1] for m in sys.modules if m.startswith("
                 "'classfilters.')))")
    loaded = set(eval(out))
    assert not loaded & {"data", "decode", "features", "models", "train", "cache"}, loaded


def test_public_api_is_flat_and_complete():
    assert sorted(classfilters.__all__) == sorted(classfilters._EXPORTS)
    for name in classfilters.__all__:
        assert getattr(classfilters, name) is not None
    assert classfilters.Recipe is importlib.import_module("classfilters.train").Recipe
    text = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and not re.search(r'^version\s*=\s*"', text, re.MULTILINE)  # written once




def test_no_module_is_long_without_saying_why():
    for path in sorted((LIB / "classfilters").glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 300:
            assert "lines" in text.split('"""')[1], f"{path.name}: over 300 lines; say why in its docstring"


# ------------------------------------------------------------------------------------------ the session


def test_interactive_runs_write_to_scratch_and_save_figure_returns_nothing(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from classfilters.session import open_study
    S = open_study("demo", overrides={"name": "t-scratch"})
    assert S.out_dir == REPO / "runs" / "scratch" / "t-scratch" and "figures" not in S.out_dir.parts
    S.out_dir.rmdir()
    S = open_study("demo", tmp_path, k=7, fig2_class=None)
    assert S.profile.k == 7 and S.profile.fig2_class == 0 and S.out_dir == tmp_path
    fig = plt.figure()
    assert S.save_figure(fig, "f") is None  # a cell ending with it shows the figure once, not twice
    assert (tmp_path / "f.png").is_file() and (tmp_path / "f.pdf").is_file()


# ------------------------------------------------------------------------------------------ the k panel


def panel_for(features, labels, **kw):
    from classfilters.widgets import KPanel
    c, d = int(labels.max()) + 1, features.shape[1]
    torch.manual_seed(0)
    model = types.SimpleNamespace(num_features=d, num_classes=c, head=nn.Linear(d, c))
    split = types.SimpleNamespace(labels=labels, classes=[f"c{i}" for i in range(c)], num_classes=c)
    from classfilters.session import Subject
    subject = Subject("toy", model, split, split, features, features)
    return KPanel(subject, **kw)


def test_panel_state_marks_zero_count_picks_and_matches_evaluate():
    from classfilters import evaluate, influential_features
    features, labels = planted(d=32, strength=50.0)  # image i's top 1 is always 3c
    panel = panel_for(features, labels)
    s = panel.state(1, 10, 2)
    assert s.indices[0] == 6 and s.histogram[6] == 40 and s.histogram.sum() == 40
    assert s.zero_picks == [0, 1, 2, 3, 4, 5, 7, 8, 9]  # filled by index order, and counted in the cost
    assert s.multiply_adds == 60
    head = panel.subject.head
    reference = evaluate(head, influential_features(features, labels, 1, 10), features, labels)
    assert s.accuracy == pytest.approx(reference["acc_decomposed"])
    assert np.average(s.class_accuracy, weights=np.bincount(labels)) == pytest.approx(s.accuracy)
    png = panel.render(s)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "count 0" in panel.summary(s)


def test_panel_histograms_for_every_k_equal_algorithm_1():
    from classfilters.influence import class_histograms
    gen = torch.Generator().manual_seed(1)
    for features in (torch.relu(torch.randn(300, 16, generator=gen)), torch.randn(300, 16, generator=gen)):
        labels = torch.randint(0, 4, (300,), generator=gen)
        labels[:4] = torch.arange(4)
        panel = panel_for(features, labels)
        for k in (1, 3, 16):
            assert torch.equal(panel.histograms(k), class_histograms(features, labels, 4, k)[0])


def test_panel_widget_builds():
    pytest.importorskip("ipywidgets")
    import pandas as pd
    features, labels = planted(d=32)
    grid = pd.DataFrame([{"k": k, "k_prime": kp, "relative": 0.5} for k in (1, 5) for kp in (1, 5)])
    box = panel_for(features, labels, grid=grid).widget()
    image = box.children[1]
    assert image.value[:4] == b"\x89PNG"


def test_panel_redraws_what_the_sliders_and_picker_say():
    """Moving k, k' or the class redraws the picture and the numbers for the new values (issue 16: the panel
    after a slider moves), each against Algorithm 1 and `evaluate` recomputed independently."""
    pytest.importorskip("ipywidgets")
    from classfilters import evaluate, influential_features
    features, labels = planted(d=32, strength=2.0)
    panel = panel_for(features, labels, k=5, k_prime=5)
    box = panel.widget()
    k, kp, picker = box.children[0].children
    image, text = box.children[1], box.children[2]
    seen = {image.value}
    for control, value in ((k, 2), (kp, 9), (picker, 3)):
        control.value = value
        assert image.value not in seen  # a new picture
        seen.add(image.value)
    reference = influential_features(features, labels, 2, 9)
    accuracy = evaluate(panel.subject.head, reference, features, labels)["acc_decomposed"]
    assert "<b>k</b> = 2, <b>k'</b> = 9" in text.value and "<b>class</b> c3" in text.value
    assert f"<b>accuracy</b> {accuracy:.4f}" in text.value
    assert f"= {reference.indices[3]}" in text.value
    assert f"<b>multiply-adds</b> {sum(map(len, reference.indices))} of {32 * panel.c}" in text.value


# ------------------------------------------------------------------------------------------ provenance and resume


def tiny_notebooks(folder: Path) -> Path:
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'demo'\nout_dir = None\nk = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from pathlib import Path\nPath(out_dir, 'table.csv').write_text(f'k,{k}\\n')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_write.ipynb")
    return folder


def test_resume_reruns_what_is_not_provably_current(tmp_path, monkeypatch):
    kw = {"figures_dir": tmp_path / "figures", "runs_dir": tmp_path / "runs",
          "notebooks_dir": tiny_notebooks(tmp_path / "nbs"), "progress": False}
    log = []

    def resume():
        log.clear()
        assert runner.run_notebooks("demo", overrides={"name": "t", "k": 3}, resume=True, log=log.append, **kw) == 0
        return "\n".join(log)

    assert "01_write ..." in resume()
    assert "CLASSFILTERS_PROGRESS" not in os.environ  # the kernels' environment is theirs alone
    assert (tmp_path / "figures" / "table.csv").read_text() == "k,3\n"  # the runner passed the notebook's knob
    prov = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    assert prov["notebooks"]["01_write"]["outputs"].keys() == {"table.csv"}
    assert "skipped" in resume()
    (tmp_path / "figures" / "table.csv").unlink()
    assert "output table.csv is missing" in resume()
    (tmp_path / "figures" / "table.csv").write_text("edited\n")
    assert "output table.csv was changed" in resume()
    (tmp_path / "runs" / "01_write.ipynb").unlink()
    assert "executed copy" in resume()
    monkeypatch.setattr(provenance, "source_hash", lambda: "0" * 64)  # an uncommitted edit in lib/
    assert "library's sources changed" in resume()
    assert "skipped" in resume()
    (tmp_path / "figures" / "provenance.json").write_text('{"notebooks": {')
    with pytest.raises(ValueError, match=r"provenance.json is corrupt"):
        resume()
    with pytest.raises(SystemExit, match=r"error: .*provenance.json is corrupt"):
        runner.main(["--set", "name=t", "--resume", "--figures", str(tmp_path / "figures"), "--runs", str(tmp_path / "r")])


def test_a_run_of_one_notebook_keeps_the_others_records_under_other_settings(tmp_path):
    """--only with other settings: the other notebooks' records stay, tagged with the settings they ran
    under (never silently dropped), and --resume runs them again because those settings differ."""
    folder = tiny_notebooks(tmp_path / "nbs")
    second = nbformat.read(folder / "01_write.ipynb", as_version=4)
    second.cells[1].source = "from pathlib import Path\nPath(out_dir, 'other.csv').write_text(f'k,{k}\\n')"
    nbformat.write(second, folder / "02_other.ipynb")
    kw = {"figures_dir": tmp_path / "figures", "runs_dir": tmp_path / "runs", "notebooks_dir": folder, "progress": False}
    log = []
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 3}, log=log.append, **kw) == 0
    first = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 4}, only="02", log=log.append, **kw) == 0
    assert "01_write: made under other settings" in "\n".join(log)
    prov = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    old, new = prov["notebooks"]["01_write"], prov["notebooks"]["02_other"]
    assert old == first["notebooks"]["01_write"]                           # kept as it was written
    assert prov["settings"][old["settings"]]["k"] == 3 and prov["settings"][new["settings"]]["k"] == 4
    assert prov["profile_values"]["k"] == 4 and old["settings"] != new["settings"]
    log.clear()
    assert runner.run_notebooks("demo", overrides={"name": "t", "k": 4}, resume=True, log=log.append, **kw) == 0
    assert "01_write: run again (the profile's settings changed)" in "\n".join(log)
    assert "02_other: current" in "\n".join(log)


def test_kernel_sockets_stay_out_of_the_working_directory(tmp_path, monkeypatch):
    """The kernels' IPC sockets live in a private temporary folder that is removed after the run: a
    killed run must not leave kernel-ipc-N files in the user's working directory."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'demo'\nout_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json\nfrom pathlib import Path\nfrom ipykernel.connect import get_connection_info\n"
        "Path(out_dir, 'connection.json').write_text(json.dumps(get_connection_info(unpack=True), default=str))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_connection.ipynb")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert runner.run_notebooks("demo", overrides={"name": "t"}, figures_dir=tmp_path / "figures",
                                runs_dir=tmp_path / "runs", notebooks_dir=folder, progress=False, log=print) == 0
    info = json.loads((tmp_path / "figures" / "connection.json").read_text())
    if os.name == "posix":
        sockets = Path(info["ip"])
        assert info["transport"] == "ipc" and sockets.is_absolute() and cwd not in sockets.parents
        assert not sockets.parent.exists()  # removed with the run
    assert list(cwd.iterdir()) == []


def test_provenance_is_written_atomically_and_names_the_commit_without_git(tmp_path, monkeypatch):
    path = tmp_path / "provenance.json"
    provenance.write(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["provenance.json"]
    assert path.stat().st_mode & 0o044  # readable by others, as any file the runner writes
    with pytest.raises(TypeError):
        provenance.write(path, {"a": object()})  # a failed write leaves the old file and no temporary
    assert json.loads(path.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1
    notes = []
    monkeypatch.delenv("CLASSFILTERS_COMMIT", raising=False)
    assert provenance.git_commit(tmp_path, notes.append) == ("unknown", None) and "unknown" in notes[0]
    (tmp_path / "COMMIT").write_text("abc123\n")
    assert provenance.git_commit(tmp_path, notes.append) == ("abc123", None)
    monkeypatch.setenv("CLASSFILTERS_COMMIT", "def456")
    assert provenance.git_commit(tmp_path, notes.append) == ("def456", None)
    commit, dirty = provenance.git_commit(REPO)
    assert len(commit) == 40 and dirty in (True, False)


# ------------------------------------------------------------------------------------------ commands


def test_makefile_and_readme_name_the_same_commands():
    """`make demo` / `make test` and the README's plain commands for machines without make are the same calls."""
    make = (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    install = re.search(r"^install:\n\t\$\(PYTHON\) (.+)$", make, re.MULTILINE).group(1)
    demo = re.search(r"^demo: install\n\t\$\(PYTHON\) (.+)$", make, re.MULTILINE).group(1).replace("$(PROFILE)", "demo")
    test = re.search(r"^test: install\n\t\$\(PYTHON\) (.+)$", make, re.MULTILINE).group(1)
    for command in (install.replace(" -q", ""), demo, test):
        assert f"python {command}" in readme, f"README lacks the plain command `python {command}`"
    assert install.replace(" -q", "") == '-m pip install -e ".[dev]"'


def test_data_folder_is_documented_and_its_manifest_is_well_formed():
    assert (REPO / "data" / "README.md").is_file()
    manifest = json.loads((REPO / "data" / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and entry["path"] and entry["bytes"] > 0
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/cifar10/x.bin"], cwd=REPO, check=False).returncode == 0
    kept = subprocess.run(["git", "check-ignore", "-q", "data/README.md"], cwd=REPO, check=False).returncode != 0
    assert ignored and kept


def test_depth_seeds_and_the_accuracy_floor_are_checked():
    from classfilters.profile import load_profile
    with pytest.raises(ValueError, match="distinct seeds"):
        load_profile("demo", {"depth_seeds": [0, 0, 1]})
    with pytest.raises(ValueError, match="fraction of the full head"):
        load_profile("demo", {"explain_accuracy_floor": 90})
    with pytest.raises(ValueError, match="csg_budget"):
        load_profile("demo", {"csg_budget": 20})
    assert load_profile("demo", {"depth_seeds": [3, 1]}).depth_seeds == [3, 1]


def test_fix_model_takes_one_architecture_or_a_list_of_distinct_ones():
    from classfilters.profile import load_profile
    assert load_profile("demo").fix_architectures() == ["resnet8"]
    assert load_profile("demo", {"fix_model": ["resnet8", "resnet11_bottleneck"]}).fix_architectures() == [
        "resnet8", "resnet11_bottleneck"]
    assert load_profile("cifar10-shared", {"fix_model": None}).fix_architectures() == ["resnet20"]  # resnet20@shared
    for bad in ([], ["resnet8", "resnet8"]):
        with pytest.raises(ValueError, match="fix_model must be one architecture or a list of distinct ones"):
            load_profile("demo", {"fix_model": bad})
    with pytest.raises(ValueError, match="setting 'fix_model' .* must be"):
        load_profile("demo", {"fix_model": 8})
