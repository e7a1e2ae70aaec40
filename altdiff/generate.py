"""The functional text-to-image / image-to-image loop: encode → sample → decode → safety check.

Mirrors diffusers' AltDiffusionPipeline / AltDiffusionImg2ImgPipeline step for step (same random draws in the
same order), so the same arguments and generator give the same image.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checks, hires, inpaint, prompts, tome, webui_family, webui_sampling
from . import infotext as infotext_io
from .checks import is_int, is_number, plain
from .images import MAX_IMAGE_PIXELS, ImageInput, preprocess
from .latents import Interrupted, decode, image_latents
from .lora import text_encoder_scale
from .networks import prompt_networks
from .rng import randn_tensor
from .samplers import SAMPLERS, get_sampler
from .schedules import add_noise, make_schedule, sampler_for_config, schedule_for_strength

if TYPE_CHECKING:
    from .pipeline import Pipeline

logger = logging.getLogger("altdiff")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")

@dataclass(frozen=True)
class ModelSource:
    """A model named by a source string (altdiff.generate's `model="..."`): `load()` runs once generate() has
    checked the other arguments, so a bad argument fails before a model loads."""

    load: Callable[[], Pipeline]


@dataclass
class GenerationResult:
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    # The webui's infotext fields for the networks the prompts named ("Lora hashes", "TI hashes").
    infotext: dict[str, str] = field(default_factory=dict)
    # The webui family: each image's infotext, as the webui >= 1.9 writes it (the webui remakes the image).
    infotexts: list[str] = field(default_factory=list)


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float):
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    3.4): match the std of the guided prediction to the text prediction's, mixed by `guidance_rescale`."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def _embed(pipe: Pipeline, texts: list[str], device, max_length: int, clip_skip: int | None,
           lora_scale: float | None = None, a1111_prompts: bool = False) -> torch.Tensor:
    with text_encoder_scale(pipe, lora_scale):
        if a1111_prompts:
            return prompts.encode(pipe.tokenizer, pipe.text_encoder, texts, device, clip_skip)
        tokens = pipe.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True)
        mask = tokens["attention_mask"].to(device) if pipe.text_encoder.config.use_attention_mask else None
        return pipe.text_encoder(tokens["input_ids"].to(device), attention_mask=mask, clip_skip=clip_skip)


def encode_prompt(pipe: Pipeline, prompt, device, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                  negative_prompt=None, prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_embeds: torch.Tensor | None = None, lora_scale: float | None = None,
                  clip_skip: int | None = None, *, a1111_prompts: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' encode_prompt: (prompt_embeds, negative_prompt_embeds), each repeated per image.
    `lora_scale` scales the text encoder's LoRA adapters (diffusers: cross_attention_kwargs["scale"]).
    `a1111_prompts` reads (word:1.2) emphasis and BREAK and encodes long prompts in 75-token chunks instead
    of truncating (altdiff.prompts); prompt and negative prompt are padded to the same number of chunks."""
    device = torch.device(device)
    if isinstance(prompt, str):
        prompt = [prompt]
    batch_size = len(prompt) if prompt is not None else prompt_embeds.shape[0]
    dtype = next(pipe.text_encoder.parameters()).dtype
    max_length = pipe.tokenizer.model_max_length
    if prompt_embeds is None:
        for text in prompt:
            if not a1111_prompts and len(pipe.tokenizer.encode(text)) + 2 > max_length:
                logger.warning("prompt truncated to %d tokens: %r", max_length, text)
        prompt_embeds = _embed(pipe, prompt, device, max_length, clip_skip, lora_scale, a1111_prompts)
    prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
    bs, seq_len, _ = prompt_embeds.shape
    prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1).view(bs * num_images_per_prompt, seq_len, -1)

    if do_classifier_free_guidance and negative_prompt_embeds is None:
        if negative_prompt is None:
            uncond = [""] * batch_size
        elif isinstance(negative_prompt, str):
            uncond = [negative_prompt]
        else:
            uncond = list(negative_prompt)
        # diffusers encodes the negative prompt without clip_skip.
        negative_prompt_embeds = _embed(pipe, uncond, device, prompt_embeds.shape[1], None, lora_scale,
                                        a1111_prompts)
    if do_classifier_free_guidance and a1111_prompts and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
        empty = _embed(pipe, [""], device, max_length, None, lora_scale, a1111_prompts)
        prompt_embeds, negative_prompt_embeds = prompts.pad_to_same_length(prompt_embeds, negative_prompt_embeds,
                                                                           empty)
    if do_classifier_free_guidance:
        seq_len = negative_prompt_embeds.shape[1]
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
        negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1).view(
            batch_size * num_images_per_prompt, seq_len, -1)
    return prompt_embeds, negative_prompt_embeds


