"""Noise schedules computed once, up front, exactly as diffusers 0.35.2's schedulers compute them in
`__init__` + `set_timesteps`: betas, alphas_cumprod, the model timesteps and (for the sigma samplers) sigmas.

A `Schedule` is plain data; the samplers in `samplers.py` are loops over it. A config written for one
scheduler class can drive any sampler, as `XScheduler.from_config(config)` does: fields the file set are
used, the others take that class's own defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch

from .config import ConfigError, SchedulerConfig

SCHEDULER_SAMPLERS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}

_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_DPM = {**_COMMON, "solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "final_sigmas_type": "zero", "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
        # Not __init__ arguments of DPMSolverMultistepScheduler, but from_config keeps them as hidden config
        # entries and its Karras conversion reads them.
        "sigma_min": None, "sigma_max": None}
# Each diffusers class's __init__ defaults: the fields a sampler reads, and what it reads when a file is silent.
DEFAULTS = {
    "pndm": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "ddim": {**_COMMON, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False,
             "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "lms": {**_COMMON, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "timestep_spacing": "linspace"},
    "euler": {**_COMMON, "interpolation_type": "linear", "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
              "timestep_spacing": "linspace", "timestep_type": "discrete", "rescale_betas_zero_snr": False,
              "final_sigmas_type": "zero"},
    "euler_a": {**_COMMON, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "dpmpp_2m": _DPM,
    "dpmpp_2m_karras": _DPM,
}
PREDICTION_TYPES = {"pndm": ("epsilon", "v_prediction"), "euler_a": ("epsilon", "v_prediction")}
# Options altdiff does not implement: field -> the values it accepts (only checked where the class reads it).
# DPMSolverMultistepScheduler itself maps the UniPC solver types onto midpoint.
SUPPORTED = {
    "thresholding": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "algorithm_type": ("dpmsolver++",),
    "solver_order": (2,),
    "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
}
SIGMA_SAMPLERS = ("lms", "euler", "euler_a")


@dataclass
class Schedule:
    """Everything a sampler needs, computed once. `timesteps[i]` is what model call i receives (on the target
    device, in diffusers' dtype: int64 for pndm/ddim/dpmpp, float32 for lms/euler/euler_a); the rest stays on
    the CPU, as diffusers keeps its sigmas there, so per-step scalars never sync with the device."""

    sampler: str
    timesteps: torch.Tensor
    init_noise_sigma: float
    prediction_type: str
    num_inference_steps: int
    num_train_timesteps: int
    all_timesteps: torch.Tensor  # CPU copy of the full schedule; timesteps == all_timesteps[begin_index:]
    alphas_cumprod: torch.Tensor  # float32, one per training timestep
    final_alpha_cumprod: torch.Tensor  # pndm/ddim: alphas_cumprod "before" timestep 0
    sigmas: torch.Tensor | None = None  # lms/euler/euler_a/dpmpp: float32, len(all_timesteps) + 1, ends in 0
    lms_coefficients: list[list[float]] | None = None  # lms: per step, the integrated multistep coefficients
    clip_sample_range: float | None = None  # ddim: clamp x0 to +-this; None: no clipping
    skip_prk_steps: bool = True  # pndm: False runs the 12 Runge-Kutta warm-up calls first
    begin_index: int = 0  # img2img: position of timesteps[0] in all_timesteps


def sampler_for_config(config: SchedulerConfig) -> str:
    """The sampler name of the scheduler class the config was written for."""
    name = config._class_name
    if name not in SCHEDULER_SAMPLERS:
        raise ConfigError(f"{config.source}: _class_name={name!r} is not a supported scheduler "
                          f"(expected one of {sorted(SCHEDULER_SAMPLERS)})")
    sampler = SCHEDULER_SAMPLERS[name]
    if sampler == "dpmpp_2m" and config.use_karras_sigmas:
        return "dpmpp_2m_karras"
    return sampler


def resolve_config(sampler: str, config: SchedulerConfig) -> dict:
    """The values the sampler's diffusers class would run with after `from_config(config)`, validated."""
    if sampler not in DEFAULTS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; expected one of {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS[sampler], **{k: v for k, v in config.set_fields().items() if k in DEFAULTS[sampler]}}

    def refuse(name: str, expected) -> None:
        raise ConfigError(f"{config.source}: {name}={cfg[name]!r} is not supported by sampler {sampler!r} "
                          f"(expected {expected})")

    for name, allowed in SUPPORTED.items():
        if name in cfg and cfg[name] not in allowed:
            refuse(name, " or ".join(repr(a) for a in allowed))
    predictions = PREDICTION_TYPES.get(sampler, ("epsilon", "v_prediction", "sample"))
    if cfg["prediction_type"] not in predictions:
        refuse("prediction_type", " or ".join(repr(p) for p in predictions))
    if not isinstance(cfg["num_train_timesteps"], int) or cfg["num_train_timesteps"] < 2:
        refuse("num_train_timesteps", "an int >= 2")
    if cfg["trained_betas"] is not None and len(cfg["trained_betas"]) != cfg["num_train_timesteps"]:
        raise ConfigError(f"{config.source}: trained_betas has {len(cfg['trained_betas'])} values "
                          f"(expected num_train_timesteps={cfg['num_train_timesteps']})")
    if sampler == "dpmpp_2m_karras":
        cfg["use_karras_sigmas"] = True
    elif sampler == "dpmpp_2m":
        cfg["use_karras_sigmas"] = False
    return cfg


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last timestep is pure noise.
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def train_alphas_cumprod(sampler: str, cfg: dict) -> torch.Tensor:
    """alphas_cumprod over the training timesteps, as the sampler's diffusers class computes it."""
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _betas_for_alpha_bar(n)
    rescale = cfg.get("rescale_betas_zero_snr", False)
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale and sampler != "ddim":
        # diffusers' sigma-based schedulers keep the last sigma finite this way; DDIM keeps the exact 0.
        alphas_cumprod[-1] = 2 ** -24
    return alphas_cumprod


def _spaced(spacing: str, n_train: int, n: int, offset: int) -> np.ndarray:
    """Descending timesteps as DDIM/LMS/Euler space them (linspace ones unrounded, float64)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (n_train // n))[::-1] + offset
    return np.round(np.arange(n_train, 0, -n_train / n)) - 1


def _pndm_timesteps(cfg: dict, n: int) -> np.ndarray:
    n_train = cfg["num_train_timesteps"]
    ascending = _spaced(cfg["timestep_spacing"], n_train, n, cfg["steps_offset"])[::-1].round().astype(np.int64)
    if cfg["skip_prk_steps"]:
        # PLMS needs two calls at the first timestep to bootstrap its multistep history.
        return np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].astype(np.int64)
    # Runge-Kutta warm-up: 3 steps of 4 calls each over the 4 noisiest timesteps (plus half steps).
    prk = ascending[-4:].repeat(2) + np.tile(np.array([0, n_train // n // 2]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return np.concatenate([prk, ascending[:-3][::-1]]).astype(np.int64)


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas` by interpolating log-sigma (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5) noise levels."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_schedule(sampler: str, cfg: dict, n: int, alphas_cumprod: torch.Tensor):
    """(timesteps, sigmas) of LMS / Euler / Euler ancestral / DPM-Solver++ as numpy arrays."""
    n_train = cfg["num_train_timesteps"]
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    log_sigmas = np.log(train_sigmas)
    if sampler in SIGMA_SAMPLERS:
        timesteps = _spaced(cfg["timestep_spacing"], n_train, n, cfg["steps_offset"]).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if cfg.get("use_karras_sigmas"):
            # LMS ignores sigma_min / sigma_max; Euler honours them.
            low = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else sigmas[-1].item()
            high = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else sigmas[0].item()
            sigmas = _karras(low, high, n)
            timesteps = _sigma_to_t(sigmas, log_sigmas).astype(np.float32)
        return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)
    # DPM-Solver spaces N + 1 points and drops the last (timestep 0) for linspace / leading.
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        step_ratio = n_train // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    else:
        timesteps = np.arange(n_train, 0, -n_train / n).round().astype(np.int64) - 1
    if cfg["use_karras_sigmas"]:
        low = cfg["sigma_min"] if cfg["sigma_min"] is not None else train_sigmas[0].item()
        high = cfg["sigma_max"] if cfg["sigma_max"] is not None else train_sigmas[-1].item()
        sigmas = _karras(low, high, n)
        timesteps = _sigma_to_t(sigmas, log_sigmas)
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _lms_coefficients(sigmas: torch.Tensor, max_order: int = 4) -> list:
    """For step k, the integrals over [sigma_k, sigma_k+1] of the Lagrange basis polynomials through
    sigma_k, sigma_k-1, ... (order min(k + 1, 4), as diffusers counts it from the schedule start). diffusers
    integrates with scipy.quad; Gauss-Legendre with 4 nodes is exact for these cubics."""
    s = sigmas.double().numpy()
    nodes, weights = np.polynomial.legendre.leggauss(4)
    coefficients = []
    for k in range(len(s) - 1):
        order = min(k + 1, max_order)
        half, mid = (s[k + 1] - s[k]) / 2, (s[k + 1] + s[k]) / 2
        tau = mid + half * nodes
        row = []
        for j in range(order):
            basis = np.ones_like(tau)
            for m in range(order):
                if m != j:
                    basis *= (tau - s[k - m]) / (s[k - j] - s[k - m])
            row.append(float(half * (weights * basis).sum()))
        coefficients.append(row)
    return coefficients


def make_schedule(sampler: str, config: SchedulerConfig, num_inference_steps: int,
                  device: torch.device | str | None = None) -> Schedule:
    """The schedule diffusers' scheduler for `sampler` builds from `config` with `set_timesteps(N)`."""
    cfg = resolve_config(sampler, config)
    n_train = cfg["num_train_timesteps"]
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps: expected an int, got {type(num_inference_steps).__name__}")
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps: expected 1 <= N <= num_train_timesteps={n_train}, "
                         f"got {num_inference_steps}")
    n = num_inference_steps
    alphas_cumprod = train_alphas_cumprod(sampler, cfg)
    final_alpha_cumprod = torch.tensor(1.0) if cfg.get("set_alpha_to_one") else alphas_cumprod[0]
    extra = {}
    init_noise_sigma = 1.0
    if sampler == "pndm":
        if not cfg["skip_prk_steps"] and n < 4:
            raise ValueError(f"num_inference_steps: PNDM without skip_prk_steps needs at least 4 steps, got {n}")
        timesteps = torch.from_numpy(_pndm_timesteps(cfg, n))
        extra["skip_prk_steps"] = bool(cfg["skip_prk_steps"])
    elif sampler == "ddim":
        timesteps = torch.from_numpy(_spaced(cfg["timestep_spacing"], n_train, n, cfg["steps_offset"])
                                     .round().astype(np.int64))
        extra["clip_sample_range"] = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    else:
        steps, sigmas = _sigma_schedule(sampler, cfg, n, alphas_cumprod)
        timesteps = torch.from_numpy(steps)
        extra["sigmas"] = torch.from_numpy(sigmas)
        if sampler in SIGMA_SAMPLERS:
            max_sigma = extra["sigmas"].max()
            # Leading spacing starts below the top sigma, so the input noise is scaled to unit variance + sigma.
            init_noise_sigma = float(max_sigma if cfg["timestep_spacing"] in ("linspace", "trailing")
                                     else (max_sigma ** 2 + 1) ** 0.5)
        if sampler == "lms":
            extra["lms_coefficients"] = _lms_coefficients(extra["sigmas"])
    return Schedule(sampler=sampler, timesteps=timesteps.to(device), init_noise_sigma=init_noise_sigma,
                    prediction_type=cfg["prediction_type"], num_inference_steps=n, num_train_timesteps=n_train,
                    all_timesteps=timesteps, alphas_cumprod=alphas_cumprod,
                    final_alpha_cumprod=final_alpha_cumprod, **extra)


