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

from . import __version__
from .checks import SEED_MAX, is_int, is_number
from .images import to_rgb
from .infotext import image_infotext, parse
from .rng import randn_tensor, slerp

# The webui's sampler names, aliases and options (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py)
# for the samplers altdiff has, and the altdiff sampler each schedule ("automatic" is the sampler's own
# default, as the webui's options["scheduler"] says) maps onto. Order as the webui lists them.
SAMPLERS = {
    "DPM++ 2M": (["k_dpmpp_2m"], {"scheduler": "karras"}, {"karras": "dpmpp_2m_karras", "uniform": "dpmpp_2m"}),
    "Euler a": (["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}, {"uniform": "euler_a"}),
    "Euler": (["k_euler"], {}, {"uniform": "euler"}),
    "LMS": (["k_lms"], {}, {"uniform": "lms"}),
    "DDIM": (["ddim"], {}, {"uniform": "ddim"}),
    "PLMS": (["plms"], {}, {"uniform": "pndm"}),
}
# modules/sd_schedulers.py: (name, label, aliases, default_rho, need_inner_model), the ones altdiff has.
SCHEDULERS = [("automatic", "Automatic", None, -1, False), ("uniform", "Uniform", None, -1, False),
              ("karras", "Karras", None, 7.0, False)]
DEFAULT_SAMPLER = "Euler"  # the webui API's sampler_index default

# Fields whose value asks for a feature altdiff lacks unless it is one of these (the webui's defaults and
# what its clients send by default). Fields the webui itself ignores in a request (hires settings while
# enable_hr is off, mask settings without a mask, image_cfg_scale outside edit models) are accepted.
INERT = {
    "enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
    "script_name": (None, ""), "script_args": ([], None), "alwayson_scripts": ({}, None),
    "firstphase_width": (0, None), "firstphase_height": (0, None), "s_min_uncond": (0, None),
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
    eta: float  # generate()'s eta (DDIM); other samplers have none
    clip_skip: int  # the webui's CLIP_stop_at_last_layers
    model: str | None  # override_settings' sd_model_checkpoint; None: the server's current model
    init_image: PIL.Image.Image | None = None
    denoising_strength: float | None = None
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

def _scheduler(name: str) -> tuple[str, str, Any, float, bool] | None:
    return next((s for s in SCHEDULERS if name in (s[0], s[1], *(s[2] or []))), None)


def resolve_sampler(sampler_name: str | None, scheduler: str | None,
                    field: str = "sampler_name") -> tuple[str, str, str]:
    """(altdiff sampler, the webui's sampler name, its scheduler label) for a webui sampler name (with or without a scheduler
    suffix such as "DPM++ 2M Karras", as the webui's get_sampler_and_scheduler reads it) and scheduler."""
    name = sampler_name or DEFAULT_SAMPLER
    sched = _scheduler(scheduler) if scheduler else SCHEDULERS[0]
    if sched is None:
        raise FieldError("scheduler", f"unknown scheduler {scheduler!r}; expected one of "
                         f"{[s[1] for s in SCHEDULERS]}")
    for s in SCHEDULERS:
        suffix = next((o for o in (s[1], s[0], *(s[2] or [])) if name.endswith(" " + o)), None)
        if suffix:
            name, sched = name[:-len(suffix) - 1], s
            break
    found = next((n for n, (aliases, _, _) in SAMPLERS.items() if name == n or name in aliases), None)
    if found is None:
        raise FieldError(field, f"unknown sampler {name!r}; expected one of {list(SAMPLERS)}")
    _, options, variants = SAMPLERS[found]
    key = options.get("scheduler", "uniform") if sched[0] == "automatic" else sched[0]
    if key not in variants:
        raise FieldError("scheduler", f"{found} has no {sched[1]} schedule here (expected Automatic or "
                         f"{' or '.join(s[1] for s in SCHEDULERS if s[0] in variants)})")
    return variants[key], found, sched[1]


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers."""
    return [{"name": n, "aliases": aliases, "options": options} for n, (aliases, options, _) in SAMPLERS.items()]


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers."""
    return [{"name": n, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": inner}
            for n, label, aliases, rho, inner in SCHEDULERS]


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
                sampler=sampler, sampler_name=sampler_name, scheduler=scheduler, eta=0.0 if eta is None or sampler != "ddim" else eta,
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
    """The generate() keyword arguments that make batch `b` of `task` on `pipe`."""
    part = slice(b * task.batch_size, (b + 1) * task.batch_size)
    kwargs = dict(prompt=task.prompt, model=pipe, negative_prompt=task.negative_prompt,
                  num_inference_steps=task.steps, guidance_scale=task.cfg_scale, sampler=task.sampler,
                  num_images_per_prompt=task.batch_size, eta=task.eta, clip_skip=clip_skip_for(pipe, task.clip_skip),
                  a1111_prompts=True, lora_dir=task.lora_dir, embeddings_dir=task.embeddings_dir, progress=False)
    if task.init_image is not None:
        return dict(kwargs, image=task.init_image, strength=task.denoising_strength, seed=task.seeds[part])
    kwargs.update(height=task.height, width=task.width)
    if task.subseed_strength == 0:
        return dict(kwargs, seed=task.seeds[part])
    factor, channels = pipe.vae_scale_factor, pipe.unet.config.in_channels
    shape = (task.batch_size, channels, task.height // factor, task.width // factor)
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
           networks: dict[str, str] | None = None) -> Result:
    """Infotexts, the grid and the `info` JSON for the images made (fewer than planned when interrupted)."""
    texts = [infotext(task, img, i, model, flag, networks) for i, (img, flag) in enumerate(zip(images, nsfw))]
    first = 0
    if task.grid and len(images) > 1:
        images = [image_grid(images, task.batch_size), *images]
        texts = [infotext(task, images[1], 0, model, networks=networks), *texts]
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
