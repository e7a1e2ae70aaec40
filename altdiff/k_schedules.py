"""The webui's sigma schedules over k-diffusion 0.1.1.post1's CompVis discrete denoiser.

`training_sigmas(alphas_cumprod)` are the model's 1000 training sigmas, ascending (k-diffusion's
`DiscreteSchedule.sigmas`); `sigma_to_t` / `t_to_sigma` convert with fractional timesteps by log-sigma
interpolation (the webui leaves `enable_quantization` off). `compvis_denoiser` wraps a UNet call into
k-diffusion's form `model(x, sigma, **kwargs) -> denoised` (eps or v prediction).

The 12 schedule types of the webui 1.10 (modules/sd_schedulers.py) are functions
`f(n, sigma_min, sigma_max, model_sigmas=None) -> sigmas` (float32 CPU tensor); `webui_sigmas` is what
`KDiffusionSampler.get_sigmas` does with the webui's options at their defaults. Arithmetic follows the
references operation by operation (float32 torch where they use torch, float64 where they use numpy or
Python floats), so the sigmas are equal, not merely close.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Align Your Steps' published SD1.5 noise levels; the webui uses them for every non-SDXL model.
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
# The webui's defaults of opts.beta_dist_alpha / opts.beta_dist_beta.
BETA_DIST_ALPHA = 0.6
BETA_DIST_BETA = 0.6


def training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The training sigmas ((1 - a) / a) ** 0.5, ascending, in the dtype of `alphas_cumprod`."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each sigma: linear interpolation of log-sigma between training steps."""
    log_sigmas = sigmas.log()
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma of a fractional timestep: log-sigma interpolated between the neighbouring training steps."""
    log_sigmas = sigmas.log()
    t = t.float()
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def compvis_denoiser(unet: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor,
                     prediction_type: str = "epsilon") -> Callable[..., torch.Tensor]:
    """k-diffusion's CompVisDenoiser (epsilon) or CompVisVDenoiser (v_prediction) around `unet(x_in, t, **kw)`
    (the UNet's eps or v prediction).

    The returned `denoise(x, sigma, **kw)` feeds the UNet `x / sqrt(sigma^2 + 1)` at the fractional t of
    each sigma (one per batch row) and returns the predicted x0.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
    sigmas = training_sigmas(alphas_cumprod)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s ** 2 + 1) ** 0.5
        out = unet(x * c_in, sigma_to_t(sigma, sigmas.to(sigma.device)), **kwargs)
        if prediction_type == "epsilon":
            return x + out * -s
        return out * (-s / (s ** 2 + 1) ** 0.5) + x * (1 / (s ** 2 + 1))

    return denoise


# --- the schedule types -------------------------------------------------------------------------------