def schedule_for_strength(schedule: Schedule, strength: float) -> Schedule:
    """The img2img tail of a schedule, as the img2img pipelines' get_timesteps + set_begin_index cut it:
    the last int(N * strength) steps (every scheduler here has order 1)."""
    if isinstance(strength, bool) or not isinstance(strength, Real):
        raise TypeError(f"strength: expected a float in [0, 1], got {type(strength).__name__}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength: expected a value in [0, 1], got {strength}")
    n = schedule.num_inference_steps
    init_timestep = min(int(n * strength), n)
    if init_timestep == 0:
        raise ValueError(f"strength: {strength} with num_inference_steps={n} leaves no denoising step; "
                         f"use strength >= {1 / n:.4g} or more steps")
    t_start = max(n - init_timestep, 0)
    return dataclasses.replace(schedule, timesteps=schedule.all_timesteps[t_start:].to(schedule.timesteps.device),
                               begin_index=t_start)


def add_noise(schedule: Schedule, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`original` noised to the schedule's first timestep, as that scheduler's `add_noise` does (img2img)."""
    if not isinstance(original, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise TypeError("add_noise: original and noise must be tensors")
    if original.shape != noise.shape:
        raise ValueError(f"noise: expected shape {tuple(original.shape)} like original, got {tuple(noise.shape)}")
    k = schedule.begin_index
    if schedule.sigmas is None:
        t = int(schedule.all_timesteps[k])
        alpha_prod = schedule.alphas_cumprod.to(device=original.device, dtype=original.dtype)[t]
        return alpha_prod ** 0.5 * original + (1 - alpha_prod) ** 0.5 * noise
    sigma = schedule.sigmas.to(device=original.device, dtype=original.dtype)[k]
    if schedule.sampler in SIGMA_SAMPLERS:
        return original + noise * sigma
    alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha_t * original + (sigma * alpha_t) * noise
