"""What the paper notebooks share: a profile's settings, its models with cached features, and saving results.

A profile is a small YAML file in `profiles/` (demo, cifar10-shared, cifar10, imagenet); `extends: <name>`
inherits another profile, and `${VAR:-default}` in a string is read from the environment.
The notebooks stay free of logic by calling this module:

    S = open_study("demo", overrides)          # settings + output folder figures/demo/
    run = S.load(S.model)                      # model, splits and cached features of one model
    S.save_table(df, "table8_ablation")        # figures/demo/table8_ablation.csv and .md
    S.save_figure(fig, "fig2_histogram")       # figures/demo/fig2_histogram.png and .pdf

Models come from the shared checkpoints (`checkpoints`), torchvision weights
(`weights: pretrained`), random weights (`weights: random`, for tests) or are trained by
the library (`weights: train`, cached); features are extracted once and cached on disk.
A model name may carry a tag after `@` ("resnet20@shared"): the architecture is the part
before it, so one profile can hold a checkpoint and a freshly trained model of the same kind.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch
import yaml

from .data import ImageSplit, check_same_classes, folder_transform, open_dataset
from .decomposed import DecomposedHead, accuracy, evaluate, grid_accuracy
from .features import extract_features_many
from .influence import InfluentialFeatures, influential_features
from .models import FeatureModel, build_model
from .overlap import jaccard_matrix, mutual_information_matrix
from .train import Recipe, finetune_head, trained_model

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The folder holding `profiles/`: the checkout this package was installed from, else the cwd's."""
    for base in (PACKAGE_ROOT, Path.cwd(), *Path.cwd().parents):
        if (base / "profiles").is_dir():
            return base
    return Path.cwd()


def expand(value):
    """`${VAR:-default}` and `${VAR}` in strings (recursively in lists and dicts) from the environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand(v) for v in value]
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    return value


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`; nested dicts are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def profile_path(profile: str | Path) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_absolute() else (Path.cwd() / path if (Path.cwd() / path).is_file() else repo_root() / path)
    path = repo_root() / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (repo_root() / "profiles").glob("*.yaml"))
        raise FileNotFoundError(f"no profile '{profile}': choose one of {names} or pass the path of a YAML file")
    return path


def load_profile(profile: str | Path, overrides: dict | None = None) -> dict:
    """The profile's values (after `extends` and the overrides), with `name` set and variables expanded."""
    path = profile_path(profile)
    values = yaml.safe_load(path.read_text()) or {}
    check_settings(values, str(path))
    check_settings(overrides or {}, "the overrides")
    name = values.get("name", path.stem)
    parent = values.pop("extends", None)
    if parent:
        values = merge(load_profile(parent), values)
    return expand(merge({**values, "name": name}, overrides or {}))


def check_settings(values: dict, where: str) -> None:
    """Only settings the notebooks read (those of profiles/demo.yaml, and a Recipe's under `train`):
    a misspelt one fails here instead of being silently ignored."""
    known = {*yaml.safe_load((repo_root() / "profiles" / "demo.yaml").read_text()), "name", "extends", "progress"}
    recipe = {f.name for f in fields(Recipe)}
    for key, allowed, prefix in [*((k, known, "") for k in values),
                                 *((k, recipe, "train.") for k in (values.get("train") or {}))]:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown setting '{prefix}{key}' in {where}{hint}; every setting is listed, with "
                             f"what it does, in profiles/demo.yaml (train: the fields of classfilters.Recipe)")


def resolve(path: str) -> str:
    """A path relative to the repository root, made absolute (notebooks run from notebooks/)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else repo_root() / p)


def dataset_spec(spec: str) -> str:
    kind, sep, path = spec.partition(":")
    return f"{kind}:{resolve(path)}" if sep and path else spec


def limit(split: ImageSplit, n: int | None, seed: int = 0) -> ImageSplit:
    """At most `n` images of `split`, drawn at random once (in dataset order), or the split itself."""
    if not n or n >= len(split):
        return split
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if split.images is not None:
        return split.subset(index)
    return ImageSplit(split.labels[index], split.classes, split.name, f"{split.fingerprint}[first{n}-seed{seed}]",
                      dataset=torch.utils.data.Subset(split.dataset, index.tolist()), mean=split.mean,
                      std=split.std, meta=split.meta)


def architecture(name: str) -> str:
    """The model to build for a profile's model name: "resnet20@shared" -> "resnet20"."""
    return name.split("@", 1)[0]


