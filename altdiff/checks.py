"""Argument checks shared by the API, the CLI, `altdiff batch` and the server: one definition of "a number",
"an int", "a finite tensor", so every boundary accepts and refuses the same things."""

from __future__ import annotations

import math
import numbers

import torch


def as_number(x) -> int | float | None:
    """`x` as a Python int or float when it is a finite real number, numpy scalars and 0-d tensors included;
    None otherwise. bool is not a number here (True as a guidance scale is a mistake, not 1)."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 0 or x.dtype == torch.bool or x.is_complex():
            return None
        x = x.item()
    if isinstance(x, bool) or type(x).__name__ == "bool_":  # numpy.bool_ is no numbers.Integral, but say it
        return None
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real) and math.isfinite(x):
        return float(x)
    return None


def is_number(x) -> bool:
    return as_number(x) is not None


def is_int(x, low: int | None = None, high: int | None = None) -> bool:
    """An integer (Python, numpy or 0-d tensor; not bool, not 3.0) in [low, high] where given."""
    n = as_number(x)
    return isinstance(n, int) and (low is None or n >= low) and (high is None or n <= high)
