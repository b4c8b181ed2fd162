"""The tables of each section of the paper, as pandas frames, from a study's subjects.

Fig 2 and the overlap (§4): `index_table`, `overlap_frames`, `overlap_summary`; Fig 3 (§5.1):
`grid_table`; Tables 2-6 and Fig 4 (§5.2) on the profile's dataset (the paper's are ImageNet): `depth_table`,
`depth_curves`, grouped by `family`, with paired-bootstrap intervals over the test images;
§5.2.3: `retrain` (the head), `retrain_network` (head and whole network), `softmax_table`; Table 7: `visual_table`; Table 8: `ablation_tables`;
Table 1 and the CSG comparison: `csg_tables`. Each returns frames the notebooks save and plot.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import asdict

import pandas as pd
import torch

from .decomposed import DecomposedHead, accuracy, evaluate, grid_accuracy, head_on, relative_accuracy
from .features import extract_features
from .influence import InfluentialFeatures
from .models import model_family
from .overlap import jaccard_matrix, mean_over_all_class_pairs, mean_pairwise, mutual_information_matrix
from .recipe import Recipe
from .session import Study, Subject, architecture
from .sizes import grid_sizes
from .train import finetune_head, finetune_network, train_classifier
from .uncertainty import bootstrap_accuracy, correct_predictions, diagonal_intervals


def family(name: str) -> str:
    """The model family of a profile's model name, for grouping the depth study (`models.model_family` of
    its architecture), with any `@tag` kept: "resnet20@shared" -> "ResNet (CIFAR), shared"."""
    _, _, tag = name.partition("@")
    label = model_family(architecture(name))
    return f"{label}, {tag}" if tag else label


def slug(text: str) -> str:
    """A file-name part: "ResNet (CIFAR), shared" -> "resnet_cifar_shared". A name with other than ASCII
    characters also gets a short hash of itself ("ResNet 模型" -> "resnet_<hash>"), so that two names differing
    only there never share a file."""
    part = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if text.isascii():
        return part
    digest = hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=4).hexdigest()
    return f"{part or 'name'}_{digest}"


def index_table(influence: InfluentialFeatures, classes: list[str]) -> pd.DataFrame:
    """Per class: its index set I_c, its size and the share of the class histogram it covers."""
    h = influence.histograms.double()
    covered = (h * influence.mask).sum(1) / h.sum(1).clamp(min=1)
    return pd.DataFrame({"class": classes, "indices": [" ".join(map(str, i)) for i in influence.indices],
                         "size": [len(i) for i in influence.indices], "mass_covered": covered.tolist()})


def overlap_frames(mask: torch.Tensor, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Jaccard and mutual-information matrices of the classes' index sets, as labelled frames."""
    return (pd.DataFrame(jaccard_matrix(mask).numpy(), index=classes, columns=classes),
            pd.DataFrame(mutual_information_matrix(mask).numpy(), index=classes, columns=classes))


def overlap_summary(influence: InfluentialFeatures) -> pd.DataFrame:
    """Mean Jaccard and mutual information of the classes' index sets. The mutual information twice:
    `_paper`, the paper's averaging over all C^2 ordered class pairs, self-pairs included (comparable
    with its 0.0345), and `_distinct_pairs`, ours over the C (C - 1) pairs of different classes."""
    mask = influence.mask
    mi = mutual_information_matrix(mask)
    return pd.DataFrame([{"k": influence.k, "k_prime": influence.k_prime,
                          "mean_jaccard_distinct_pairs": mean_pairwise(jaccard_matrix(mask)),
                          "mutual_information_paper": mean_over_all_class_pairs(mi),
                          "mutual_information_distinct_pairs": mean_pairwise(mi)}])


def grid_table(subject: Subject, ks, k_primes) -> pd.DataFrame:
    """Fig 3: decomposed and relative test accuracy for every (k, k'), long format; axis values above D
    are dropped with a printed note."""
    d = subject.model.num_features
    ks, k_primes = grid_sizes(ks, d, "k"), grid_sizes(k_primes, d, "k'")
    acc = grid_accuracy(subject.train_features, subject.train.labels, subject.test_features, subject.test.labels,
                        subject.head, ks, k_primes)
    full = subject.full_accuracy
    rows = [{"k": k, "k_prime": kp, "acc_decomposed": float(acc[a, b]), "acc_full": full,
             "relative": relative_accuracy(float(acc[a, b]), full), "multiply_adds": kp * subject.model.num_classes}
            for a, k in enumerate(ks) for b, kp in enumerate(k_primes)]
    return pd.DataFrame(rows)


