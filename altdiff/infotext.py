"""The AUTOMATIC1111 webui's infotext (a PNG's "parameters" text) as an interface: `write` the text the webui
>= 1.9 writes (processing.create_infotext), `parse` it as the webui reads it
(infotext_utils.parse_generation_parameters), and `to_generate_kwargs` for the keys altdiff reproduces, so an
infotext remakes its image. A key for something altdiff does not do is an `InfotextError` naming it."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import PIL.Image

from . import __version__
from .hires import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS
from .images import read_infotext
from .lora import LORA_DIR_SUFFIXES
from .networks import lora_hash
from .weights import file_hash


class InfotextError(ValueError):
    """An infotext key altdiff cannot reproduce, or a value it cannot read; the message names the key."""


# altdiff's diffusers-family sampler names -> the webui's labels, for the infotext the CLI writes.
SAMPLER_LABELS = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras"}

# modules/sd_schedulers.py (webui 1.10): (name, label, aliases) in its order, which old sampler names such as
# "DPM++ 2M Karras" are split by.
SCHEDULE_TYPES = [("automatic", "Automatic", ()), ("uniform", "Uniform", ()), ("karras", "Karras", ()),
                  ("exponential", "Exponential", ()), ("polyexponential", "Polyexponential", ()),
                  ("sgm_uniform", "SGM Uniform", ("SGMUniform",)), ("kl_optimal", "KL Optimal", ()),
                  ("align_your_steps", "Align Your Steps", ()), ("simple", "Simple", ()),
                  ("normal", "Normal", ()), ("ddim", "DDIM", ()), ("beta", "Beta", ())]
_SCHEDULE_LABELS = {**{name: label for name, label, _ in SCHEDULE_TYPES},
                    **{label: label for _, label, _ in SCHEDULE_TYPES}}


# --- writing ------------------------------------------------------------------------------------------------

def quote(value: Any) -> str:
    """infotext_utils.quote: JSON-quoted when it holds ',', ':' or a newline. Also when it starts with '"',
    which the webui leaves bare and then misreads as a quoted value."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str | None, params: dict[str, Any]) -> str:
    """The webui's layout: prompt line(s), "Negative prompt: ..." when there is one, and one "Key: value, ..."
    line of the params that are not None (a param whose value equals its key is written bare, as the webui
    does). Unlike the webui, whitespace around the prompt is kept, so parse_infotext gives it back."""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def write(prompt: str, negative_prompt: str | None = None, *, steps: int, sampler: str,
          schedule_type: str = "Automatic", cfg_scale: float, seed: int, width: int, height: int,
          model_hash: str | None = None, model: str | None = None, variation_seed: int | None = None,
          variation_seed_strength: float = 0.0, denoising_strength: float | None = None, clip_skip: int = 1,
          ensd: int = 0, token_merging_ratio: float = 0.0, token_merging_ratio_hr: float = 0.0, rng: str = "GPU",
          extra: dict[str, Any] | None = None, version: str | None = f"altdiff {__version__}") -> str:
    """processing.create_infotext's text, keys in its order. The caller decides what the webui decides from
    the sampler: `ensd` only when the sampler uses it (0 otherwise), and in `extra` (the webui's
    extra_generation_params, written after RNG in their order) e.g. "Hires upscale", "Lora hashes",
    "TI hashes", "Eta" / "Eta DDIM" when not the sampler's default, "NGMS"."""
    params = {
        "Steps": steps, "Sampler": sampler, "Schedule type": schedule_type, "CFG scale": cfg_scale,
        "Seed": seed, "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model,
        "Variation seed": variation_seed if variation_seed_strength else None,
        "Variation seed strength": variation_seed_strength or None,
        "Denoising strength": denoising_strength, "Clip skip": clip_skip if clip_skip > 1 else None,
        "ENSD": ensd or None, "Token merging ratio": token_merging_ratio or None,
        "Token merging ratio hr": token_merging_ratio_hr or None,
        "RNG": rng if rng != "GPU" else None, **(extra or {}), "Version": version,
    }
    return format_infotext(prompt, negative_prompt, params).strip()


