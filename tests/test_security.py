"""Hostile and careless input: checkpoints that would run code, class lists that differ between
splits, broken or unwritable caches, bad arguments."""
import pathlib
import pickle

import pytest
import torch

from classfilters.models import CifarResNet, UntrustedCheckpointError, build_model, read_checkpoint


class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran")


def malicious_checkpoints(tmp_path):
    marker = tmp_path / "MARKER"
    state = CifarResNet(8).state_dict()
    zipped = tmp_path / "zipped.th"
    torch.save({"state_dict": state, "extra": Payload(marker)}, zipped)
    legacy = tmp_path / "legacy.th"
    torch.save({"state_dict": state, "extra": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.th"  # a plain pickle named .th: runs before torch's "invalid magic number"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    return marker, (zipped, legacy, raw)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_malicious_checkpoint_runs_no_code(tmp_path):
    marker, files = malicious_checkpoints(tmp_path)
    for path in files:
        renamed = path.with_suffix(".pt")  # a .pt goes through the state-dict path, not the CIFAR one
        renamed.write_bytes(path.read_bytes())
        for load in (read_checkpoint, lambda p: build_model("resnet8", p), lambda p: build_model("resnet8", renamed),
                     lambda p: build_model("resnet50", p)):
            with pytest.raises(UntrustedCheckpointError, match="trust_checkpoint=True") as err:
                load(path)
            assert path.stem in str(err.value) and "run code" in str(err.value)
            assert not marker.exists(), f"loading {path.name} ran its code"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_trusting_a_checkpoint_unpickles_it(tmp_path):
    marker, (zipped, _, _) = malicious_checkpoints(tmp_path)
    model = build_model("resnet8", zipped, trust_checkpoint=True)  # the user said so: the payload runs
    assert marker.read_text() == "code ran"
    assert torch.equal(model.head.weight, torch.load(zipped, weights_only=False)["state_dict"]["linear.weight"])


def test_plain_checkpoints_load_without_trust(tmp_path):
    model = CifarResNet(8, num_classes=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 91.0},
               tmp_path / "m.th")
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    for path in (tmp_path / "m.th", tmp_path / "m.safetensors"):
        loaded = build_model("resnet8", path, num_classes=4)
        assert torch.equal(loaded.head.weight, model.linear.weight)


def test_the_shared_authors_checkpoints_load_safely(shared_data):
    for path in sorted((shared_data / "weights").glob("*.th"))[:2]:
        blob = read_checkpoint(path)
        assert isinstance(blob, dict) and "state_dict" in blob
        build_model(path.name.split("-")[0], path)


def test_a_truncated_checkpoint_says_so(tmp_path):
    torch.save(CifarResNet(8).state_dict(), tmp_path / "full.th")
    data = (tmp_path / "full.th").read_bytes()
    (tmp_path / "cut.th").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="could not be read"):
        read_checkpoint(tmp_path / "cut.th")