def depth_row(study: Study, subject: Subject, k: int, seed: int = 0) -> dict:
    """Tables 2-6 on the profile's dataset: one model's D, k'/C, k'/D and accuracies at k = k' (a k above D is
    an error), each accuracy with its 95 % paired-bootstrap interval over the test images (`_lo`, `_hi`:
    uncertainty.py; the relative accuracy's interval comes from the same resamples as its two accuracies)."""
    d, c, n = subject.model.num_features, subject.model.num_classes, len(subject.test)
    inf = study.influence(subject, k, k)
    result = evaluate(subject.head, inf, subject.test_features, subject.test.labels)
    boot = bootstrap_accuracy(*correct_predictions(subject.head, inf, subject.test_features, subject.test.labels),
                              seed=seed)
    intervals = {f"{name}{end}": boot[f"{name}{end}"] for name in ("acc_full", "acc_decomposed", "relative")
                 for end in ("_lo", "_hi")}
    return {"family": family(subject.name), "model": subject.name, "D": d, "C": c, "k": k, "k_prime": k,
            "k'/C": k / c, "k'/D": k / d, "acc_decomposed": result["acc_decomposed"], "acc_full": result["acc_full"],
            "relative": result["relative"], **intervals, "n_test": n,
            "multiply_adds_full": result["multiply_adds_full"],
            "multiply_adds_decomposed": result["multiply_adds_decomposed"]}


def depth_table(study: Study, k: int) -> pd.DataFrame:
    """Tables 2-6 on the profile's dataset (not the paper's ImageNet unless the profile is): every model of
    the profile at k = k', grouped by family, with bootstrap intervals."""
    return pd.DataFrame([depth_row(study, subject, k, study.profile.seed) for subject in study.load_all()])


def depth_curves(study: Study, ks) -> pd.DataFrame:
    """Fig 4 on the profile's dataset: full, decomposed and relative accuracy along k = k' for every model
    of the profile (values above a model's D dropped), with paired-bootstrap intervals (`_lo`, `_hi`)."""
    frames = []
    for subject in study.load_all():
        axis = grid_sizes(ks, subject.model.num_features, f"k of {subject.name}")
        rows = diagonal_intervals(subject.head, subject.train_features, subject.train.labels, subject.test_features,
                                  subject.test.labels, axis, seed=study.profile.seed)
        frames.append(pd.DataFrame(rows).assign(model=subject.name, family=family(subject.name)))
    return pd.concat(frames, ignore_index=True)


def seed_curves(study: Study, ks, seeds) -> pd.DataFrame:
    """Fig 4 over training seeds: every model the profile trains here, trained once per seed, its full,
    decomposed and relative test accuracy along k = k' (values above D dropped). Empty when the profile
    trains none (checkpoints, downloaded weights) or gives one seed."""
    names = [name for name in study.profile.models if study.trains(name)]
    if len(seeds) < 2 or not names:
        return pd.DataFrame(columns=["model", "family", "seed", "k", "acc_full", "acc_decomposed", "relative"])
    rows = []
    for name in names:
        for seed in seeds:
            subject = study.load_seeded(name, seed)
            for k in grid_sizes(ks, subject.model.num_features, f"k of {name}"):
                result = evaluate(subject.head, study.influence(subject, k, k), subject.test_features, subject.test.labels)
                rows.append({"model": name, "family": family(name), "seed": seed, "k": k,
                             **{c: result[c] for c in ("acc_full", "acc_decomposed", "relative")}})
    return pd.DataFrame(rows)


def seed_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1), min and max over the seeds of each model's accuracies at each k."""
    stats = [f"{name}_{stat}" for name in ("acc_full", "acc_decomposed", "relative") for stat in ("mean", "std", "min", "max")]
    if curves.empty:
        return pd.DataFrame(columns=["model", "family", "k", *stats, "n_seeds"])
    grouped = curves.groupby(["model", "family", "k"], sort=False)
    out = grouped[["acc_full", "acc_decomposed", "relative"]].agg(["mean", "std", "min", "max"])
    out.columns = [f"{name}_{stat}" for name, stat in out.columns]
    return out.reset_index().assign(n_seeds=grouped.seed.nunique().values)


def retrain(subject: Subject, influence: InfluentialFeatures, epochs: int, lr: float, seed: int = 0):
    """§5.2.3: fine-tune the decomposed head from the masked weights; (history, cost, head)."""
    head = DecomposedHead(subject.head, influence)
    history = finetune_head(head, subject.train_features, subject.train.labels, epochs=epochs, lr=lr, seed=seed,
                            eval_features=subject.test_features, eval_labels=subject.test.labels)
    history = pd.DataFrame(history).assign(acc_full=subject.full_accuracy)
    history.attrs["lr"] = lr
    history["relative"] = relative_accuracy(history["test_acc"], subject.full_accuracy)
    c, d = subject.model.num_classes, subject.model.num_features
    cost = pd.DataFrame([{"layer": "full", "multiply_adds": c * d, "fraction": 1.0},
                         {"layer": "decomposed", "multiply_adds": head.multiply_adds, "fraction": head.multiply_adds / (c * d)}])
    return history, cost, head


