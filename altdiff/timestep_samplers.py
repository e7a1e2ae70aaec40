"""The webui 1.10's timestep samplers (sd_samplers_timesteps.py / sd_samplers_timesteps_impl.py) as plain
functions: DDIM, DDIM CFG++ and PLMS (and UniPC, altdiff.unipc).

Contract, the webui's own:
`f(model, x, timesteps, extra_args=None, callback=None, disable=None, <options>, *, alphas_cumprod,
noise_sampler=None)`
- `model(x, t, **extra_args) -> eps`: `t` is the integer timestep as a float tensor, one per batch row (the
  webui's CompVisTimestepsDenoiser behind its CFG denoiser).
- `timesteps` ascending, from `get_timesteps` (txt2img) or `img2img_timesteps`; the sampler walks them from
  the last down to `timesteps[1]` and lands on the noise level of `timesteps[0]`: one model call per interval,
  len(timesteps) - 1 in all (PLMS one more, for its first step). With 50 steps that is 49 calls, one fewer
  than diffusers' DDIM.
- `alphas_cumprod`: the model's 1000 training alpha-bars (float32), as the webui reads them from the model.
- `callback` gets k-diffusion's dict {'x', 'i', 'sigma': 0, 'sigma_hat': 0, 'denoised'} once per interval.
- Randomness: never torch's global RNG. DDIM and DDIM CFG++ draw `noise_sampler(t, t_prev)` (the two integer
  timesteps of the step, as tensors) once per step, eta 0 included, exactly where the webui calls
  torch.randn_like (its ImageRNG.next()), so the per-image RNG sees the same draws. Without a noise sampler
  they skip the draw at eta 0 and refuse eta > 0.

DDIM CFG++ needs the CFG denoiser's unconditional prediction, as the webui's CFGDenoiserTimesteps gives it:
the sampler sets `model.cond_scale_multiplier = 1 / 12.5` (the CFG denoiser multiplies the request's
cond_scale by it) and `model.need_last_noise_uncond = True`; after every call the model must expose the
uncond eps it computed as `model.last_noise_uncond` (shaped like x). The webui spells the first attribute
`cond_scale_miltiplier`; the CFG denoiser should read the spelling above.

Arithmetic follows the webui operation by operation: the alpha-bars of the current steps in float32, those of
the previous steps and the DDIM sigmas in float64, each taken as a Python float and multiplied by a tensor of
ones in x's dtype before use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from tqdm.auto import trange

from .k_samplers import Callback, Model, NoiseSampler, _required
from .unipc import unipc

# The webui's CFG++ maps a CFG scale of [0, 12.5] onto CFG++'s guidance of [0, 1].
CFGPP_SCALE = 1 / 12.5


def get_timesteps(steps: int, discard_next_to_last_sigma: bool = False) -> torch.Tensor:
    """The webui's CompVisSampler.get_timesteps: range(0, 1000, 1000 // steps) + 1, clipped to [0, 999], one
    step more when `discard_next_to_last_sigma`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps: expected an int in [1, 1000], got {steps!r}")
    steps += 1 if discard_next_to_last_sigma else 0
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


def setup_img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """The webui's sd_samplers_common.setup_img2img_steps: (schedule steps, t_enc). `fix_steps` is what
    opts.img2img_fix_steps (default off) or an explicit step count (the hires pass) switches on."""
    if not 0 <= denoising_strength <= 1:
        raise ValueError(f"denoising_strength: expected a number in [0, 1], got {denoising_strength!r}")
    strength = min(denoising_strength, 0.999)
    if fix_steps:
        return (int(steps / strength) if denoising_strength > 0 else 0), steps - 1
    return steps, int(strength * steps)


def img2img_timesteps(timesteps: torch.Tensor, t_enc: int, alphas_cumprod: torch.Tensor) -> tuple:
    """What CompVisSampler.sample_img2img walks: (timesteps[:t_enc], sqrt(a), sqrt(1 - a)) where
    a = alphas_cumprod[timesteps[t_enc]]; the start latent is init * sqrt(a) + noise * sqrt(1 - a), and the
    run makes t_enc - 1 model calls."""
    if not 0 <= t_enc < len(timesteps):
        raise ValueError(f"t_enc: expected an int in [0, {len(timesteps) - 1}], got {t_enc!r}")
    a = alphas_cumprod[timesteps[t_enc]]
    return timesteps[:t_enc], torch.sqrt(a), torch.sqrt(1 - a)


