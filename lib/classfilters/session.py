"""A study session: a profile's models with their splits and cached features, and where results are saved.

The notebooks stay free of logic by calling this module:

    S = open_study("demo", k=10)               # the profile (typed, profile.py) with the notebook's knobs
    subject = S.load()                         # the profile's model, its splits and cached features
    S.save_table(df, "table8_ablation")        # <out>/table8_ablation.csv and .md
    S.save_figure(fig, "fig2_histogram")       # <out>/fig2_histogram.png and .pdf

<out> is `figures/<profile>/` when the runner executes the notebooks (it passes `out_dir`), and
`runs/scratch/<profile>/` when a notebook is run by hand (in JupyterLab), so that trying things
never overwrites the committed figures.

Models come from checkpoints (`checkpoints`), torchvision weights (`weights: pretrained`), random
weights (`weights: random`, for tests) or are trained by the library (`weights: train`, cached);
features are extracted once and cached on disk (features.py), and kept in memory per session.
A model name may carry a tag after `@` ("resnet20@shared"): the architecture is the part before
it, so one profile can hold a checkpoint and a freshly trained model of the same kind.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .data import ImageSplit, check_same_classes, folder_transform, open_dataset
from .decomposed import accuracy, head_on
from .features import extract_features_many
from .influence import InfluentialFeatures, influential_features
from .models import FeatureModel, build_model
from .profile import Profile, load_profile, repo_root
from .sizes import Size
from .train import trained_model


def resolve(path: str) -> str:
    """A path relative to the repository root, made absolute (notebooks run from notebooks/)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else repo_root() / p)


def dataset_spec(spec: str) -> str:
    kind, sep, path = spec.partition(":")
    return f"{kind}:{resolve(path)}" if sep and path else spec


def limit(split: ImageSplit, n: int | None, seed: int = 0) -> ImageSplit:
    """At most `n` images of `split`, drawn at random once (in dataset order), or the split itself. A
    subset by `ImageSplit.subset`: an image folder's stays a folder, decoded in batches as the whole."""
    if not n or n >= len(split):
        return split
    return split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values)


def normalized_as(split: ImageSplit, model: FeatureModel) -> ImageSplit:
    """`split` standardised with the model's own mean and std where its weights bring them, else as it is."""
    if model.mean is None or model.std is None:
        return split
    return dataclasses.replace(split, mean=tuple(model.mean), std=tuple(model.std))


def architecture(name: str) -> str:
    """The model to build for a profile's model name: "resnet20@shared" -> "resnet20"."""
    return name.split("@", 1)[0]


@dataclass
class Subject:
    """A model under study: the model, its train and test splits and their features (float32, CPU)."""
    name: str
    model: FeatureModel
    train: ImageSplit
    test: ImageSplit
    train_features: torch.Tensor
    test_features: torch.Tensor

    @property
    def head(self) -> torch.nn.Linear:
        """A float32 CPU copy of the model's head (the model itself stays where it is)."""
        return head_on(self.model.head, "cpu")

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def full_accuracy(self) -> float:
        with torch.no_grad():
            return accuracy(self.head(self.test_features), self.test.labels)

    def describe(self, dataset: str) -> str:
        return (f"{self.name} on {dataset}: D = {self.model.num_features}, C = {self.model.num_classes}, "
                f"{len(self.train)} train / {len(self.test)} test images, full test accuracy {self.full_accuracy:.4f}")


