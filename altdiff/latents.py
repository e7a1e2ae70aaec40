"""Between pixels and latents for generate()'s two families: an init image to its scaled VAE latents, latents
to images through the safety check, and the stop a step callback raises to end sampling early."""

from __future__ import annotations

from typing import TYPE_CHECKING

import PIL.Image
import torch

from . import webui_sampling
from .images import postprocess

if TYPE_CHECKING:
    from .pipeline import Pipeline


class Interrupted(Exception):
    def __init__(self, latents: torch.Tensor):
        self.latents = latents


def image_latents(pipe: Pipeline, image: torch.Tensor, total: int, generator, device, dtype) -> torch.Tensor:
    """img2img: the scaled VAE latent *sample* of each image (first random draws), repeated to `total`."""
    latent_channels = pipe.unet.config.in_channels
    image = image.to(device=device, dtype=dtype)
    if image.shape[1] == latent_channels:
        init = image
    else:
        if isinstance(generator, list):
            # diffusers encodes image[i:i+1] with generator[i]; slices past the image batch are empty.
            init = torch.cat([pipe.vae.encode(image[i:i + 1]).sample(generator[i])
                              for i in range(min(total, image.shape[0]))])
        else:
            init = pipe.vae.encode(image).sample(generator)
        init = pipe.vae.config.scaling_factor * init
    n = init.shape[0]
    if total % n:
        raise ValueError(f"image: a batch of {n} images cannot be spread over {total} generated images")
    return torch.cat([init] * (total // n)) if total > n else init


def decode(pipe: Pipeline, latents: torch.Tensor, output_type: str, truncate: bool = False):
    """(images, nsfw_content_detected): VAE decode, safety check (flagged images black), conversion;
    `truncate`: PIL images by the webui's conversion (255 * x truncated, where diffusers rounds)."""
    if output_type == "latent":
        return latents, None
    nsfw = None
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    if pipe.safety_checker is not None:
        nsfw = pipe.safety_checker.check((decoded / 2 + 0.5).clamp(0, 1))
        # Flagged images are zeroed and skip denormalisation: they come out black, as in diffusers.
        decoded = torch.stack([torch.zeros_like(img) if flag else img for img, flag in zip(decoded, nsfw)])
    if truncate and output_type == "pil":
        arrays = webui_sampling.to_uint8(decoded)
        return [PIL.Image.fromarray(a * (0 if nsfw and nsfw[i] else 1)) for i, a in enumerate(arrays)], nsfw
    return postprocess(decoded, output_type, [not f for f in nsfw] if nsfw else [True] * len(decoded)), nsfw