def image_infotext(image, prompt: str, negative_prompt: str | None, *, steps: int, sampler: str,
                   cfg_scale: float, seed: int, model: str, strength: float | None = None,
                   nsfw: bool = False, extra: dict[str, Any] | None = None) -> str:
    """The infotext of one generated image, as the CLI, `altdiff batch` and `altdiff serve` write it; `extra`
    adds fields such as GenerationResult.infotext's "Lora hashes" or the server's "Variation seed"."""
    params = {"Steps": steps, "Sampler": SAMPLER_LABELS.get(sampler, sampler), "CFG scale": cfg_scale,
              "Seed": seed, "Size": f"{image.width}x{image.height}", "Model": Path(str(model)).name,
              "Denoising strength": strength, "NSFW": True if nsfw else None, **(extra or {})}
    return format_infotext(prompt, negative_prompt, params)


# --- Model hash ---------------------------------------------------------------------------------------------

def model_hash(path: str | os.PathLike) -> str:
    """The webui's "Model hash": the first 10 hex digits of the checkpoint file's sha256 (computed once per
    file version)."""
    return file_hash(path)[:10]


# --- reading ------------------------------------------------------------------------------------------------

def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _is_key_char(ch: str) -> bool:
    return _is_word(ch) or ch in " -/"


def _quoted_end(line: str, start: int) -> int:
    """Index just past a '"..."' value starting at `start` (backslash escapes, at least one character),
    or -1."""
    i, n = start + 1, len(line)
    while i < n and line[i] != '"':
        i += 2 if line[i] == "\\" else 1
    return i + 1 if start + 1 < i < n else -1


def param_pairs(line: str) -> list[tuple[str, str]]:
    """The (key, raw value) pairs the webui's re_param finds in the parameters line, in one linear scan (its
    regex backtracks quadratically on long lines). A key is a run of word characters, spaces, '-' and '/'
    starting with a word character, at least two long, followed by ':'; the value is a '"...\"' string
    followed by ',' or the end, or else everything up to the next ','."""
    pairs, i, n = [], 0, len(line)
    while i < n:
        j = i
        while j < n and line[j].isspace():
            j += 1
        if j >= n or not _is_word(line[j]):
            i = j + 1 if j > i else i + 1
            continue
        end = j
        while end < n and _is_key_char(line[end]):
            end += 1
        if end >= n or line[end] != ":" or end - j < 2:
            i = end
            continue
        k = end + 1
        while k < n and line[k].isspace():
            k += 1
        stop = _quoted_end(line, k) if k < n and line[k] == '"' else -1
        if stop == -1 or (stop < n and line[stop] != ","):
            stop = line.find(",", k)
            stop = n if stop == -1 else stop
        pairs.append((line[j:end], line[k:stop]))
        i = stop + 1
    return pairs


