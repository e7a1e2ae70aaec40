"""Samplers as plain functions (k-diffusion style) that reproduce diffusers 0.35.2's scheduler `step`s.

Every sampler has one signature: `sample_x(model, x, schedule, *, generator=None, eta=0.0, callback=None)`.
`model(x_in, t)` returns the raw UNet prediction (epsilon, v or sample, as `schedule.prediction_type` says;
classifier-free guidance happens inside it) for the scaled input `x_in` at `t`, an element of
`schedule.timesteps`. `x` is what the diffusers loop starts from: noise times `init_noise_sigma`, or the
img2img `add_noise` result. `callback(i, t, x)` runs after model call i with the new latents; a tensor it
returns replaces them. History (PLMS `ets`, LMS derivatives, DPM-Solver's previous x0) lives in locals;
per-step scalars are CPU tensors, as diffusers keeps them, so the loop never waits on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .rng import Generator, randn_tensor
from .schedules import Schedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def _check(schedule: Schedule, x: torch.Tensor, *samplers: str) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected an altdiff Schedule, got {type(schedule).__name__}")
    if schedule.sampler not in samplers:
        raise ValueError(f"schedule: made for sampler {schedule.sampler!r}, not {samplers[0]!r}; "
                         f"build it with make_schedule({samplers[0]!r}, ...)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point latents tensor, got {type(x).__name__}")


def _after_step(callback: Callback | None, i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if callback is None:
        return x
    replaced = callback(i, t, x)
    return x if replaced is None else replaced


def _denoised(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 predicted by the sigma samplers (LMS / Euler / Euler ancestral) in diffusers' arithmetic."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    return out


def sample_ddim(model: Model, x: torch.Tensor, schedule: Schedule, *, generator: Generator = None,
                eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12); eta > 0 adds fresh noise each step, drawn like diffusers."""
    _check(schedule, x, "ddim")
    steps = schedule.all_timesteps[schedule.begin_index:]
    # diffusers quirk: the previous timestep is always t - T // N, whatever the spacing.
    prev = steps - schedule.num_train_timesteps // schedule.num_inference_steps
    alpha = schedule.alphas_cumprod[steps]
    alpha_prev = torch.where(prev >= 0, schedule.alphas_cumprod[prev.clamp(min=0)], schedule.final_alpha_cumprod)
    beta = 1 - alpha
    std = eta * ((1 - alpha_prev) / beta * (1 - alpha / alpha_prev)) ** 0.5
    sqrt_alpha, sqrt_beta, sqrt_alpha_prev = alpha ** 0.5, beta ** 0.5, alpha_prev ** 0.5
    direction_coeff = (1 - alpha_prev - std ** 2) ** 0.5
    clip = schedule.clip_sample_range
    for i, t in enumerate(schedule.timesteps):
        out = model(x, t)
        if schedule.prediction_type == "epsilon":
            x0, eps = (x - sqrt_beta[i] * out) / sqrt_alpha[i], out
        elif schedule.prediction_type == "sample":
            x0 = out
            eps = (x - sqrt_alpha[i] * x0) / sqrt_beta[i]
        else:
            x0 = sqrt_alpha[i] * x - sqrt_beta[i] * out
            eps = sqrt_alpha[i] * out + sqrt_beta[i] * x
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        x = sqrt_alpha_prev[i] * x0 + direction_coeff[i] * eps
        if eta > 0:
            noise = randn_tensor(tuple(out.shape), generator=generator, device=out.device, dtype=out.dtype)
            x = x + std[i] * noise
        x = _after_step(callback, i, t, x)
    return x


def _pndm_prev(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
               v_prediction: bool) -> torch.Tensor:
    """diffusers' PNDMScheduler._get_prev_sample: the PNDM paper's transfer function, eq. (9)."""
    if v_prediction:
        eps = (alpha ** 0.5) * eps + ((1 - alpha) ** 0.5) * x
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    denom = alpha * beta_prev ** 0.5 + (alpha * beta * alpha_prev) ** 0.5
    return (alpha_prev / alpha) ** 0.5 * x - (alpha_prev - alpha) * eps / denom


