"""The k-diffusion 0.1.1.post1 samplers the webui 1.10 lists (sd_samplers_kdiffusion.py), as plain functions.

Contract, k-diffusion's own:
`sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, <options>, noise_sampler=None)`
- `model(x, sigma, **extra_args) -> denoised` (e.g. k_schedules.compvis_denoiser behind the CFG denoiser);
  `sigma` is one value per batch row.
- `x` starts at noise * sigmas[0] (txt2img) or init latent + noise * sigmas[0] (img2img); `sigmas` descends
  to 0 (k_schedules.webui_sigmas). DPM fast / adaptive take `sigma_min, sigma_max` (and `n`) instead: the
  webui passes the model's smallest / largest training sigma and n = steps in txt2img, and the img2img
  schedule's sigma_sched[-2] / sigma_sched[0] and n = len(sigma_sched) - 1 (`webui_sampler_kwargs` builds
  these keyword arguments as the webui's KDiffusionSampler does).
- `callback` gets k-diffusion's dict {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} once per model step.
- Randomness: never torch's global RNG. Every draw is `noise_sampler(sigma, sigma_next) -> Tensor` shaped
  like x, made exactly where k-diffusion calls torch.randn_like or its noise sampler, so a per-image RNG
  (the webui routes randn_like to ImageRNG.next()) sees the same sequence of draws. Euler / Heun / DPM2
  draw once per step even when s_churn leaves the noise unused, and DPM fast / adaptive even at eta 0, as
  k-diffusion does; without a noise sampler they skip those unused draws. Pass the image RNG's noise sampler
  to every non-SDE sampler anyway: the webui's hires pass draws on from the same per-image RNG, so the
  count of draws matters. SDE samplers get a Brownian-tree noise sampler.
- Options and defaults are k-diffusion's. The webui passes `eta` = the request's eta, else 1.0
  (opts.eta_ancestral), to every function that has one (DPM fast / adaptive included), and s_churn /
  s_tmin / s_tmax / s_noise only to Euler, Heun and DPM2.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm, trange

from .schedules import _lms_coefficients

Model = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative (the webui's form: sigma a scalar)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple:
    """(sigma_down, sigma_up): the noise level to step down to and the noise to add back."""
    if not eta:
        return sigma_to, 0.0
    variance = sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2
    sigma_up = min(sigma_to, eta * variance ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _required(noise_sampler: NoiseSampler | None, sampler: str) -> NoiseSampler:
    if noise_sampler is None:
        raise ValueError(f"noise_sampler: {sampler} draws noise; pass noise_sampler(sigma, sigma_next) "
                         "(altdiff never uses torch's global RNG)")
    return noise_sampler


def _churn(x: torch.Tensor, sigmas: torch.Tensor, i: int, noise_sampler: NoiseSampler | None, s_churn: float,
           s_tmin: float, s_tmax: float, s_noise: float, sampler: str) -> tuple:
    """Karras' churn shared by Euler / Heun / DPM2: (x, sigma_hat); draws one noise per step when able."""
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    if noise_sampler is None and gamma > 0:
        _required(noise_sampler, f"{sampler} with s_churn > 0")
    eps = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise if noise_sampler is not None else None
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _report(callback: Callback | None, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Karras et al. (2022) Algorithm 2 with Euler steps."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "Euler")
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict | None = None, callback: Callback | None = None,
                           disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + _required(noise_sampler, "Euler a")(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Karras et al. (2022) Algorithm 2 with Heun steps (Euler for the last)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "Heun")
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver-2 steps inside Karras' Algorithm 2 (Euler for the last)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, "DPM2")
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm_2_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


def _dpm_2_step(model, x, d, sigma, sigma_next, s_in, extra_args) -> torch.Tensor:
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
    return x + to_d(x_2, sigma_mid, denoised_2) * (sigma_next - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict | None = None, callback: Callback | None = None,
                           disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver-2 steps."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(model, x, d, sigmas[i], sigma_down, s_in, extra_args)
            x = x + _required(noise_sampler, "DPM2 a")(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, disable: bool | None = None, order: int = 4) -> torch.Tensor:
    """Linear multistep over the last `order` derivatives, coefficients integrated in sigma."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    coefficients = _lms_coefficients(sigmas.detach().cpu(), order)
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + sum(coeff * d for coeff, d in zip(coefficients[i], reversed(ds)))
    return x


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor,
                              extra_args: dict | None = None, callback: Callback | None = None,
                              disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                              noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + 1 / 2 * h
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h * (1 / 2)).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + _required(noise_sampler, "DPM++ 2S a")(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                     r: float = 1 / 2) -> torch.Tensor:
    """DPM-Solver++ (stochastic), two model calls per step."""
    noise_sampler = _required(noise_sampler, "DPM++ SDE")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma_fn(t), _sigma_fn(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma_fn(t), _sigma_fn(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint or Heun second-order correction."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type: expected 'heun' or 'midpoint', got {solver_type!r}")
    if eta:
        noise_sampler = _required(noise_sampler, "DPM++ 2M SDE")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = h_last = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    phi = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
                    x = x + phi * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                scale = (-2 * eta_h).expm1().neg().sqrt()
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * scale * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE."""
    if eta:
        noise_sampler = _required(noise_sampler, "DPM++ 3M SDE")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                scale = (-2 * h * eta).expm1().neg().sqrt()
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * scale * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- DPM-Solver (fast: fixed steps; adaptive: embedded pairs with a PID step-size controller) --------

class _Eps:
    """DPM-Solver's epsilon at (x, t = -log sigma), cached per step under a key as k-diffusion caches it."""

    def __init__(self, model: Model, extra_args: dict | None, on_eval: Callable[[], object]):
        self.model, self.extra_args, self.on_eval = model, extra_args or {}, on_eval
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in self.cache:
            sigma = _sigma_fn(t) * x.new_ones([x.shape[0]])
            self.cache[key] = (x - self.model(x, sigma, **self.extra_args)) / _sigma_fn(t)
            self.on_eval()
        return self.cache[key]


def _dpm_solver_1(eps: _Eps, x, t, t_next) -> torch.Tensor:
    h = t_next - t
    return x - _sigma_fn(t_next) * h.expm1() * eps("eps", x, t)


def _dpm_solver_2(eps: _Eps, x, t, t_next, r1: float = 1 / 2) -> torch.Tensor:
    h = t_next - t
    e = eps("eps", x, t)
    s1 = t + r1 * h
    u1 = x - _sigma_fn(s1) * (r1 * h).expm1() * e
    e_r1 = eps("eps_r1", u1, s1)
    return x - _sigma_fn(t_next) * h.expm1() * e - _sigma_fn(t_next) / (2 * r1) * h.expm1() * (e_r1 - e)


def _dpm_solver_3(eps: _Eps, x, t, t_next, r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
    h = t_next - t
    e = eps("eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - _sigma_fn(s1) * (r1 * h).expm1() * e
    e_r1 = eps("eps_r1", u1, s1)
    u2 = (x - _sigma_fn(s2) * (r2 * h).expm1() * e
          - _sigma_fn(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (e_r1 - e))
    e_r2 = eps("eps_r2", u2, s2)
    return x - _sigma_fn(t_next) * h.expm1() * e - _sigma_fn(t_next) / r2 * (h.expm1() / h - 1) * (e_r2 - e)


def _ancestral_t(t, t_next, t_end, eta: float) -> tuple:
    """(t_next_, sigma_up): where an ancestral DPM-Solver step lands before its noise is added."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
    t_next_ = torch.minimum(t_end, _t_fn(sigma_down))
    return t_next_, (_sigma_fn(t_next) ** 2 - _sigma_fn(t_next_) ** 2) ** 0.5


def _check_sigma_range(sigma_min, sigma_max) -> None:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigma_min, sigma_max: must be > 0, got {float(sigma_min)}, {float(sigma_max)}")


@torch.no_grad()
def sample_dpm_fast(model: Model, x: torch.Tensor, sigma_min: float, sigma_max: float, n: int,
                    extra_args: dict | None = None, callback: Callback | None = None,
                    disable: bool | None = None, eta: float = 0.0, s_noise: float = 1.0,
                    noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver-Fast: n model calls in steps of order 3 (then 2 / 1), evenly spaced in log-sigma.

    Like k-diffusion it draws one noise per step even at eta 0 (scaled by 0) when a noise sampler is given.
    """
    _check_sigma_range(sigma_min, sigma_max)
    if eta:
        noise_sampler = _required(noise_sampler, "DPM fast with eta > 0")
    t_start, t_end = _t_fn(torch.tensor(sigma_max)), _t_fn(torch.tensor(sigma_min))
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    steps = (_dpm_solver_1, _dpm_solver_2, _dpm_solver_3)
    with tqdm(total=n, disable=disable) as bar:
        for i, order in enumerate(orders):
            eps = _Eps(model, extra_args, bar.update)
            t, t_next = ts[i], ts[i + 1]
            t_next_, sigma_up = _ancestral_t(t, t_next, t_end, eta)
            denoised = x - _sigma_fn(t) * eps("eps", x, t)
            if callback is not None:
                callback({"sigma": _sigma_fn(ts[i]), "sigma_hat": _sigma_fn(t), "x": x, "i": i, "t": ts[i],
                          "t_up": t, "denoised": denoised})
            x = steps[order - 1](eps, x, t, t_next_)
            if noise_sampler is not None:
                x = x + sigma_up * s_noise * noise_sampler(_sigma_fn(t), _sigma_fn(t_next))
    return x


@dataclass
class PIDStepSizeController:
    """A PID controller of the ODE step size h (k-diffusion's, after Söderlind's digital filters)."""

    h: float
    pcoeff: float
    icoeff: float
    dcoeff: float
    order: float = 1
    accept_safety: float = 0.81
    eps: float = 1e-8
    errs: list = field(default_factory=list)

    def propose_step(self, error: torch.Tensor) -> bool:
        """Scale h by the filtered inverse error; True when the step that made `error` is accepted."""
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / self.order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / self.order
        b3 = self.dcoeff / self.order
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** b1 * self.errs[1] ** b2 * self.errs[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model: Model, x: torch.Tensor, sigma_min: float, sigma_max: float,
                        extra_args: dict | None = None, callback: Callback | None = None,
                        disable: bool | None = None, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                        h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                        accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None, return_info: bool = False):
    """DPM-Solver-12 / 23 with adaptive step size: each step compares an order-(k-1) and an order-k solution.

    Like k-diffusion it draws one noise per accepted step even at eta 0 when a noise sampler is given.
    """
    _check_sigma_range(sigma_min, sigma_max)
    if order not in (2, 3):
        raise ValueError(f"order: expected 2 or 3, got {order!r}")
    if eta:
        noise_sampler = _required(noise_sampler, "DPM adaptive with eta > 0")
    t_start, t_end = _t_fn(torch.tensor(sigma_max)), _t_fn(torch.tensor(sigma_min))
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta: must be 0 for reverse sampling")
    h_init = abs(h_init) * (1 if forward else -1)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    s, x_prev = t_start, x
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    with tqdm(disable=disable) as bar:
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            eps = _Eps(model, extra_args, bar.update)
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_, sigma_up = _ancestral_t(s, t, t_end, eta)
            denoised = x - _sigma_fn(s) * eps("eps", x, s)
            if order == 2:
                x_low, x_high = _dpm_solver_1(eps, x, s, t_), _dpm_solver_2(eps, x, s, t_)
            else:
                x_low, x_high = _dpm_solver_2(eps, x, s, t_, r1=1 / 3), _dpm_solver_3(eps, x, s, t_)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high
                if noise_sampler is not None:
                    x = x + sigma_up * s_noise * noise_sampler(_sigma_fn(s), _sigma_fn(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if callback is not None:
                callback({"sigma": _sigma_fn(s), "sigma_hat": _sigma_fn(s), "x": x, "i": info["steps"] - 1,
                          "t": s, "t_up": s, "denoised": denoised, "error": error, "h": pid.h, **info})
    return (x, info) if return_info else x


# --- the webui's table ----------------------------------------------------------------------------------

class KSampler(NamedTuple):
    """One row of the webui's samplers_k_diffusion (the label is the table's key), options as the webui's."""

    function: Callable[..., torch.Tensor]
    aliases: tuple[str, ...]
    options: dict


_ROWS = (
    ("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), {"scheduler": "karras"}),
    ("DPM++ SDE", sample_dpmpp_sde, ("k_dpmpp_sde",),
     {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    ("DPM++ 2M SDE", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",),
     {"scheduler": "exponential", "brownian_noise": True}),
    ("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun",),
     {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}),
    ("DPM++ 2S a", sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",),
     {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    ("DPM++ 3M SDE", sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",),
     {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True}),
    ("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": True}),
    ("Euler", sample_euler, ("k_euler",), {}),
    ("LMS", sample_lms, ("k_lms",), {}),
    ("Heun", sample_heun, ("k_heun",), {"second_order": True}),
    ("DPM2", sample_dpm_2, ("k_dpm_2",),
     {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    ("DPM2 a", sample_dpm_2_ancestral, ("k_dpm_2_a",),
     {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True}),
    ("DPM fast", sample_dpm_fast, ("k_dpm_fast",), {"uses_ensd": True}),
    ("DPM adaptive", sample_dpm_adaptive, ("k_dpm_ad",), {"uses_ensd": True}),
)

KDIFFUSION_SAMPLERS: dict[str, KSampler] = {label: KSampler(fn, aliases, options)
                                            for label, fn, aliases, options in _ROWS}

def find_k_sampler(name: str, table: dict[str, KSampler] = KDIFFUSION_SAMPLERS) -> str:
    """The webui label of the sampler called `name` (label or alias, any case), a key of `table`
    (KDIFFUSION_SAMPLERS, or a table with more samplers of this form); ValueError listing the choices."""
    if isinstance(name, str):
        key = name.casefold()
        for label, row in table.items():
            if key == label.casefold() or key in (alias.casefold() for alias in row.aliases):
                return label
    raise ValueError(f"sampler: unknown k-diffusion sampler {name!r}; expected one of {', '.join(table)}")


def webui_sampler_kwargs(label: str, sigmas: torch.Tensor, model_sigmas: torch.Tensor, steps: int, *,
                         img2img: bool = False, eta: float | None = None, s_churn: float = 0.0,
                         s_tmin: float = 0.0, s_tmax: float | None = None, s_noise: float = 1.0,
                         table: dict[str, KSampler] = KDIFFUSION_SAMPLERS) -> dict:
    """The keyword arguments the webui's KDiffusionSampler gives the function of `label`, besides model, x,
    extra_args, callback, disable and noise_sampler.

    `sigmas` is the schedule the run walks: webui_sigmas(...) in txt2img, its img2img tail (sigma_sched) with
    `img2img=True`. eta None is the webui's opts.eta_ancestral, 1.0; s_tmax None or 0 is infinity. DPM fast /
    adaptive get sigma_min / sigma_max (the model's extreme training sigmas in txt2img, sigma_sched[-2] and
    sigma_sched[0] in img2img) and DPM fast its number of model calls (`steps`; len(sigma_sched) - 1 in
    img2img).
    """
    function, _, options = table[find_k_sampler(label, table)]
    parameters = inspect.signature(function).parameters
    kwargs: dict = {}
    if function in (sample_euler, sample_heun, sample_dpm_2):
        kwargs.update(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax or float("inf"), s_noise=s_noise)
    if "eta" in parameters:
        kwargs["eta"] = 1.0 if eta is None else eta
    if "sigmas" in parameters:
        kwargs["sigmas"] = sigmas
    elif img2img:
        kwargs.update(sigma_min=sigmas[-2], sigma_max=sigmas[0])
    else:
        kwargs.update(sigma_min=model_sigmas[0].item(), sigma_max=model_sigmas[-1].item())
    if "n" in parameters:
        kwargs["n"] = len(sigmas) - 1 if img2img else steps
    if options.get("solver_type") == "heun":
        kwargs["solver_type"] = "heun"
    return kwargs
