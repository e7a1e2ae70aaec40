"""Image pre/post-processing (as diffusers' VaeImageProcessor) and PNG files with AUTOMATIC1111 infotext."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL.PngImagePlugin import PngInfo

from . import checks
from .atomic import atomic_path

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence

# Pillow's decompression-bomb guard, made an error instead of a warning: a 100-megapixel upload is refused
# before its pixels are decoded.
MAX_IMAGE_PIXELS = 8192 * 8192


def _check_pil(img: PIL.Image.Image) -> None:
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image: {img.width}x{img.height} is larger than the {MAX_IMAGE_PIXELS} pixels allowed")


def open_image(path: str | Path) -> PIL.Image.Image:
    """Open an image file for img2img: size checked before decoding, converted to RGB (16-bit, palette and
    alpha images included)."""
    try:
        img = PIL.Image.open(path)
    except FileNotFoundError:
        raise ValueError(f"image: file not found: {path}") from None
    except (PIL.UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image: {path} is not a readable image ({e})") from None
    _check_pil(img)
    return to_rgb(img)


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits before RGB (Pillow's convert would clip at 255).
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = PIL.Image.fromarray(np.round(arr / peak * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Flatten transparency onto white, as image editors show it.
        img = img.convert("RGBA")
        background = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = PIL.Image.alpha_composite(background, img)
    return img.convert("RGB")


def _check_same_shape(images: list) -> None:
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ValueError(f"image: a list must hold images of one size, got shapes {sorted(shapes)}")


def _as_float(values: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255, the same picture as PIL gives) as float32 in [0, 1]; floating-point pixels as
    they are. Other integer or bool types have no agreed range and are refused."""
    if values.dtype == torch.uint8:
        return values.float() / 255.0
    if not values.is_floating_point():
        raise TypeError(f"image: expected uint8 (0..255) or floating-point pixels, got {values.dtype}")
    return values