def _schedule(x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, eta: float) -> tuple:
    """(alphas, alphas_prev, sqrt(1 - alphas), ddim sigmas) of the webui's samplers, per timestep index."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1 or len(timesteps) < 2:
        raise ValueError("timesteps: expected a 1-D tensor of at least 2 ascending timesteps (get_timesteps)")
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1:
        raise ValueError("alphas_cumprod: expected the model's 1-D tensor of training alpha-bars")
    timesteps = timesteps.long().cpu()
    alphas_cumprod = alphas_cumprod.cpu()
    alphas = alphas_cumprod[timesteps]
    prev_dtype = torch.float32 if x.device.type in ("mps", "xpu") else torch.float64
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(prev_dtype)
    a_prev = alphas_prev.double()
    # 1 - alphas in float32, the rest in float64, as the webui's numpy/torch mix computes it
    sigmas = eta * ((1 - a_prev) / (1 - alphas).double() * (1 - alphas.double() / a_prev)).sqrt()
    return alphas, alphas_prev, torch.sqrt(1 - alphas), sigmas


def _ddim_loop(model: Model, x: torch.Tensor, timesteps: torch.Tensor, extra_args: dict | None,
               callback: Callback | None, disable: bool | None, eta: float, alphas_cumprod: torch.Tensor,
               noise_sampler: NoiseSampler | None, direction: Callable[[torch.Tensor], torch.Tensor],
               name: str) -> torch.Tensor:
    """DDIM's update; `direction(e_t)` is the eps that points back to x_t (e_t itself, or CFG++'s uncond)."""
    alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = _schedule(x, timesteps, alphas_cumprod, eta)
    if eta:
        _required(noise_sampler, f"{name} with eta {eta}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in trange(len(timesteps) - 1, disable=disable):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1. - a_prev - sigma_t ** 2).sqrt() * direction(e_t)
        if noise_sampler is not None:
            x = x + sigma_t * noise_sampler(timesteps[index] * s_in, timesteps[index - 1] * s_in)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


@torch.no_grad()
def ddim(model: Model, x: torch.Tensor, timesteps: torch.Tensor, extra_args: dict | None = None,
         callback: Callback | None = None, disable: bool | None = None, eta: float = 0.0, *,
         alphas_cumprod: torch.Tensor, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2020) over the webui's timesteps; eta 0 (the webui's eta_ddim default) is
    deterministic."""
    return _ddim_loop(model, x, timesteps, extra_args, callback, disable, eta, alphas_cumprod, noise_sampler,
                      lambda e_t: e_t, "DDIM")


@torch.no_grad()
def ddim_cfgpp(model: Model, x: torch.Tensor, timesteps: torch.Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, disable: bool | None = None, eta: float = 0.0, *,
               alphas_cumprod: torch.Tensor, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DDIM with CFG++ (Chung et al. 2024): x0 from the guided eps, the direction back to x_t from the
    unconditional eps (`model.last_noise_uncond`, see the module docstring), guidance scale / 12.5."""
    model.cond_scale_multiplier = CFGPP_SCALE
    model.need_last_noise_uncond = True

    def uncond(e_t: torch.Tensor) -> torch.Tensor:
        last = getattr(model, "last_noise_uncond", None)
        if not isinstance(last, torch.Tensor) or last.shape != e_t.shape:
            raise TypeError("model: DDIM CFG++ needs the CFG denoiser to set model.last_noise_uncond, the "
                            "unconditional eps shaped like x, on every call")
        return last

    return _ddim_loop(model, x, timesteps, extra_args, callback, disable, eta, alphas_cumprod, noise_sampler,
                      uncond, "DDIM CFG++")


@torch.no_grad()
def plms(model: Model, x: torch.Tensor, timesteps: torch.Tensor, extra_args: dict | None = None,
         callback: Callback | None = None, disable: bool | None = None, *,
         alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multistep): a pseudo improved-Euler first step (one extra model
    call), then Adams-Bashforth of order 2, 3 and 4 over the eps history."""
    alphas, alphas_prev, sqrt_one_minus_alphas, _ = _schedule(x, timesteps, alphas_cumprod, 0.0)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps: list[torch.Tensor] = []

    def step(e_t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1. - a_prev).sqrt() * e_t, pred_x0

    for i in trange(len(timesteps) - 1, disable=disable):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        if not old_eps:
            x_prev, _ = step(e_t, index)
            e_t_next = model(x_prev, timesteps[max(index - 1, 0)].item() * s_in, **extra_args)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = step(e_t_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


class TimestepSampler(NamedTuple):
    """One row of the webui's samplers_timesteps (the label is the table's key)."""

    function: Callable[..., torch.Tensor]
    aliases: tuple[str, ...]
    options: dict


TIMESTEP_SAMPLERS: dict[str, TimestepSampler] = {
    "DDIM": TimestepSampler(ddim, ("ddim",), {}),
    "DDIM CFG++": TimestepSampler(ddim_cfgpp, ("ddim_cfgpp",), {}),
    "PLMS": TimestepSampler(plms, ("plms",), {}),
    "UniPC": TimestepSampler(unipc, ("unipc",), {}),
}


def find_timestep_sampler(name: str) -> str:
    """The webui label of the timestep sampler called `name` (label or alias, any case); ValueError listing
    the choices."""
    if isinstance(name, str):
        key = name.casefold()
        for label, row in TIMESTEP_SAMPLERS.items():
            if key == label.casefold() or key in (alias.casefold() for alias in row.aliases):
                return label
    raise ValueError(f"sampler: unknown timestep sampler {name!r}; expected one of "
                     f"{', '.join(TIMESTEP_SAMPLERS)}")