class Study:
    """A profile's settings (`profile`), its output folder (`out_dir`) and its models, loaded once each."""

    def __init__(self, profile: Profile, out_dir: str | Path | None = None):
        self.profile = profile
        self.out_dir = Path(out_dir) if out_dir else repo_root() / "runs" / "scratch" / profile.name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._subjects: dict[str, Subject] = {}
        self._splits: dict[tuple, ImageSplit] = {}

    # ---------------------------------------------------------------------------------- data and models

    def split(self, which: str, size: tuple | None = None) -> ImageSplit:
        """The profile's train or test split; for image folders, as a model's (resize, crop, interpolation)."""
        p = self.profile
        if (which, size) not in self._splits:
            cap = p.max_train if which == "train" else p.max_test
            opened = open_dataset(dataset_spec(p.dataset), which, size)
            if which != "train":  # a test split numbering other classes would be scored as them
                check_same_classes({"train": self.split("train", size).classes, which: opened.classes})
            self._splits[which, size] = limit(opened, cap, p.seed)
        return self._splits[which, size]

    def build(self, name: str) -> FeatureModel:
        p, train = self.profile, self.split("train")
        in_channels = train.images.shape[1] if train.images is not None else 3
        arch = architecture(name)
        if name in p.checkpoints:
            return build_model(arch, resolve(p.checkpoints[name]), num_classes=train.num_classes,
                               in_channels=in_channels)
        if "@" in name:
            raise ValueError(f"model {name!r} has a tag but no entry under `checkpoints`: list its weights file "
                             f"there, or drop the tag to have it {p.weights}")
        if p.weights in ("pretrained", "random"):
            torch.manual_seed(p.seed)
            num_classes = None if p.weights == "pretrained" else train.num_classes
            pretrained = (p.pretrained_weights or True) if p.weights == "pretrained" else False
            if pretrained and arch.startswith("timm:"):  # timm's own pretrained tag; a torchvision weights name is not one
                pretrained = True
            return build_model(arch, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained)
        if p.weights != "train":
            raise ValueError(f"weights must be train, pretrained or random (or list the model under checkpoints), "
                             f"got {p.weights!r}")
        return trained_model(arch, train, p.train, seed=p.seed, device=p.device, progress=p.progress)

    def trains(self, name: str) -> bool:
        """Whether the profile trains `name` here (not a checkpoint, downloaded or random weights)."""
        return self.profile.weights == "train" and name not in self.profile.checkpoints and "@" not in name

    def load_seeded(self, name: str, seed: int) -> Subject:
        """The model `name` trained here with `seed` (the profile's seed: the study's own `name`), named
        `name#seed<seed>` otherwise; a model the profile does not train is refused."""
        p = self.profile
        if not self.trains(name):
            raise ValueError(f"{name!r} is not trained by this profile (a checkpoint or weights {p.weights!r}): "
                             f"it has no training seeds")
        if seed == p.seed:
            return self.load(name)
        seeded = f"{name}#seed{seed}"
        if seeded not in self._subjects:
            train = self.split("train")
            model = trained_model(architecture(name), train, p.train, seed=seed, device=p.device, progress=p.progress)
            self._add({seeded: model.eval()})
        return self._subjects[seeded]

    def load(self, name: str | None = None) -> Subject:
        """The model `name` (default: the profile's main model) with its features, built once per study."""
        return self.load_all([name or self.profile.model])[0]

    def load_all(self, names=None) -> list[Subject]:
        """Several models at once (default: the profile's `models`): each split is read and decoded once for all."""
        names = list(self.profile.models if names is None else names)
        self._add({name: self.build(name).eval() for name in names if name not in self._subjects})
        return [self._subjects[name] for name in names]

    def wrap(self, model: FeatureModel, name: str) -> Subject:
        """A `Subject` for a model made in the notebook (e.g. the CSG one), on the profile's splits."""
        self._add({name: model.eval()} if name not in self._subjects else {})
        return self._subjects[name]

    def _add(self, models: dict[str, FeatureModel]) -> None:
        """Features of `models`: one pass over each split for all the models that see the images
        the same way: an image folder decoded as each model's `input_size` says (resize, crop,
        interpolation), and standardised with the model's own mean and std where it has them."""
        p = self.profile
        kw = {"batch_size": p.batch_size, "device": p.device, "progress": p.progress}
        folder = p.dataset.startswith("imagefolder")  # only image folders are decoded at a chosen size
        views = {name: (folder_transform(m.input_size) if folder else None,
                        None if m.mean is None else tuple(m.mean), None if m.std is None else tuple(m.std))
                 for name, m in models.items()}
        for view in dict.fromkeys(views.values()):
            group = {name: m for name, m in models.items() if views[name] == view}
            first = next(iter(group.values()))
            train, test = (normalized_as(self.split(which, view[0]), first) for which in ("train", "test"))
            phi_train, phi_test = extract_features_many(group, train, **kw), extract_features_many(group, test, **kw)
            for name, model in group.items():
                self._subjects[name] = Subject(name, model, train, test, phi_train[name], phi_test[name])

    def influence(self, subject: Subject, k: Size | None = None, k_prime: Size | None = None) -> InfluentialFeatures:
        """Algorithm 1 on the subject's training features (the profile's k and k' unless given)."""
        p = self.profile
        return influential_features(subject.train_features, subject.train.labels,
                                    p.k if k is None else k, p.k_prime if k_prime is None else k_prime,
                                    num_classes=subject.train.num_classes,
                                    provenance={"model": subject.name, "dataset": p.dataset, "profile": p.name})

    # ---------------------------------------------------------------------------------- output

    def save_table(self, df: pd.DataFrame, name: str, index: bool = False) -> pd.DataFrame:
        """`df` as <out>/<name>.csv and .md; returns it for display."""
        df.to_csv(self.out_dir / f"{name}.csv", index=index)
        (self.out_dir / f"{name}.md").write_text(markdown(df.reset_index() if index else df))
        return df

    def save_figure(self, fig, name: str) -> None:
        """`fig` as <out>/<name>.png and .pdf. Returns nothing: the notebook shows the figure once, itself."""
        fig.savefig(self.out_dir / f"{name}.png", dpi=150, bbox_inches="tight")
        fig.savefig(self.out_dir / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})  # same bytes


def open_study(profile: str | Path | Profile = "demo", out_dir: str | Path | None = None,
               overrides: dict | None = None, **settings) -> Study:
    """The notebooks' entry point: a profile (name, YAML path or `Profile`), optional overrides (nested,
    as `--set`), and the notebook's knobs as keywords (None: the profile's value) -> a `Study`."""
    if not isinstance(profile, Profile):
        profile = load_profile(profile, overrides)
    elif overrides:
        profile = profile.replace(**overrides)
    return Study(profile.replace(**settings), out_dir)


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
