"""Live previews from latents by the webui's "Approx cheap" method (modules/sd_vae_approx.py): a fixed linear
map of the 4 SD 1.x latent channels to RGB, at latent resolution (1/8 of the image's size)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

# latent channel -> (R, G, B), the webui's SD 1.x cheap_approximation coefficients
CHEAP_COEFFICIENTS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264),
                      (-0.184, -0.271, -0.473))


def cheap_preview(latent: torch.Tensor) -> PIL.Image.Image:
    """The RGB preview of one (4, h, w) latent, mapped from [-1, 1] to 8-bit as the webui's
    single_sample_to_image does."""
    if latent.ndim != 3 or latent.shape[0] != 4:
        raise ValueError(f"latent: expected shape (4, h, w), got {tuple(latent.shape)}")
    coefficients = torch.tensor(CHEAP_COEFFICIENTS, dtype=torch.float32)
    rgb = torch.einsum("lxy,lr->rxy", latent.detach().float().cpu(), coefficients)
    rgb = (rgb * 0.5 + 0.5).clamp(0, 1)
    return PIL.Image.fromarray((255.0 * np.moveaxis(rgb.numpy(), 0, 2)).astype(np.uint8))
