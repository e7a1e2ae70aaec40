"""The webui's hires fix (StableDiffusionProcessingTxt2Img, 1.10): the target size, the upscale between the
passes (in latent space or, for the model-free upscalers, in pixels) and its infotext keys.

The second pass itself is img2img over the upscaled latent with fresh noise from the same seeds; the family
that runs generate() drives it with these pieces."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .inpaint import LANCZOS

# shared.latent_upscale_modes: upscaler label -> torch interpolate (mode, antialias)
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# modules/upscaler.py's model-free upscalers; "None" is a plain LANCZOS resize in images.resize_image
PIXEL_UPSCALERS = {"None": None, "Lanczos": PIL.Image.Resampling.LANCZOS, "Nearest": PIL.Image.Resampling.NEAREST}
OPT_F = 8  # the webui's opt_f: the VAE's downscale factor of every SD model


class HiresError(ValueError):
    """A hires-fix argument the webui would reject, or one that needs a model altdiff does not run."""


@dataclass(frozen=True)
class HiresOptions:
    """The webui's txt2img hires fields (API names and defaults); hr_* None means "same as the first pass"."""

    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: float = 0.7
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_cfg: float | None = None

    def __post_init__(self):
        if self.hr_upscaler not in LATENT_UPSCALE_MODES and self.hr_upscaler not in PIXEL_UPSCALERS:
            known = ", ".join([*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS])
            raise HiresError(f"hr_upscaler {self.hr_upscaler!r} is not one altdiff runs (model-based upscalers "
                             f"such as ESRGAN are not included); expected one of: {known}")
        if not self.hr_scale > 0:
            raise HiresError(f"hr_scale must be > 0, got {self.hr_scale!r}")
        for name in ("hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HiresError(f"{name} must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise HiresError(f"denoising_strength must be in [0, 1], got {self.denoising_strength!r}")


@dataclass(frozen=True)
class HiresTarget:
    """Where the second pass works: its pixel size and the latent rows/columns cut to reach hr_resize."""

    width: int
    height: int
    truncate_x: int = 0
    truncate_y: int = 0


def target(width: int, height: int, options: HiresOptions, factor: int = OPT_F) -> HiresTarget | None:
    """calculate_target_resolution; None where the webui drops the second pass (the size does not change).
    `factor`: the VAE's (tiny test models have 2)."""
    rx, ry = options.hr_resize_x, options.hr_resize_y
    truncate_x = truncate_y = 0
    if rx == 0 and ry == 0:
        to_x, to_y = int(width * options.hr_scale), int(height * options.hr_scale)
    elif ry == 0:
        to_x, to_y = rx, rx * height // width
    elif rx == 0:
        to_x, to_y = ry * width // height, ry
    else:
        # scale to cover the requested box, then cut the overflow in latent space
        if width / height < rx / ry:
            to_x, to_y = rx, rx * height // width
        else:
            to_x, to_y = ry * width // height, ry
        truncate_x, truncate_y = (to_x - rx) // factor, (to_y - ry) // factor
    if (to_x, to_y) == (width, height):
        return None
    return HiresTarget(to_x, to_y, truncate_x, truncate_y)


def upscale_latent(samples: torch.Tensor, size: HiresTarget, upscaler: str, factor: int = OPT_F) -> torch.Tensor:
    """The latent upscalers: torch interpolate to the target's latent size."""
    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    return F.interpolate(samples, size=(size.height // factor, size.width // factor), mode=mode,
                         antialias=antialias)


def _upscaler_upscale(image: PIL.Image.Image, scale: float, resample) -> PIL.Image.Image:
    # Upscaler.upscale: up to three do_upscale steps of `scale`, then LANCZOS to a multiple of 8
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for _ in range(3):
        shape = image.size
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if shape == image.size or (image.width >= dest_w and image.height >= dest_h):
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def upscale_image(image: PIL.Image.Image, size: HiresTarget, upscaler: str) -> PIL.Image.Image:
    """images.resize_image(0, ...) with a model-free upscaler, as sample_hr_pass calls it."""
    resample = PIXEL_UPSCALERS[upscaler]
    w, h = size.width, size.height
    if resample is not None:
        scale = max(w / image.width, h / image.height)
        if scale > 1.0:
            image = _upscaler_upscale(image, scale, resample)
    if image.size != (w, h):
        image = image.resize((w, h), resample=LANCZOS)
    return image


def to_pixels(decoded: torch.Tensor) -> list[PIL.Image.Image]:
    """sample_hr_pass's first-pass images: [-1, 1] decodes to uint8 by truncation (astype), not rounding."""
    x = torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)
    arrays = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in arrays]