def family(name: str) -> str:
    """The paper's model families: its tables group the depth study by these (plus any `@tag`)."""
    name, _, tag = name.partition("@")
    label = base_family(name)
    return f"{label}, {tag}" if tag else label


def slug(text: str) -> str:
    """A file-name part: "ResNet (CIFAR), shared" -> "resnet_cifar_shared"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def base_family(name: str) -> str:
    for prefix, label in (("wide_resnet", "Wide ResNet"), ("densenet", "DenseNet"),
                          ("efficientnet", "EfficientNet"), ("timm:", "timm")):
        if name.startswith(prefix):
            return label
    depth = int(re.sub(r"\D", "", name) or 0)
    return "ResNet (ImageNet)" if name.startswith("resnet") and depth in (18, 34, 50, 101, 152) else "ResNet (CIFAR)"


@dataclass
class Run:
    """One model of a profile with its splits and cached features (float32, CPU)."""
    name: str
    model: FeatureModel
    train: ImageSplit
    test: ImageSplit
    train_features: torch.Tensor
    test_features: torch.Tensor

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.head.cpu().float()

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def full_accuracy(self) -> float:
        with torch.no_grad():
            return accuracy(self.head(self.test_features), self.test.labels)


class Study:
    """A profile's settings (as attributes), its output folder and its models."""

    def __init__(self, values: dict, out_dir: str | Path | None = None):
        self.values = values
        self.__dict__.update({k: v for k, v in values.items() if k not in ("values", "out_dir")})
        self.out_dir = Path(out_dir) if out_dir else repo_root() / "figures" / values["name"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._runs: dict[str, Run] = {}
        self._splits: dict[tuple, ImageSplit] = {}

    def get(self, key, default=None):
        return self.values.get(key, default)

    # ---------------------------------------------------------------------------------- data and models

    def split(self, which: str, size: tuple | None = None) -> ImageSplit:
        """The profile's train or test split; for image folders, as a model's (resize, crop, interpolation)."""
        if (which, size) not in self._splits:
            cap = self.get("max_train") if which == "train" else self.get("max_test")
            opened = open_dataset(dataset_spec(self.dataset), which, size)
            if which != "train":  # a test split numbering other classes would be scored as them
                check_same_classes({"train": self.split("train", size).classes, which: opened.classes})
            self._splits[which, size] = limit(opened, cap, self.get("seed", 0))
        return self._splits[which, size]

    def build(self, name: str) -> FeatureModel:
        train = self.split("train")
        checkpoints = self.get("checkpoints") or {}
        weights = self.get("weights", "train")
        in_channels = train.images.shape[1] if train.images is not None else 3
        arch = architecture(name)
        if name in checkpoints:
            return build_model(arch, resolve(checkpoints[name]), num_classes=train.num_classes, in_channels=in_channels)
        if "@" in name:
            raise ValueError(f"model {name!r} has a tag but no entry under `checkpoints`: list its weights file "
                             f"there, or drop the tag to have it {weights}")
        if weights in ("pretrained", "random"):
            torch.manual_seed(self.get("seed", 0))
            num_classes = None if weights == "pretrained" else train.num_classes
            pretrained = (self.get("pretrained_weights") or True) if weights == "pretrained" else False
            return build_model(arch, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained)
        if weights != "train":
            raise ValueError(f"weights must be train, pretrained or random (or list the model under checkpoints), got {weights!r}")
        return trained_model(arch, train, self.recipe(), seed=self.get("seed", 0), device=self.get("device"),
                             progress=self.get("progress", False))

    def recipe(self) -> Recipe:
        return Recipe(**(self.get("train") or {}))

    def csg_recipe(self) -> Recipe:
        """The training recipe with the CSG epochs and learning rate."""
        return Recipe(**{**(self.get("train") or {}), "epochs": self.csg_epochs, "lr": self.csg_lr})

    def load(self, name: str | None = None) -> Run:
        """The model `name` (default: the profile's main model) with its features, built once per study."""
        return self.load_all([name or self.model])[0]

    def load_all(self, names) -> list[Run]:
        """Several models at once: each split is read and decoded once for all of them."""
        self._add_runs({name: self.build(name).eval() for name in names if name not in self._runs})
        return [self._runs[name] for name in names]

    def wrap(self, model: FeatureModel, name: str) -> Run:
        """A `Run` for a model made in the notebook (e.g. the CSG one), on the profile's splits."""
        self._add_runs({name: model.eval()} if name not in self._runs else {})
        return self._runs[name]

    def _add_runs(self, models: dict[str, FeatureModel]) -> None:
        """Features of `models`: one pass over each split for all the models that see the images
        the same way (an image folder is decoded as each model's `input_size` says: resize, crop,
        interpolation)."""
        kw = {"batch_size": self.get("batch_size", 256), "device": self.get("device"),
              "progress": self.get("progress", False)}
        folder = self.dataset.startswith("imagefolder")  # only image folders are decoded at a chosen size
        sizes = {name: folder_transform(m.input_size) if folder else None for name, m in models.items()}
        for size in dict.fromkeys(sizes.values()):
            group = {name: m for name, m in models.items() if sizes[name] == size}
            train, test = self.split("train", size), self.split("test", size)
            phi_train, phi_test = extract_features_many(group, train, **kw), extract_features_many(group, test, **kw)
            for name, model in group.items():
                self._runs[name] = Run(name, model, train, test, phi_train[name], phi_test[name])

    def influence(self, run: Run, k=None, k_prime=None) -> InfluentialFeatures:
        """Algorithm 1 on the run's training features (the profile's k and k' unless given)."""
        return influential_features(run.train_features, run.train.labels, k or self.k, k_prime or self.k_prime,
                                    num_classes=run.train.num_classes,
                                    provenance={"model": run.name, "dataset": self.dataset, "profile": self.name})

    # ---------------------------------------------------------------------------------- output

    def save_table(self, df: pd.DataFrame, name: str, index: bool = False) -> pd.DataFrame:
        """`df` as figures/<profile>/<name>.csv and .md; returns it for display."""
        df.to_csv(self.out_dir / f"{name}.csv", index=index)
        (self.out_dir / f"{name}.md").write_text(markdown(df.reset_index() if index else df))
        return df

    def save_figure(self, fig, name: str):
        """`fig` as figures/<profile>/<name>.png and .pdf; returns it for display."""
        fig.savefig(self.out_dir / f"{name}.png", dpi=150, bbox_inches="tight")
        fig.savefig(self.out_dir / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})  # same figure, same bytes
        return fig


