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

from . import __version__, inpaint, webui_sampling
from .checks import SEED_MAX, is_int, is_number
from .hires import HiresError, HiresOptions
from .hires import target as hires_target
from .images import to_rgb
from .infotext import parse, to_generate_kwargs
from .inpaint import InpaintError, InpaintOptions
from .k_schedules import SCHEDULE_TYPES, find_schedule_type
from .timestep_samplers import TIMESTEP_SAMPLERS

DEFAULT_SAMPLER = "Euler"  # the webui API's sampler_index default

# Fields whose value asks for a feature altdiff lacks unless it is one of these (the webui's defaults and
# what its clients send by default). Fields the webui itself ignores in a request (hires settings while
# enable_hr is off, mask settings without a mask, image_cfg_scale outside edit models) are accepted.
INERT = {
    "restore_faces": (False, None), "tiling": (False, None), "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "script_name": (None, ""), "script_args": ([], None), "alwayson_scripts": ({}, None),
    "firstphase_width": (0, None), "firstphase_height": (0, None),
    "s_churn": (0, None), "s_tmin": (0, None), "s_tmax": (0, None, math.inf), "s_noise": (1, None),
    "refiner_checkpoint": (None, "", "None"), "firstpass_image": (None, ""),
    "latent_mask": (None, ""), "initial_noise_multiplier": (None, 1),
    "disable_extra_networks": (False, None),
}
# The webui settings altdiff has: a request's override_settings or POST /options may set them.
OVERRIDABLE = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "randn_source", "eta_noise_seed_delta",
               "token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")