def from_pixels(images: list[PIL.Image.Image]) -> torch.Tensor:
    """The upscaled images as the VAE's [0, 1] input batch (images_tensor_to_samples scales to [-1, 1])."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])).permute(0, 3, 1, 2)


def truncate(samples: torch.Tensor, size: HiresTarget) -> torch.Tensor:
    """Cut the latent overflow of an hr_resize box, split between both sides as the webui does."""
    tx, ty = size.truncate_x, size.truncate_y
    return samples[:, :, ty // 2:samples.shape[2] - (ty + 1) // 2, tx // 2:samples.shape[3] - (tx + 1) // 2]


def infotext_params(options: HiresOptions, *, sampler: str, scheduler: str | None, prompt: str,
                    negative_prompt: str, cfg_scale: float) -> dict[str, object]:
    """The keys StableDiffusionProcessingTxt2Img.init adds, in its order."""
    params: dict[str, object] = {"Denoising strength": options.denoising_strength}
    if options.hr_sampler_name is not None and options.hr_sampler_name != sampler:
        params["Hires sampler"] = options.hr_sampler_name
    if options.hr_scheduler is not None and options.hr_scheduler != scheduler:
        params["Hires schedule type"] = options.hr_scheduler
    if options.hr_prompt and options.hr_prompt != prompt:
        params["Hires prompt"] = options.hr_prompt
    if options.hr_negative_prompt and options.hr_negative_prompt != negative_prompt:
        params["Hires negative prompt"] = options.hr_negative_prompt
    if options.hr_cfg is not None and options.hr_cfg != cfg_scale:
        params["Hires CFG Scale"] = options.hr_cfg
    if options.hr_resize_x == 0 and options.hr_resize_y == 0:
        params["Hires upscale"] = options.hr_scale
    else:
        params["Hires resize"] = f"{options.hr_resize_x}x{options.hr_resize_y}"
    if options.hr_second_pass_steps:
        params["Hires steps"] = options.hr_second_pass_steps
    params["Hires upscaler"] = options.hr_upscaler
    return params


# infotext key -> (HiresOptions field, type); "Hires resize" arrives split as parse() splits "WxH" values
_FROM_INFOTEXT = {"Hires upscale": ("hr_scale", float), "Hires upscaler": ("hr_upscaler", str),
                  "Hires steps": ("hr_second_pass_steps", int), "Hires resize-1": ("hr_resize_x", int),
                  "Hires resize-2": ("hr_resize_y", int), "Hires sampler": ("hr_sampler_name", str),
                  "Hires schedule type": ("hr_scheduler", str), "Hires CFG Scale": ("hr_cfg", float),
                  "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
                  "Denoising strength": ("denoising_strength", float)}


def from_infotext(params: dict[str, object]) -> HiresOptions:
    """The HiresOptions an infotext's hires keys describe (what the webui's paste fills in)."""
    fields = {}
    for key, value in params.items():
        name, kind = _FROM_INFOTEXT[key]
        try:
            fields[name] = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            raise HiresError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    return HiresOptions(**fields)


def options(value: "HiresOptions | dict | None") -> HiresOptions | None:
    """generate()'s `hires`: HiresOptions, or a dict of the webui API's hr_* field names."""
    if value is None or isinstance(value, HiresOptions):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"hires: expected HiresOptions or a dict of its fields, got {type(value).__name__}")
    try:
        return HiresOptions(**value)
    except TypeError as e:
        raise HiresError(f"hires: {e}") from None