def open_study(profile: str = "demo", overrides: dict | None = None, out_dir: str | Path | None = None) -> Study:
    """The notebooks' entry point: profile name (or YAML path) + overrides -> a `Study`."""
    import matplotlib
    if os.environ.get("MPLBACKEND", "").lower() == "agg":
        matplotlib.use("Agg")
    return Study(load_profile(profile, overrides), out_dir)


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


# -------------------------------------------------------------------------------------- tables


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
    """Mean pairwise Jaccard and mutual information of the classes' index sets."""
    from .overlap import mean_pairwise
    mask = influence.mask
    return pd.DataFrame([{"k": influence.k, "k_prime": influence.k_prime,
                          "mean_jaccard": mean_pairwise(jaccard_matrix(mask)),
                          "mean_mutual_information": mean_pairwise(mutual_information_matrix(mask))}])


def grid_table(run: Run, ks, k_primes) -> pd.DataFrame:
    """Fig 3: decomposed and relative test accuracy for every (k, k'), long format."""
    ks, k_primes = list(ks), list(k_primes)
    acc = grid_accuracy(run.train_features, run.train.labels, run.test_features, run.test.labels, run.head, ks, k_primes)
    full = run.full_accuracy
    rows = [{"k": k, "k_prime": kp, "acc_decomposed": float(acc[a, b]), "acc_full": full,
             "relative": float(acc[a, b]) / full, "multiply_adds": kp * run.model.num_classes}
            for a, k in enumerate(ks) for b, kp in enumerate(k_primes)]
    return pd.DataFrame(rows)


