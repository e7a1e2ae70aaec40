"""Reading checkpoint files and strict, key- and shape-checked loading onto meta-built modules.

Module attribute names equal the checkpoint keys, so loading is a copy: no rename table, no random init.
`.safetensors` tensors are read from the mapped file straight onto the target device (no CPU copy on the
way to a GPU) and converted to the target dtype there. Pickled formats go through
`torch.load(weights_only=True)` only, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)
log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class WeightsError(ValueError):
    """A weights file is unreadable, unsafe, or does not fit the model."""


def _check_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """Every tensor's shape and dtype, from the header. safetensors' own messages do not say which file;
    check the framing ourselves first."""
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
    return {k: (tuple(v.get("shape", ())), _SAFETENSORS_DTYPES.get(v.get("dtype"), v.get("dtype")))
            for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _is_floating(dtype: torch.dtype | str) -> bool:
    # A dtype torch names (above) or safetensors' own name for the others (F8_E4M3, ...).
    return dtype.is_floating_point if isinstance(dtype, torch.dtype) else str(dtype).startswith(("F", "BF"))


def _safetensors_device(device: torch.device | str | None) -> str:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A `.safetensors` file as a state dict that reads each tensor when it is looked up, from the mapped file
    onto `device`. Keys, shapes and dtypes (`meta`) come from the header: checking a model against the file
    reads no data."""

    def __init__(self, path: str | Path, device: torch.device | str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: weights file not found")
        self.meta = _check_safetensors_header(self.path)
        try:
            self._file = safe_open(str(self.path), framework="pt", device=_safetensors_device(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors file ({e})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.meta:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors file ({key}: {e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)


def open_weights(path: str | Path, device: torch.device | str | None = None) -> Mapping[str, torch.Tensor]:
    """A component's weights file as a state dict: `.safetensors` read tensor by tensor onto `device`
    (`SafetensorsFile`), other formats read whole onto the CPU (`read_state_dict`)."""
    path = Path(path)
    return SafetensorsFile(path, device) if path.suffix in SAFETENSORS_SUFFIXES else read_state_dict(path)


def read_state_dict(path: str | Path) -> StateDict:
    """All tensors of one file, on CPU. `.safetensors` is memory-mapped; pickle formats are read with
    `weights_only=True` and must hold only tensors (a `state_dict` wrapper, as in LDM `.ckpt`, is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return dict(SafetensorsFile(path))
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


def _meta(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """Each tensor's shape and dtype."""
    if isinstance(state_dict, SafetensorsFile):
        return dict(state_dict.meta)  # from the header: no tensor read
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one WeightsError listing missing keys, unexpected keys and shape mismatches."""
    _check_meta(model, _meta(state_dict), source)


def _check_meta(model: nn.Module, got: dict[str, tuple[tuple[int, ...], torch.dtype | str]], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {got[k][0]} (model expects {tuple(v.shape)})"
              for k, v in expected.items() if k in got and got[k][0] != tuple(v.shape)]
    # Weights quantized to (or mislabelled as) an integer dtype would be cast to garbage floats.
    dtypes = [f"{k} {got[k][1]}" for k, v in expected.items()
              if k in got and v.is_floating_point() and not _is_floating(got[k][1])]
    problems = [_summary(x, w) for x, w in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                            (shapes, "shape mismatches"),
                                            (dtypes, "weights in a non-floating-point dtype")) if x]
    if problems:
        raise WeightsError(f"{source}: weights do not fit {type(model).__name__}; " + "; ".join(problems))


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` when it is floating point; integer tensors and dtype None leave it as it is."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def check_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                  ignore: Iterable[str] = ()) -> list[str]:
    """`check_state_dict` for the keys not under an `ignore` prefix, which it returns."""
    ignore = tuple(ignore)
    skipped = [k for k in state_dict if ignore and k.startswith(ignore)]
    if skipped:
        log.debug("%s: ignored %d unused tensors: %s", source, len(skipped), ", ".join(skipped))
    meta = {k: v for k, v in _meta(state_dict).items() if not (ignore and k.startswith(ignore))}
    _check_meta(model, meta, source)
    return list(meta)


def load_module(build: Callable[[], M], state_dict: Mapping[str, torch.Tensor], source: str, *,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                ignore: Iterable[str] = ()) -> M:
    """Build a module on the meta device (no init cost) and fill it from `state_dict`, strictly: keys and
    shapes are checked before any tensor is read.

    `ignore` lists key prefixes the checkpoint may carry that the model does not use (e.g. an unused pooler).
    Each tensor goes to `device` first and is cast to `dtype` there (floating point only).
    """
    with torch.device("meta"):
        model = build()
    converted = {}
    for k in check_weights(model, state_dict, source, ignore):
        v = state_dict[k]
        converted[k] = cast_floating(v.to(device) if device is not None else v, dtype)
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
