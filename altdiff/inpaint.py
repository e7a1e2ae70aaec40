"""Inpainting as the AUTOMATIC1111 webui (1.10) prepares it for an ordinary 4-channel model.

Follows StableDiffusionProcessingImg2Img.init (mask binarising, per-axis blur, invert, "only masked"
crop with padding, fill modes), modules/masking.py, images.resize_image and apply_overlay: the pixel work
before the VAE encode, the latent mask after it, and the overlay after the decode.
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch

LANCZOS = PIL.Image.Resampling.LANCZOS

# resize_mode: the webui's "Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"
RESIZE_MODES = (0, 1, 2, 3)
# inpainting_fill: "fill", "original", "latent noise", "latent nothing"
FILL_MODES = (0, 1, 2, 3)


class InpaintError(ValueError):
    """An inpainting argument outside what the webui accepts."""


@dataclass(frozen=True)
class InpaintOptions:
    """The webui's img2img mask fields (API names), with the webui's UI defaults."""

    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    mask_round: bool = True
    resize_mode: int = 0

    def __post_init__(self):
        for name in ("mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InpaintError(f"{name} must be an integer >= 0, got {value!r}")
        if self.inpainting_fill not in FILL_MODES:
            raise InpaintError(f"inpainting_fill must be one of {FILL_MODES}, got {self.inpainting_fill!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise InpaintError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")


@dataclass
class PreparedInpaint:
    """One image's pixel-side result: what to encode, the latent mask source, and what to paste back."""

    image: PIL.Image.Image          # RGB at (width, height), filled when inpainting_fill != 1
    mask: PIL.Image.Image           # the processing-size mask the latent mask is made from
    overlay: PIL.Image.Image        # RGBA: the original outside the mask, composited over the result
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) of the "only masked" crop, else None


def binary_mask(mask: PIL.Image.Image, round: bool = True) -> PIL.Image.Image:
    """processing.create_binary_mask: an RGBA mask with real alpha is read from its alpha channel."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round else alpha
    return mask.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    # the webui's kernel-size rule; cv2.getGaussianKernel's sampled, normalised Gaussian
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-x * x / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def _blur_axis(array: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    kernel = _gaussian_kernel(sigma)
    half = len(kernel) // 2
    pad = [(0, 0)] * array.ndim
    pad[axis] = (half, half)
    # cv2's default border, BORDER_REFLECT_101, is numpy's "reflect"
    padded = np.pad(array.astype(np.float64), pad, mode="reflect")
    length = array.shape[axis]
    out = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur_mask(mask: PIL.Image.Image, blur_x: int, blur_y: int) -> PIL.Image.Image:
    """The webui's mask blur: cv2.GaussianBlur along x with sigma blur_x, then along y with blur_y.

    In floating point, where OpenCV rounds its uint8 kernel to fixed point: within one level per axis."""
    array = np.array(mask)
    if blur_x > 0:
        array = _blur_axis(array, blur_x, axis=1)
    if blur_y > 0:
        array = _blur_axis(array, blur_y, axis=0)
    return PIL.Image.fromarray(array)


def crop_region(mask: PIL.Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """masking.get_crop_region_v2: the masked pixels' bounding box grown by pad, None for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height))


def _expand_span(lo: int, hi: int, desired: float, limit: int) -> tuple[int, int]:
    diff = int(desired - (hi - lo))
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int,
                       image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """masking.expand_crop_region: grow the region to the processing size's aspect ratio, kept in the image."""
    x1, y1, x2, y2 = region
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _expand_span(y1, y2, (x2 - x1) / ratio, image_height)
    else:
        x1, x2 = _expand_span(x1, x2, (y2 - y1) * ratio, image_width)
    return x1, y1, x2, y2


