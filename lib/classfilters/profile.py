"""Profiles: the typed settings of a study, their defaults, and the YAML files that change them.

`Profile` holds every setting the notebooks read, with its default and what it does (as
nanoGPT's GPTConfig, or `Recipe` for training). A profile file in `profiles/` (demo,
cifar10-shared, cifar10, imagenet) or anywhere else changes some of them:

    extends: demo                        # start from another profile (files merge key by key)
    dataset: imagefolder:${CLASSFILTERS_IMAGENET:-data/imagenet}   # ${VAR:-default} from the environment
    train: {epochs: 20}                  # a Recipe's fields

`load_profile(name_or_path, overrides)` resolves `extends`, the overrides (`--set k=10`,
`--set train.epochs=20`: `parse_set`) and the variables, then checks every key against the
fields (a misspelt one is refused with the nearest name) and every value against its type.
No torch here: the runner reads a profile without loading the numerical stack.
About 300 lines, most of them the settings themselves, each with its default and what it does.
"""
from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .recipe import Recipe
from .sizes import DEFAULT_K, as_size

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Profile:
    """Every setting of a study. The defaults are the `demo` profile's."""
    name: str = "demo"             # the profile's name: outputs go to figures/<name>/ (default: the file's stem)
    # --- data and models
    dataset: str = "digits"        # digits | cifar10 | cifar10:<path> | imagefolder:<path> (relative to the repo root)
    model: str = "resnet20"        # the model of notebooks 1, 2, 4-10
    models: list[str] = field(default_factory=lambda: ["resnet8", "resnet14", "resnet20", "resnet32"])  # depth study (3)
    weights: str = "train"         # train (library, cached) | pretrained (torchvision) | random (tests); see checkpoints
    pretrained_weights: str | bool | None = None  # with weights: pretrained, a torchvision weights name; None: default
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> weights file, loaded instead of trained
    train: Recipe = field(default_factory=lambda: Recipe(epochs=10, batch_size=64, lr=0.05, flip=False))  # training
    max_train: int | None = None   # cap on training images, drawn at random once (None: all)
    max_test: int | None = None    # cap on test images (None: all)
    batch_size: int = 256          # feature extraction batch
    device: str | None = None      # None: cuda when available, else cpu
    seed: int = 0                  # initial weights, subsets, noise and random index sets
    progress: bool = True          # progress of training (epoch, loss, accuracy) and extraction (images/s)
    # --- Algorithm 1 and the notebooks
    k: int | float = DEFAULT_K     # features kept per image: a count, or a fraction of activation mass in (0, 1]
    k_prime: int | float = DEFAULT_K  # features kept per class: a count, or a fraction of a histogram's mass
    fig2_class: int = 0            # the class whose histogram is Fig 2 (notebook 1)
    grid_k: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32])  # Fig 3 axes
    depth_k: int = DEFAULT_K       # k = k' of the depth study (the paper: 50 on ImageNet)
    depth_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds of the models trained
    #                                here, each trained once per seed in the depth study (checkpoints: one model)
    finetune_epochs: int = 5       # retraining the decomposed head (the authors: 1 on CIFAR-10, ~10 on ImageNet)
    finetune_lr: float = 0.001     # Adam, constant: the head alone and the authors' whole-network arm of notebook 04
    #                                (the authors: 1e-4 on CIFAR-10, 1e-6 on ImageNet)
    finetune_network_lr: float = 0.01  # the library's whole-network arm (notebook 04): peak lr of SGD + Nesterov one-cycle
    vis_images: int = 6            # images in Table 7
    csg_epochs: int = 6            # CSG training epochs, from the profile's model
    csg_lr: float = 0.02           # CSG peak learning rate
    csg_lambda: float = 0.01       # CSG sparsity weight lam of lam * relu(||G||_1 - budget |G|) (the official code: 1e-3)
    csg_budget: float = 0.2        # the L1-density the sparsity term allows for free (the official code: 0.2)
    csg_gate_lr: float = 0.08      # the gates' own Adam learning rate (constant; csg.py: gated steps * lr >~ 5 to close)
    csg_from: str = "model"        # CSG starts from the profile's trained `model` (cheap) or from `scratch` (the CSG paper)
    # --- ExplainFix (notebooks 8 and 9; skipped where the model has no spatial maps or the split is streamed)
    fix_model: str | list[str] | None = "resnet8"  # architecture(s) trained from scratch per init in notebook 8
    #                                (None: the profile's model's architecture)
    fix_inits: list[str] = field(default_factory=lambda: ["learned", "DCT2"])  # learned | DCT2 GHaar Psine Unchanged KRandom
    fix_epochs: int = 2            # training epochs of each init (the rest of the recipe: `train`)
    spectra_null_draws: int = 20   # random-filter draws of the low-frequency null
    prune_model: str | None = "resnet8"  # the trained model pruned in notebook 9 (None: the profile's model)
    prune_pcts: list[float] = field(default_factory=lambda: [50, 90, 99])  # ChannelPrune percentages (notebook 9)
    prune_epochs: int = 1          # fine-tuning epochs after pruning (0: none)
    prune_lr: float = 0.02         # fine-tuning peak learning rate after pruning
    prune_keep_per_layer: int = 1  # each layer's most salient filters spared (0: the paper's purely global rule)
    prune_max_images: int = 256    # images whose gradients give the filter saliency
    subset_classes: list[str] = field(default_factory=lambda: ["3,8"])  # class subsets, each "a,b,..." (names or indices)
    subset_pct: float = 90         # percentage of spatial filters zeroed for a class subset
    subset_epochs: int = 5         # fine-tuning epochs of the class-subset model (on its classes' images only)
    # --- explanations of class-specific features (notebook 10)
    explain_methods: list[str] = field(default_factory=lambda: ["lrp_epsilon_plus", "gradient_x_input"])  # methods of
    # the pointing game and the metric table (classfilters.METHODS); heatmaps use the first
    explain_images: int = 3        # test images (first of each class) in the heatmap figure
    explain_mosaics: int = 3       # 2x2 mosaics of four test images of distinct classes (4 tiles explained each)
    explain_max_tiles: int = 4     # mosaic tiles scored by the metric table and by each search configuration
    explain_metrics: list[str] = field(default_factory=lambda: [
        "pixel_flipping_aopc", "faithfulness_correlation", "relevance_mass", "grid_pointing", "sparseness",
        "random_logit", "avg_sensitivity"])  # metric table (explanation_metrics.METRICS; model_randomisation is costly)
    explain_check_families: list[str] = field(default_factory=lambda: ["resnet18"])  # torchvision architectures
    # canonized beside the profile's model (random weights and BatchNorm statistics) in the canonization check
    explain_search_space: dict[str, list[float]] = field(default_factory=lambda: {
        "low": [0.0, 0.25], "high": [0.0, 0.25]})  # LRP-gamma search: gamma per layer group (low, mid, high,
    # classifier) and epsilon; canonized or not is added where the family has a canonizer
    explain_search_budget: int = 3  # configurations scored per search at most (the grid, else a seeded sample of it)
    explain_search_k: list[int] = field(default_factory=lambda: [2, 5])        # k of the decomposed-logit search
    explain_search_k_prime: list[int] = field(default_factory=lambda: [5])  # k' of the decomposed-logit search
    explain_objective: str = "grid_pointing"  # the searches maximise this metric's mean (or aggregate: the
    # canonization paper's normalised mean of grid pointing, faithfulness correlation, sparseness, sensitivity)
    explain_floor: float = 0.0     # configurations whose mean faithfulness correlation is below it are infeasible
    explain_accuracy_floor: float = 0.9  # (k, k') whose decomposed head keeps less of the full test accuracy
    #                                      (relative accuracy) are infeasible in the k search

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = Recipe(**self.train)
        self.k, self.k_prime = as_size(self.k, None, "k"), as_size(self.k_prime, None, "k_prime")
        self.depth_k = as_size(self.depth_k, None, "depth_k")
        if len(set(self.depth_seeds)) != len(self.depth_seeds) or not self.depth_seeds:
            raise ValueError(f"depth_seeds must be distinct seeds, at least one, got {self.depth_seeds}")
        if not 0 <= self.explain_accuracy_floor <= 1:
            raise ValueError(f"explain_accuracy_floor is a fraction of the full head's accuracy in [0, 1] "
                             f"(0.9 = 90 %), got {self.explain_accuracy_floor}")
        if not 0 <= self.csg_budget <= 1:
            raise ValueError(f"csg_budget is an L1-density of the gates in [0, 1] (the official code: 0.2), "
                             f"got {self.csg_budget}")
        if isinstance(self.fix_model, list) and (not self.fix_model or len(set(self.fix_model)) != len(self.fix_model)):
            raise ValueError(f"fix_model must be one architecture or a list of distinct ones, got {self.fix_model}")
        if self.csg_from not in ("model", "scratch"):
            raise ValueError(f"csg_from must be 'model' (CSG from the trained model) or 'scratch' (a fresh one), "
                             f"got {self.csg_from!r}")

    def replace(self, **settings) -> Profile:
        """A copy with `settings` changed (checked as a profile file's); a value None keeps the current one."""
        changes = {key: value for key, value in settings.items() if value is not None}
        return from_dict(merge(self.to_dict(), changes), "the notebook's parameters")

    def to_dict(self) -> dict:
        return asdict(self)

    def csg_recipe(self) -> Recipe:
        """The training recipe with the CSG epochs and learning rate."""
        return Recipe(**{**asdict(self.train), "epochs": self.csg_epochs, "lr": self.csg_lr})

    def fix_recipe(self) -> Recipe:
        """The training recipe with the ExplainFix epochs (notebook 8)."""
        return Recipe(**{**asdict(self.train), "epochs": self.fix_epochs})

    def fix_architectures(self) -> list[str]:
        """The architectures of notebook 8: `fix_model` as a list, the profile's model's when None."""
        if self.fix_model is None:
            return [self.model.split("@", 1)[0]]
        return [self.fix_model] if isinstance(self.fix_model, str) else list(self.fix_model)

    def prune_recipe(self, epochs: int | None = None) -> Recipe:
        """Fine-tuning after pruning: the training recipe with `prune_epochs` (or `epochs`) and `prune_lr`."""
        return Recipe(**{**asdict(self.train), "epochs": self.prune_epochs if epochs is None else epochs,
                         "lr": self.prune_lr})


