"""The AUTOMATIC1111 webui's txt2img/img2img semantics on top of generate(), as its source has them
(modules/api/api.py and models.py, processing.py, rng.py, images.py, sd_samplers*.py, sd_schedulers.py):
its sampler and scheduler names, seeds (image i uses seed+i), variation seeds (slerp of two noises), grids,
per-image infotext and the `info` JSON. No web framework here: altdiff.serve puts this behind HTTP.

A request (a dict of the webui's fields) becomes a `Task`; `generate_kwargs(task, pipe, b)` is the
generate() call that makes batch b, so image i of a response is `generate(**generate_kwargs(...))` with
seed+i; `finish` turns the images into the webui's response parts. Fields asking for something altdiff does
not do are a `FieldError` naming the field, never ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from . import __version__, webui_sampling
from .checks import SEED_MAX, is_int, is_number
from .images import to_rgb
from .infotext import image_infotext, parse
from .k_samplers import KDIFFUSION_SAMPLERS
from .k_schedules import SCHEDULE_TYPES, find_schedule_type
from .rng import randn_tensor, slerp

# The webui's timestep samplers altdiff runs in its diffusers family until they exist in the webui family
# (the k-diffusion samplers, altdiff.k_samplers, are the webui's own): name -> (aliases, options, altdiff name).
TIMESTEP_SAMPLERS = {
    "DDIM": (["ddim"], {}, "ddim"),
    "PLMS": (["plms"], {}, "pndm"),
}
DEFAULT_SAMPLER = "Euler"  # the webui API's sampler_index default

# Fields whose value asks for a feature altdiff lacks unless it is one of these (the webui's defaults and
# what its clients send by default). Fields the webui itself ignores in a request (hires settings while
# enable_hr is off, mask settings without a mask, image_cfg_scale outside edit models) are accepted.
INERT = {
    "enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
    "script_name": (None, ""), "script_args": ([], None), "alwayson_scripts": ({}, None),
    "firstphase_width": (0, None), "firstphase_height": (0, None),
    "s_churn": (0, None), "s_tmin": (0, None), "s_tmax": (0, None, math.inf), "s_noise": (1, None),
    "refiner_checkpoint": (None, "", "None"), "firstpass_image": (None, ""), "infotext": (None, ""),
    "mask": (None, ""), "latent_mask": (None, ""), "initial_noise_multiplier": (None, 1), "resize_mode": (0,),
    "disable_extra_networks": (False, None),
}
OVERRIDABLE = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


class FieldError(ValueError):
    """A request field with a value altdiff cannot honour (HTTP 422 naming `field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class Limits:
    """Server-side limits a request must stay within."""

    max_pixels: int = 1024 * 1024  # width x height of one image
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_upload_pixels: int = 4096 * 4096  # a decoded init image or png-info image
    # characters of prompt / negative_prompt: ~30 chunks of 75 tokens of plain text; the webui has no limit,
    # but encoding grows with the chunk count and a megabyte prompt would hold the worker for minutes
    max_prompt_chars: int = 8192


@dataclass
class Task:
    """One txt2img/img2img request, checked: batch b makes images b*batch_size ... (b+1)*batch_size - 1."""

    request: dict[str, Any]  # the request as given (echoed as `parameters`)
    prompt: str
    negative_prompt: str
    seeds: list[int]  # one per image
    subseeds: list[int]
    subseed_strength: float
    batch_size: int
    n_iter: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: str  # altdiff's name
    sampler_name: str  # the webui's name
    scheduler: str  # the webui's label
    eta: float | None  # generate()'s eta (None: the sampler's webui default)
    clip_skip: int  # the webui's CLIP_stop_at_last_layers
    model: str | None  # override_settings' sd_model_checkpoint; None: the server's current model
    init_image: PIL.Image.Image | None = None
    denoising_strength: float | None = None
    s_min_uncond: float = 0.0
    lora_dir: str | None = None  # where the prompt's <lora:NAME:w> tags are found
    embeddings_dir: str | None = None  # embeddings a prompt names by file stem
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    @property
    def grid(self) -> bool:
        """The webui API returns a grid first when it saves images (its do_not_save_grid is set from
        save_images) and more than one image is made; do_not_save_grid also turns it off here."""
        r = self.request
        return bool(r.get("save_images")) and not r.get("do_not_save_grid") and len(self.seeds) > 1


# --- samplers ----------------------------------------------------------------------------------------------

def resolve_sampler(sampler_name: str | None, scheduler: str | None,
                    field: str = "sampler_name") -> tuple[str, str, str]:
    """(generate()'s sampler, the webui's sampler name, the schedule type label) as the webui's
    get_sampler_and_scheduler reads them ("DPM++ 2M Karras" is DPM++ 2M with Karras). The k-diffusion
    samplers run in the webui family; DDIM and PLMS in the diffusers family, Automatic/Uniform only."""
    name = sampler_name or DEFAULT_SAMPLER
    if scheduler:
        try:
            find_schedule_type(scheduler)
        except ValueError as e:
            raise FieldError("scheduler", str(e).partition(": ")[2]) from None
    found = next((n for n, (aliases, _, _) in TIMESTEP_SAMPLERS.items() if name == n or name in aliases), None)
    if found is None:
        try:
            choice = webui_sampling.resolve(name, scheduler)
        except ValueError:
            raise FieldError(field, f"unknown sampler {name!r}; expected one of "
                             f"{[*KDIFFUSION_SAMPLERS, *TIMESTEP_SAMPLERS]}") from None
        return choice.label, choice.label, choice.schedule_type
    label = find_schedule_type(scheduler).label if scheduler else "Automatic"
    if label not in ("Automatic", "Uniform"):
        raise FieldError("scheduler", f"{found} runs with the Automatic (Uniform) schedule only here, got {label}")
    return TIMESTEP_SAMPLERS[found][2], found, label


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers, in the webui's order."""
    rows = [(label, list(row.aliases), row.options) for label, row in KDIFFUSION_SAMPLERS.items()]
    rows += [(n, aliases, options) for n, (aliases, options, _) in TIMESTEP_SAMPLERS.items()]
    return [{"name": n, "aliases": aliases, "options": options} for n, aliases, options in rows]


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) if s.aliases else None,
             "default_rho": s.default_rho, "need_inner_model": s.need_inner_model} for s in SCHEDULE_TYPES]


# --- requests ----------------------------------------------------------------------------------------------

def decode_image(data: Any, field: str, max_pixels: int) -> PIL.Image.Image:
    """A base64 image field (plain or a data: URL), size-checked before its pixels are decoded."""
    if not isinstance(data, str):
        raise FieldError(field, f"expected a base64 image string, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)  # line breaks allowed, nothing else
    except (binascii.Error, ValueError) as e:
        raise FieldError(field, f"not valid base64 ({e})") from None
    try:
        img = PIL.Image.open(io.BytesIO(raw))
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, ValueError) as e:
        # ValueError: Pillow's text chunk limits (MAX_TEXT_CHUNK, MAX_TEXT_MEMORY), a zTXt bomb
        raise FieldError(field, f"not a readable image ({e})") from None
    if img.width * img.height > max_pixels:
        raise FieldError(field, f"{img.width}x{img.height} is larger than the {max_pixels} pixels allowed")
    try:
        img.load()
    except (OSError, ValueError) as e:  # truncated data, or a zlib bomb in a text chunk
        raise FieldError(field, f"not a readable image ({e})") from None
    return img


def fixed_seed(seed: int) -> int:
    """processing.get_fixed_seed: -1 picks one."""
    return random.randrange(4294967294) if seed == -1 else seed


def _same(value, allowed) -> bool:
    return value is allowed or (value == allowed and isinstance(value, bool) == isinstance(allowed, bool))


def _check_inert(request: dict) -> None:
    for name, allowed in INERT.items():
        value = request.get(name)
        if name in request and not any(_same(value, a) for a in allowed):
            raise FieldError(name, f"{value!r} asks for something altdiff does not do (accepted: "
                             f"{', '.join(repr(a) for a in allowed)})")
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        if is_number(request.get(name)) and request[name] > 0:
            raise FieldError(name, f"seed resizing is not supported (accepted: 0 or -1), got {request[name]!r}")


def _check_int(request: dict, name: str, low: int, high: int, default: int) -> int:
    value = request.get(name, default)
    if value is None:
        value = default
    if not is_int(value, low, high):
        raise FieldError(name, f"expected an int in [{low}, {high}], got {value!r}")
    return int(value)


def _check_number(request: dict, name: str, low: float, high: float, default: float | None) -> float | None:
    value = request.get(name, default)
    if value is None:
        return default
    if not is_number(value) or not low <= value <= high:
        raise FieldError(name, f"expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def parse_task(request: dict, *, img2img: bool, limits: Limits, options: dict, models: list[str],
               lora_dir: str | None = None, embeddings_dir: str | None = None) -> Task:
    """A checked Task from a txt2img (or img2img) request; `options` are the server's current webui options,
    `models` the names a request may use for a model, `lora_dir` / `embeddings_dir` the server's folders."""
    _check_inert(request)
    for name in ("prompt", "negative_prompt"):
        if not isinstance(request.get(name) or "", str):
            raise FieldError(name, f"expected a string, got {type(request[name]).__name__}")
        if len(request.get(name) or "") > limits.max_prompt_chars:
            raise FieldError(name, f"{len(request[name])} characters is more than the server's limit of "
                             f"{limits.max_prompt_chars}")
    overrides = request.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise FieldError("override_settings", f"expected an object, got {type(overrides).__name__}")
    for key in overrides:
        if key not in OVERRIDABLE and overrides[key] != options.get(key, object()):
            raise FieldError(f"override_settings.{key}", f"not a setting altdiff has (it has {list(OVERRIDABLE)})")
    model = overrides.get("sd_model_checkpoint")
    if model is not None and model not in models:
        raise FieldError("override_settings.sd_model_checkpoint", f"unknown model {model!r}; expected one of "
                         f"{models} (GET /sdapi/v1/sd-models)")
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"])
    if not is_int(clip_skip, 1, 12):
        raise FieldError("override_settings.CLIP_stop_at_last_layers", f"expected an int in [1, 12], got "
                         f"{clip_skip!r}")

    width = _check_int(request, "width", 8, 2**16, 512)
    height = _check_int(request, "height", 8, 2**16, 512)
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise FieldError(name, f"must be a multiple of 8, got {value}")
    if width * height > limits.max_pixels:
        raise FieldError("width", f"{width}x{height} is more than the server's limit of {limits.max_pixels} "
                         "pixels per image")
    steps = _check_int(request, "steps", 1, limits.max_steps, 50)
    batch_size = _check_int(request, "batch_size", 1, limits.max_batch_size, 1)
    n_iter = _check_int(request, "n_iter", 1, limits.max_n_iter, 1)
    cfg_scale = _check_number(request, "cfg_scale", 0.0, 100.0, 7.0)
    # seed + i of every image must be a seed torch takes (checks.SEED_MAX); -1 picks one.
    seed = _check_int(request, "seed", -1, SEED_MAX - batch_size * n_iter + 1, -1)
    subseed = _check_int(request, "subseed", -1, SEED_MAX - batch_size * n_iter + 1, -1)
    subseed_strength = _check_number(request, "subseed_strength", 0.0, 1.0, 0.0)
    if subseed_strength > 0 and img2img:
        raise FieldError("subseed_strength", "variation seeds are supported for txt2img only")

    sampler_field = "sampler_name" if request.get("sampler_name") else "sampler_index"
    for name in ("sampler_name", "sampler_index", "scheduler"):
        if not isinstance(request.get(name) or "", str):
            raise FieldError(name, f"expected a string, got {type(request[name]).__name__}")
    sampler, sampler_name, scheduler = resolve_sampler(request.get("sampler_name") or request.get("sampler_index"),
                                         request.get("scheduler"), sampler_field)
    eta = _check_number(request, "eta", 0.0, 1.0, None)  # the webui accepts any eta with any sampler
    s_min_uncond = _check_number(request, "s_min_uncond", 0.0, 1e4, 0.0)

    init_image = strength = None
    if img2img:
        images = request.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise FieldError("init_images", "expected a list of one base64 image")
        # The webui flattens alpha onto white and resizes to width x height ("Just resize", Lanczos).
        init_image = to_rgb(decode_image(images[0], "init_images.0", limits.max_upload_pixels)).resize(
            (width, height), resample=PIL.Image.LANCZOS)
        strength = _check_number(request, "denoising_strength", 0.0, 1.0, 0.75)
        if int(steps * strength) < 1:
            raise FieldError("denoising_strength", f"{strength} of {steps} steps runs no step; raise either")

    total = batch_size * n_iter
    seed, subseed = fixed_seed(seed), fixed_seed(subseed)
    # processing.py: with variations every image keeps the seed and the subseed counts up.
    seeds = [seed + (i if subseed_strength == 0 else 0) for i in range(total)]
    return Task(request=request, prompt=request.get("prompt") or "",
                negative_prompt=request.get("negative_prompt") or "", seeds=seeds,
                subseeds=[subseed + i for i in range(total)], subseed_strength=subseed_strength,
                batch_size=batch_size, n_iter=n_iter, steps=steps, cfg_scale=cfg_scale, width=width, height=height,
                sampler=sampler, sampler_name=sampler_name, scheduler=scheduler, eta=eta if sampler in KDIFFUSION_SAMPLERS else (eta or 0.0) if sampler == "ddim" else 0.0,
                s_min_uncond=s_min_uncond,
                clip_skip=int(clip_skip), model=model, init_image=init_image, denoising_strength=strength,
                lora_dir=lora_dir, embeddings_dir=embeddings_dir)


# --- generation ----------------------------------------------------------------------------------------------

def variation_latents(shape: tuple[int, ...], seeds: list[int], subseeds: list[int], strength: float) -> torch.Tensor:
    """Initial noise of a batch with variation seeds, as the webui's ImageRNG.first: per image, the seed's and
    the subseed's noise (drawn as generate() draws them: one CPU generator per image) slerped by `strength`."""
    one = (1, *shape[1:])
    return torch.cat([slerp(strength, randn_tensor(one, torch.Generator().manual_seed(s))[0],
                            randn_tensor(one, torch.Generator().manual_seed(v))[0])[None]
                      for s, v in zip(seeds, subseeds)])


def clip_skip_for(pipe, layers: int) -> int | None:
    """generate()'s clip_skip for the webui's CLIP_stop_at_last_layers: skip layers - 1 more XLM-R layers
    than the model's own default state (m9 the last, m18 the second to last). The webui itself ignores the
    setting for XLM-R models."""
    if layers == 1:
        return None
    return layers - 1 + (1 if pipe.text_encoder.config.has_pre_transformation else 0)


def generate_kwargs(task: Task, pipe, b: int) -> dict[str, Any]:
    """The generate() keyword arguments that make batch `b` of `task` on `pipe`: the webui family for the
    k-diffusion samplers (its noise, seeds, subseeds and infotext; the webui ignores CLIP skip for XLM-R),
    the diffusers family for DDIM and PLMS."""
    part = slice(b * task.batch_size, (b + 1) * task.batch_size)
    kwargs = dict(prompt=task.prompt, model=pipe, negative_prompt=task.negative_prompt,
                  num_inference_steps=task.steps, guidance_scale=task.cfg_scale, sampler=task.sampler,
                  num_images_per_prompt=task.batch_size, eta=task.eta, lora_dir=task.lora_dir,
                  embeddings_dir=task.embeddings_dir, progress=False, seed=task.seeds[part])
    if task.init_image is not None:
        kwargs.update(image=task.init_image, strength=task.denoising_strength)
    else:
        kwargs.update(height=task.height, width=task.width)
    if task.sampler in KDIFFUSION_SAMPLERS or task.sampler in webui_sampling.WEBUI_TIMESTEP_SAMPLERS:
        return dict(kwargs, family="webui", scheduler=task.scheduler, subseed=task.subseeds[part][0],
                    subseed_strength=task.subseed_strength, s_min_uncond=task.s_min_uncond)
    kwargs.update(a1111_prompts=True, clip_skip=clip_skip_for(pipe, task.clip_skip))
    if task.subseed_strength == 0 or task.init_image is not None:
        return kwargs
    factor, channels = pipe.vae_scale_factor, pipe.unet.config.in_channels
    shape = (task.batch_size, channels, task.height // factor, task.width // factor)
    del kwargs["seed"]
    return dict(kwargs, latents=variation_latents(shape, task.seeds[part], task.subseeds[part],
                                                  task.subseed_strength))


def image_grid(images: list[PIL.Image.Image], batch_size: int = 1) -> PIL.Image.Image:
    """modules/images.py image_grid with the default options (rows = round(sqrt(n)), white background)."""
    rows = min(round(math.sqrt(len(images))), len(images))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, (i % cols * w, i // cols * h))
    return grid


@dataclass
class Result:
    images: list[PIL.Image.Image]  # the grid first, when there is one
    infotexts: list[str]  # one per image
    info: str  # the webui's `info` JSON string
    index_of_first_image: int = 0


def infotext(task: Task, image: PIL.Image.Image, i: int, model: str, nsfw: bool = False,
             networks: dict[str, str] | None = None) -> str:
    """Image i's infotext: the CLI's, with the webui's fields for variation seeds, a schedule type, clip skip
    and the networks the prompt named (GenerationResult.infotext's "Lora hashes", "TI hashes")."""
    extra = {"Variation seed": task.subseeds[i] if task.subseed_strength else None,
             "Variation seed strength": task.subseed_strength or None,
             "Schedule type": None if task.scheduler == "Automatic" else task.scheduler,
             "Clip skip": task.clip_skip if task.clip_skip > 1 else None, **(networks or {})}
    return image_infotext(image, task.prompt, task.negative_prompt, steps=task.steps, sampler=task.sampler,
                          cfg_scale=task.cfg_scale, seed=task.seeds[i], model=model,
                          strength=task.denoising_strength, nsfw=nsfw, extra=extra)


def finish(task: Task, images: list[PIL.Image.Image], nsfw: list[bool], model: str,
           networks: dict[str, str] | None = None, infotexts: list[str] | None = None) -> Result:
    """Infotexts, the grid and the `info` JSON for the images made (fewer than planned when interrupted).
    `infotexts`: the webui family's own, one per image (GenerationResult.infotexts)."""
    texts = infotexts or [infotext(task, img, i, model, flag, networks)
                          for i, (img, flag) in enumerate(zip(images, nsfw))]
    first = 0
    if task.grid and len(images) > 1:
        images = [image_grid(images, task.batch_size), *images]
        texts = [texts[0], *texts]
        first = 1
    n = len(task.seeds)
    r = task.request
    info = {
        "prompt": task.prompt, "all_prompts": [task.prompt] * n, "negative_prompt": task.negative_prompt,
        "all_negative_prompts": [task.negative_prompt] * n, "seed": task.seeds[0], "all_seeds": task.seeds,
        "subseed": task.subseeds[0], "all_subseeds": task.subseeds, "subseed_strength": task.subseed_strength,
        "width": task.width, "height": task.height, "sampler_name": task.sampler_name,
        "cfg_scale": task.cfg_scale, "steps": task.steps, "batch_size": task.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": r.get("seed_resize_from_w", -1),
        "seed_resize_from_h": r.get("seed_resize_from_h", -1), "denoising_strength": r.get("denoising_strength"),
        "extra_generation_params": {}, "index_of_first_image": first, "infotexts": texts, "styles": [],
        "job_timestamp": task.timestamp, "clip_skip": task.clip_skip, "is_using_inpainting_conditioning": False,
        "version": f"altdiff {__version__}", "nsfw_content_detected": nsfw,
    }
    return Result(images, texts, json.dumps(info, ensure_ascii=False), first)


def png_info(image: PIL.Image.Image) -> dict[str, Any]:
    """POST /sdapi/v1/png-info: the infotext, the image's other text chunks, and the parameters parsed as the
    webui's parse_generation_parameters does (infotext.parse: "Size" split into Size-1/Size-2, its defaults)."""
    text = image.info.get("parameters")
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    if not isinstance(text, str):
        return {"info": "", "items": items, "parameters": {}}
    prompt, negative, params = parse(text)
    parameters: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **params}
    return {"info": text, "items": items, "parameters": parameters}
