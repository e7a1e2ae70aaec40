"""The webui family's pieces for generate(): the AUTOMATIC1111 webui 1.10's sampling recipe (processing.py,
sd_samplers_kdiffusion.py KDiffusionSampler.sample / sample_img2img) on altdiff's UNet.

- The model's noise schedule as the webui's LDM model holds it: alphas_cumprod computed in float64 and stored
  as float32 (diffusers computes it in float32; the last bits differ).
- Sampler names as the webui reads them (get_sampler_and_scheduler: "DPM++ 2M Karras" is DPM++ 2M with the
  Karras schedule type), its sigmas (k_schedules.webui_sigmas) and the arguments it passes (k_samplers).
- Conditioning through the webui's prompt schedules (altdiff.conditioning), one encoder call per prompt.
- Noise from rng.ImageRNG (one generator per image, ENSD, variation seeds); SDE samplers get the Brownian
  noise the webui builds from the images' seeds.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import conditioning, prompts
from .cfg_denoiser import CFGDenoiser
from .extra_samplers import EXTRA_SAMPLERS, LCMDenoiser
from .k_samplers import KDIFFUSION_SAMPLERS, find_k_sampler, webui_sampler_kwargs
from .k_schedules import SCHEDULE_TYPES, compvis_denoiser, find_schedule_type, training_sigmas, webui_sigmas
from .rng import BrownianTreeNoise, ImageRNG, rng_noise_sampler
from .timestep_samplers import TIMESTEP_SAMPLERS, get_timesteps, img2img_timesteps, setup_img2img_steps

DEFAULT_SAMPLER = "DPM++ 2M"
# The samplers of k-diffusion's form: k-diffusion's own, Restart (sd_samplers_extra) and LCM (sd_samplers_lcm).
K_SAMPLERS = {**KDIFFUSION_SAMPLERS, **EXTRA_SAMPLERS}
WEBUI_TIMESTEP_SAMPLERS = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")
SEED_LIMIT = 4294967294  # processing.get_fixed_seed: -1 picks random.randrange(4294967294)


@dataclass(frozen=True)
class WebuiSampler:
    label: str  # the webui's sampler name
    schedule_type: str  # the label of the schedule type asked for ("Automatic" = the sampler's own)

    @property
    def timesteps(self) -> bool:
        """A timestep sampler (DDIM, PLMS: model(x, t) -> eps over the webui's integer timesteps)."""
        return self.label in TIMESTEP_SAMPLERS

    @property
    def options(self) -> dict:
        return (TIMESTEP_SAMPLERS if self.timesteps else K_SAMPLERS)[self.label].options

    @property
    def infotext_schedule_type(self) -> str:
        """What the webui writes as "Schedule type": the schedule actually used when Automatic resolved to
        the sampler's own (get_sigmas records it), else the label asked for."""
        own = self.options.get("scheduler")
        if self.schedule_type == "Automatic" and own is not None:
            return find_schedule_type(own).label
        return self.schedule_type

    def total_steps(self, steps: int) -> int:
        """The denoiser calls the prompt schedules are made for (SamplerData.total_steps)."""
        return steps * 2 if self.options.get("second_order") else steps

    def uses_ensd(self, eta: float | None) -> bool:
        """processing.is_sampler_using_eta_noise_seed_delta: whether the infotext records ENSD."""
        return bool(self.options.get("uses_ensd")) and (1.0 if eta is None else eta) != 0


def is_webui_sampler(name: str) -> bool:
    try:
        resolve(name, None)
    except ValueError:
        return False
    return True


def resolve(sampler: str | None, scheduler: str | None) -> WebuiSampler:
    """get_sampler_and_scheduler: a trailing schedule type in the sampler's name ("DPM++ 2M Karras", "LMS
    Karras") is split off and wins over `scheduler`; a schedule type equal to the sampler's own becomes
    Automatic. Unknown names are a ValueError (the webui silently falls back to its default sampler)."""
    name = sampler or DEFAULT_SAMPLER
    if not isinstance(name, str):
        raise TypeError(f"sampler: expected a webui sampler name, got {type(name).__name__}")
    schedule = find_schedule_type(scheduler) if scheduler else SCHEDULE_TYPES[0]
    for candidate in SCHEDULE_TYPES:
        suffix = next((o for o in (candidate.label, candidate.name, *(candidate.aliases or ()))
                       if name.endswith(" " + o)), None)
        if suffix:
            name, schedule = name[:-len(suffix) - 1], candidate
            break
    try:
        label = find_k_sampler(name, K_SAMPLERS)
    except ValueError:
        label = next((lb for lb in WEBUI_TIMESTEP_SAMPLERS if lb.casefold() == name.casefold()), None)
        if label is None:
            raise ValueError(f"sampler: unknown webui sampler {name!r}; expected one of "
                             f"{', '.join([*K_SAMPLERS, *WEBUI_TIMESTEP_SAMPLERS])}") from None
        return WebuiSampler(label, schedule.label)  # the webui's timestep samplers have no schedule types
    if K_SAMPLERS[label].options.get("scheduler") == schedule.name:
        schedule = SCHEDULE_TYPES[0]
    if label == "LCM" and schedule.need_inner_model and schedule.name != "uniform":
        # these read timesteps off the CompVis denoiser; LCM's own maps only its 50 distilled timesteps
        raise ValueError(f"scheduler: LCM runs with Automatic, Uniform or a sigma-only schedule type here, "
                         f"not {schedule.label}")
    return WebuiSampler(label, schedule.label)


def ldm_alphas_cumprod(config) -> torch.Tensor:
    """ldm's DDPM.register_schedule for the model's betas: float64 maths, a float32 buffer."""
    n = config.num_train_timesteps or 1000
    start, end = config.beta_start or 0.0001, config.beta_end or 0.02
    kind = config.beta_schedule or "linear"
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64).numpy() ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64).numpy()
    else:
        raise ValueError(f"scheduler config: beta_schedule {kind!r} has no webui equivalent here "
                         "(expected scaled_linear or linear)")
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


