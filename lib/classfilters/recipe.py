"""`Recipe`: how the library trains a classifier (SGD + Nesterov, one-cycle, crop and flip; or Adam at a
constant learning rate, the authors' fine-tuning of §5.2.3).

A plain dataclass with no torch import, so that a profile (profile.py) can be read and
checked without loading torch; `train.py` does the training.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class Recipe:
    epochs: int = 30            # passes over the training split
    batch_size: int = 128       # images per step
    lr: float = 0.1             # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4  # L2 on all weights
    crop_padding: int | None = None  # random-crop padding in pixels (None: an eighth of the width; 0: none)
    flip: bool = True           # random horizontal flips (off for digits)
    label_smoothing: float = 0.0
    optimizer: str = "sgd"      # "sgd": SGD + Nesterov (momentum 0.9), one-cycle to `lr`; "adam": Adam at the
    #                             constant `lr` (the authors' whole-network fine-tuning: lr 1e-4, weight decay 0)
    compile: bool = False       # torch.compile the network (CUDA graphs on a GPU): a slower start, faster steps;
    #                             every batch then holds exactly batch_size images (the last one topped up)
    precision: str = "auto"     # "auto": bf16 autocast on GPUs and on CPUs that compute bf16 natively (AVX512-BF16
    #                             or AMX: 1.4x a float32 loop for a CIFAR ResNet-20 on an AMD Zen 4), float32
    #                             on other CPUs; "bf16" or "fp32" to choose (the loss is always float32)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} ('auto': bf16 where the device computes it "
                             f"natively), got {self.precision!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' (SGD + Nesterov, one-cycle) or 'adam' (constant lr), "
                             f"got {self.optimizer!r}")