def sample_pndm(model: Model, x: torch.Tensor, schedule: Schedule, *, generator: Generator = None,
                eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    """PNDM (Liu et al. 2022): 12 Runge-Kutta warm-up calls unless skip_prk_steps, then PLMS. The state
    machine follows diffusers' counter exactly, including its quirks (the repeated first PLMS timestep
    averages two predictions from the same start; the second prediction is not kept in the history)."""
    _check(schedule, x, "pndm")
    steps = schedule.all_timesteps[schedule.begin_index:].tolist()
    prk_table = schedule.all_timesteps.tolist()  # step_prk reads its base timestep from the full schedule
    ratio = schedule.num_train_timesteps // schedule.num_inference_steps
    n_prk = 0 if schedule.skip_prk_steps else 12
    v_prediction = schedule.prediction_type == "v_prediction"

    def alpha(t: int) -> torch.Tensor:
        return schedule.alphas_cumprod[t] if t >= 0 else schedule.final_alpha_cumprod

    ets, start, rk_sum = [], x, 0
    for i, t_model in enumerate(schedule.timesteps):
        out = model(x, t_model)
        t = steps[i]
        if i < n_prk:
            # Four calls per Runge-Kutta step: t, t - h/2 (twice), t - h; combined 1/6, 1/3, 1/3, 1/6.
            prev_t = t - (0 if i % 2 else ratio // 2)
            t = prk_table[i // 4 * 4]
            if i % 4 == 0:
                rk_sum = rk_sum + 1 / 6 * out
                ets.append(out)
                start = x
            elif i % 4 in (1, 2):
                rk_sum = rk_sum + 1 / 3 * out
            else:
                out = rk_sum + 1 / 6 * out
                rk_sum = 0
            x = _pndm_prev(start, out, alpha(t), alpha(prev_t), v_prediction)
        else:
            prev_t = t - ratio
            base = x
            if i == 1:
                prev_t, t = t, t + ratio
            else:
                ets = ets[-3:] + [out]
            if len(ets) == 1 and i == 0:
                eps, start = out, x
            elif len(ets) == 1 and i == 1:
                eps, base = (out + ets[-1]) / 2, start
            elif len(ets) == 2:
                eps = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                eps = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
            x = _pndm_prev(base, eps, alpha(t), alpha(prev_t), v_prediction)
        x = _after_step(callback, i, t_model, x)
    return x


def sample_lms(model: Model, x: torch.Tensor, schedule: Schedule, *, generator: Generator = None,
               eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    """Linear multistep (order up to 4) over sigmas with integrated coefficients (diffusers' LMSDiscrete)."""
    _check(schedule, x, "lms")
    sigmas, k0 = schedule.sigmas, schedule.begin_index
    scale_in = (sigmas ** 2 + 1) ** 0.5
    derivatives = []
    for i, t in enumerate(schedule.timesteps):
        k = k0 + i
        out = model(x / scale_in[k], t)
        x0 = _denoised(out, x, sigmas[k], schedule.prediction_type)
        derivatives = (derivatives + [(x - x0) / sigmas[k]])[-4:]
        # diffusers quirk: the order counts from the schedule start, so an img2img run's first step uses
        # a higher-order coefficient with the single derivative it has.
        x = x + sum(c * d for c, d in zip(schedule.lms_coefficients[k], reversed(derivatives)))
        x = _after_step(callback, i, t, x)
    return x


def sample_euler(model: Model, x: torch.Tensor, schedule: Schedule, *, generator: Generator = None,
                 eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    """Euler (Karras et al. 2022, Algorithm 2 without churn), stepping in float32 like diffusers."""
    _check(schedule, x, "euler")
    sigmas, k0 = schedule.sigmas, schedule.begin_index
    scale_in = (sigmas ** 2 + 1) ** 0.5
    for i, t in enumerate(schedule.timesteps):
        k = k0 + i
        out = model(x / scale_in[k], t)
        x32 = x.to(torch.float32)
        x0 = _denoised(out, x32, sigmas[k], schedule.prediction_type)
        derivative = (x32 - x0) / sigmas[k]
        x = (x32 + derivative * (sigmas[k + 1] - sigmas[k])).to(out.dtype)
        x = _after_step(callback, i, t, x)
    return x


def sample_euler_ancestral(model: Model, x: torch.Tensor, schedule: Schedule, *, generator: Generator = None,
                           eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of sigma_up (drawn every step,
    the last one included, as diffusers does)."""
    _check(schedule, x, "euler_a")
    sigmas, k0 = schedule.sigmas, schedule.begin_index
    scale_in = (sigmas ** 2 + 1) ** 0.5
    sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
    sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    for i, t in enumerate(schedule.timesteps):
        k = k0 + i
        out = model(x / scale_in[k], t)
        x32 = x.to(torch.float32)
        x0 = _denoised(out, x32, sigmas[k], schedule.prediction_type)
        derivative = (x32 - x0) / sigmas[k]
        x32 = x32 + derivative * (sigma_down[k] - sigmas[k])
        noise = randn_tensor(tuple(out.shape), generator=generator, device=out.device, dtype=out.dtype)
        x = (x32 + noise * sigma_up[k]).to(out.dtype)
        x = _after_step(callback, i, t, x)
    return x


def sample_dpmpp_2m(model: Model, x: torch.Tensor, schedule: Schedule, *, generator: Generator = None,
                    eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint variant: first order on the first step of a run and on
    the last step (final sigma 0), second order in between."""
    _check(schedule, x, "dpmpp_2m", "dpmpp_2m_karras")
    sigmas, k0 = schedule.sigmas, schedule.begin_index
    last = len(schedule.all_timesteps) - 1
    alpha = 1 / ((sigmas ** 2 + 1) ** 0.5)
    sigma_t = sigmas * alpha
    lam = torch.log(alpha) - torch.log(sigma_t)
    prev_x0 = None
    for i, t in enumerate(schedule.timesteps):
        k = k0 + i
        out = model(x, t)
        if schedule.prediction_type == "epsilon":
            x0 = (x - sigma_t[k] * out) / alpha[k]
        elif schedule.prediction_type == "v_prediction":
            x0 = alpha[k] * x - sigma_t[k] * out
        else:
            x0 = out
        x32 = x.to(torch.float32)
        h = lam[k + 1] - lam[k]
        x_next = (sigma_t[k + 1] / sigma_t[k]) * x32 - (alpha[k + 1] * (torch.exp(-h) - 1.0)) * x0
        if i > 0 and k < last:
            r0 = (lam[k] - lam[k - 1]) / h
            d1 = (1.0 / r0) * (x0 - prev_x0)
            x_next = x_next - 0.5 * (alpha[k + 1] * (torch.exp(-h) - 1.0)) * d1
        x = x_next.to(x0.dtype)
        prev_x0 = x0
        x = _after_step(callback, i, t, x)
    return x


SAMPLERS = {
    "ddim": sample_ddim,
    "pndm": sample_pndm,
    "lms": sample_lms,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