NOISE_SETTINGS = {"randn_source": "GPU", "eta_noise_seed_delta": 0}  # the webui's defaults
TOME_SETTINGS = {"token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0}


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
    rng: str = "GPU"  # the webui's randn_source
    ensd: int = 0  # the webui's eta_noise_seed_delta
    token_merging_ratio: float = 0.0
    init_image: PIL.Image.Image | None = None  # resized to width x height, unless there is a mask
    denoising_strength: float | None = None
    mask: PIL.Image.Image | None = None
    inpaint: InpaintOptions | None = None  # with a mask
    hires: HiresOptions | None = None
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
    get_sampler_and_scheduler reads them ("DPM++ 2M Karras" is DPM++ 2M with Karras); every one runs in
    generate()'s webui family, under its webui label."""
    name = sampler_name or DEFAULT_SAMPLER
    if scheduler:
        try:
            find_schedule_type(scheduler)
        except ValueError as e:
            raise FieldError("scheduler", str(e).partition(": ")[2]) from None
    try:
        choice = webui_sampling.resolve(name, scheduler)
    except ValueError:
        raise FieldError(field, f"unknown sampler {name!r}; expected one of "
                         f"{[row['name'] for row in samplers_list()]}") from None
    return choice.label, choice.label, choice.schedule_type


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers, in the webui's order."""
    # k-diffusion's and Restart, then the timestep samplers, then LCM, as the webui lists them
    k_rows = {label: (list(row.aliases), row.options) for label, row in webui_sampling.K_SAMPLERS.items()}
    lcm = k_rows.pop("LCM")
    rows = [(label, *row) for label, row in k_rows.items()]
    rows += [(label, list(TIMESTEP_SAMPLERS[label].aliases), TIMESTEP_SAMPLERS[label].options)
             for label in webui_sampling.WEBUI_TIMESTEP_SAMPLERS]
    rows.append(("LCM", *lcm))
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


def field_ranges(limits: Limits) -> dict[str, tuple[int | float, int | float]]:
    """[low, high] of each numeric request field, as the checks below apply them and /openapi.json shows them.
    Width and height are also multiples of 8 with width x height <= limits.max_pixels; seed + the image count
    stays within SEED_MAX."""
    return {"width": (8, 2**16), "height": (8, 2**16), "steps": (1, limits.max_steps),
            "batch_size": (1, limits.max_batch_size), "n_iter": (1, limits.max_n_iter), "cfg_scale": (0.0, 100.0),
            "seed": (-1, SEED_MAX), "subseed": (-1, SEED_MAX), "subseed_strength": (0.0, 1.0), "eta": (0.0, 1.0),
            "s_min_uncond": (0.0, 1e4), "denoising_strength": (0.0, 1.0), "resize_mode": (0, 3),
            "mask_blur_x": (0, 256), "mask_blur_y": (0, 256), "mask_blur": (0, 256),
            "inpaint_full_res_padding": (0, 256),
            "inpainting_fill": (0, 3), "inpainting_mask_invert": (0, 1), "hr_scale": (0.0, 16.0),
            "hr_second_pass_steps": (0, limits.max_steps), "hr_resize_x": (0, 2**16), "hr_resize_y": (0, 2**16)}


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
    r = field_ranges(limits)
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
    noise = {**NOISE_SETTINGS, **{k: options[k] for k in NOISE_SETTINGS if k in options},
             **{k: overrides[k] for k in NOISE_SETTINGS if k in overrides}}
    check_noise_settings(noise, "override_settings.")
    merging = {**TOME_SETTINGS, **{k: options[k] for k in TOME_SETTINGS if k in options},
               **{k: overrides[k] for k in TOME_SETTINGS if k in overrides}}
    check_tome_settings(merging, "override_settings.")
    # processing.py get_token_merging_ratio: img2img prefers its own setting unless the request overrides the
    # general one
    ratio = merging["token_merging_ratio"]
    if img2img and "token_merging_ratio" not in overrides:
        ratio = merging["token_merging_ratio_img2img"] or ratio

    width = _check_int(request, "width", *r["width"], 512)
    height = _check_int(request, "height", *r["height"], 512)
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise FieldError(name, f"must be a multiple of 8, got {value}")
    if width * height > limits.max_pixels:
        raise FieldError("width", f"{width}x{height} is more than the server's limit of {limits.max_pixels} "
                         "pixels per image")
    steps = _check_int(request, "steps", *r["steps"], 50)
    batch_size = _check_int(request, "batch_size", *r["batch_size"], 1)
    n_iter = _check_int(request, "n_iter", *r["n_iter"], 1)
    cfg_scale = _check_number(request, "cfg_scale", *r["cfg_scale"], 7.0)
    # seed + i of every image must be a seed torch takes (checks.SEED_MAX); -1 picks one.
    seed = _check_int(request, "seed", -1, SEED_MAX - batch_size * n_iter + 1, -1)
    subseed = _check_int(request, "subseed", -1, SEED_MAX - batch_size * n_iter + 1, -1)
    subseed_strength = _check_number(request, "subseed_strength", *r["subseed_strength"], 0.0)
    if subseed_strength > 0 and img2img:
        raise FieldError("subseed_strength", "variation seeds are supported for txt2img only")

    sampler_field = "sampler_name" if request.get("sampler_name") else "sampler_index"
    for name in ("sampler_name", "sampler_index", "scheduler"):
        if not isinstance(request.get(name) or "", str):
            raise FieldError(name, f"expected a string, got {type(request[name]).__name__}")
    sampler, sampler_name, scheduler = resolve_sampler(request.get("sampler_name") or request.get("sampler_index"),
                                         request.get("scheduler"), sampler_field)
    eta = _check_number(request, "eta", *r["eta"], None)  # the webui accepts any eta with any sampler
    s_min_uncond = _check_number(request, "s_min_uncond", *r["s_min_uncond"], 0.0)

    init_image = strength = mask = inpaint_options = hires_options = None
    if img2img:
        init_image, mask, inpaint_options = _img2img_images(request, width, height, limits)
        strength = _check_number(request, "denoising_strength", *r["denoising_strength"], 0.75)
        if int(steps * strength) < 1:
            raise FieldError("denoising_strength", f"{strength} of {steps} steps runs no step; raise either")
    elif request.get("enable_hr"):
        hires_options = _hires(request, width, height, limits)

    total = batch_size * n_iter
    seed, subseed = fixed_seed(seed), fixed_seed(subseed)
    # processing.py: with variations every image keeps the seed and the subseed counts up.
    seeds = [seed + (i if subseed_strength == 0 else 0) for i in range(total)]
    return Task(request=request, prompt=request.get("prompt") or "",
                negative_prompt=request.get("negative_prompt") or "", seeds=seeds,
                subseeds=[subseed + i for i in range(total)], subseed_strength=subseed_strength,
                batch_size=batch_size, n_iter=n_iter, steps=steps, cfg_scale=cfg_scale, width=width, height=height,
                sampler=sampler, sampler_name=sampler_name, scheduler=scheduler, eta=eta,
                s_min_uncond=s_min_uncond,
                clip_skip=int(clip_skip), rng=noise["randn_source"], ensd=int(noise["eta_noise_seed_delta"]),
                token_merging_ratio=float(ratio),
                model=model, init_image=init_image, denoising_strength=strength,
                mask=mask, inpaint=inpaint_options, hires=hires_options, lora_dir=lora_dir,
                embeddings_dir=embeddings_dir)


def check_noise_settings(settings: dict, prefix: str = "") -> None:
    """randn_source and eta_noise_seed_delta as the webui's settings take them."""
    if "randn_source" in settings and settings["randn_source"] not in ("GPU", "CPU", "NV"):
        raise FieldError(f"{prefix}randn_source", f"expected GPU, CPU or NV, got {settings['randn_source']!r}")
    if "eta_noise_seed_delta" in settings and not is_int(settings["eta_noise_seed_delta"], 0, SEED_MAX):
        raise FieldError(f"{prefix}eta_noise_seed_delta", f"expected an int >= 0, got "
                         f"{settings['eta_noise_seed_delta']!r}")


def check_tome_settings(settings: dict, prefix: str = "") -> None:
    """The webui's token merging settings: ratios in [0, 1); the hires pass merges at the first pass's ratio
    here, so token_merging_ratio_hr is 0 (the webui's "same as the first pass") or that ratio."""
    for name in TOME_SETTINGS:
        if name in settings and not (is_number(settings[name]) and 0 <= settings[name] < 1):
            raise FieldError(f"{prefix}{name}", f"expected a number in [0, 1), got {settings[name]!r}")
    hr = settings.get("token_merging_ratio_hr", 0)
    if hr and hr != settings.get("token_merging_ratio", 0):
        raise FieldError(f"{prefix}token_merging_ratio_hr", "altdiff merges the hires pass at token_merging_ratio; "
                         f"expected 0 or that ratio, got {hr!r}")


# infotext key -> txt2img request field, as the webui's paste fields fill them (infotext_utils)
_PASTE_FIELDS = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps",
                 "Sampler": "sampler_name", "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed",
                 "Size-1": "width", "Size-2": "height", "Variation seed": "subseed",
                 "Variation seed strength": "subseed_strength", "Denoising strength": "denoising_strength",
                 "Hires upscale": "hr_scale", "Hires upscaler": "hr_upscaler", "Hires steps": "hr_second_pass_steps",
                 "Hires resize-1": "hr_resize_x", "Hires resize-2": "hr_resize_y", "Hires sampler": "hr_sampler_name",
                 "Hires schedule type": "hr_scheduler", "Hires prompt": "hr_prompt",
                 "Hires negative prompt": "hr_negative_prompt", "NGMS": "s_min_uncond"}
