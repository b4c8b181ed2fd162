"""The sizes k and k': the one place that says what they may be.

k (features kept per image) and k' (features kept per class) are each an int *count* in [1, D],
or a float *fraction of mass* in (0, 1] (the fewest components covering that share of an image's
activations, or of a class histogram). `as_size` normalises and checks one value; the kernels
(influence, decomposed), the profile, the study, the widget, the grid axes (`grid_sizes`, which
drops what does not fit with a printed note) and the command line (`parse_size`) all go through it.
numpy and tensor integers are counts, numpy and tensor floats fractions. No torch import.
"""
from __future__ import annotations

import math
import numbers

Size = int | float  # an int count, or a float fraction of mass in (0, 1]
DEFAULT_K = 5       # the paper's k = k' = 5 on CIFAR-10: the default everywhere k or k' is not given


def as_size(value, limit: int | None, name: str = "k") -> Size:
    """`value` as a count (int in [1, limit]) or a fraction of mass (float in (0, 1]); an error otherwise.
    `limit` is D, the number of features (None: unchecked above)."""
    if not isinstance(value, numbers.Real) and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a 0-d tensor or array
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int count or a float fraction of mass, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if value < 1 or (limit is not None and value > limit):
            top = f"D={limit}" if limit is not None else "D"
            raise ValueError(f"{name}={value} is out of range: a count must lie between 1 and {top} "
                             f"(or give a fraction of mass in (0, 1], e.g. 0.9)")
        return value
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{name}={value} is out of range: a fraction of mass must lie in (0, 1] "
                         f"(or give a count, e.g. 5)")
    return value


def parse_size(text: str, name: str = "k", check: bool = True) -> Size:
    """'5' -> 5 (a count); '0.9' -> 0.9 (a fraction of mass), range-checked except against D (`check`; the
    command line checks the range later, with every other argument, so that all problems are said at once)."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is neither a count (5) nor a fraction of mass (0.9)") from None
    return as_size(value, None, name) if check else value


def grid_sizes(values, limit: int, name: str = "k", log=print) -> list[int]:
    """The counts of a grid axis that fit D = `limit` features, sorted and unique; the others are
    dropped with one printed note (a grid on a narrow model keeps its smaller values)."""
    keep, dropped = set(), []
    for v in values:
        try:
            keep.add(as_size(v, limit, name))
        except ValueError:
            dropped.append(v)
    bad = [v for v in keep if not isinstance(v, int)]
    if bad:
        raise TypeError(f"a grid axis holds counts, got fractions {bad} for {name}")
    if dropped and log:
        log(f"note: {name} values {dropped} dropped from the grid: they must lie in [1, D={limit}]")
    if not keep:
        raise ValueError(f"no {name} value of {list(values)} lies in [1, D={limit}]")
    return sorted(keep)
