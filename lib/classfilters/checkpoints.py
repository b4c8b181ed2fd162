"""Checkpoints read without running code from them, and loaded with a clear error on a mismatch.

A `.safetensors` file holds tensors only; anything else is read by `torch.load(weights_only=True)`,
whose unpickler builds only tensors and plain containers. A file that needs a full unpickling
(a pickled model, custom classes) is refused unless the caller trusts it (`trust_checkpoint=True`).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists what does not match."""
    own = model.state_dict()
    state = dict(state)
    for k in own:  # checkpoints from before PyTorch 0.4.1 lack BatchNorm's step counter
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ValueError(f"checkpoint {source} does not match {type(model).__name__}: " + ", ".join(parts)
                         + ". Pick the model the checkpoint was saved from.")
    model.load_state_dict(state)


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and plain containers: reading it would run its code."""


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False):
    """The object saved in a checkpoint file, read without running any code from it.

    `.safetensors` files are read by safetensors (tensors only, by design). Anything else is
    read by `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain
    containers (dict, list, numbers, strings) and refuses every other object before making
    it: a pickle can name any Python function to call, so a full unpickling would run
    whatever code the file's author chose. Checkpoints that really need it (a whole pickled
    model, custom classes) are refused unless `trust_checkpoint=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass the path of a weights file, "
                                "e.g. ../shared/data/weights/resnet20-12fca82f.th")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e}); "
                             "is it complete?") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower() and "weights only" not in str(e).lower():
            raise ValueError(f"checkpoint {path} could not be read ({e}); is it a complete torch.save file?") from e
        if not trust_checkpoint:
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            operand = re.search(r"Unsupported operand \d+", str(e))
            detail = (f"it names the callable {named.group(1)}" if named else
                      f"{operand.group(0)}: not a torch.save file of tensors" if operand else "see the cause below")
            raise UntrustedCheckpointError(
                f"checkpoint {path} holds Python objects other than tensors ({detail}); unpickling it would "
                "run code named by the file. It was not loaded. If you trust its source, pass "
                "trust_checkpoint=True (CLI: --trust-checkpoint), or better, re-save its state_dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors.") from e
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                         "is it a complete torch.save file?") from e
    try:  # trusted by the caller: a full unpickling
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                         "is it a complete torch.save file?") from e


def read_state_dict(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """The state dict in a checkpoint (under "state_dict" or "model" when wrapped; `module.` prefix removed)."""
    blob = read_checkpoint(path, trust_checkpoint)
    state = blob.get("state_dict", blob.get("model", blob)) if isinstance(blob, dict) else blob
    if isinstance(state, nn.Module):  # a whole pickled model (trusted)
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
