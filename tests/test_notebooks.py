"""The paper notebooks run end to end under papermill on the smallest settings, and their tables say what the paper says.

One run of all ten notebooks on a test-sized demo profile (digits, two small ResNets,
few epochs), one of all seven with the ImageNet profile on a tiny fake image folder and
random weights, the runner's stop / resume behaviour, and a check that the committed notebooks
carry no outputs and a `parameters` cell. About two minutes on two CPU cores.
"""
import json
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
import torch

from classfilters import evaluate, extract_features, influential_features, open_dataset, provenance, runner

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TINY = {"name": "tiny", "dataset": "digits", "model": "resnet8", "models": ["resnet8", "resnet14"],
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "flip": False},
        "grid_k": [1, 2, 4, 8, 16, 32, 64], "depth_k": 5, "k": 5, "k_prime": 5,
        "finetune_epochs": 2, "finetune_lr": 0.001, "vis_images": 3, "csg_epochs": 2,
        "explain_methods": ["lrp_epsilon_plus", "gradient_x_input"], "explain_images": 2, "explain_mosaics": 2,
        "explain_max_tiles": 4, "explain_check_families": ["resnet18"], "explain_search_budget": 2,
        "explain_search_space": {"low": [0.0, 0.25], "high": [0.0, 0.25]}, "explain_search_k": [2, 5],
        "explain_search_k_prime": [2], "explain_floor": -1.0, "depth_seeds": [0, 1, 2]}


