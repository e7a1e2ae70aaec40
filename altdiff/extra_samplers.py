"""The webui 1.10's two samplers outside k-diffusion, in k-diffusion's form (see k_samplers' docstring):
LCM (sd_samplers_lcm.py) with its own denoiser, and Restart (sd_samplers_extra.py).

- LCM runs `sample_lcm` over an `LCMDenoiser` instead of the CompVis denoiser: the model's alpha-bars at the
  50 timesteps 19, 39, ..., 999 that LCM was distilled on, nearest-timestep lookup, and the consistency
  model's boundary-condition scalings. Its schedule ("Automatic" = Uniform) is `LCMDenoiser.get_sigmas(n)`.
  As in the webui, the boundary condition's skip term mixes the k-diffusion input x (not the model's scaled
  input, as diffusers' LCMScheduler does); at LCM's timesteps that term's weight is below 1e-5.
- Restart (Xu et al. 2023) walks Heun steps and, at its default for 20 steps or more, re-noises back to
  sigma 2 once or twice after passing sigma 0.1; the webui replaces the schedule by a Karras one then.
Both draw their noise through `noise_sampler(sigma, sigma_next)`, never torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm, trange

from .k_samplers import Callback, KSampler, Model, NoiseSampler, _required, to_d
from .k_schedules import _append_zero, karras, t_to_sigma

LCM_ORIGINAL_STEPS = 50  # the webui's "LCM Original Timesteps"
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


class LCMDenoiser:
    """The webui's LCMCompVisDenoiser around `unet(x_in, t, **kw) -> eps`: `denoiser(x, sigma, **kw)` is
    the consistency model's denoised x in k-diffusion's form."""

    def __init__(self, unet: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor):
        if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.shape != (1000,):
            raise ValueError("alphas_cumprod: expected the model's 1000 training alpha-bars")
        self.unet = unet
        self.skip_steps = 1000 // LCM_ORIGINAL_STEPS
        index = torch.arange(LCM_ORIGINAL_STEPS - 1, -1, -1) * self.skip_steps
        valid = alphas_cumprod.float()[999 - index]
        self.sigmas = ((1 - valid) / valid) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The LCM timestep (19, 39, ..., 999) nearest in log-sigma."""
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(((timestep - (self.skip_steps - 1)) / self.skip_steps).float(), min=0,
                        max=len(self.sigmas) - 1)
        return t_to_sigma(t, self.sigmas.to(t.device))

    def get_sigmas(self, n: int) -> torch.Tensor:
        """The webui's LCM schedule: n timesteps evenly from 999 to 19, then 0."""
        start = self.sigma_to_t(self.sigmas[-1])
        end = self.sigma_to_t(self.sigmas[0])
        return _append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        eps = self.unet(x * (1 / (s ** 2 + 1) ** 0.5), self.sigma_to_t(sigma), **kwargs)
        x0 = x + eps * -s
        scaled_t = self.sigma_to_t(sigma).view(s.shape) * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA ** 2 / (scaled_t ** 2 + LCM_SIGMA_DATA ** 2)
        c_out = scaled_t / (scaled_t ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5
        return c_out * x0 + c_skip * x


@torch.no_grad()
def sample_lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, disable: bool | None = None,
               noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """LCM multistep sampling: jump to the denoised x, then re-noise to the next sigma."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * _required(noise_sampler, "LCM")(sigmas[i], sigmas[i + 1])
    return x


def _nearest(sigmas: torch.Tensor, value: float) -> int:
    return int(torch.argmin(abs(sigmas - value), dim=0))


def restart_steps(sigmas: torch.Tensor, restart_list: dict | None = None) -> list[tuple]:
    """Restart's (sigma, sigma_next) pairs. restart_list maps a sigma where a restart starts to
    [restart steps, restart times, sigma to re-noise to]; None is the webui's default: none under 20 steps,
    else {0.1: [10, 1, 2]} (steps // 4 + 1 steps twice from 36 steps) over a Karras schedule shortened by
    the restart steps."""
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            count, times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = karras(steps - count * times, sigmas[-2].item(), sigmas[0].item()).to(sigmas.device)
            restart_list = {0.1: [count + 1, times, 2]}
    restarts = {_nearest(sigmas, key): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            count, times, sigma_max = restarts[i + 1]
            max_idx = _nearest(sigmas, sigma_max)
            if max_idx < i + 1:
                restart = karras(count, sigmas[i + 1].item(), sigmas[max_idx].item()).to(sigmas.device)[:-1]
                pairs.extend(list(zip(restart[:-1], restart[1:])) * times)
    return pairs


@torch.no_grad()
def restart_sampler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None, s_noise: float = 1.,
                    restart_list: dict | None = None,
                    noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Restart sampling: Heun steps (Euler into sigma 0) over restart_steps(sigmas, restart_list), adding
    noise up to the higher sigma wherever the walk jumps back up."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    last_sigma = None
    for step_id, (sigma, sigma_next) in enumerate(tqdm(restart_steps(sigmas, restart_list), disable=disable)):
        if last_sigma is not None and last_sigma < sigma:
            noise = _required(noise_sampler, "Restart")(last_sigma, sigma)
            x = x + noise * s_noise * (sigma ** 2 - last_sigma ** 2) ** 0.5
        denoised = model(x, sigma * s_in, **extra_args)
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({'x': x, 'i': step_id, 'sigma': sigma_next, 'sigma_hat': sigma, 'denoised': denoised})
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
        last_sigma = sigma_next
    return x


EXTRA_SAMPLERS: dict[str, KSampler] = {
    "Restart": KSampler(restart_sampler, ("restart",), {"scheduler": "karras", "second_order": True}),
    "LCM": KSampler(sample_lcm, ("k_lcm",), {}),
}