def preprocess(image: ImageInput, scale_factor: int, latent_channels: int) -> torch.Tensor:
    """Like diffusers' VaeImageProcessor.preprocess: PIL (resized down to a multiple of `scale_factor`,
    Lanczos), numpy HWC/BHWC and torch CHW/BCHW become a float32 BCHW tensor in [-1, 1]; a tensor with
    `latent_channels` channels is taken as latents and returned unchanged. Arrays and tensors are uint8
    0..255, or floats in [0, 1] (or [-1, 1] when any value is negative, as diffusers reads them); floats
    outside [-1, 1] are refused rather than clipped."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("image: empty list")
    kinds = {type(i) for i in images}
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        if not all(isinstance(i, PIL.Image.Image) for i in images):
            raise TypeError(f"image: a list must hold one kind of image, got {sorted(k.__name__ for k in kinds)}")
        for img in images:
            _check_pil(img)
        w, h = (x - x % scale_factor for x in first.size)
        if w <= 0 or h <= 0:
            raise ValueError(f"image: {first.size[0]}x{first.size[1]} is smaller than {scale_factor} pixels")
        arrays = [np.asarray(to_rgb(i).resize((w, h), resample=PIL.Image.LANCZOS), dtype=np.float32) / 255.0
                  for i in images]
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(first, np.ndarray):
        if not all(isinstance(i, np.ndarray) for i in images):
            raise TypeError("image: a list must hold one kind of image")
        _check_same_shape(images)
        arr = np.concatenate(images) if first.ndim == 4 else np.stack(images)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"image: numpy images must be HxWx3 or BxHxWx3, got shape {tuple(first.shape)}")
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise TypeError(f"image: expected uint8 (0..255) or floating-point pixels, got numpy {arr.dtype}")
        tensor = _as_float(torch.from_numpy(np.ascontiguousarray(arr))).float().permute(0, 3, 1, 2)
    elif isinstance(first, torch.Tensor):
        if not all(isinstance(i, torch.Tensor) for i in images):
            raise TypeError("image: a list must hold one kind of image")
        if any(i.is_meta for i in images):
            raise ValueError("image: the tensor is on the meta device and has no data; pass a CPU or CUDA tensor")
        _check_same_shape(images)
        devices = {i.device for i in images}
        if len(devices) > 1:
            raise ValueError(f"image: a list must hold tensors on one device, got {sorted(map(str, devices))}")
        tensor = torch.cat(images) if first.ndim == 4 else torch.stack(images)
        if tensor.ndim != 4:
            raise ValueError(f"image: tensors must be CxHxW or BxCxHxW, got shape {tuple(first.shape)}")
        if tensor.shape[1] == latent_channels:
            return checks.tensor("image", tensor)  # latents: taken as they are
        tensor = _as_float(tensor)
    else:
        raise TypeError(f"image: expected a PIL image, numpy array, torch tensor or a list of them, got "
                        f"{type(first).__name__}")
    if tensor.shape[1] != 3:
        raise ValueError(f"image: expected 3 colour channels (or {latent_channels} latent channels), got "
                         f"{tensor.shape[1]}")
    h, w = tensor.shape[-2:]
    if h < scale_factor or w < scale_factor:
        raise ValueError(f"image: {w}x{h} is smaller than {scale_factor} pixels")
    checks.tensor("image", tensor)
    low, high = tensor.min().item(), tensor.max().item()
    if low < -1 or high > 1:
        raise ValueError(f"image: float pixels must be in [0, 1] or [-1, 1] (uint8: 0..255), got values in "
                         f"[{low:g}, {high:g}]")
    if h % scale_factor or w % scale_factor:
        # diffusers resizes tensors and arrays with nearest interpolation down to the multiple.
        tensor = torch.nn.functional.interpolate(tensor, size=(h - h % scale_factor, w - w % scale_factor))
    # diffusers takes tensors already in [-1, 1] as they are (a deprecated form it still accepts), judged
    # after the resize.
    return tensor if tensor.min() < 0 else tensor * 2.0 - 1.0


def postprocess(image: torch.Tensor, output_type: str, do_denormalize: Sequence[bool]):
    """[-1, 1] BCHW → "pt" BCHW in [0, 1], "np" BHWC float32, "pil" list of RGB images. Images whose
    `do_denormalize` is False (flagged by the safety checker, already zeroed) come out black."""
    image = torch.stack([(img / 2 + 0.5).clamp(0, 1) if d else img for img, d in zip(image, do_denormalize)])
    if output_type == "pt":
        return image
    arr = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    return [PIL.Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]


def _png_info(infotext: str | None) -> PngInfo:
    # UTF-8 iTXt, so CJK and Arabic prompts survive.
    info = PngInfo()
    if infotext is not None:
        info.add_itxt("parameters", infotext)
    return info


def encode_png(image: PIL.Image.Image, infotext: str | None = None) -> bytes:
    """PNG bytes with the infotext as the "parameters" chunk, as save_png writes them."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(infotext))
    return buffer.getvalue()


def save_png(image: PIL.Image.Image, path: str | Path, infotext: str | None = None,
             replace: bool = True) -> Path:
    """Write a PNG atomically (temp file in the same folder, then rename) with the infotext as a UTF-8
    iTXt "parameters" chunk, so CJK and Arabic prompts survive. replace=False raises FileExistsError
    rather than replace an existing file (atomic_path)."""
    path = Path(path)
    with atomic_path(path, replace=replace) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(infotext))
    return path


def save_numbered(image: PIL.Image.Image, folder: str | Path, name: str, infotext: str | None = None) -> Path:
    """Save as the next free number in `folder`, as the webui numbers files (`name` holds `{number:05}`).
    Safe between processes sharing the folder: a name another process took meanwhile is never replaced; the
    next number is tried instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in folder.glob("*.png") if (m := re.match(r"(?:grid-)?(\d+)", p.name))]
    number = max(taken, default=-1) + 1
    while True:
        try:
            return save_png(image, folder / name.format(number=number), infotext, replace=False)
        except FileExistsError:
            number += 1


def read_infotext(path: str | Path) -> str | None:
    with PIL.Image.open(path) as img:
        return img.info.get("parameters")