def execute(tmp_path, profile, overrides, only=None):
    log = []
    status = runner.run_notebooks(profile, only=only, overrides=overrides, figures_dir=tmp_path / "figures",
                                  runs_dir=tmp_path / "runs", log=log.append)
    assert status == 0, "\n".join(log)
    return tmp_path / "figures"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, digits_model):
    """The demo notebooks on TINY, plus `resnet8@saved`: a saved ResNet-8 beside the one trained here."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.save(digits_model.body.model.state_dict(), folder / "resnet8.pt")
    overrides = {**TINY, "models": [*TINY["models"], "resnet8@saved"],
                 "checkpoints": {"resnet8@saved": str(folder / "resnet8.pt")}}
    return execute(folder, "demo", overrides)


def table(folder, name):
    assert (folder / f"{name}.md").is_file(), f"{name}.md missing"
    return pd.read_csv(folder / f"{name}.csv")


def test_committed_notebooks_are_clean():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08", "09", "10"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell not tagged parameters"
        assigned = [line.split("=")[0].strip() for line in code[0].source.splitlines() if "=" in line]
        assert list(papermill.inspect_notebook(str(path))) == assigned, f"{path.name}: papermill cannot read them all"
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs: strip them"


def test_every_output_and_provenance(tiny):
    for name in ("fig2_histogram", "fig2_histograms_all_classes", "overlap_matrix", "fig3_heatmap", "fig4_depth_study",
                 "fig4_seeds",
                 "retrain_accuracy", "table7_maps", "table8_ablation", "csg_gates_and_mi", "explanation_heatmaps",
                 "explanation_search", "explanation_search_best_worst"):
        picture = plt.imread(tiny / f"{name}.png")  # a real picture: drawn, not blank
        assert picture.ndim == 3 and len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)) > 8, name
        assert (tiny / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
    prov = json.loads((tiny / "provenance.json").read_text())
    assert [n for n, e in prov["notebooks"].items() if e["status"] == "ok"] == [p.stem for p in NOTEBOOKS]
    assert all(e["seconds"] > 0 for e in prov["notebooks"].values())
    assert prov["libraries"]["torch"] == torch.__version__ and prov["device"] == provenance.device_name()
    assert all(e["device"] == prov["device"] for e in prov["notebooks"].values())  # each notebook's own machine
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout
    assert prov["git_commit"] == (head.strip() or "unknown")  # this checkout's commit, never a made-up string
    assert prov["profile_values"]["model"] == "resnet8" and len(prov["source_hash"]) == 64


def test_executed_notebooks_embed_their_figures_once(tiny):
    """The runner's copies in runs/ are documents: every plot cell carries a PNG, none the Agg text
    `<Figure size ...>`, and no figure saved at the end of a cell appears twice."""
    for path in NOTEBOOKS:
        nb = nbformat.read(tiny.parent / "runs" / path.name, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not any("<Figure size" in str(o.get("data", {}).get("text/plain", "")) and "image/png" not in o.data
                       for o in outputs if "data" in o), path.name  # a figure only as text: no image
        for cell in nb.cells:
            if cell.cell_type == "code" and "S.save_figure(" in cell.source:
                pngs = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
                saved = cell.source.count("S.save_figure(")  # per step when inside a loop
                shown_once = len(set(pngs)) == len(pngs) and (len(pngs) == saved or "for " in cell.source)
                assert len(pngs) >= saved and shown_once, f"{path.name}: {len(pngs)} images for {saved} saved figures"
    injected = next(c for c in nbformat.read(tiny.parent / "runs" / "01_influence.ipynb", as_version=4).cells
                    if "injected-parameters" in c.metadata.get("tags", []))
    assert "fig2_class = 0" in injected.source and "k = 5" in injected.source  # only the notebook's knobs
    assert "overrides" not in injected.source and "grid_k" not in injected.source
    injected = next(c for c in nbformat.read(tiny.parent / "runs" / "03_depth_study.ipynb", as_version=4).cells
                    if "injected-parameters" in c.metadata.get("tags", []))
    assert "depth_k = 5" in injected.source and "grid_k = [1, 2, 4, 8, 16, 32, 64]" in injected.source


def test_influence_tables(tiny):
    hist = table(tiny, "fig2_histogram")
    assert len(hist) == 64 and hist["count"].sum() == 5 * (hist["count"].sum() // 5)
    assert hist[hist.selected]["count"].min() >= hist[~hist.selected]["count"].max()  # I_c = most frequent
    sets = table(tiny, "table_index_sets")
    assert len(sets) == 10 and (sets["size"] == 5).all() and sets.mass_covered.between(0, 1).all()
    jaccard = pd.read_csv(tiny / "overlap_jaccard.csv", index_col=0).to_numpy()
    assert np.allclose(np.diag(jaccard), 1) and np.allclose(jaccard, jaccard.T) and (jaccard >= 0).all()
    mi = pd.read_csv(tiny / "overlap_mutual_information.csv", index_col=0).to_numpy()
    summary = table(tiny, "overlap_summary")
    assert summary.mutual_information_paper[0] == pytest.approx(mi.mean())  # all C^2 pairs, the paper's
    assert summary.mutual_information_distinct_pairs[0] == pytest.approx(mi[~np.eye(10, dtype=bool)].mean())


def test_k_sweep_relations(tiny):
    grid = table(tiny, "fig3_grid")
    assert len(grid) == 7 * 7 and grid.acc_decomposed.between(0, 1).all()
    diagonal = grid[grid.k == grid.k_prime].sort_values("k")
    assert diagonal.relative.iloc[-1] == pytest.approx(1.0)            # k' = D: the full head
    assert diagonal.relative.iloc[-1] > diagonal.relative.iloc[0]      # relative accuracy rises with k' on the diagonal
    assert np.corrcoef(np.log(diagonal.k), diagonal.relative)[0, 1] > 0.7
    assert (grid.multiply_adds == grid.k_prime * 10).all()
    assert len(table(tiny, "fig3_best_k_per_k_prime")) == 7


def test_depth_study_table(tiny, digits_model):
    depth = table(tiny, "table2-6_depth_study")
    assert list(depth.model) == ["resnet8", "resnet14", "resnet8@saved"]
    assert list(depth.family) == ["ResNet (CIFAR)", "ResNet (CIFAR)", "ResNet (CIFAR), saved"]
    assert (depth.D == 64).all() and (depth.C == 10).all()
    assert len(table(tiny, "table_depth_resnet_cifar")) == 2 and len(table(tiny, "table_depth_resnet_cifar_saved")) == 1
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")  # resnet8@saved is the saved model
    influence = influential_features(extract_features(digits_model, train, progress=False), train.labels, 5, 5)
    saved = evaluate(digits_model.head, influence, extract_features(digits_model, test, progress=False), test.labels)
    assert depth.acc_full[2] == pytest.approx(saved["acc_full"]) and depth.acc_decomposed[2] == pytest.approx(saved["acc_decomposed"])
    assert np.allclose(depth["k'/D"], 5 / 64) and np.allclose(depth["k'/C"], 0.5)
    assert np.allclose(depth.relative, depth.acc_decomposed / depth.acc_full)
    for name in ("acc_full", "acc_decomposed", "relative"):  # paired-bootstrap intervals hold their estimate
        assert (depth[f"{name}_lo"] <= depth[name]).all() and (depth[name] <= depth[f"{name}_hi"]).all(), name
        assert (depth[f"{name}_hi"] - depth[f"{name}_lo"] > 0).all(), name
    assert (depth.acc_full > 0.5).all() and depth.relative.between(0.3, 1.2).all()
    curves = table(tiny, "fig4_relative_vs_k")
    assert set(curves.model) == {"resnet8", "resnet14", "resnet8@saved"} and (curves.k == curves.k_prime).all()
    assert (curves.relative_lo <= curves.relative).all() and (curves.relative <= curves.relative_hi).all()


def test_depth_study_over_training_seeds(tiny):
    """Every model trained here, once per seed (the saved checkpoint has none); each row recomputed from a
    model trained independently with that seed."""
    from classfilters import Recipe, trained_model
    seeds = table(tiny, "fig4_seeds")
    assert list(seeds.model.unique()) == ["resnet8", "resnet14"] and set(seeds.seed) == {0, 1, 2}
    assert all(ks == [1, 2, 4, 8, 16, 32, 64] for ks in seeds.groupby(["model", "seed"]).k.apply(list))
    curves = table(tiny, "fig4_relative_vs_k")
    seed0 = seeds[seeds.seed == 0].merge(curves, on=["model", "k"], suffixes=("", "_study"))
    assert len(seed0) == 2 * 7 and np.allclose(seed0.relative, seed0.relative_study)          # seed 0 is the study's own model
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    model = trained_model("resnet14", train, Recipe(**TINY["train"]), seed=2, progress=False)
    phi_train, phi_test = (extract_features(model, s, progress=False) for s in (train, test))
    for k in (1, 8):
        expected = evaluate(model.head, influential_features(phi_train, train.labels, k, k), phi_test, test.labels)
        row = seeds[(seeds.model == "resnet14") & (seeds.seed == 2) & (seeds.k == k)].iloc[0]
        assert row.relative == pytest.approx(expected["relative"]) and row.acc_full == pytest.approx(expected["acc_full"])
    assert seeds.groupby(["model", "k"]).acc_full.nunique().max() > 1    # other seeds, other models
    summary = table(tiny, "fig4_seeds_summary")
    assert len(summary) == 2 * 7 and (summary.n_seeds == 3).all()
    r14 = seeds[(seeds.model == "resnet14") & (seeds.k == 8)].relative
    row = summary[(summary.model == "resnet14") & (summary.k == 8)].iloc[0]
    assert row.relative_mean == pytest.approx(r14.mean()) and row.relative_std == pytest.approx(r14.std(ddof=1))
    assert row.relative_min == pytest.approx(r14.min()) and row.relative_max == pytest.approx(r14.max())


def test_retrain_tables(tiny):
    history = table(tiny, "retrain_history")
    assert list(history.epoch) == [0, 1, 2] and history.test_acc.between(0, 1).all()
    assert history.test_acc.iloc[-1] >= history.test_acc.iloc[0] - 0.02   # fine-tuning does not hurt
    cost = table(tiny, "retrain_cost")
    assert list(cost.multiply_adds) == [640, 50]
    network = table(tiny, "retrain_network")
    assert list(network.retrained) == ["nothing (full head)", "nothing (masked weights)", "head only (cached features)",
                                       "whole network", "whole network", "whole network (control)"]
    assert list(network["head"]) == ["full", "decomposed", "decomposed", "decomposed", "decomposed", "full"]
    assert list(network.authors) == [False, False, False, True, False, True]
    assert list(network.lr[3:]) == pytest.approx([TINY["finetune_lr"], 0.01, TINY["finetune_lr"]])
    assert network.test_acc[1] == pytest.approx(history.test_acc.iloc[0])
    assert network.test_acc[2] == pytest.approx(history.test_acc.iloc[-1])
    assert network.test_acc[3] > network.test_acc[1] and network.test_acc[4] > network.test_acc[1]  # recovery
    assert len(set(network.test_acc[3:])) == 3                              # three different trainings
    assert np.allclose(network.relative, network.test_acc / network.test_acc[0])
    assert len(table(tiny, "decomposed_softmax")) == 5


def test_visualization_table(tiny):
    maps = table(tiny, "table7_maps")
    assert len(maps) == 3 and list(maps["class"]) == [0, 1, 2]
    assert (maps.mean_influential > maps.mean_non_influential).mean() >= 2 / 3  # influential channels fire harder


def test_ablation_table(tiny):
    summary = table(tiny, "table8_ablation").set_index(["noise", "head", "replaced"])
    mean = summary["mean"]
    for noise, head in [("standard_normal", "full"), ("matched", "decomposed")]:
        influential = mean[noise, head, "influential"]
        assert influential < mean[noise, head, "non_influential_matched_size"], (noise, head)  # influential noise hurts more
        assert mean[noise, head, "non_influential_matched_size"] <= mean["none", head, "nothing"] + 0.02, (noise, head)
    noisy = summary.drop(index="none", level="noise")
    assert (noisy.draws == 10).all() and (noisy["std"] >= 0).all()
    authors = summary[summary.authors_table8].reset_index()
    assert sorted(authors.replaced) == ["influential", "non_influential_all", "nothing"]
    assert (authors["head"] == "full").all() and set(authors.noise) == {"none", "standard_normal"}
    long = table(tiny, "table8_ablation_long")
    assert len(long) == 2 + 10 * 3 * 3 and set(long.draw) == set(range(10))


def test_csg_tables(tiny):
    t1 = table(tiny, "table1_csg")
    assert len(t1) == 3 and t1.accuracy.between(0.3, 1).all()
    assert list(t1.csg_start) == ["n/a (no CSG)", "from resnet8", "from resnet8"]  # TINY: csg_from model
    assert t1.l1_density[1:].between(0, 1).all() and t1.nonzero_fraction[1:].between(0, 1).all()
    assert t1.l1_density[1] == t1.l1_density[2] and t1.l1_density[1] < 0.5  # the gates shrink from their 0.5 start
    assert t1.l1_budget[0] != t1.l1_budget[0] and (t1.l1_budget[1:] == 0.2).all()  # NaN without CSG; the official 0.2
    mi = table(tiny, "csg_mutual_information")
    assert list(mi.method) == ["ours (Algorithm 1)", "CSG lowest gates (authors' code)", "CSG highest gates (sound)"]
    assert (mi.mutual_information_distinct_pairs >= 0).all() and mi.jaccard_distinct_pairs.between(0, 1).all()
    assert (mi.mutual_information_paper > mi.mutual_information_distinct_pairs).all()  # self-pairs add entropy


def test_fixed_filter_tables(tiny):
    inits = table(tiny, "explainfix_initialisations").set_index("init")
    assert list(inits.index) == ["learned", "DCT2"] and (inits.params == inits.params["learned"]).all()
    assert inits.trainable_params["learned"] == inits.params["learned"]             # nothing fixed
    assert inits.trainable_params["DCT2"] < 0.1 * inits.trainable_params["learned"]  # only BN and the head learn
    assert inits.acc["learned"] > 0.5 and inits.acc["DCT2"] > 0.15 and (inits.seconds_per_epoch > 0).all()
    models = ["resnet8 (profile)", "resnet8 learned", "resnet8 DCT2"]
    low = table(tiny, "explainsteer_low_frequency")
    assert list(low.model.unique()) == models and low.low_share.between(0, 1).all()
    assert np.allclose(low.null_mean, 1 / 3, atol=0.03) and (low.null_lo <= low.null_hi).all()
    spectra = table(tiny, "explainsteer_spectra")
    ed = spectra[spectra.spectrum == "ed"]
    assert (ed.energy >= 0).all() and (ed.groupby(["model", "layer"]).size() == 9).all()
    assert list(spectra.model.unique()) == models and spectra.weighted.all()
    at_k = table(tiny, "explainfix_relative_at_k").set_index("model")
    assert list(at_k.index) == models and at_k.relative.between(0.2, 1.2).all()
    assert at_k.acc_full["resnet8 DCT2"] == pytest.approx(inits.acc["DCT2"])  # the same model in both tables
    diagonal = table(tiny, "explainfix_relative_diagonal")
    assert set(diagonal.model) == set(models)
    assert np.allclose(diagonal[diagonal.k == 64].relative, 1.0)                  # k' = D: the full head
    noise = table(tiny, "explainfix_table8")
    authors = noise[(noise.noise == "standard_normal") & noise.authors_table8].set_index(["model", "replaced"])["mean"]
    assert authors["resnet8 learned", "influential"] < authors["resnet8 learned", "non_influential_all"] + 0.1


def test_pruning_tables(tiny):
    sweep = table(tiny, "prune_sweep")
    names = ["unpruned, fine-tuned", "pruned 50%", "pruned 90%", "pruned 99%"]
    assert list(sweep.model) == ["unpruned", *names] and list(sweep.pct) == [0, 0, 50, 90, 99]
    for column in ("macs", "params", "kernels"):
        assert sweep[column].is_monotonic_decreasing and sweep[column].iloc[-1] < 0.2 * sweep[column].iloc[0], column
        assert sweep[column][0] == sweep[column][1], column                      # the control is the whole model
    pruned = sweep[sweep.pct > 0]
    assert (pruned.acc >= pruned.acc_before_finetune - 0.02).all()               # fine-tuning recovers
    assert sweep.acc[0] > 0.5 and sweep.acc[2] > 0.5 and (sweep.latency_ms > 0).all()
    assert sweep.acc_before_finetune[1] == sweep.acc[0] and sweep.finetune_seconds_per_epoch[1:].gt(0).all()
    at_k = table(tiny, "prune_relative_at_k")
    assert list(at_k.model) == ["resnet8", *names]
    assert np.allclose(at_k.acc_full, sweep.acc) and np.allclose(at_k.relative, sweep.relative)
    assert len(table(tiny, "prune_table8")) == 5 * 11
    subset = table(tiny, "class_subset").iloc[0]
    assert subset.classes == "3+8" and subset.params_small < subset.params_full and subset.macs_small < subset.macs_full
    assert subset.acc_full > 0.8 and 0 <= subset.acc_finetuned <= 1
    export = table(tiny, "class_subset_export").iloc[0]
    assert export.equal and export.same_decisions and export.max_abs_diff < 1e-4 and export.bytes_pt2 > 0


def test_explanation_tables(tiny):
    check = table(tiny, "canonization_check").set_index("model")
    assert list(check.index) == ["resnet8", "resnet18 (random)"]
    assert list(check.family) == ["cifar_resnet", "resnet"] and (check.bn_folded > 0).all()
    assert (check.max_rel_dz <= 1e-5).all() and check.restored_exactly.all()        # the same function, undone exactly
    assert check.loc["resnet18 (random)", "zennit_0.5.1_dz"] > check.loc["resnet18 (random)", "max_abs_dz"]  # eps kept
    pointing = table(tiny, "grid_pointing")
    assert set(pointing.start) == {"full", "influential", "non_influential"} and set(pointing.canonized) == {True, False}
    assert set(pointing.method) == {"lrp_epsilon_plus", "gradient_x_input"} and len(pointing) == 2 * 3 * 2
    assert (pointing.rows == 2 * 4).all()                                                # every tile of 2 mosaics
    assert ((0 <= pointing.grid_pointing_lo) & (pointing.grid_pointing_lo <= pointing.grid_pointing)
            & (pointing.grid_pointing <= pointing.grid_pointing_hi) & (pointing.grid_pointing_hi <= 1)).all()
    tiles = table(tiny, "grid_pointing_tiles")
    assert len(tiles) == 8 * 2 * 3 * 2 and tiles.grid_pointing.dropna().between(0, 1).all()
    full = tiles[(tiles.start == "full") & (tiles.method == "lrp_epsilon_plus") & tiles.canonized]
    assert pointing.set_index(["method", "start", "canonized"]).loc[("lrp_epsilon_plus", "full", True), "grid_pointing"] \
        == pytest.approx(full.grid_pointing.mean())
    scored = tiles.groupby(["method", "start", "canonized"]).grid_pointing.count()     # n: the tiles scored
    assert (pointing.set_index(["method", "start", "canonized"]).n == scored.reindex(
        pointing.set_index(["method", "start", "canonized"]).index)).all()
    metrics = table(tiny, "explanation_metrics")
    assert len(metrics) == 2 * 2 and set(metrics.canonized) == {True, False} and (metrics.rows == 4).all()
    assert (metrics.n <= metrics.rows).all()
    for name in ("pixel_flipping_aopc", "faithfulness_correlation", "relevance_mass", "grid_pointing", "sparseness",
                 "random_logit", "avg_sensitivity"):
        ok = metrics[name].notna()
        assert ok.any(), name
        assert ((metrics[f"{name}_lo"] <= metrics[name] + 1e-12) & (metrics[name] <= metrics[f"{name}_hi"] + 1e-12))[ok].all()
    for name in ("relevance_mass", "grid_pointing", "sparseness"):
        assert metrics[name].dropna().between(0, 1).all(), name
    gammas = table(tiny, "explanation_search_gamma")
    assert len(gammas) == 2 and {"low", "high", "canonize", "grid_pointing", "faithfulness_correlation",
                                 "feasible"} <= set(gammas.columns)
    assert gammas.feasible.all() and gammas.grid_pointing.is_monotonic_decreasing   # floor -1: best first
    ks = table(tiny, "explanation_search_k")
    assert sorted(ks.k) == [2, 5] and (ks.k_prime == 2).all() and ks.grid_pointing.between(0, 1).all()
    assert {"acc_decomposed", "relative", "best"} <= set(ks.columns) and ks.relative.between(0, 1.2).all()
    assert (ks.best.str.contains("accuracy")).sum() == 1 and ks.relative[ks.best.str.contains("accuracy")].iloc[0] == ks.relative.max()


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """Two classes x two generated JPEGs in train/ and val/ (64x64, resized to 256 and cropped to 224)."""
    from torchvision.io import write_jpeg
    root = tmp_path_factory.mktemp("imagenet")
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                write_jpeg(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=gen),
                           str(root / split / cls / f"{i}.JPEG"))
    return root


def test_imagenet_profile_with_random_weights(tmp_path, fake_imagenet):
    overrides = {"dataset": f"imagefolder:{fake_imagenet}", "weights": "random", "model": "resnet18",
                 "models": ["resnet18"], "k": 5, "k_prime": 5, "depth_k": 5, "grid_k": [1, 5, 20],
                 "max_train": None, "batch_size": 4, "vis_images": 2, "finetune_epochs": 1, "explain_images": 1,
                 "explain_methods": ["gradient_x_input"]}
    out = execute(tmp_path, "imagenet", overrides)  # every notebook, streamed 224 px images
    grid = table(out, "fig3_grid")
    assert len(grid) == 9 and grid.acc_decomposed.between(0, 1).all()
    depth = table(out, "table2-6_depth_study")
    assert list(depth.model) == ["resnet18"] and depth.D[0] == 512 and depth.C[0] == 2
    assert depth.family[0] == "ResNet (ImageNet)"
    assert len(table(out, "table_index_sets")) == 2
    assert len(table(out, "table7_maps")) == 2 and len(table(out, "table1_csg")) == 3
    executed = (out.parent / "runs" / "09_pruning.ipynb").read_text()
    assert "skipped: " in executed and "in-memory split" in executed  # ExplainFix says why it does not run
    assert not (out / "prune_sweep.csv").exists() and not (out / "explainfix_initialisations.csv").exists()


    check = table(out, "canonization_check")  # 2 classes: no 2x2 mosaics, so the pointing game etc. say so and skip
    assert list(check.model) == ["resnet18"] and check.restored_exactly.all() and (check.max_rel_dz <= 1e-5).all()
    assert (out / "explanation_heatmaps.png").is_file() and not (out / "explanation_search.png").exists()


def test_cifar10_profile_on_the_shared_data(tmp_path, shared_data, monkeypatch):
    """The GPU reproduction's profile as written, cut down to 500 / 300 JPEG images, one epoch and
    two of its models: one trained here, one shared checkpoint evaluated as it is."""
    monkeypatch.setenv("CLASSFILTERS_SHARED_DATA", str(shared_data.resolve()))
    overrides = {"max_train": 500, "max_test": 300, "models": ["resnet20", "resnet20@shared"],
                 "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "flip": True}, "csg_epochs": 1,
                 "grid_k": [1, 5, 16, 64], "vis_images": 2, "batch_size": 256,
                 "fix_inits": ["learned", "DCT2"], "fix_epochs": 1, "explain_mosaics": 2, "explain_max_tiles": 4,
                 "explain_check_families": [], "explain_search_budget": 2, "explain_search_k": [5],
                 "explain_search_k_prime": [5]}
    out = execute(tmp_path, "cifar10", overrides)
    depth = table(out, "table2-6_depth_study").set_index("model")
    assert list(depth.index) == ["resnet20", "resnet20@shared"]
    assert list(depth.family) == ["ResNet (CIFAR)", "ResNet (CIFAR), shared"]
    assert 0.72 <= depth.acc_full["resnet20@shared"] <= 0.90  # 81 % on the whole JPEG test split
    assert (depth.D == 64).all() and (depth.C == 10).all()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["profile"] == "cifar10" and all(n["status"] == "ok" for n in provenance["notebooks"].values())


def test_runner_stops_at_the_failing_notebook_and_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for name, source in (("01_ok", "print('fine')"), ("02_broken", "raise ValueError('planted failure')"),
                         ("03_never", "print('unreachable')")):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("profile = 'demo'\nout_dir = None")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(source)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    kw = {"figures_dir": tmp_path / "figures", "runs_dir": tmp_path / "runs", "notebooks_dir": folder}
    log = []
    assert runner.run_notebooks("demo", overrides={"name": "t"}, log=log.append, **kw) == 1
    assert any("02_broken FAILED: ValueError: planted failure" in line for line in log)
    prov = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    assert prov["notebooks"]["01_ok"]["status"] == "ok" and prov["notebooks"]["02_broken"]["status"] == "failed"
    assert "03_never" not in prov["notebooks"] and (tmp_path / "runs" / "02_broken.ipynb").is_file()
    log.clear()
    assert runner.run_notebooks("demo", overrides={"name": "t"}, resume=True, log=log.append, **kw) == 1
    assert any("01_ok: current" in line for line in log)


def test_runner_picks_notebooks_and_parses_overrides():
    assert runner.pick(NOTEBOOKS, "4").stem == "04_decomposition_retrain"
    assert runner.pick(NOTEBOOKS, "csg").stem == "07_csg"
    with pytest.raises(SystemExit):
        runner.pick(NOTEBOOKS, "nothing")
    assert runner.parse_set(["k=10", "train.epochs=2", "models=[resnet8]"]) == \
        {"k": 10, "train": {"epochs": 2}, "models": ["resnet8"]}


def test_a_misspelt_setting_is_named_not_ignored(tmp_path):
    from classfilters.profile import load_profile
    with pytest.raises(ValueError, match=r"unknown setting 'kprime' in the overrides \(did you mean 'k_prime'\?\)"):
        load_profile("demo", {"kprime": 10})
    with pytest.raises(ValueError, match=r"'train.epoch' .* \(did you mean 'train.epochs'\?\)"):
        load_profile("demo", {"train": {"epoch": 2}})
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: demo\nmax_trian: 100\n")
    with pytest.raises(ValueError, match=r"unknown setting 'max_trian' in .*mine.yaml \(did you mean 'max_train'"):
        load_profile(mine)
    with pytest.raises(SystemExit, match="did you mean 'k_prime'"):
        runner.main(["--set", "kprime=10"])


def test_tagged_model_needs_a_checkpoint(tmp_path):
    from classfilters.session import open_study
    S = open_study("demo", tmp_path, {"name": "t"})
    with pytest.raises(ValueError, match="has a tag but no entry under `checkpoints`"):
        S.build("resnet8@elsewhere")


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "profiles").glob("*.yaml")))
def test_every_profile_loads(profile):
    from classfilters.profile import load_profile
    p = load_profile(profile)
    assert p.name == profile and p.model in p.models
    for name in p.models:
        assert "@" not in name or name in p.checkpoints, f"{profile}: {name} has no checkpoint"


def test_models_see_an_image_folder_at_their_own_size(tmp_path, fake_imagenet):
    """A model whose weights expect other (resize, crop) gets its own decode pass at that size;
    models at the same size share one."""
    from classfilters import build_model, extract_features, open_dataset
    from classfilters.session import open_study
    S = open_study("imagenet", tmp_path, {"name": "t", "dataset": f"imagefolder:{fake_imagenet}", "weights": "random",
                                          "batch_size": 4})
    torch.manual_seed(0)
    small, default, other = (build_model("resnet18", num_classes=2).eval() for _ in range(3))
    small.input_size, other.input_size = (40, 32), (256, 224, "bilinear")  # other: the default, said in full
    S._add({"small": small, "default": default, "other": other})
    runs = S._subjects
    assert runs["small"].train.dataset.crop == 32 and runs["default"].train.dataset.crop == 224
    assert runs["default"].train is runs["other"].train  # one split, one pass for both
    direct = extract_features(small, open_dataset(f"imagefolder:{fake_imagenet}", "train", (40, 32)), use_cache=False,
                              progress=False)
    assert torch.allclose(runs["small"].train_features, direct, atol=1e-5)


def test_session_subsets_copies_heads_and_uses_models_own_normalisation(tmp_path, fake_imagenet):
    """`max_train` keeps an image folder a folder (batched decoding); a subject's head is a copy (the
    model's own stays as it is); a model with its own mean/std gets its split standardised so."""
    import dataclasses

    from classfilters import build_model, extract_features
    from classfilters.data import FolderImages
    from classfilters.session import open_study
    S = open_study("imagenet", tmp_path, {"name": "t", "dataset": f"imagefolder:{fake_imagenet}", "weights": "random",
                                          "batch_size": 4, "max_train": 3, "max_test": None})
    torch.manual_seed(0)
    plain, own = (build_model("resnet18", num_classes=2).eval() for _ in range(2))
    own.mean, own.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain.head.to(torch.float64)
    S._add({"plain": plain, "own": own})
    subjects = S._subjects
    train = subjects["plain"].train
    assert len(train) == 3 and isinstance(train.dataset, FolderImages) and len(subjects["plain"].test) == 4
    assert subjects["own"].train.mean == own.mean and subjects["own"].train.std == own.std
    assert subjects["plain"].train.mean != own.mean
    direct = extract_features(own, dataclasses.replace(train, mean=own.mean, std=own.std), use_cache=False,
                              progress=False)
    assert torch.allclose(subjects["own"].train_features, direct, atol=1e-5)
    head = subjects["plain"].head
    assert head.weight.dtype == torch.float32 and plain.head.weight.dtype == torch.float64  # not converted in place
    assert head is not plain.head