def sizes(values, limit_: int) -> list[int]:
    """The integer sizes of a sweep that fit in D features."""
    return sorted({int(v) for v in values if 1 <= int(v) <= limit_})


def depth_row(study: Study, run: Run, k: int) -> dict:
    """Tables 2-6: one model's D, k'/C, k'/D and accuracies at k = k'."""
    d, c = run.model.num_features, run.model.num_classes
    k = min(k, d)
    result = evaluate(run.head, study.influence(run, k, k), run.test_features, run.test.labels)
    return {"family": family(run.name), "model": run.name, "D": d, "C": c, "k": k, "k_prime": k,
            "k'/C": k / c, "k'/D": k / d, "acc_decomposed": result["acc_decomposed"], "acc_full": result["acc_full"],
            "relative": result["relative"], "multiply_adds_full": result["multiply_adds_full"],
            "multiply_adds_decomposed": result["multiply_adds_decomposed"]}


def depth_table(study: Study, k: int) -> pd.DataFrame:
    """Tables 2-6: every model of the profile at k = k', grouped by family."""
    return pd.DataFrame([depth_row(study, run, k) for run in study.load_all(study.models)])


def depth_curves(study: Study, ks) -> pd.DataFrame:
    """Fig 4: relative accuracy along k = k' for every model of the profile."""
    frames = []
    for name, run in zip(study.models, study.load_all(study.models)):
        grid = grid_table(run, sizes(ks, run.model.num_features), sizes(ks, run.model.num_features))
        frames.append(grid[grid.k == grid.k_prime].assign(model=name, family=family(name)))
    return pd.concat(frames, ignore_index=True)


def retrain(run: Run, influence: InfluentialFeatures, epochs: int, lr: float, seed: int = 0):
    """§5.2.3: fine-tune the decomposed head from the masked weights; (history, cost, head)."""
    head = DecomposedHead(run.head, influence)
    history = finetune_head(head, run.train_features, run.train.labels, epochs=epochs, lr=lr, seed=seed,
                            eval_features=run.test_features, eval_labels=run.test.labels)
    history = pd.DataFrame(history).assign(acc_full=run.full_accuracy)
    history["relative"] = history["test_acc"] / history["acc_full"]
    c, d = run.model.num_classes, run.model.num_features
    cost = pd.DataFrame([{"layer": "full", "multiply_adds": c * d, "fraction": 1.0},
                         {"layer": "decomposed", "multiply_adds": head.multiply_adds, "fraction": head.multiply_adds / (c * d)}])
    return history, cost, head


@torch.no_grad()
def softmax_table(run: Run, head: DecomposedHead, n: int = 5) -> pd.DataFrame:
    """The first `n` test images: true class, standard and decomposed softmax of their top class."""
    phi = run.test_features[:n]
    full, dec = run.head(phi).softmax(-1), head.decomposed_softmax(phi)
    return pd.DataFrame({"image": range(len(phi)), "true": [run.classes[i] for i in run.test.labels[:n]],
                         "pred_full": [run.classes[i] for i in full.argmax(1)], "p_full": full.max(1).values.tolist(),
                         "pred_decomposed": [run.classes[i] for i in dec.argmax(1)],
                         "p_decomposed": dec.max(1).values.tolist()})


# -------------------------------------------------------------------------------------- the k panel


def k_panel(run: Run, k: int = 5, k_prime: int = 5):
    """An ipywidgets panel: sliders for k and k' and a class picker, updated live from cached features."""
    import ipywidgets as w

    d = run.model.num_features
    k_slider = w.IntSlider(value=min(k, d), min=1, max=d, description="k")
    kp_slider = w.IntSlider(value=min(k_prime, d), min=1, max=d, description="k'")
    picker = w.Dropdown(options=[(c, i) for i, c in enumerate(run.classes)],
                        value=0, description="class")
    out = w.HTML()

    def update(*_):
        inf = influential_features(run.train_features, run.train.labels, k_slider.value, kp_slider.value,
                                   num_classes=run.train.num_classes)
        r = evaluate(run.head, inf, run.test_features, run.test.labels)
        out.value = (f"<b>accuracy</b> {r['acc_decomposed']:.4f} (full {r['acc_full']:.4f}) &nbsp; "
                     f"<b>relative</b> {r['relative']:.4f} &nbsp; <b>multiply-adds</b> "
                     f"{r['multiply_adds_decomposed']} of {r['multiply_adds_full']}<br>"
                     f"<b>I<sub>{run.classes[picker.value]}</sub></b> = {inf.indices[picker.value]}")

    for widget in (k_slider, kp_slider, picker):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([k_slider, kp_slider, picker]), out])