SETTINGS = {f.name for f in fields(Profile)}
RECIPE_FIELDS = {f.name for f in fields(Recipe)}


def repo_root() -> Path:
    """The checkout this package runs from (the folder holding `profiles/`), else the working directory."""
    for base in (PACKAGE_ROOT, Path.cwd(), *Path.cwd().parents):
        if (base / "profiles").is_dir():
            return base
    return Path.cwd()


VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand(value):
    """`${VAR:-default}` and `${VAR}` in strings (recursively in lists and dicts) from the environment."""
    if isinstance(value, str):
        out = VARIABLE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
        if VARIABLE.fullmatch(value):  # a whole value from a variable is read as YAML: `max_test: ${N:-100}` is 100
            return yaml.safe_load(out) if out.strip() else None
        return out
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
    """A profile's file: a name in profiles/, or the path of a YAML file (relative: to the cwd, else the repo)."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if path.is_absolute() or (Path.cwd() / path).is_file():
            return path.resolve()
        return repo_root() / path
    path = repo_root() / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (repo_root() / "profiles").glob("*.yaml"))
        raise FileNotFoundError(f"no profile '{profile}': choose one of {names} or pass the path of a YAML file")
    return path


def read_values(profile: str | Path, overrides: dict | None = None) -> dict:
    """The raw values of a profile file after `extends` and `overrides`, with `name` set; keys checked."""
    path = profile_path(profile)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a profile is a mapping of settings, got {type(values).__name__}")  # noqa: TRY004 -- a bad file, not a bad argument
    check_keys(values, str(path), extra={"extends"})
    check_keys(overrides or {}, "the overrides")
    name = values.get("name", path.stem)
    parent = values.pop("extends", None)
    if parent:
        values = merge(read_values(parent), values)
    return merge({**values, "name": name}, overrides or {})


def load_profile(profile: str | Path = "demo", overrides: dict | None = None) -> Profile:
    """A profile by name or path, with `extends`, `overrides` and `${VAR:-default}` resolved, typed and checked."""
    return from_dict(expand(read_values(profile, overrides)), str(profile_path(profile)))


def from_dict(values: dict, where: str) -> Profile:
    """A `Profile` from plain values; unknown keys and values of the wrong type are refused, naming `where`."""
    check_keys(values, where)
    hints = typing.get_type_hints(Profile)
    for key, value in values.items():
        if key != "train" and not matches(value, hints[key]):
            raise ValueError(f"setting '{key}' in {where} must be {describe(hints[key])}, got {value!r}")
    recipe_hints = typing.get_type_hints(Recipe)
    for key, value in (values.get("train") or {}).items():
        if not matches(value, recipe_hints[key]):
            raise ValueError(f"setting 'train.{key}' in {where} must be {describe(recipe_hints[key])}, got {value!r}")
    try:
        return Profile(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"in {where}: {e}") from None


def check_keys(values: dict, where: str, extra: set = frozenset()) -> None:
    """Only the fields of `Profile` (and of `Recipe` under `train`): a misspelt setting fails here, naming the
    nearest one, instead of being silently ignored."""
    train = values.get("train")
    if train is not None and not isinstance(train, (dict, Recipe)):
        raise ValueError(f"setting 'train' in {where} must be a mapping of Recipe fields, got {train!r}")
    items = [*((k, SETTINGS | extra, "") for k in values),
             *((k, RECIPE_FIELDS, "train.") for k in (train if isinstance(train, dict) else {}))]
    for key, allowed, prefix in items:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown setting '{prefix}{key}' in {where}{hint}; every setting is listed, with "
                             f"what it does, in classfilters.Profile (train: the fields of classfilters.Recipe)")


def matches(value, hint) -> bool:
    """Whether a YAML value fits a field's type (int for float is fine; bool is not an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(matches(k, key) and matches(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_set(items: list[str]) -> dict:
    """--set key=value (value parsed as YAML; dotted keys reach into nested settings: train.epochs=20)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return out


def save_profile(profile: Profile, path: Path) -> Path:
    """The resolved profile as YAML (what the runner hands each notebook)."""
    path.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return path