def unquote(text: str) -> str:
    """infotext_utils.unquote: a '"..."' value is JSON, anything else is as written."""
    if len(text) < 1 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of format_infotext, keeping the prompts exactly as written: (prompt, negative_prompt, params as
    strings, "Size" unsplit)."""
    *head, last = text.split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        head, pairs = head + [last], []
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {key.strip(): unquote(value) for key, value in pairs}
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


# parse_generation_parameters fills these when absent (values as the webui has them).
_DEFAULTS = {"Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
             "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
             "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
             "Masked area padding": 32}
_LATE_DEFAULTS = {"RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
                  "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full",
                  "FP8 weight": "Disable"}


def parse(text: str) -> tuple[str, str, dict[str, Any]]:
    """infotext_utils.parse_generation_parameters: (prompt, negative_prompt, params). Lines are stripped, the
    last line is parameters when it has at least 3 "key: value" pairs, quoted values are JSON, "WxH" values
    become key-1/key-2, and the webui's defaults and migrations are applied (Clip skip 1, RNG GPU, Schedule
    type Automatic, old hires "First pass size", the Version back-compat flags). Also what the webui does when
    pasting: an old sampler name such as "DPM++ 2M Karras" becomes Sampler "DPM++ 2M" + Schedule type
    "Karras". Values are strings except the numeric defaults the webui fills. Never raises on any text."""
    *lines, last = text.strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, Any] = {}
    for key, value in pairs:
        if not value:  # the webui's v[0] raises on an empty value and the key is dropped
            continue
        value = unquote(value) if value[0] == '"' and value[-1] == '"' else value
        size = re.match(r"^(\d+)x(\d+)$", value)  # the webui's re_imagesize
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.groups()
        else:
            params[key] = value
    prompt_text = "\n".join(prompt)
    if "Hypernet" in params:
        prompt_text += f"<hypernet:{params['Hypernet']}:{params.get('Hypernet strength', '1.0')}>"
    for key, value in _DEFAULTS.items():
        params.setdefault(key, value)
    _old_hires_fix(params)
    for key, value in _LATE_DEFAULTS.items():
        params.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in params and params["FP8 weight"] != "Disable":
        params["Cache FP16 weight for LoRA"] = False
    _backcompat(params, prompt_text)
    _split_sampler(params)
    return prompt_text, "\n".join(negative), params


def _old_hires_fix(params: dict[str, Any]) -> None:
    """restore_old_hires_fix_params: "First pass size" infotexts (webui < 1.0) become Size + Hires resize."""
    first_w, first_h = params.get("First pass size-1"), params.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    try:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(params.get("Size-1", 512)), int(params.get("Size-2", 512))
    except ValueError:
        return
    if first_w == 0 or first_h == 0:  # processing.old_hires_fix_first_pass_dimensions
        scale = math.sqrt(512 * 512 / max(width * height, 1))
        first_w, first_h = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    params.update({"Size-1": first_w, "Size-2": first_h, "Hires resize-1": width, "Hires resize-2": height})


def _version(text: Any) -> tuple | None:
    """infotext_versions.parse_version's ordering for "v1.7.0-225-g…" style versions: (release, post) with a
    pre-release ("1.6.0-RC") before its release; None for anything else (e.g. "altdiff 0.1.0")."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:-([0-9A-Za-z]+))?(?:-.*)?", str(text or "").strip())
    if not m:
        return None
    release = (int(m[1]), int(m[2]), int(m[3] or 0))
    tail = m[4]
    if tail is None:
        return release, 0
    return (release, int(tail)) if tail.isdigit() else (release, -1)


def _backcompat(params: dict[str, Any], prompt: str) -> None:
    """infotext_versions.backcompat: flags for behaviour older webui versions had."""
    ver = _version(params.get("Version"))
    if ver is None:
        return
    if ver < ((1, 6, 0), 0) and "[" in prompt:
        params["Old prompt editing timelines"] = True
    if ver < ((1, 6, 0), 0) and params.get("Sampler", "") in ("DDIM", "PLMS"):
        params["Pad conds v0"] = True
    if ver < ((1, 7, 0), 225):
        params["Downcast alphas_cumprod"] = True
    if ver < ((1, 8, 0), 0) and params.get("Refiner"):
        params["Refiner switch by sampling steps"] = True


def _split_sampler(params: dict[str, Any]) -> None:
    """sd_samplers.get_sampler_and_scheduler: a schedule type's label, name or alias ending the sampler name
    is the schedule type (names like "DPM++ 2M Karras" from webui < 1.9); a schedule given by name becomes
    its label."""
    schedule = params["Schedule type"]
    params["Schedule type"] = _SCHEDULE_LABELS.get(schedule, schedule)
    name = params.get("Sampler")
    if not isinstance(name, str):
        return
    for schedule_name, label, aliases in SCHEDULE_TYPES:
        for option in (label, schedule_name, *aliases):
            if name.endswith(" " + option):
                params["Schedule type"], name = label, name[:-len(option) - 1]
                break
    params["Sampler"] = name


