"""Argument checks shared by the API, the CLI, `altdiff batch` and the server: one definition of "a number",
"an int", "a seed", "a usable tensor", so every boundary accepts and refuses the same things.

Boundaries also normalise here: numpy scalars and 0-d tensors become Python ints and floats (`plain`), so the
code behind a boundary sees plain numbers only."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch

# torch.Generator.manual_seed takes any unsigned 64-bit seed; outside that torch fails with "Overflow when
# unpacking long" (or silently wraps negative seeds).
SEED_MAX = 2**64 - 1


def as_number(x) -> int | float | None:
    """`x` as a Python int or float when it is a finite real number, numpy scalars and 0-d tensors included;
    None otherwise. bool is not a number here (True as a guidance scale is a mistake, not 1)."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 0 or x.dtype == torch.bool or x.is_complex() or x.is_meta:
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


def plain(x):
    """`x` as a Python int or float when it is a number (numpy scalars and 0-d tensors included); anything
    else as it is, for the check that follows to refuse by name."""
    n = as_number(x)
    return x if n is None else n


def seed(name: str, x, count: int = 1) -> int:
    """`x` as a Python int seed such that x, x+1, ..., x+count-1 all lie in 0..2**64-1 (what torch's
    generators take). TypeError for a non-integer, ValueError for one out of range; both name `name`."""
    n = as_number(x)
    if not isinstance(n, int):
        raise TypeError(f"{name}: expected an int in 0..2**64-1, got {x!r}")
    if not 0 <= n <= SEED_MAX - (count - 1):
        last = f" (and the {count} seeds from it, up to {n + count - 1})" if count > 1 else ""
        raise ValueError(f"{name}: must be in 0..2**64-1 ({SEED_MAX}), got {n}{last}")
    return n


def tensor(name: str, x, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """A tensor argument that has data (not on the meta device), the expected number of dimensions and only
    finite values; ValueError naming `name` otherwise. Moving it to the model's device is the caller's."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.is_meta:
        raise ValueError(f"{name}: the tensor is on the meta device and has no data; pass a CPU or CUDA tensor")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in `x` (integer tensors always pass)."""
    return not x.is_floating_point() or bool(torch.isfinite(x).all())


def cross_attention_kwargs(kwargs) -> dict | None:
    """diffusers' `cross_attention_kwargs`: None or {"scale": number} (the LoRA scale; the only key altdiff
    has a use for). Returns it with the scale as a Python float."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise TypeError(f"cross_attention_kwargs: must be a dict such as {{'scale': 0.5}} or None, "
                        f"got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - {"scale"}, key=str)
    if unknown:
        raise ValueError(f"cross_attention_kwargs: unsupported keys {unknown} (only 'scale' is accepted)")
    if "scale" not in kwargs:
        return {}
    scale = as_number(kwargs["scale"])
    if scale is None:
        raise TypeError(f"cross_attention_kwargs['scale']: must be a finite number, got {kwargs['scale']!r}")
    return {"scale": float(scale)}


DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_device(device: str | torch.device | None, require_available: bool = True) -> torch.device:
    """The torch device named by `device` (None: CUDA when available, else the CPU). With
    `require_available` False a CUDA device is accepted on a machine without one (a Ray driver naming the
    workers' device)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a torch device (expected 'cpu', 'cuda' or 'cuda:N')") from None
    if device.type == "cuda" and require_available and not torch.cuda.is_available():
        raise ValueError("device: CUDA was requested but no CUDA device is available (use device='cpu')")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: {device.type!r} is not supported (expected 'cpu' or 'cuda')")
    return device


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} is not supported (expected float16, bfloat16 or float32)")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported (expected one of {sorted(set(DTYPES))})")
    return DTYPES[dtype]


def writable(name: str, folder: str | Path) -> None:
    """ValueError naming `name` unless files can be created in `folder` (made on the first write if missing):
    the nearest folder on its path that exists must be a folder this process may write in. Checked before
    any model loads, so a bad output path costs nothing."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}: cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write to {folder}: no permission to create files in {existing}")