def fill(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """masking.fill: the masked area takes the colours of its surroundings by repeated blurs."""
    result = PIL.Image.new("RGBA", image.size)
    masked = PIL.Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(PIL.ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def resize_image(resize_mode: int, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """images.resize_image with no img2img upscaler (LANCZOS). Mode 3 resizes in latent space, so the
    webui sends only masks here with it, and they take the "resize and fill" branch as in the webui."""
    if resize_mode not in RESIZE_MODES:
        raise InpaintError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if image.mode == "RGBA":
        image = image.convert("RGB")
    if resize_mode == 0:
        return image.resize((width, height), resample=LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    result = PIL.Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if resize_mode == 1:
        return result
    # "resize and fill": stretch the resized image's edge rows/columns into the bands left empty
    if ratio < src_ratio and height // 2 - src_h // 2 > 0:
        band = height // 2 - src_h // 2
        result.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        result.paste(resized.resize((width, band), box=(0, src_h, width, src_h)), box=(0, band + src_h))
    elif ratio > src_ratio and width // 2 - src_w // 2 > 0:
        band = width // 2 - src_w // 2
        result.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        result.paste(resized.resize((band, height), box=(src_w, 0, src_w, height)), box=(band + src_w, 0))
    return result


def flatten(image: PIL.Image.Image, background: str = "#ffffff") -> PIL.Image.Image:
    """images.flatten: transparency over the webui's default img2img background colour."""
    if image.mode == "RGBA":
        base = PIL.Image.new("RGBA", image.size, background)
        base.alpha_composite(image)
        image = base
    return image.convert("RGB")


def prepare(image: PIL.Image.Image, mask: PIL.Image.Image, width: int, height: int,
            options: InpaintOptions) -> PreparedInpaint:
    """StableDiffusionProcessingImg2Img.init's pixel work for one image and its mask."""
    mask = binary_mask(mask, options.mask_round)
    if options.inpainting_mask_invert:
        mask = PIL.ImageOps.invert(mask)
    mask = blur_mask(mask, options.mask_blur_x, options.mask_blur_y)

    region = crop_region(mask, options.inpaint_full_res_padding) if options.inpaint_full_res else None
    if region is not None:
        region = expand_crop_region(region, width, height, mask.width, mask.height)
        overlay_mask = mask
        mask = resize_image(2, mask.crop(region), width, height)
        paste_to = (region[0], region[1], region[2] - region[0], region[3] - region[1])
    else:
        # a blank mask makes the webui drop "only masked" and carry on as whole-picture inpainting
        mask = resize_image(options.resize_mode, mask, width, height)
        overlay_mask = PIL.Image.fromarray(np.clip(np.array(mask).astype(np.float32) * 2, 0, 255).astype(np.uint8))
        paste_to = None

    image = flatten(image)
    if region is None and options.resize_mode != 3:
        image = resize_image(options.resize_mode, image, width, height)
    if overlay_mask.size != image.size:
        overlay_mask = resize_image(options.resize_mode, overlay_mask, image.width, image.height)
    overlay = PIL.Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(overlay_mask.convert("L")))
    if region is not None:
        image = resize_image(2, image.crop(region), width, height)
    if options.inpainting_fill != 1:
        if image.size != mask.size:
            # the webui's fill pastes through the processing-size mask; mode 3 leaves the image unresized
            raise InpaintError(f"inpainting_fill={options.inpainting_fill} with resize_mode=3 needs an image of "
                               f"the processing size {width}x{height}, got {image.width}x{image.height}")
        image = fill(image, mask)
    return PreparedInpaint(image=image, mask=mask, overlay=overlay.convert("RGBA"), paste_to=paste_to)


def latent_mask(mask: PIL.Image.Image, latent_width: int, latent_height: int, round: bool = True,
                channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, nmask) as the webui builds them: 1 keeps the init latent, nmask = 1 - mask is repainted."""
    small = mask.convert("RGB").resize((latent_width, latent_height))
    keep_out = np.array(small, dtype=np.float32)[..., 0] / 255
    if round:
        keep_out = np.around(keep_out)
    nmask = torch.from_numpy(np.tile(keep_out[None], (channels, 1, 1)))
    return 1.0 - nmask, nmask


def fill_latent(init_latent: torch.Tensor, mask: torch.Tensor, nmask: torch.Tensor, inpainting_fill: int,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """The latent fills: 2 "latent noise" puts `noise` (the image's seed noise) under the mask, 3 "latent
    nothing" zeros it; 0 and 1 act on pixels and leave the latent alone."""
    if inpainting_fill == 2:
        if noise is None:
            raise InpaintError("inpainting_fill=2 (latent noise) needs the seed noise")
        return init_latent * mask + noise * nmask
    if inpainting_fill == 3:
        return init_latent * mask
    return init_latent


def apply_overlay(image: PIL.Image.Image, overlay: PIL.Image.Image,
                  paste_to: tuple[int, int, int, int] | None = None) -> PIL.Image.Image:
    """processing.apply_overlay (with uncrop): the result is put back in place, the original over it."""
    if paste_to is not None:
        x, y, w, h = paste_to
        base = PIL.Image.new("RGBA", overlay.size)
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


def diffusers_mask(mask_image, size: tuple[int, int]) -> torch.Tensor:
    """StableDiffusionInpaintPipeline's mask_processor: grayscale, LANCZOS to the image's (height, width),
    binarised at 0.5; shape (n, 1, height, width), 1 = repaint."""
    masks = mask_image if isinstance(mask_image, list) else [mask_image]
    if not masks or not all(isinstance(m, PIL.Image.Image) for m in masks):
        raise TypeError(f"mask_image: expected a PIL image or a list of them, got {type(mask_image).__name__}")
    height, width = size
    arrays = [np.asarray(m.convert("L").resize((width, height), resample=LANCZOS), dtype=np.float32) / 255.0
              for m in masks]
    return (torch.from_numpy(np.stack(arrays))[:, None] >= 0.5).float()


def infotext_params(options: InpaintOptions, only_masked: bool) -> dict[str, object]:
    """The keys StableDiffusionProcessingImg2Img.init adds for a mask, in its order; `only_masked`: the
    "only masked" crop happened (a blank mask turns it off)."""
    params: dict[str, object] = {}
    if options.inpainting_mask_invert:
        params["Mask mode"] = "Inpaint not masked"
    # the webui's single mask_blur exists only when both axes agree; a None value is left out of infotexts
    if (options.mask_blur_x > 0 or options.mask_blur_y > 0) and options.mask_blur_x == options.mask_blur_y:
        params["Mask blur"] = options.mask_blur_x
    if only_masked:
        params["Inpaint area"] = "Only masked"
        params["Masked area padding"] = options.inpaint_full_res_padding
    content = {0: "fill", 2: "latent noise", 3: "latent nothing"}.get(options.inpainting_fill)
    if content is not None:
        params["Masked content"] = content
    return params


def options(value: "InpaintOptions | dict | None") -> InpaintOptions:
    """generate()'s `inpaint_options`: InpaintOptions (None: the webui UI's defaults), or a dict of the webui
    API's field names (`mask_blur` sets both axes, as the webui's setter does)."""
    if value is None:
        return InpaintOptions()
    if isinstance(value, InpaintOptions):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"inpaint_options: expected InpaintOptions or a dict, got {type(value).__name__}")
    fields = dict(value)
    blur = fields.pop("mask_blur", None)
    if blur is not None:
        fields["mask_blur_x"] = fields["mask_blur_y"] = blur
    try:
        return InpaintOptions(**fields)
    except TypeError as e:
        raise InpaintError(f"inpaint_options: {e}") from None