def text_of(source: str | os.PathLike | PIL.Image.Image) -> str:
    """The infotext in `source`: a PIL image's or a PNG file's "parameters" text, or the string itself."""
    if isinstance(source, PIL.Image.Image):
        text = source.info.get("parameters")
    elif isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                              and source.lower().endswith(".png") and Path(source).is_file()):
        text = read_infotext(source)
    elif isinstance(source, str):
        return source
    else:
        raise TypeError("infotext: expected a string, a PNG path or a PIL image, "
                        f"got {type(source).__name__}")
    if not isinstance(text, str):
        raise InfotextError("infotext: the image has no \"parameters\" text")
    return text


# --- to generate() ------------------------------------------------------------------------------------------

# Keys that change no pixels.
_NEUTRAL = {"Version", "Model", "TI hashes", "Init image hash", "NSFW", "User"}
# Keys parse() always fills: accepted at the webui's default, which is what an infotext without them means.
_AT_DEFAULT = {**{k: str(v) for k, v in {**_DEFAULTS, **_LATE_DEFAULTS}.items()}, "Emphasis": "Original",
               "Token merging ratio": "0", "Token merging ratio hr": "0",
               "Cache FP16 weight for LoRA": "False", "Hires upscale": "1", "Hires steps": "0"}
# The flags _backcompat sets, with the webui version before which it sets them.
_BACKCOMPAT = {"Old prompt editing timelines": "v1.6.0", "Pad conds v0": "v1.6.0",
               "Downcast alphas_cumprod": "v1.7.0-225", "Refiner switch by sampling steps": "v1.8.0"}
# The hires upscalers altdiff runs (altdiff.hires): the latent modes and the model-free pixel ones; the
# webui's others are image upscaler models altdiff does not have.
HIRES_UPSCALERS = (*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS)
_HIRES_KEYS = {"Hires upscale", "Hires upscaler", "Hires steps", "Hires resize-1", "Hires resize-2",
               "Hires sampler", "Hires schedule type", "Hires CFG Scale", "Hires prompt",
               "Hires negative prompt"}


def _number(params: dict[str, Any], key: str, kind: type = float):
    value = params[key]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InfotextError(f"{key}: expected {'an integer' if kind is int else 'a number'}, "
                            f"got {value!r}") from None