def retrain_network(study: Study, subject: Subject, influence: InfluentialFeatures, history: pd.DataFrame,
                    epochs: int, lr: float, authors_lr: float = 1e-4) -> pd.DataFrame:
    """§5.2.3 like for like: test accuracy of the full head, the masked decomposed head, the head alone
    fine-tuned (`history` of `retrain`) and the whole network fine-tuned with the decomposed head
    (`train.finetune_network` on a deep copy: the subject's own model is not changed), `epochs` epochs with
    the profile's crops and flips, twice: the authors' procedure (Adam at the constant `authors_lr`, all
    parameters, train mode, weight decay 0; `authors` True) and the library's recipe (SGD + Nesterov,
    one-cycle to `lr`). A control fine-tunes the whole network with the *full* head by the authors'
    procedure: what fine-tuning alone gains (e.g. a model adapting to a shifted split), to set against the
    decomposed rows. Needs an in-memory split (digits, CIFAR-10): for an image folder those rows say so
    and hold NaN."""
    p = study.profile
    head_lr = history.attrs.get("lr", float("nan"))
    rows = [{"retrained": "nothing (full head)", "head": "full", "authors": False, "optimizer": "", "epochs": 0,
             "lr": float("nan"), "test_acc": subject.full_accuracy},
            {"retrained": "nothing (masked weights)", "head": "decomposed", "authors": False, "optimizer": "",
             "epochs": 0, "lr": float("nan"), "test_acc": float(history.test_acc.iloc[0])},
            {"retrained": "head only (cached features)", "head": "decomposed", "authors": False, "optimizer": "Adam",
             "epochs": int(history.epoch.iloc[-1]), "lr": head_lr, "test_acc": float(history.test_acc.iloc[-1])}]
    arms = [("whole network", "decomposed", True, "adam", authors_lr, 0.0),
            ("whole network", "decomposed", False, "sgd", lr, None),
            ("whole network (control)", "full", True, "adam", authors_lr, 0.0)]
    for retrained, head, authors, optimizer, arm_lr, decay in arms:
        row = {"retrained": retrained, "head": head, "authors": authors,
               "optimizer": "Adam, constant" if optimizer == "adam" else "SGD + Nesterov, one-cycle",
               "epochs": epochs, "lr": arm_lr}
        if subject.train.images is None:
            print(f"{retrained} ({head} head) skipped: train_classifier needs an in-memory split (digits, CIFAR-10)")
            rows.append({**row, "test_acc": float("nan")})
            continue
        recipe = Recipe(**{**asdict(p.train), "epochs": epochs, "lr": arm_lr, "optimizer": optimizer,
                           **({} if decay is None else {"weight_decay": decay})})
        model = copy.deepcopy(subject.model)
        if head == "decomposed":
            model = finetune_network(model, influence, subject.train, recipe, device=p.device, seed=p.seed,
                                     progress=p.progress)
        else:
            model = train_classifier(model, subject.train, recipe, device=p.device, seed=p.seed, progress=p.progress)
        phi = extract_features(model, subject.test, batch_size=p.batch_size, device=p.device, progress=p.progress)
        with torch.no_grad():
            rows.append({**row, "test_acc": accuracy(head_on(model.head, "cpu")(phi), subject.test.labels)})
    table = pd.DataFrame(rows)
    table["relative"] = relative_accuracy(table.test_acc, subject.full_accuracy)
    return table


def softmax_table(subject: Subject, head: DecomposedHead, n: int = 5) -> pd.DataFrame:
    """The first `n` test images: true class, standard and decomposed softmax of their top class."""
    with torch.no_grad():
        phi = subject.test_features[:n]
        full, dec = subject.head(phi).softmax(-1), head.decomposed_softmax(phi)
    return pd.DataFrame({"image": range(len(phi)), "true": [subject.classes[i] for i in subject.test.labels[:n]],
                         "pred_full": [subject.classes[i] for i in full.argmax(1)], "p_full": full.max(1).values.tolist(),
                         "pred_decomposed": [subject.classes[i] for i in dec.argmax(1)],
                         "p_decomposed": dec.max(1).values.tolist()})


# -------------------------------------------------------------------------------------- Tables 7, 8 and 1


