"""Reading checkpoint files and strict, key- and shape-checked loading onto meta-built modules.

Module attribute names equal the checkpoint keys, so loading is a copy: no rename table, no random init.
Pickled formats go through `torch.load(weights_only=True)` only, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)
log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class WeightsError(ValueError):
    """A weights file is unreadable, unsafe, or does not fit the model."""


def _check_safetensors_header(path: Path) -> None:
    # safetensors' own messages do not say which file; check the framing ourselves first.
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise WeightsError(f"{path}: truncated safetensors file (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated safetensors file (tensor data ends at byte {8 + n + end}, "
                           f"file has {size})")


def read_state_dict(path: str | Path) -> StateDict:
    """All tensors of one file, on CPU. `.safetensors` is memory-mapped; pickle formats are read with
    `weights_only=True` and must hold only tensors (a `state_dict` wrapper, as in LDM `.ckpt`, is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix in SAFETENSORS_SUFFIXES:
        _check_safetensors_header(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: corrupt safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip archive" in str(e) or "central directory" in str(e):
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e2:
                    raise WeightsError(f"{path}: unreadable checkpoint ({_first_line(e2)})") from None
            else:
                raise WeightsError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None
        except pickle.UnpicklingError as e:
            raise WeightsError(f"{path}: refused to unpickle: the file holds objects other than tensors "
                               f"(only weights_only loading is allowed; {_first_line(e)})") from None
        except Exception as e:
            raise WeightsError(f"{path}: unreadable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
        return _tensors_only(obj, path)
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r} "
                       f"(expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _tensors_only(obj, path: Path) -> StateDict:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: expected only tensors, but {len(bad)} entries are not "
                           f"(first: {bad[:3]!r})")
    return obj


# diffusers saves models as diffusion_pytorch_model.*, transformers (text encoder, safety checker) as
# model.safetensors / pytorch_model.bin.
WEIGHT_NAMES = (("diffusion_pytorch_model", ".safetensors"), ("model", ".safetensors"),
                ("diffusion_pytorch_model", ".bin"), ("pytorch_model", ".bin"))


def find_weights(folder: str | Path, variant: str | None = None) -> Path:
    """The weights file of one component folder, in diffusers' or transformers' naming: safetensors before
    .bin, the `variant` file (e.g. fp16) before the plain one, which serves when the variant is absent, as
    in diffusers."""
    folder = Path(folder)
    names = [f"{stem}.{variant}{suffix}" for stem, suffix in WEIGHT_NAMES] if variant else []
    names += [f"{stem}{suffix}" for stem, suffix in WEIGHT_NAMES]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _summary(items: list, what: str, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {what}: {shown}{more}"


def check_state_dict(model: nn.Module, state_dict: StateDict, source: str) -> None:
    """Raise one WeightsError listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} (model expects {tuple(v.shape)})"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    # Weights quantized to (or mislabelled as) an integer dtype would be cast to garbage floats.
    dtypes = [f"{k} {state_dict[k].dtype}" for k, v in expected.items()
              if k in state_dict and v.is_floating_point() and not state_dict[k].is_floating_point()]
    problems = [_summary(x, w) for x, w in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                            (shapes, "shape mismatches"),
                                            (dtypes, "weights in a non-floating-point dtype")) if x]
    if problems:
        raise WeightsError(f"{source}: weights do not fit {type(model).__name__}; " + "; ".join(problems))


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` when it is floating point; integer tensors and dtype None leave it as it is."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_module(build: Callable[[], M], state_dict: StateDict, source: str, *,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                ignore: Iterable[str] = ()) -> M:
    """Build a module on the meta device (no init cost) and fill it from `state_dict`, strictly.

    `ignore` lists key prefixes the checkpoint may carry that the model does not use (e.g. an unused pooler).
    Floating-point tensors are cast to `dtype`; the result is moved to `device`.
    """
    with torch.device("meta"):
        model = build()
    ignore = tuple(ignore)
    skipped = [k for k in state_dict if ignore and k.startswith(ignore)]
    if skipped:
        log.debug("%s: ignored %d unused tensors: %s", source, len(skipped), ", ".join(skipped))
    state_dict = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
    check_state_dict(model, state_dict, source)
    converted = {}
    for k, v in state_dict.items():
        v = cast_floating(v, dtype)
        converted[k] = v.to(device) if device is not None else v
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime in ns, size): what tells a changed file from the one read before."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def file_hash(path: str | Path, addnet: bool = False) -> str:
    """sha256 of a file, or with `addnet` of a .safetensors file's tensor data only (everything after the
    header: kohya's "addnet" hash, the webui's modules/hashes.py addnet_hash_safetensors). Cached by path,
    mtime and size, as the webui caches its hashes."""
    path = Path(path).resolve()
    return _file_hash(path, file_stamp(path), addnet)


@lru_cache(maxsize=256)
def _file_hash(path: Path, stamp: tuple[int, int], addnet: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if addnet:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