# Characters per prompt text: ~60 chunks of 75 tokens of plain text. The webui has no limit, but encoding
# (and the emphasis parser) grows with the text, and a megabyte prompt would hold the pipeline for minutes.
MAX_PROMPT_CHARS = 16384


def _check_unicode(name: str, texts: list[str]) -> None:
    # Lone surrogates (what Python makes of undecodable bytes in argv or files) cannot reach sentencepiece.
    for text in texts:
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name}: {len(text)} characters is more than generate()'s limit of "
                             f"{MAX_PROMPT_CHARS} (altdiff.generate.MAX_PROMPT_CHARS)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name}: not valid Unicode text ({e.reason} at position {e.start}); "
                             "decode bytes as UTF-8 first") from None


def _check_inputs(*, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                  num_inference_steps, guidance_scale, num_images_per_prompt, eta, generator, seed,
                  output_type, callback_on_step_end_tensor_inputs, strength, guidance_rescale, image,
                  callback_steps, sized_image: bool) -> int:
    """Everything checkable before a model runs; returns the prompt batch size. Keyword-only: twenty
    arguments by position are one slip from checking the wrong one."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("prompt and prompt_embeds: pass one of them, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("prompt: provide a prompt (str or list of str) or prompt_embeds")
    if prompt is not None:
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"prompt: expected a str or a non-empty list of str, got {type(prompt).__name__}")
        _check_unicode("prompt", texts)
        batch_size = len(texts)
    else:
        checks.tensor("prompt_embeds", prompt_embeds, ndim=3)
        batch_size = prompt_embeds.shape[0]
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("negative_prompt and negative_prompt_embeds: pass one of them, not both")
    if negative_prompt is not None:
        if prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(f"negative_prompt: should be the same type as prompt ({type(prompt).__name__}), "
                            f"got {type(negative_prompt).__name__}")
        if isinstance(negative_prompt, list):
            if not all(isinstance(t, str) for t in negative_prompt):
                raise TypeError("negative_prompt: expected a str or a list of str")
            if len(negative_prompt) != batch_size:
                raise ValueError(f"negative_prompt: has {len(negative_prompt)} entries but prompt has "
                                 f"{batch_size}")
        elif not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt: expected a str or a list of str, got "
                            f"{type(negative_prompt).__name__}")
        _check_unicode("negative_prompt", [negative_prompt] if isinstance(negative_prompt, str)
                       else negative_prompt)
    if negative_prompt_embeds is not None:
        checks.tensor("negative_prompt_embeds", negative_prompt_embeds, ndim=3)
        if prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds: shape {tuple(negative_prompt_embeds.shape)} must equal "
                             f"prompt_embeds' {tuple(prompt_embeds.shape)}")
        if negative_prompt_embeds.shape[0] != batch_size:
            raise ValueError(f"negative_prompt_embeds: has {negative_prompt_embeds.shape[0]} entries but prompt "
                             f"has {batch_size}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not is_int(value, 1) or value % 8):
            raise ValueError(f"{name}: must be a positive multiple of 8, got {value!r}")
    # the webui's inpainting works at width x height and pastes back into the image at its own size
    if image is not None and not sized_image and (height is not None or width is not None):
        raise ValueError("height/width: img2img takes its size from image; resize the image instead")
    if not is_int(num_inference_steps, 1):
        raise ValueError(f"num_inference_steps: must be a positive int, got {num_inference_steps!r}")
    if not is_number(guidance_scale):
        raise ValueError(f"guidance_scale: must be a finite number, got {guidance_scale!r}")
    if not is_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale: must be in [0, 1], got {guidance_rescale!r}")
    if eta is not None and (not is_number(eta) or eta < 0):
        raise ValueError(f"eta: must be a number >= 0 (or None: the sampler's default), got {eta!r}")
    if not is_int(num_images_per_prompt, 1):
        raise ValueError(f"num_images_per_prompt: must be a positive int, got {num_images_per_prompt!r}")
    if image is not None and (not is_number(strength) or not 0 <= strength <= 1):
        raise ValueError(f"strength: must be in [0.0, 1.0], got {strength!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: must be one of {OUTPUT_TYPES}, got {output_type!r}")
    bad = [k for k in callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {CALLBACK_TENSOR_INPUTS}")
    if callback_steps is not None and not is_int(callback_steps, 1):
        raise ValueError(f"callback_steps: must be a positive int, got {callback_steps!r}")
    if seed is not None and generator is not None:
        raise ValueError("seed and generator: pass one of them, not both")
    total = batch_size * num_images_per_prompt
    if isinstance(generator, list):
        if len(generator) != total:
            raise ValueError(f"generator: a list of {len(generator)} generators was passed but the batch has "
                             f"{total} images (prompts x num_images_per_prompt)")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator: list entries must be torch.Generator")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}")
    if isinstance(seed, (list, tuple)) and len(seed) != total:
        raise ValueError(f"seed: a list of {len(seed)} seeds was passed but the batch has {total} images")
    return batch_size


def _generators_from_seed(seed: int | Sequence[int]):
    """CPU generators from `seed`: one, or one per image for a list (each seed in 0..2**64-1)."""
    if isinstance(seed, (list, tuple)):
        return [torch.Generator("cpu").manual_seed(checks.seed(f"seed[{i}]", s)) for i, s in enumerate(seed)]
    return torch.Generator("cpu").manual_seed(checks.seed("seed", seed))


def _check_for_model(pipe: Pipeline, image, height: int | None, width: int | None, latents, prompt_embeds,
                     negative_prompt_embeds, total: int, a1111_prompts: bool
                     ) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """The checks that need the model: (the preprocessed init image, None) for img2img, else (None, the
    latents' shape)."""
    unet_cfg, factor = pipe.unet.config, pipe.vae_scale_factor
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is not None and embeds.shape[-1] != unet_cfg.cross_attention_dim:
            raise ValueError(f"{name}: width {embeds.shape[-1]} does not match the model's "
                             f"cross_attention_dim {unet_cfg.cross_attention_dim}")
    max_length = pipe.tokenizer.model_max_length
    if negative_prompt_embeds is not None and prompt_embeds is None and not a1111_prompts and (
            negative_prompt_embeds.shape[1] != max_length):
        raise ValueError(f"negative_prompt_embeds: has {negative_prompt_embeds.shape[1]} tokens but the prompt "
                         f"is encoded to {max_length}")
    if image is not None:
        return preprocess(image, factor, unet_cfg.in_channels), None
    height = height or unet_cfg.sample_size * factor
    width = width or unet_cfg.sample_size * factor
    if height * width > MAX_IMAGE_PIXELS:
        raise ValueError(f"height/width: {width}x{height} is larger than the {MAX_IMAGE_PIXELS} pixels allowed")
    shape = (total, unet_cfg.in_channels, height // factor, width // factor)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected a tensor of shape {shape}, got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)}")
        checks.tensor("latents", latents)
    return None, shape


def _encode(pipe: Pipeline, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            num_images_per_prompt: int, guidance_scale: float, cross_attention_kwargs: dict | None,
            clip_skip: int | None, a1111_prompts: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """({"prompt_embeds": the UNet's text states (negative then positive under CFG), "negative_prompt_embeds"},
    whether classifier-free guidance runs)."""
    do_cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    lora_scale = (cross_attention_kwargs or {}).get("scale")
    prompt_embeds, negative_prompt_embeds = encode_prompt(
        pipe, prompt, pipe.device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds,
        negative_prompt_embeds, lora_scale, clip_skip, a1111_prompts=a1111_prompts)
    embeds = {"prompt_embeds": torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds,
              "negative_prompt_embeds": negative_prompt_embeds}
    return embeds, do_cfg


def _guidance_embedding(pipe: Pipeline, guidance_scale: float, total: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The UNet's guidance-scale embedding (LCM-style distilled UNets with time_cond_proj_dim), else None."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor(guidance_scale - 1).repeat(total)
    return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=pipe.device, dtype=dtype)


def _prepare_latents(pipe: Pipeline, schedule, shape, latents, init_image, total: int, generator,
                     dtype: torch.dtype) -> torch.Tensor:
    """The latents the sampler starts from: noise (or the given latents) times the schedule's initial
    sigma; for img2img the init image's latents noised to the schedule's first timestep."""
    device = pipe.device
    if init_image is None:
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * schedule.init_noise_sigma
    init = image_latents(pipe, init_image, total, generator, device, dtype)
    noise = randn_tensor(tuple(init.shape), generator=generator, device=device, dtype=dtype)
    return add_noise(schedule, init, noise)


def _prepare_inpaint(pipe: Pipeline, schedule, init_image: torch.Tensor, pixel_mask: torch.Tensor, total: int,
                     generator, dtype: torch.dtype, strength: float):
    """StableDiffusionInpaintPipeline (4-channel UNet): (the starting latents, a blend applied after every
    step). Random draws in its order: the init image's latent sample, the noise, the masked image's sample."""
    device = pipe.device
    init = image_latents(pipe, init_image, total, generator, device, dtype)
    noise = randn_tensor(tuple(init.shape), generator=generator, device=device, dtype=dtype)
    # pure noise at strength 1, as diffusers' is_strength_max; else the init latents noised like img2img
    latents = noise * schedule.init_noise_sigma if strength == 1.0 else add_noise(schedule, init, noise)
    # diffusers encodes the masked image even for a 4-channel UNet, which uses only its random draws
    image_latents(pipe, init_image * (pixel_mask < 0.5), total, generator, device, dtype)
    factor = pipe.vae_scale_factor
    mask = F.interpolate(pixel_mask, size=(init_image.shape[2] // factor, init_image.shape[3] // factor))
    mask = mask.to(device=device, dtype=dtype)
    mask = torch.cat([mask] * (total // mask.shape[0])) if mask.shape[0] < total else mask
    last = len(schedule.timesteps) - 1

    def blend(i: int, x: torch.Tensor) -> torch.Tensor:
        # the unmasked area follows the init latents noised to the next step's level
        known = init
        if i < last:
            known = add_noise(dataclasses.replace(schedule, begin_index=schedule.begin_index + i + 1), init, noise)
        return (1 - mask) * known + mask * x

    return latents, blend


def denoise(unet, latents: torch.Tensor, schedule, sample_fn, embeds: dict[str, torch.Tensor], *,
            guidance_scale: float, guidance_rescale: float = 0.0, do_cfg: bool = True,
            timestep_cond: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
            generator=None, eta: float = 0.0, callback=None) -> torch.Tensor:
    """The sampling loop: `sample_fn` (altdiff.samplers) steps `latents` over `schedule`, asking the UNet for
    a classifier-free-guided prediction at each timestep. `embeds["prompt_embeds"]` (negative and positive
    concatenated under CFG) is read at every step, so a step callback may replace it."""
    cache = getattr(unet, "deepcache", None)
    if cache is not None:  # DeepCache counts steps by the timestep's place in the schedule, as deepcache does
        cache.reset()
        timesteps = [float(v) for v in schedule.timesteps]

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            cache.at(timesteps.index(float(t)))
        x = torch.cat([x] * 2) if do_cfg else x
        pred = unet(x, t, embeds["prompt_embeds"], timestep_cond=timestep_cond,
                    cross_attention_kwargs=cross_attention_kwargs)
        if do_cfg:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
            if guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_text, guidance_rescale)
        return pred

    return sample_fn(model_fn, latents, schedule, generator=generator, eta=eta, callback=callback)


def _step_callback(pipe: Pipeline, embeds: dict, bar, n_calls: int, steps: int, callback_on_step_end,
                   tensor_inputs: Sequence[str], callback, callback_steps: int | None):
    """The sampler's per-step callback: progress, then diffusers' callback_on_step_end (which may replace
    latents and embeddings) and the legacy callback/callback_steps pair."""
    warmup = n_calls - steps  # PNDM's repeated first timestep does not advance the progress count

    def on_step(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        bar.update()
        new = None
        if callback_on_step_end is not None:
            local = {"latents": x, **embeds}
            out = callback_on_step_end(pipe, i, t, {k: local[k] for k in tensor_inputs})
            out = dict(out or {})
            embeds["prompt_embeds"] = out.pop("prompt_embeds", embeds["prompt_embeds"])
            embeds["negative_prompt_embeds"] = out.pop("negative_prompt_embeds", embeds["negative_prompt_embeds"])
            new = out.pop("latents", None)
            if new is not None and not torch.isfinite(new).all():
                raise ValueError(f"callback_on_step_end: returned latents with NaN or inf at step {i}")
        if callback is not None and (i == n_calls - 1 or i + 1 > warmup) and i % (callback_steps or 1) == 0:
            callback(i, t, x if new is None else new)
        if pipe._interrupt:  # set by a callback: stop here with these latents
            raise Interrupted(x if new is None else new)
        return new

    return on_step


def _blended(blend, on_step):
    """The inpainting blend runs after each sampler step, before the step callbacks see the latents."""
    def step(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = blend(i, x)
        new = on_step(i, t, x)
        return x if new is None else new
    return step


FAMILIES = ("diffusers", "webui")


def _family(*, family, sampler, scheduler, rng, eta_noise_seed_delta, subseed, subseed_strength, s_min_uncond,
            inpaint_options, hires_options) -> str:
    """The sampler family: as given, else "webui" for a webui sampler name or a webui-only argument."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES} (or None), got {family!r}")
        return family
    if isinstance(sampler, str) and sampler not in SAMPLERS and webui_sampling.is_webui_sampler(sampler):
        return "webui"
    webui_only = (scheduler is not None, rng is not None, eta_noise_seed_delta not in (0, None),
                  subseed is not None, subseed_strength not in (0, 0.0, None), s_min_uncond not in (0, 0.0, None),
                  inpaint_options is not None, hires_options is not None)
    return "webui" if any(webui_only) else "diffusers"


def _check_diffusers_family(sampler, image, mask_image, inpaint_options, hires) -> None:
    """What the diffusers family refuses, before a model loads."""
    for name, value in (("inpaint_options", inpaint_options), ("hires", hires)):
        if value is not None:
            raise ValueError(f"{name}: the webui's inpainting options and hires fix are the webui family's; "
                             "drop family='diffusers'")
    if mask_image is not None and image is None:
        raise ValueError("mask_image: inpainting needs `image`, the picture the mask applies to")
    if sampler:  # None or "": the config's sampler
        get_sampler(sampler)


def _from_infotext(source, given: dict) -> dict:
    """generate()'s arguments for an infotext: its values for every argument `given` leaves at its default."""
    prompt_text, negative, params = infotext_io.parse(infotext_io.text_of(source))
    found = infotext_io.to_generate_kwargs(prompt_text, negative, params, lora_dir=given.get("lora_dir"))
    if found.get("hires"):
        found["hires"] = hires.from_infotext(found["hires"])
    defaults = {name: p.default for name, p in inspect.signature(generate).parameters.items()}
    return {**given, **{k: v for k, v in found.items() if given.get(k, defaults.get(k)) == defaults.get(k)}}


def generate(prompt: str | list[str] | None = None, *, model: Pipeline | ModelSource,
             image: ImageInput | None = None, strength: float = 0.8, height: int | None = None,
             width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
             negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
             eta: float | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             seed: int | list[int] | None = None, latents: torch.Tensor | None = None,
             prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
             output_type: str = "pil", return_dict: bool = True,
             callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
             callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
             cross_attention_kwargs: dict | None = None, guidance_rescale: float = 0.0,
             clip_skip: int | None = None, sampler: str | None = None,
             callback: Callable | None = None, callback_steps: int | None = None, progress: bool = True,
             a1111_prompts: bool = False, lora_dir: str | Path | None = None,
             embeddings_dir: str | Path | None = None, mask_image: ImageInput | None = None,
             family: str | None = None, scheduler: str | None = None, rng: str | None = None,
             eta_noise_seed_delta: int = 0, subseed: int | None = None, subseed_strength: float = 0.0,
             s_min_uncond: float = 0.0, inpaint_options: inpaint.InpaintOptions | dict | None = None,
             hires: hires.HiresOptions | dict | None = None, token_merging_ratio: float | None = None,
             infotext: str | Path | PIL.Image.Image | None = None):
    """Text-to-image, or image-to-image when `image` is given, on the Pipeline `model` (`altdiff.generate` also
    takes a source string, loaded after the checks: ModelSource, altdiff.pipeline.get_model). Arguments as in
    diffusers' AltDiffusion pipelines; `sampler` picks a sampler by name (None: the model's scheduler config),
    `seed` an int (or one per image) makes CPU generators, `progress` shows a tqdm bar, `a1111_prompts` reads
    prompts as the AUTOMATIC1111 webui does ((word:1.2) emphasis, BREAK, no 77-token limit; see altdiff.prompts) with its
    `<lora:NAME:w>` tags resolved in `lora_dir` for this call; embeddings in `embeddings_dir` apply where a
    prompt names their file (altdiff.networks.prompt_networks). `mask_image` with `image` inpaints as diffusers'
    StableDiffusionInpaintPipeline does with a 4-channel UNet (white = repaint).

    Two sampler families. "diffusers" (the default) is diffusers' pipelines, draw for draw. "webui" is the
    AUTOMATIC1111 webui 1.10's recipe (altdiff.webui_sampling): its sampler names (`sampler="Euler a"`,
    "DPM++ 2M Karras", ...) and schedule types (`scheduler`), its noise (`rng` "GPU" | "CPU" | "NV", one
    generator per image, `seed` + i per image, `eta_noise_seed_delta`, `subseed`/`subseed_strength`), its
    prompt schedules and CFG denoiser (`s_min_uncond`), its truncating uint8 conversion. `family=None`
    picks "webui" when `infotext` is given, when `sampler` is a webui name that is not a diffusers-family
    name, or when a webui-only argument is set. `eta=None` is the sampler's default (diffusers: 0; webui:
    1 for ancestral samplers). `infotext` (a string, a PNG path or a PIL image carrying one) fills every
    argument the call leaves at its default; arguments given explicitly win. In the webui family
    `mask_image` inpaints as the webui's img2img does, with `inpaint_options` (altdiff.inpaint.InpaintOptions
    or a dict of the webui API's mask fields: blur, fill, "only masked", invert, resize mode), and `hires`
    (altdiff.hires.HiresOptions or a dict of its hr_* fields) adds txt2img's hires-fix second pass. Its
    `clip_skip` is recorded in the infotext ("Clip skip: clip_skip + 1") but not applied: the webui's XLM-R
    encoder has no CLIP skip.

    `token_merging_ratio` (both families) merges that share of the tokens before each self-attention at the
    latent's resolution, as the webui applies tomesd (altdiff.tome); None keeps `pipe.enable_token_merging`'s
    setting, 0 turns it off for the call.

    Stages: check → encode → prepare latents → denoise → decode and safety check."""
    if infotext is not None:
        return generate(**_from_infotext(infotext, {k: v for k, v in locals().items() if k != "infotext"}))
    # numpy scalars and 0-d tensors as Python numbers, so the checks and stages see plain ints and floats.
    (strength, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, eta, guidance_rescale,
     clip_skip, callback_steps) = map(plain, (strength, height, width, num_inference_steps, guidance_scale,
                                              num_images_per_prompt, eta, guidance_rescale, clip_skip,
                                              callback_steps))
    cross_attention_kwargs = checks.cross_attention_kwargs(cross_attention_kwargs)
    if token_merging_ratio is not None:
        tome.TokenMerging(plain(token_merging_ratio))  # checked before the model loads
    family = _family(family=family, sampler=sampler, scheduler=scheduler, rng=rng,
                     eta_noise_seed_delta=eta_noise_seed_delta, subseed=subseed, subseed_strength=subseed_strength,
                     s_min_uncond=s_min_uncond, inpaint_options=inpaint_options, hires_options=hires)
    batch_size = _check_inputs(
        prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, height=height, width=width,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, seed=seed,
        output_type=output_type, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        strength=strength, guidance_rescale=guidance_rescale, image=image, callback_steps=callback_steps,
        sized_image=family == "webui" and mask_image is not None)
    if family == "webui":
        webui = webui_family.check(
            sampler=sampler, scheduler=scheduler, rng=rng, ensd=eta_noise_seed_delta, subseed=subseed,
            subseed_strength=subseed_strength, s_min_uncond=s_min_uncond, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            guidance_rescale=guidance_rescale, image=image, mask_image=mask_image,
            inpaint_options=inpaint_options, hires_options=hires, output_type=output_type,
            tensor_inputs=callback_on_step_end_tensor_inputs)
        sampler = None
    else:
        _check_diffusers_family(sampler, image, mask_image, inpaint_options, hires)
        if seed is not None:
            generator = _generators_from_seed(seed)
    total = batch_size * num_images_per_prompt
    pipe = model.load() if isinstance(model, ModelSource) else model
    webui_inpaint = family == "webui" and mask_image is not None  # the webui's mask handling sizes the image
    init_image, shape = _check_for_model(pipe, None if webui_inpaint else image, height, width, latents,
                                         prompt_embeds, negative_prompt_embeds, total,
                                         a1111_prompts or family == "webui")
    if family == "webui":
        images, nsfw, networks_infotext, infotexts = webui_family.run(
            pipe, webui, prompt=prompt, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, shape=shape, init_image=init_image, image=image,
            mask_image=mask_image, height=height, width=width, strength=strength, steps=num_inference_steps,
            guidance_scale=guidance_scale, eta=eta, seed=seed, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs, output_type=output_type,
            callback_on_step_end=callback_on_step_end, callback=callback, callback_steps=callback_steps,
            progress=progress, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
            token_merging_ratio=token_merging_ratio)
        if not return_dict:
            return images, nsfw
        return GenerationResult(images=images, nsfw_content_detected=nsfw, infotext=networks_infotext,
                                infotexts=infotexts)
    eta = eta or 0.0
    if mask_image is not None:
        pixel_mask = inpaint.diffusers_mask(mask_image, tuple(init_image.shape[2:]))
    sampler = sampler or sampler_for_config(pipe.scheduler_config)
    sample_fn = get_sampler(sampler)
    schedule = make_schedule(sampler, pipe.scheduler_config, num_inference_steps, device=pipe.device)
    steps = num_inference_steps
    if image is not None:
        schedule = schedule_for_strength(schedule, strength)
        steps = min(int(num_inference_steps * strength), num_inference_steps)

    with pipe.lock, prompt_networks(pipe, prompt, negative_prompt, a1111_prompts=a1111_prompts, lora_dir=lora_dir,
                                    embeddings_dir=embeddings_dir) as networks, torch.inference_mode(), \
            pipe.running(), tome.merging_for(pipe.unet, token_merging_ratio):
        pipe._interrupt = False
        embeds, do_cfg = _encode(pipe, networks.prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, guidance_scale, cross_attention_kwargs, clip_skip,
                                 a1111_prompts)
        dtype = embeds["prompt_embeds"].dtype
        if mask_image is None:
            latents = _prepare_latents(pipe, schedule, shape, latents, init_image, total, generator, dtype)
        else:
            latents, blend = _prepare_inpaint(pipe, schedule, init_image, pixel_mask, total, generator, dtype,
                                              strength)
        n_calls = len(schedule.timesteps)
        with tqdm(total=n_calls, disable=not progress, desc="altdiff") as bar:
            on_step = _step_callback(pipe, embeds, bar, n_calls, steps, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs, callback, callback_steps)
            if mask_image is not None:
                on_step = _blended(blend, on_step)
            try:
                latents = denoise(pipe.unet_runner(), latents, schedule, sample_fn, embeds,
                                  guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, do_cfg=do_cfg,
                                  timestep_cond=_guidance_embedding(pipe, guidance_scale, total, latents.dtype),
                                  cross_attention_kwargs=cross_attention_kwargs, generator=generator, eta=eta,
                                  callback=on_step)
            except Interrupted as stop:
                latents = stop.latents
        images, nsfw = decode(pipe, latents, output_type)
    if not return_dict:
        return images, nsfw
    return GenerationResult(images=images, nsfw_content_detected=nsfw, infotext=networks.infotext)