def visual_table(subject: Subject, influence: InfluentialFeatures, n: int, seed: int = 0):
    """Table 7: (images, maps, table) for the first test image of up to `n` classes."""
    from . import visualize
    from .ablation import non_influential_mask

    index = visualize.example_index(subject.test.labels, n)
    images, labels = visualize.fetch_images(subject.test, index), subject.test.labels[index]
    maps, raw = visualize.class_maps(subject.model, subject.test, images, labels, influence, seed)
    corr = visualize.image_correlation(images, maps)
    with torch.no_grad():
        pred = subject.head(subject.test_features[index]).argmax(1)
    non = non_influential_mask(influence, seed)[labels]
    table = pd.DataFrame({"image": index.tolist(), "class": [subject.classes[i] for i in labels],
                          "predicted": [subject.classes[i] for i in pred],
                          "influential": [" ".join(map(str, influence.indices[i])) for i in labels.tolist()],
                          "non_influential": [" ".join(map(str, r.nonzero().flatten().tolist())) for r in non]})
    for j, name in enumerate(("standard", "non_influential", "influential")):
        table[f"mean_{name}"] = raw[:, j].tolist()
        table[f"corr_image_{name}"] = corr[:, j].tolist()
    return images, maps, table


def ablation_tables(subject: Subject, influence: InfluentialFeatures, seed: int = 0,
                    draws: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 8: (long, summary). `long` has one row per (noise, head, replaced, draw) (ablation.py's
    `noise_ablation`, each noisy row over `draws` seeded draws) with a plot label `setting`;
    `summary` the mean and standard deviation over the draws of each (noise, head, replaced).
    The authors' Table 8 is the two rows with `authors_table8`: standard_normal noise, full head,
    replacing I_y ("influential") or all D - k' features outside it ("non_influential_all")."""
    from .ablation import noise_ablation, summarize

    rows = noise_ablation(subject.head, influence, subject.test_features, subject.test.labels,
                          subject.train_features, seed, draws=draws)
    long = pd.DataFrame(rows)
    long["setting"] = long["noise"] + ", " + long["head"] + " head"
    return long, pd.DataFrame(summarize(rows))


def csg_tables(study: Study, subject: Subject, gated, csg_subject: Subject, influence: InfluentialFeatures,
               csg_from: str = "model", budget: float = 0.2):
    """Table 1 (accuracy of both CSG paths, with the gates' L1-density, the budget it was trained under and the
    non-zero fraction, and how CSG started: from the trained `model` or from `scratch`) and the overlap / MI
    comparison of index sets."""
    from . import csg

    paths = csg.path_accuracies(gated, csg_subject.test_features, subject.test.labels)
    started = {"model": f"from {subject.name}", "scratch": "from scratch"}[csg_from]
    density = {"l1_density": csg.l1_density(gated.gates), "l1_budget": budget,
               "nonzero_fraction": csg.nonzero_fraction(gated.gates)}
    nan = {"l1_density": float("nan"), "l1_budget": float("nan"), "nonzero_fraction": float("nan")}
    table1 = pd.DataFrame([
        {"model": f"{subject.name} (standard training)", "path": "standard", "csg_start": "n/a (no CSG)",
         "accuracy": subject.full_accuracy, **nan},
        {"model": f"{subject.name} + CSG", "path": "standard", "csg_start": started, "accuracy": paths["standard"],
         **density},
        {"model": f"{subject.name} + CSG", "path": "gated (true-label gates)", "csg_start": started,
         "accuracy": paths["gated"], **density}])
    k_prime = study.profile.k_prime if isinstance(study.profile.k_prime, int) else max(map(len, influence.indices))
    sets = {"ours (Algorithm 1)": (influence.mask, subject),
            "CSG lowest gates (authors' code)": (csg.gate_mask(gated.gates, k_prime, "lowest"), csg_subject),
            "CSG highest gates (sound)": (csg.gate_mask(gated.gates, k_prime, "highest"), csg_subject)}
    rows = []
    for method, (mask, r) in sets.items():
        with torch.no_grad():
            acc = accuracy(DecomposedHead(r.head, mask)(r.test_features), r.test.labels)
        mi = mutual_information_matrix(mask)
        rows.append({"method": method, "k_prime": k_prime,
                     "mutual_information_paper": mean_over_all_class_pairs(mi),  # all C^2 pairs (the paper's)
                     "mutual_information_distinct_pairs": mean_pairwise(mi),      # ours: different classes only
                     "jaccard_distinct_pairs": mean_pairwise(jaccard_matrix(mask)), "acc_decomposed": acc,
                     "relative": relative_accuracy(acc, r.full_accuracy)})
    return table1, pd.DataFrame(rows)