def _lora_names(hashes: str, lora_dir: str | os.PathLike) -> dict[str, str]:
    """"name: hash, ..." -> {name in the prompt: the stem of the file in lora_dir with that hash}."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise InfotextError(f"Lora hashes: {folder} is not a folder")
    by_hash = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in LORA_DIR_SUFFIXES and path.is_file():
            by_hash.setdefault(lora_hash(path), path.stem)
    names = {}
    for entry in hashes.split(","):
        name, sep, short = entry.partition(":")
        if not sep:
            raise InfotextError(f"Lora hashes: expected 'name: hash' entries, got {entry.strip()!r}")
        found = by_hash.get(short.strip())
        if found is None:
            raise InfotextError(f"Lora hashes: no file in {folder} has the hash {short.strip()} "
                                f"of {name.strip()!r}")
        names[name.strip().replace(",", "")] = found
    return names


def to_generate_kwargs(prompt: str, negative_prompt: str, params: dict[str, Any], *,
                       lora_dir: str | os.PathLike | None = None,
                       model_hash: str | None = None) -> dict[str, Any]:
    """generate() keyword arguments (the webui family) that remake the image of parse()'s result. With
    `lora_dir`, "Lora hashes" finds each network by its hash there and the prompt's <lora:name:...> names
    the file found (what the webui does when pasting); without it the names are used as written. With
    `model_hash`, a different "Model hash" is an error. Hires keys go, as given, into one dict under "hires".
    Any key for something altdiff does not reproduce is an InfotextError naming it."""
    kwargs: dict[str, Any] = {"family": "webui", "prompt": prompt, "negative_prompt": negative_prompt}
    hires = {key: params[key] for key in _HIRES_KEYS & params.keys()
             if str(params[key]) != _AT_DEFAULT.get(key)}
    for key, value in params.items():
        if key in _NEUTRAL or key in _HIRES_KEYS or str(value) == _AT_DEFAULT.get(key):
            continue
        if key == "Steps":
            kwargs["num_inference_steps"] = _number(params, key, int)
        elif key == "Sampler":
            kwargs["sampler"] = value
        elif key == "Schedule type":
            kwargs["scheduler"] = value
        elif key == "CFG scale":
            kwargs["guidance_scale"] = _number(params, key)
        elif key == "Seed":
            kwargs["seed"] = _number(params, key, int)
        elif key in ("Size-1", "Size-2"):
            kwargs["width" if key == "Size-1" else "height"] = _number(params, key, int)
        elif key == "RNG":
            if value not in ("CPU", "NV"):
                raise InfotextError(f"RNG: expected GPU, CPU or NV, got {value!r}")
            kwargs["rng"] = value
        elif key == "ENSD":
            kwargs["eta_noise_seed_delta"] = _number(params, key, int)
        elif key in ("Eta", "Eta DDIM"):
            kwargs["eta"] = _number(params, key)
        elif key == "Variation seed":
            kwargs["subseed"] = _number(params, key, int)
        elif key == "Variation seed strength":
            kwargs["subseed_strength"] = _number(params, key)
        elif key == "Token merging ratio":
            kwargs["token_merging_ratio"] = _number(params, key)
        elif key == "Token merging ratio hr":
            # the hires pass merges at the first pass's ratio here (the webui's token_merging_ratio_hr unset)
            first = _number({"Token merging ratio": params.get("Token merging ratio", 0)}, "Token merging ratio")
            if _number(params, key) != first:
                raise InfotextError(f"{key}: altdiff merges the hires pass at the first pass's Token merging ratio, "
                                    f"not {value!r}")
        elif key == "Clip skip":
            # the webui's XLM-R encoder has no CLIP skip: the webui family records it without applying it
            kwargs["clip_skip"] = _number(params, key, int) - 1
        elif key == "NGMS":
            kwargs["s_min_uncond"] = _number(params, key)
        elif key == "Denoising strength":
            strength = _number(params, key)
            if hires:
                hires[key] = strength
            else:
                kwargs["strength"] = strength
        elif key == "Model hash":
            if model_hash is not None and value != model_hash:
                raise InfotextError(f"Model hash: the infotext's model is {value}, this one is {model_hash}")
        elif key == "Lora hashes":
            if lora_dir is not None:
                names = _lora_names(str(value), lora_dir)
                kwargs["prompt"] = re.sub(r"<lora:([^:]+):",
                                          lambda m, found=names: f"<lora:{found.get(m[1], m[1])}:",
                                          kwargs["prompt"])
        elif key in _BACKCOMPAT:
            raise InfotextError(f"{key}: the webui remakes infotexts of Version {params.get('Version')} "
                                f"(older than {_BACKCOMPAT[key]}) with this old behaviour, which altdiff "
                                "does not reproduce")
        else:
            name = key[:-2] if re.fullmatch(r".+-[12]", key) else key  # "WxH" keys were split in two
            raise InfotextError(f"{name}: altdiff does not reproduce this setting (value {value!r})")
    if hires:
        upscaler = hires.get("Hires upscaler", "Latent")
        if upscaler not in HIRES_UPSCALERS:
            raise InfotextError(f"Hires upscaler: altdiff has the latent and model-free upscalers "
                                f"({', '.join(HIRES_UPSCALERS)}), not {upscaler!r}")
        kwargs["hires"] = hires
    return kwargs
