"""The webui's classifier-free-guidance denoiser (modules/sd_samplers_cfg_denoiser.py, CFGDenoiser) at its
default options: what a k-diffusion-form sampler calls as `model(x, sigma)`.

Per call it rebuilds the step's conditioning from the prompt schedules (altdiff.conditioning: prompt editing,
alternation, AND), runs the inner denoiser on [every AND sub-prompt of every image] + [every image's
uncond] in one call when cond and uncond have the same token length, else cond and uncond as separate calls
(the webui's rule; pad_cond_uncond off), combines them with the AND weights, and blends in the init latent
under an inpainting mask. `step` counts calls, as the webui's does: second-order samplers advance it twice a
step, and the prompt schedules were made for that count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .conditioning import (
    MulticondLearnedConditioning,
    ScheduledPromptConditioning,
    reconstruct_cond_batch,
    reconstruct_multicond_batch,
)

Inner = Callable[..., torch.Tensor]  # inner(x, sigma, cond=text states) -> denoised


class CFGDenoiser:
    """`inner(x, sigma, cond)` is the model wrapped as k-diffusion does (CompVis: returns denoised x0)."""

    def __init__(self, inner: Inner, cond: MulticondLearnedConditioning,
                 uncond: list[list[ScheduledPromptConditioning]], cond_scale: float, s_min_uncond: float = 0.0):
        self.inner, self.cond, self.uncond = inner, cond, uncond
        self.cond_scale, self.s_min_uncond = cond_scale, s_min_uncond
        self.step = 0
        self.init_latent: torch.Tensor | None = None  # inpainting: the latent kept where mask is 1
        self.mask: torch.Tensor | None = None
        self.nmask: torch.Tensor | None = None
        # The timestep samplers blend the (un-noised) init latent into x before the model call; k-diffusion's
        # into the denoised prediction after it (CFGDenoiserTimesteps / CFGDenoiser).
        self.mask_before_denoising = False
        # DDIM CFG++ (timestep_samplers.ddim_cfgpp) scales the guidance and reads the uncond prediction back.
        self.cond_scale_multiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.mask is not None and self.mask_before_denoising:
            x = self.blend(x)
        conds_list, tensor = reconstruct_multicond_batch(self.cond, self.step)
        uncond = reconstruct_cond_batch(self.uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(conds) for conds in conds_list]
        x_in = torch.cat([x[i:i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([sigma[i:i + 1].expand(n) for i, n in enumerate(repeats)] + [sigma])
        tensor, uncond = tensor.to(x.device), uncond.to(x.device)

        # s_min_uncond ("NGMS"): on odd calls below that sigma, the uncond pass is skipped.
        skip_uncond = bool(self.step % 2 and self.s_min_uncond > 0 and sigma[0] < self.s_min_uncond)
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            x_out = self.inner(x_in, sigma_in, cond=cond_in)
        else:
            # Different token lengths: the webui's separate calls, cond in chunks of twice the batch.
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = self.inner(x_in[a:b], sigma_in[a:b], cond=tensor[a:b])
            x_out[-uncond.shape[0]:] = self.inner(x_in[-uncond.shape[0]:], sigma_in[-uncond.shape[0]:], cond=uncond)
        if skip_uncond:
            # The cond prediction stands in for the missing uncond one, and guidance becomes 1.
            x_out = torch.cat([x_out, torch.cat([x_out[conds[0][0]:conds[0][0] + 1] for conds in conds_list])])
        if self.need_last_noise_uncond:
            self.last_noise_uncond = x_out[-batch_size:].clone()
        scale = 1.0 if skip_uncond else self.cond_scale * self.cond_scale_multiplier
        denoised = combine_denoised(x_out, conds_list, batch_size, scale)
        if self.mask is not None and not self.mask_before_denoising:
            denoised = self.blend(denoised)
        self.step += 1
        return denoised

    def blend(self, latent: torch.Tensor) -> torch.Tensor:
        """Inpainting: the init latent where the mask keeps the picture, `latent` where it is repainted."""
        return latent * self.nmask + self.init_latent * self.mask


def combine_denoised(x_out: torch.Tensor, conds_list: list[list[tuple[int, float]]], batch_size: int,
                     cond_scale: float) -> torch.Tensor:
    """uncond + sum over AND sub-prompts of weight * cond_scale * (cond - uncond), per image, in the webui's
    order of additions."""
    denoised_uncond = x_out[-batch_size:]
    denoised = denoised_uncond.clone()
    for i, conds in enumerate(conds_list):
        for cond_index, weight in conds:
            denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
    return denoised