def uniform(n: int, sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas: n timesteps evenly from the last training step to 0."""
    t = torch.linspace(len(model_sigmas) - 1, 0, n, device=model_sigmas.device)
    return _append_zero(t_to_sigma(t, model_sigmas)).cpu()


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022)'s schedule."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log-sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Sigmas following a polynomial in log-sigma."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _t_range(sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor) -> tuple:
    start = sigma_to_t(torch.tensor(sigma_max), model_sigmas)
    end = sigma_to_t(torch.tensor(sigma_min), model_sigmas)
    return start, end


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """n + 1 timesteps evenly between sigma_max's and sigma_min's, the last dropped."""
    start, end = _t_range(sigma_min, sigma_max, model_sigmas)
    return _append_zero(t_to_sigma(torch.linspace(start, end, n + 1)[:-1], model_sigmas))


def normal(n: int, sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """n timesteps evenly between sigma_max's and sigma_min's (both ends kept)."""
    start, end = _t_range(sigma_min, sigma_max, model_sigmas)
    return _append_zero(t_to_sigma(torch.linspace(start, end, n), model_sigmas))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in arctan(sigma). As in the webui it ends at sigma_min, not 0."""
    alpha_min = torch.arctan(torch.tensor(sigma_min))
    alpha_max = torch.arctan(torch.tensor(sigma_max))
    step = torch.arange(n + 1)
    return torch.tan(step / n * alpha_min + (1.0 - step / n) * alpha_max)


def align_your_steps(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """NVIDIA's Align Your Steps SD1.5 levels, log-linearly resampled to n when n != 11."""
    levels = list(AYS_SD15_SIGMAS)
    if n == len(levels):
        return torch.FloatTensor(levels + [0.0])
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(levels[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return torch.FloatTensor(np.append(resampled, [0.0]))


def simple(n: int, sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Every (1000 / n)-th training sigma from the top."""
    stride = len(model_sigmas) / n
    picked = [float(model_sigmas[-(1 + int(i * stride))]) for i in range(n)]
    return torch.FloatTensor(picked + [0.0])


def ddim(n: int, sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Training sigmas 1, 1 + k, 1 + 2k, ... (k = 1000 // n), descending; may give more than n steps."""
    stride = max(len(model_sigmas) // n, 1)
    picked = [float(model_sigmas[i]) for i in range(1, len(model_sigmas), stride)]
    return torch.FloatTensor(picked[::-1] + [0.0])


def beta(n: int, sigma_min: float, sigma_max: float, model_sigmas: torch.Tensor | None = None,
         a: float = BETA_DIST_ALPHA, b: float = BETA_DIST_BETA) -> torch.Tensor:
    """Lee et al. 2024: sigma_min + ppf(q) * (sigma_max - sigma_min) for q evenly from 1 to 0, where ppf is
    the Beta(a, b) quantile (the webui's scipy.stats.beta.ppf, here `beta_ppf`)."""
    quantiles = [beta_ppf(float(q), a, b) for q in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + (x * (sigma_max - sigma_min)) for x in quantiles] + [0.0])


def _beta_cf(x: float, a: float, b: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for aa in (even, odd):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) in float64."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_cf(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile by bisection of `beta_cdf` down to float64 resolution (scipy is test-only)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            return mid
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid


# --- the table and get_sigmas -------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleType:
    """One row of the webui's `sd_schedulers.schedulers` (and of GET /sdapi/v1/schedulers)."""

    name: str
    label: str
    function: Callable[..., torch.Tensor] | None
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: tuple[str, ...] | None = None


SCHEDULE_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic", None),
    ScheduleType("uniform", "Uniform", uniform, need_inner_model=True),
    ScheduleType("karras", "Karras", karras, default_rho=7.0),
    ScheduleType("exponential", "Exponential", exponential),
    ScheduleType("polyexponential", "Polyexponential", polyexponential, default_rho=1.0),
    ScheduleType("sgm_uniform", "SGM Uniform", sgm_uniform, need_inner_model=True, aliases=("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal", kl_optimal),
    ScheduleType("align_your_steps", "Align Your Steps", align_your_steps),
    ScheduleType("simple", "Simple", simple, need_inner_model=True),
    ScheduleType("normal", "Normal", normal, need_inner_model=True),
    ScheduleType("ddim", "DDIM", ddim, need_inner_model=True),
    ScheduleType("beta", "Beta", beta, need_inner_model=True),
)


def find_schedule_type(name: str) -> ScheduleType:
    """The schedule type called `name` (name, label or alias, any case); ValueError listing the choices."""
    if isinstance(name, str):
        key = name.casefold()
        for schedule in SCHEDULE_TYPES:
            if key in (schedule.name.casefold(), schedule.label.casefold(),
                       *(alias.casefold() for alias in schedule.aliases or ())):
                return schedule
    choices = ", ".join(s.label for s in SCHEDULE_TYPES)
    raise ValueError(f"scheduler: unknown schedule type {name!r}; expected one of {choices}")


def webui_sigmas(schedule_type: str | None, steps: int, model_sigmas: torch.Tensor,
                 discard_next_to_last_sigma: bool = False,
                 sampler_scheduler: str | None = None) -> torch.Tensor:
    """The webui's KDiffusionSampler.get_sigmas for `steps` steps (float32, CPU).

    "Automatic" (or None) means the sampler's own `scheduler` option (`sampler_scheduler`), and with none
    the denoiser's uniform get_sigmas. sigma_min / sigma_max are the model's smallest and largest training
    sigmas; rho is the schedule's own default. discard_next_to_last_sigma plans one step more and drops the
    penultimate sigma.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    schedule = find_schedule_type(schedule_type or "Automatic")
    if schedule.function is None and sampler_scheduler is not None:
        schedule = find_schedule_type(sampler_scheduler)
    steps += 1 if discard_next_to_last_sigma else 0
    sigma_min, sigma_max = model_sigmas[0].item(), model_sigmas[-1].item()
    if schedule.function is None:
        sigmas = uniform(steps, sigma_min, sigma_max, model_sigmas)
    elif schedule.need_inner_model:
        sigmas = schedule.function(steps, sigma_min, sigma_max, model_sigmas)
    else:
        sigmas = schedule.function(steps, sigma_min, sigma_max)
    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.cpu()