# -------------------------------------------------------------------------------------- Tables 7, 8 and 1


def visual_table(run: Run, influence: InfluentialFeatures, n: int, seed: int = 0):
    """Table 7: (images, maps, table) for the first test image of up to `n` classes."""
    from . import visualize
    from .ablation import non_influential_mask

    index = visualize.example_index(run.test.labels, n)
    images, labels = visualize.fetch_images(run.test, index), run.test.labels[index]
    maps, raw = visualize.class_maps(run.model, run.test, images, labels, influence, seed)
    corr = visualize.image_correlation(images, maps)
    with torch.no_grad():
        pred = run.head(run.test_features[index]).argmax(1)
    non = non_influential_mask(influence, seed)[labels]
    table = pd.DataFrame({"image": index.tolist(), "class": [run.classes[i] for i in labels],
                          "predicted": [run.classes[i] for i in pred],
                          "influential": [" ".join(map(str, influence.indices[i])) for i in labels.tolist()],
                          "non_influential": [" ".join(map(str, r.nonzero().flatten().tolist())) for r in non]})
    for j, name in enumerate(("standard", "non_influential", "influential")):
        table[f"mean_{name}"] = raw[:, j].tolist()
        table[f"corr_image_{name}"] = corr[:, j].tolist()
    return images, maps, table


def ablation_tables(run: Run, influence: InfluentialFeatures, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 8, long (one row per variant, head, replaced set) and wide (the paper's layout)."""
    from .ablation import noise_ablation

    long = pd.DataFrame(noise_ablation(run.head, influence, run.test_features, run.test.labels,
                                       run.train_features, seed))
    names = {"none": "no noise", "authors": "authors' N(0, 1)", "matched": "matched mean/std"}
    long["setting"] = long["variant"].map(names) + ",\n" + long["head"] + " head"
    base = long[long.variant == "none"].set_index("head")["accuracy"]
    wide = long[long.variant != "none"].pivot_table(index=["variant", "head"], columns="replaced",
                                                    values="accuracy").reset_index()
    wide.insert(2, "no_noise", wide["head"].map(base))
    return long, wide


def csg_tables(study: Study, run: Run, gated, csg_run: Run, influence: InfluentialFeatures):
    """Table 1 (accuracy of both CSG paths) and the overlap / MI comparison of index sets."""
    from . import csg
    from .overlap import mean_pairwise

    paths = csg.path_accuracies(gated, csg_run.test_features, run.test.labels)
    table1 = pd.DataFrame([{"model": f"{run.name} (standard training)", "path": "standard", "accuracy": run.full_accuracy},
                           {"model": f"{run.name} + CSG", "path": "standard", "accuracy": paths["standard"]},
                           {"model": f"{run.name} + CSG", "path": "gated (true-label gates)", "accuracy": paths["gated"]}])
    k_prime = study.k_prime if isinstance(study.k_prime, int) else max(map(len, influence.indices))
    sets = {"ours (Algorithm 1)": (influence.mask, run),
            "CSG lowest gates (authors' code)": (csg.gate_mask(gated.gates, k_prime, "lowest"), csg_run),
            "CSG highest gates (sound)": (csg.gate_mask(gated.gates, k_prime, "highest"), csg_run)}
    rows = []
    for method, (mask, r) in sets.items():
        with torch.no_grad():
            acc = accuracy(DecomposedHead(r.head, mask)(r.test_features), r.test.labels)
        rows.append({"method": method, "k_prime": k_prime, "mutual_information": mean_pairwise(mutual_information_matrix(mask)),
                     "jaccard": mean_pairwise(jaccard_matrix(mask)), "acc_decomposed": acc,
                     "relative": acc / r.full_accuracy})
    return table1, pd.DataFrame(rows)