def fixed_seeds(seed, total: int, name: str = "seed") -> list[int]:
    """The webui's all_seeds: an int (-1 or None: random) counts up per image; a list gives each image's."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != total:
            raise ValueError(f"{name}: a list of {len(seed)} seeds was passed but the batch has {total} images")
        return [int(s) for s in seed]
    base = random.randrange(SEED_LIMIT) if seed is None or seed == -1 else int(seed)
    return [base + i for i in range(total)]


def encoder(pipe, device, clip_skip: int | None) -> Callable[[list[str]], torch.Tensor]:
    """One webui encoder call (model.get_learned_conditioning): texts padded to one chunk count, the
    "Original" emphasis mean taken over the whole call (a prompt's scheduled texts weigh on each other)."""
    return lambda texts: prompts.encode(pipe.tokenizer, pipe.text_encoder, texts, device, clip_skip,
                                        joint_mean=True)


def conds(pipe, prompt_list: list[str], negative_list: list[str], total_steps: int, clip_skip: int | None,
          hires_steps: int | None = None):
    """(c, uc): the multicond schedules of the prompts and the schedules of the negative prompts, one per
    image, as processing.setup_conds makes them (calculate_hr_conds with `hires_steps`, the hires pass's
    denoiser calls; `total_steps` then is the first pass's)."""
    encode = encoder(pipe, pipe.device, clip_skip)
    uc = conditioning.get_learned_conditioning(encode, negative_list, total_steps, hires_steps)
    c = conditioning.get_multicond_learned_conditioning(encode, prompt_list, total_steps, hires_steps)
    return c, uc


def sample(pipe, unet: Callable, choice: WebuiSampler, c, uc, rng: ImageRNG, seeds: list[int], *, steps: int,
           cfg_scale: float, eta: float | None, s_min_uncond: float, init_latent: torch.Tensor | None = None,
           strength: float | None = None, fix_steps: bool = False,
           mask: tuple[torch.Tensor, torch.Tensor] | None = None, cross_attention_kwargs: dict | None = None,
           callback: Callable[[dict], None] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KDiffusionSampler.sample (txt2img) or sample_img2img (with `init_latent` and `strength`): the final
    latents. The first rng.next() is the starting noise; every later draw a sampler makes comes from it too.
    `fix_steps`: run exactly `steps` steps of a longer schedule (the hires pass). `mask` (mask, nmask):
    inpainting, the init latent kept where mask is 1, during sampling and after it
    (StableDiffusionProcessingImg2Img.sample)."""
    alphas_cumprod = ldm_alphas_cumprod(pipe.scheduler_config)
    model_sigmas = training_sigmas(alphas_cumprod)
    prediction_type = pipe.scheduler_config.prediction_type or "epsilon"

    cache = getattr(unet, "deepcache", None)
    if cache is not None:
        cache.reset()

    def eps(x, t, cond):
        if cache is not None:  # DeepCache's step here: the CFG denoiser's call
            cache.at(denoiser.step, separate_calls=True)
        return unet(x.to(dtype), t, cond.to(dtype), cross_attention_kwargs=cross_attention_kwargs).float()

    device = pipe.device
    noise = rng.next().to(device)
    if choice.timesteps:
        denoiser = CFGDenoiser(eps, c, uc, cfg_scale, s_min_uncond)
        denoiser.mask_before_denoising = True
    elif choice.label == "LCM":  # LCMSampler: its own denoiser and, at Automatic, its own schedule
        inner = LCMDenoiser(eps, alphas_cumprod.to(device))
        model_sigmas = inner.sigmas.cpu()
        denoiser = CFGDenoiser(inner, c, uc, cfg_scale, s_min_uncond)
    else:
        denoiser = CFGDenoiser(compvis_denoiser(eps, alphas_cumprod.to(device), prediction_type), c, uc,
                               cfg_scale, s_min_uncond)
    if mask is not None:
        denoiser.init_latent, (denoiser.mask, denoiser.nmask) = init_latent, (m.to(device) for m in mask)
    if choice.timesteps:
        samples = _sample_timesteps(choice, denoiser, rng, noise, alphas_cumprod, steps=steps, eta=eta,
                                    init_latent=init_latent, strength=strength, fix_steps=fix_steps,
                                    callback=callback)
    else:
        samples = _sample_k(choice, denoiser, rng, noise, seeds, model_sigmas, steps=steps, eta=eta,
                            init_latent=init_latent, strength=strength, fix_steps=fix_steps, callback=callback)
    return samples if mask is None else denoiser.blend(samples)


def _sample_k(choice: WebuiSampler, denoiser: CFGDenoiser, rng: ImageRNG, noise: torch.Tensor, seeds: list[int],
              model_sigmas: torch.Tensor, *, steps: int, eta: float | None, init_latent: torch.Tensor | None,
              strength: float | None, fix_steps: bool, callback) -> torch.Tensor:
    """KDiffusionSampler.sample / sample_img2img: a k-diffusion sampler over the webui's sigmas."""
    device = noise.device
    function = K_SAMPLERS[choice.label].function
    if init_latent is None:
        sigmas = _sigmas(choice, denoiser, steps, model_sigmas)
        x = noise * sigmas[0].to(device)
        run_sigmas = sigmas
        kwargs = webui_sampler_kwargs(choice.label, sigmas, model_sigmas, steps, eta=eta, table=K_SAMPLERS)
    else:
        schedule_steps, t_enc = setup_img2img_steps(steps, strength, fix_steps)
        sigmas = _sigmas(choice, denoiser, schedule_steps, model_sigmas)
        run_sigmas = sigmas[schedule_steps - t_enc - 1:]
        x = init_latent + noise * run_sigmas[0].to(device)
        kwargs = webui_sampler_kwargs(choice.label, run_sigmas, model_sigmas, steps, img2img=True, eta=eta,
                                      table=K_SAMPLERS)
    if "sigmas" in kwargs:
        kwargs["sigmas"] = kwargs["sigmas"].to(device)
    if choice.options.get("brownian_noise"):
        positive = sigmas[sigmas > 0]
        noise_sampler = BrownianTreeNoise(x, positive.min(), sigmas.max(), seeds)
    else:
        noise_sampler = rng_noise_sampler(rng)
    if "noise_sampler" in inspect.signature(function).parameters:
        kwargs["noise_sampler"] = noise_sampler
    return function(denoiser, x, extra_args={}, callback=callback, disable=True, **kwargs)


def _sigmas(choice: WebuiSampler, denoiser: CFGDenoiser, steps: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """KDiffusionSampler.get_sigmas; LCM's uniform schedule is its own denoiser's get_sigmas."""
    if isinstance(denoiser.inner, LCMDenoiser) and find_schedule_type(choice.schedule_type).name in (
            "automatic", "uniform"):
        return denoiser.inner.get_sigmas(steps).cpu()
    return webui_sigmas(choice.schedule_type, steps, model_sigmas,
                        bool(choice.options.get("discard_next_to_last_sigma")), choice.options.get("scheduler"))


def _sample_timesteps(choice: WebuiSampler, denoiser: CFGDenoiser, rng: ImageRNG, noise: torch.Tensor,
                      alphas_cumprod: torch.Tensor, *, steps: int, eta: float | None,
                      init_latent: torch.Tensor | None, strength: float | None, fix_steps: bool,
                      callback) -> torch.Tensor:
    """The webui's CompVisSampler.sample / sample_img2img: the CFG denoiser over the UNet's eps at integer
    timesteps; txt2img starts from the noise itself, img2img from init * sqrt(a) + noise * sqrt(1 - a)."""
    discard = bool(choice.options.get("discard_next_to_last_sigma"))
    if init_latent is None:
        timesteps, x = get_timesteps(steps, discard), noise
    else:
        schedule_steps, t_enc = setup_img2img_steps(steps, strength, fix_steps)
        timesteps, sqrt_a, sqrt_one_minus_a = img2img_timesteps(get_timesteps(schedule_steps, discard), t_enc,
                                                                alphas_cumprod)
        x = init_latent * sqrt_a + noise * sqrt_one_minus_a
    function = TIMESTEP_SAMPLERS[choice.label].function
    parameters = inspect.signature(function).parameters
    kwargs = {"eta": 0.0 if eta is None else eta} if "eta" in parameters else {}
    if "noise_sampler" in parameters:
        kwargs["noise_sampler"] = rng_noise_sampler(rng)
    if "is_img2img" in parameters and init_latent is not None:
        kwargs["is_img2img"] = True
    return function(denoiser, x, timesteps.to(noise.device), extra_args={}, callback=callback, disable=True,
                    alphas_cumprod=alphas_cumprod.to(noise.device), **kwargs)


def to_uint8(decoded: torch.Tensor) -> list[np.ndarray]:
    """processing.py's conversion: clamp((x + 1) / 2), then 255 * x truncated to uint8 (not rounded)."""
    x = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return [(255.0 * np.moveaxis(img.cpu().numpy(), 0, 2)).astype(np.uint8) for img in x]