# infotext key -> the setting it overrides (infotext_to_setting_name_mapping)
_PASTE_SETTINGS = {"Clip skip": "CLIP_stop_at_last_layers", "RNG": "randn_source", "ENSD": "eta_noise_seed_delta",
                   "Token merging ratio": "token_merging_ratio", "Token merging ratio hr": "token_merging_ratio_hr"}


_INT_FIELDS = {"steps", "seed", "width", "height", "subseed", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y"}
_FLOAT_FIELDS = {"cfg_scale", "subseed_strength", "denoising_strength", "hr_scale", "s_min_uncond"}


def _typed(name: str, value: str):
    """An infotext value (text) as the request field's type, as the webui's paste converts it."""
    try:
        if name in _INT_FIELDS:
            return int(float(value))
        if name in _FLOAT_FIELDS:
            return float(value)
    except ValueError:
        raise FieldError("infotext", f"{name}: expected a number, got {value!r}") from None
    return value


def apply_infotext(request: dict, set_fields: set[str]) -> dict:
    """The webui API's apply_infotext for txt2img: the `infotext` field's values fill every request field the
    client did not set, its settings go into override_settings unless set there, and hires keys with a
    Denoising strength turn enable_hr on. Keys altdiff does not reproduce are refused as for any infotext
    (altdiff.infotext.to_generate_kwargs), naming `infotext`."""
    text = request.get("infotext")
    if not text:
        return request
    if not isinstance(text, str):
        raise FieldError("infotext", f"expected a string, got {type(text).__name__}")
    prompt, negative, params = parse(text)
    try:
        to_generate_kwargs(prompt, negative, params)
    except ValueError as e:
        raise FieldError("infotext", str(e)) from None
    values = {"Prompt": prompt, "Negative prompt": negative, **params}
    request = dict(request)
    for key, name in _PASTE_FIELDS.items():
        if name not in set_fields and key in values:
            request[name] = _typed(name, values[key])
    if "enable_hr" not in set_fields and "Denoising strength" in values and any(
            k in values for k in ("Hires upscale", "Hires upscaler", "Hires resize-1")):
        request["enable_hr"] = True
    for name, same in (("hr_sampler_name", "Use same sampler"), ("hr_scheduler", "Use same scheduler")):
        if request.get(name) == same:
            request[name] = None
    overrides = dict(request.get("override_settings") or {})
    for key, setting in _PASTE_SETTINGS.items():
        if key in values and setting not in overrides:
            value = values[key]
            overrides[setting] = value if setting == "randn_source" else (
                float(value) if setting.startswith("token_merging") else int(value))
    request["override_settings"] = overrides
    return request


def _img2img_images(request: dict, width: int, height: int, limits: Limits):
    """(init image, mask, InpaintOptions) of an img2img request. Without a mask the init image is flattened
    onto white and resized to width x height by resize_mode (0-2) as images.resize_image does; with one the
    webui's inpainting (altdiff.inpaint) sizes both."""
    images = request.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise FieldError("init_images", "expected a list of one base64 image")
    r = field_ranges(limits)
    image = decode_image(images[0], "init_images.0", limits.max_upload_pixels)
    resize_mode = _check_int(request, "resize_mode", *r["resize_mode"], 0)
    if not request.get("mask"):
        if resize_mode == 3:
            raise FieldError("resize_mode", "3 (latent resize) is supported with a mask only")
        return inpaint.resize_image(resize_mode, to_rgb(image), width, height), None, None
    mask = decode_image(request["mask"], "mask", limits.max_upload_pixels)
    fields = {name: _check_int(request, name, *r[name], default) for name, default in
              (("mask_blur_x", 4), ("mask_blur_y", 4), ("inpaint_full_res_padding", 0))}
    if request.get("mask_blur") is not None:  # the webui's setter: both axes
        fields["mask_blur_x"] = fields["mask_blur_y"] = _check_int(request, "mask_blur", *r["mask_blur"], 4)
    try:
        options = InpaintOptions(**fields, inpainting_fill=_check_int(request, "inpainting_fill", *r["inpainting_fill"], 0),
                                 inpaint_full_res=bool(request.get("inpaint_full_res", True)),
                                 inpainting_mask_invert=bool(
                                     _check_int(request, "inpainting_mask_invert", *r["inpainting_mask_invert"], 0)),
                                 mask_round=bool(request.get("mask_round", True)), resize_mode=resize_mode)
    except InpaintError as e:  # its messages start with the field (FieldErrors of the checks pass through)
        raise FieldError(str(e).split(" ")[0], str(e)) from None
    return image, mask, options


def _hires(request: dict, width: int, height: int, limits: Limits) -> HiresOptions:
    """The hires fix of a txt2img request (enable_hr), its second pass within the server's limits."""
    r = field_ranges(limits)
    for name in ("hr_upscaler", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        if not isinstance(request.get(name) or "", str):
            raise FieldError(name, f"expected a string, got {type(request[name]).__name__}")
    sampler = request.get("hr_sampler_name")
    scheduler = request.get("hr_scheduler")
    if sampler and sampler != "Use same sampler":
        resolve_sampler(sampler, None, "hr_sampler_name")
    if scheduler and scheduler != "Use same scheduler":
        resolve_sampler(None, scheduler, "hr_scheduler")
    try:
        options = HiresOptions(
            hr_scale=_check_number(request, "hr_scale", *r["hr_scale"], 2.0),
            # the webui's latent_upscale_default_mode when none is named
            hr_upscaler=request.get("hr_upscaler") or "Latent",
            hr_second_pass_steps=_check_int(request, "hr_second_pass_steps", *r["hr_second_pass_steps"], 0),
            hr_resize_x=_check_int(request, "hr_resize_x", *r["hr_resize_x"], 0),
            hr_resize_y=_check_int(request, "hr_resize_y", *r["hr_resize_y"], 0),
            denoising_strength=_check_number(request, "denoising_strength", *r["denoising_strength"], 0.75),
            hr_sampler_name=sampler if sampler and sampler != "Use same sampler" else None,
            hr_scheduler=scheduler if scheduler and scheduler != "Use same scheduler" else None,
            hr_prompt=request.get("hr_prompt") or None, hr_negative_prompt=request.get("hr_negative_prompt") or None)
    except HiresError as e:  # its messages start with the field (FieldErrors of the checks pass through)
        raise FieldError(str(e).split(" ")[0], str(e)) from None
    size = hires_target(width, height, options)
    if size is not None and size.width * size.height > limits.max_pixels:
        raise FieldError("hr_scale", f"the second pass's {size.width}x{size.height} is more than the server's "
                         f"limit of {limits.max_pixels} pixels per image")
    return options


# --- generation ----------------------------------------------------------------------------------------------

def generate_kwargs(task: Task, pipe, b: int) -> dict[str, Any]:
    """The generate() keyword arguments that make batch `b` of `task` on `pipe`, in the webui family (its
    noise, seeds, subseeds, prompt schedules and infotext; CLIP skip recorded, not applied, as the webui does
    for XLM-R)."""
    part = slice(b * task.batch_size, (b + 1) * task.batch_size)
    kwargs = dict(prompt=task.prompt, model=pipe, negative_prompt=task.negative_prompt,
                  num_inference_steps=task.steps, guidance_scale=task.cfg_scale, sampler=task.sampler,
                  num_images_per_prompt=task.batch_size, eta=task.eta, lora_dir=task.lora_dir,
                  embeddings_dir=task.embeddings_dir, progress=False, seed=task.seeds[part], family="webui",
                  scheduler=task.scheduler, subseed=task.subseeds[part][0], subseed_strength=task.subseed_strength,
                  s_min_uncond=task.s_min_uncond, clip_skip=task.clip_skip - 1 or None, rng=task.rng,
                  eta_noise_seed_delta=task.ensd, token_merging_ratio=task.token_merging_ratio)
    if task.init_image is not None:
        kwargs.update(image=task.init_image, strength=task.denoising_strength)
    else:
        kwargs.update(height=task.height, width=task.width, hires=task.hires)
    if task.mask is not None:
        kwargs.update(mask_image=task.mask, inpaint_options=task.inpaint, height=task.height, width=task.width)
    return kwargs


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


def finish(task: Task, images: list[PIL.Image.Image], nsfw: list[bool], model: str,
           infotexts: list[str]) -> Result:
    """The grid and the `info` JSON for the images made (fewer than planned when interrupted), with their
    infotexts (GenerationResult.infotexts, one per image)."""
    texts = list(infotexts)
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
