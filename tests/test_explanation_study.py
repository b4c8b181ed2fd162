"""Notebook 10's one-call tables skip, with a printed note, what a model family or a dataset cannot do."""
import pandas as pd
import torch
from torch import nn

from classfilters import FeatureModel, grid_mosaics, open_dataset
from classfilters import explanation_study as ex


def plain_model(classes: int = 10) -> FeatureModel:
    """A conv body with no canonizer family (no BatchNorm, not a known architecture)."""
    torch.manual_seed(0)
    return FeatureModel(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()), nn.Linear(6, classes), name="plain").eval()


def test_an_unsupported_family_is_noted_and_explained_uncanonized(digits_model):
    notes = []
    model = plain_model()
    assert ex.canonize_options(model, "plain", notes.append) == (False,)
    assert ex.canonize_options(digits_model, "resnet8", notes.append) == (True, False)
    table = ex.canonization_table({"plain": model, "resnet8": digits_model}, log=notes.append)
    assert list(table.family) == ["unsupported", "cifar_resnet"] and table.restored_exactly.iloc[1]
    assert len(notes) == 2 and all("no canonizer" in n and "supported:" in n for n in notes)
    mosaics = grid_mosaics(open_dataset("digits", "test"), 2, seed=0)
    influence = torch.zeros(10, 6, dtype=torch.bool)
    influence[:, :3] = True
    tiles, summary = ex.pointing_table(model, mosaics, ["gradient_x_input"],
                                       type("I", (), {"mask": influence})(), "plain", notes.append)
    assert set(tiles.canonized) == {False} and set(summary.start) == {"full", "influential", "non_influential"}
    assert ((summary.grid_pointing_lo <= summary.grid_pointing) & (summary.grid_pointing <= summary.grid_pointing_hi)).all()


def test_fewer_than_four_classes_skip_the_mosaic_tables():
    split = open_dataset("digits", "test")
    keep = torch.nonzero(split.labels < 3).flatten()
    small = split.subset(keep)
    small.classes = small.classes[:3]
    notes = []
    assert ex.study_mosaics(small, 2, log=notes.append) is None and "needs 4 different" in notes[0]
    assert all(isinstance(t, pd.DataFrame) and t.empty for t in ex.pointing_table(plain_model(), None, ["gradient"], None))
    assert ex.metric_table(plain_model(), None, ["gradient"], ["sparseness"], 4).empty
    assert ex.gamma_search(plain_model(), None, {}, 2, "grid_pointing", 0.0, 4) is None
    assert ex.search_summary(None).empty
