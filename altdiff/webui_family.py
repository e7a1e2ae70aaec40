"""generate()'s webui family: the AUTOMATIC1111 webui 1.10's txt2img / img2img recipe around its samplers
(altdiff.webui_sampling): its checks (`check`), its stages with inpainting and the hires fix (`run`), and the
infotext of each image."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checks, hires, inpaint, prompts, tome, webui_sampling
from . import infotext as infotext_io
from .checks import is_int, is_number
from .images import preprocess
from .latents import Interrupted, decode, image_latents
from .lora import text_encoder_scale
from .networks import prompt_networks
from .rng import SOURCES, ImageRNG

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass
class Choices:
    """The webui family's checked choices."""

    sampler: webui_sampling.WebuiSampler
    source: str
    ensd: int
    subseed: int | None
    subseed_strength: float
    s_min_uncond: float
    inpaint: inpaint.InpaintOptions | None  # with a mask_image
    hires: hires.HiresOptions | None


def check(*, sampler, scheduler, rng, ensd, subseed, subseed_strength, s_min_uncond, generator, latents,
          prompt_embeds, negative_prompt_embeds, guidance_rescale, image, mask_image, inpaint_options,
          hires_options, output_type, tensor_inputs) -> Choices:
    """The webui family's arguments; what it does not take is named."""
    for name, value, why in (
            ("generator", generator, "its noise comes from `seed` (one generator per image, `rng` source)"),
            ("latents", latents, "its starting noise comes from `seed`"),
            ("prompt_embeds", prompt_embeds, "its conditioning is scheduled from the prompt text"),
            ("negative_prompt_embeds", negative_prompt_embeds, "its conditioning comes from the text")):
        if value is not None:
            raise ValueError(f"{name}: not taken by the webui family ({why}); use family='diffusers'")
    if guidance_rescale:
        raise ValueError("guidance_rescale: the webui has no guidance rescale; use family='diffusers'")
    if tuple(tensor_inputs) != ("latents",):
        raise ValueError("callback_on_step_end_tensor_inputs: the webui family passes ('latents',) only")
    if scheduler is not None and not isinstance(scheduler, str):
        raise TypeError(f"scheduler: expected a webui schedule type name, got {type(scheduler).__name__}")
    choice = webui_sampling.resolve(sampler, scheduler)
    source = "GPU" if rng is None else rng
    if source not in SOURCES:
        raise ValueError(f"rng: expected one of {SOURCES}, got {rng!r}")
    if not is_int(ensd or 0, 0):
        raise ValueError(f"eta_noise_seed_delta: must be an int >= 0, got {ensd!r}")
    if subseed is not None and not (is_int(subseed, -1, checks.SEED_MAX)):
        raise ValueError(f"subseed: must be an int in [-1, {checks.SEED_MAX}], got {subseed!r}")
    if not is_number(subseed_strength) or not 0 <= subseed_strength <= 1:
        raise ValueError(f"subseed_strength: must be in [0, 1], got {subseed_strength!r}")
    if not is_number(s_min_uncond) or s_min_uncond < 0:
        raise ValueError(f"s_min_uncond: must be a number >= 0, got {s_min_uncond!r}")
    options = None
    if mask_image is not None:
        if image is None:
            raise ValueError("mask_image: inpainting needs `image`, the picture the mask applies to")
        for name, value in (("image", image), ("mask_image", mask_image)):
            if not isinstance(value, PIL.Image.Image):
                raise TypeError(f"{name}: the webui family inpaints one PIL image with one PIL mask, got "
                                f"{type(value).__name__}")
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type: the webui family's inpainting pastes its overlay on PIL images; "
                             f"expected 'pil' or 'latent', got {output_type!r}")
        options = inpaint.options(inpaint_options)
    elif inpaint_options is not None:
        raise ValueError("inpaint_options: they apply to a mask; pass mask_image too")
    hires_options = hires.options(hires_options)
    if hires_options is not None:
        if image is not None:
            raise ValueError("hires: the hires fix is txt2img's second pass; it takes no `image`")
        # the second pass's sampler, checked before the model runs
        webui_sampling.resolve(hires_options.hr_sampler_name or choice.label,
                               hires_options.hr_scheduler or choice.schedule_type)
    return Choices(choice, source, int(ensd or 0), subseed, float(subseed_strength), float(s_min_uncond), options,
                  hires_options)


def run(pipe: Pipeline, webui: Choices, *, prompt, negative_prompt, num_images_per_prompt: int, shape, init_image,
        image, mask_image, height, width, strength, steps: int, guidance_scale: float, eta, seed, clip_skip,
        cross_attention_kwargs, output_type, callback_on_step_end, callback, callback_steps, progress, lora_dir,
        embeddings_dir, token_merging_ratio):
    """The webui family's stages (altdiff.webui_sampling): encode the prompt schedules, draw the webui's noise,
    sample with its CFG denoiser (an inpainting mask blended in; the hires fix's second pass after it), decode
    with its truncating conversion (and paste the inpainting overlay). Returns (images, nsfw flags, the
    networks' infotext fields, the infotext of each image)."""
    # The webui's default "Enable comments": `#` to the end of a line is dropped first (infotext included).
    texts = [prompts.strip_comments(t) for t in ([prompt] if isinstance(prompt, str) else prompt)]
    negatives = [prompts.strip_comments(t) for t in (
        negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(texts))]
    n = num_images_per_prompt
    all_prompts = [t for t in texts for _ in range(n)]
    all_negatives = [t for t in negatives for _ in range(n)]
    total = len(all_prompts)
    choice, hr = webui.sampler, webui.hires
    strength_used = webui.subseed_strength
    subseeds = webui_sampling.fixed_seeds(webui.subseed, total, "subseed")
    # processing.py: with a variation strength every image keeps the seed, and the subseed counts up.
    if strength_used and not isinstance(seed, (list, tuple)):
        seeds = webui_sampling.fixed_seeds(seed, 1) * total
    else:
        seeds = webui_sampling.fixed_seeds(seed, total)
    for i, s in enumerate(seeds + subseeds):
        checks.seed(f"seed[{i}]", s)
    factor, channels = pipe.vae_scale_factor, pipe.unet.config.in_channels
    prepared = None
    if mask_image is not None:
        # The processing size: width x height, by default the image's own (a multiple of 8).
        width = width or image.width - image.width % factor
        height = height or image.height - image.height % factor
        if width < factor or height < factor:
            raise ValueError(f"image: {image.width}x{image.height} is smaller than {factor} pixels")
        prepared = inpaint.prepare(image, mask_image, width, height, webui.inpaint)
        init_image = preprocess(prepared.image, factor, channels)
    elif init_image is not None:
        height, width = init_image.shape[2], init_image.shape[3]
    else:
        height, width = shape[2] * factor, shape[3] * factor
    latent_shape = (channels, height // factor, width // factor)
    target = hires.target(width, height, hr, factor) if hr is not None else None
    hr_choice = hr_steps = None
    if target is not None:
        hr_choice = webui_sampling.resolve(hr.hr_sampler_name or choice.label, hr.hr_scheduler or choice.schedule_type)
        hr_steps = hr.hr_second_pass_steps or steps
        hr_prompts = [prompts.strip_comments(hr.hr_prompt) if hr.hr_prompt else p for p in all_prompts]
        hr_negatives = [prompts.strip_comments(hr.hr_negative_prompt) if hr.hr_negative_prompt else p
                        for p in all_negatives]
        if any("<" in p and p not in all_prompts for p in hr_prompts):
            raise ValueError("hires: an hr_prompt with its own <lora:...> tags is not supported; put the "
                             "networks in `prompt`")

    with pipe.lock, prompt_networks(pipe, all_prompts, all_negatives, a1111_prompts=True, lora_dir=lora_dir,
                                    embeddings_dir=embeddings_dir) as networks, torch.inference_mode(), \
            pipe.running(), tome.merging_for(pipe.unet, token_merging_ratio) as merging:
        pipe._interrupt = False
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        first_total = choice.total_steps(steps)
        with text_encoder_scale(pipe, lora_scale):
            c, uc = webui_sampling.conds(pipe, networks.prompt, all_negatives, first_total, None)
            if target is not None:
                hr_c, hr_uc = webui_sampling.conds(
                    pipe, [networks.prompt[i] if p == all_prompts[i] else p for i, p in enumerate(hr_prompts)],
                    hr_negatives, first_total, None, hires_steps=hr_choice.total_steps(hr_steps))
        dtype = next(pipe.unet.parameters()).dtype
        rng = ImageRNG(latent_shape, seeds, subseeds if strength_used else None, strength_used, webui.source,
                       pipe.device, webui.ensd)
        init_latent = mask = None
        if init_image is not None:
            # The webui samples the VAE posterior from torch's unseeded global RNG; altdiff seeds it per image.
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            # contiguous: the encoder's output keeps the image's channels-last strides, and a layout picks the
            # UNet's convolution kernels (~1e-7 apart, which an inpainting mask's hard edge can amplify)
            init_latent = image_latents(pipe, init_image, total, generators, pipe.device, dtype).float().contiguous()
            if prepared is not None:
                init_latent, mask = _inpaint_latents(pipe, init_latent, prepared, webui, latent_shape, seeds)
        run_steps = int(min(strength, 0.999) * steps) + 1 if init_image is not None else steps
        hr_run = hr_steps if target is not None else 0
        with tqdm(total=run_steps + hr_run, disable=not progress, desc="altdiff") as bar:
            def on_step(d: dict) -> None:
                bar.update()
                i, x = d["i"], d["x"]
                if callback_on_step_end is not None:
                    out = callback_on_step_end(pipe, i, d["sigma"], {"latents": x}) or {}
                    if out.get("latents") is not None:
                        raise ValueError("callback_on_step_end: the webui family's samplers keep their own "
                                         "latents; returning new ones is not supported")
                if callback is not None and i % (callback_steps or 1) == 0:
                    callback(i, d["sigma"], x)
                if pipe._interrupt:  # the webui returns the last denoised prediction when interrupted
                    raise Interrupted(d["denoised"])

            common = dict(cfg_scale=guidance_scale, eta=eta, s_min_uncond=webui.s_min_uncond,
                          cross_attention_kwargs=cross_attention_kwargs, callback=on_step, dtype=dtype)
            try:
                latents = webui_sampling.sample(
                    pipe, pipe.unet_runner(), choice, c, uc, rng, seeds, steps=steps, init_latent=init_latent,
                    strength=strength if init_image is not None else None, mask=mask, **common)
                if target is not None:
                    latents = _hires_pass(pipe, latents.to(dtype), target, hr, hr_choice, hr_c, hr_uc, seeds,
                                          subseeds, webui, hr_steps, dtype, common)
            except Interrupted as stop:
                latents = stop.latents
        images, nsfw = decode(pipe, latents.to(dtype), output_type, truncate=True)
    if prepared is not None and output_type == "pil":
        images = [inpaint.apply_overlay(img, prepared.overlay, prepared.paste_to) for img in images]
    texts_out = _infotexts(pipe, webui, networks, all_prompts, all_negatives, seeds, subseeds, steps,
                                 guidance_scale, eta, width, height,
                                 strength if init_image is not None else None, prepared, clip_skip,
                                 merging.ratio if merging is not None else 0.0)
    return images, nsfw, networks.infotext, texts_out


def _inpaint_latents(pipe: Pipeline, init_latent: torch.Tensor, prepared: inpaint.PreparedInpaint, webui: Choices,
                     latent_shape: tuple[int, int, int], seeds: list[int]):
    """StableDiffusionProcessingImg2Img.init's latent side: resize mode 3's latent resize, the (mask, nmask)
    pair from the processing-size mask, the latent fills (2: the images' first seed noise, as the webui's
    create_random_tensors draws it; 3: zeros)."""
    options = webui.inpaint
    channels, h, w = latent_shape
    if options.resize_mode == 3:
        init_latent = F.interpolate(init_latent, size=(h, w), mode="bilinear")
    mask, nmask = inpaint.latent_mask(prepared.mask, w, h, options.mask_round, channels)
    mask, nmask = mask.to(init_latent.device), nmask.to(init_latent.device)
    noise = None
    if options.inpainting_fill == 2:
        noise = ImageRNG(latent_shape, seeds, None, 0.0, webui.source, init_latent.device, 0).next()
    return inpaint.fill_latent(init_latent, mask, nmask, options.inpainting_fill, noise), (mask, nmask)


def _hires_pass(pipe: Pipeline, samples: torch.Tensor, target: hires.HiresTarget, hr: hires.HiresOptions,
                choice: webui_sampling.WebuiSampler, c, uc, seeds, subseeds, webui: Choices, steps: int, dtype,
                common: dict) -> torch.Tensor:
    """StableDiffusionProcessingTxt2Img.sample_hr_pass: upscale the first pass (in latent space, or decoded,
    resized by a model-free upscaler and encoded again), cut an hr_resize overflow, then img2img over it with
    the hires sampler and new noise from the same seeds, running exactly `steps` steps."""
    if hr.hr_upscaler in hires.LATENT_UPSCALE_MODES:
        samples = hires.upscale_latent(samples.float(), target, hr.hr_upscaler, pipe.vae_scale_factor)
    else:
        decoded = pipe.vae.decode(samples / pipe.vae.config.scaling_factor)
        images = [hires.upscale_image(i, target, hr.hr_upscaler) for i in hires.to_pixels(decoded)]
        pixels = hires.from_pixels(images) * 2.0 - 1.0
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        samples = image_latents(pipe, pixels, len(seeds), generators, pipe.device, dtype).float().contiguous()
    samples = hires.truncate(samples, target)
    if not hr.denoising_strength:
        # setup_img2img_steps plans 0 steps: the webui's sampler walks an all-zero schedule and returns the input
        return samples
    rng = ImageRNG(tuple(samples.shape[1:]), seeds, subseeds if webui.subseed_strength else None,
                   webui.subseed_strength, webui.source, pipe.device, webui.ensd)
    cfg = dict(common, cfg_scale=hr.hr_cfg if hr.hr_cfg is not None else common["cfg_scale"])
    return webui_sampling.sample(pipe, pipe.unet_runner(), choice, c, uc, rng, seeds, steps=steps,
                                 init_latent=samples, strength=hr.denoising_strength, fix_steps=True, **cfg)


def _infotexts(pipe: Pipeline, webui: Choices, networks, all_prompts, all_negatives, seeds, subseeds,
                     steps, guidance_scale, eta, width, height, strength, prepared, clip_skip,
                     token_merging_ratio: float) -> list[str]:
    """processing.create_infotext for each image, with the keys the run added (Eta, mask, hires). The webui
    records its CLIP skip setting ("Clip skip": layers stopped at, clip_skip + 1) though its XLM-R encoder
    does not apply it."""
    choice, hr = webui.sampler, webui.hires
    source = Path(pipe.source) if pipe.source else None
    model_hash = infotext_io.model_hash(source) if source is not None and source.is_file() else None
    extra = dict(networks.infotext)
    if choice.timesteps:  # CompVisSampler.initialize: "Eta DDIM" when not 0
        if eta:
            extra["Eta DDIM"] = eta
    elif "eta" in inspect.signature(webui_sampling.K_SAMPLERS[choice.label].function).parameters and (
            eta not in (None, 1.0)):
        extra["Eta"] = eta
    if prepared is not None:
        extra.update(inpaint.infotext_params(webui.inpaint, prepared.paste_to is not None))
    hires_on = hr is not None and hires.target(width, height, hr, pipe.vae_scale_factor) is not None
    if hires_on:
        extra.update(hires.infotext_params(hr, sampler=choice.label, scheduler=choice.schedule_type,
                                           prompt=all_prompts[0], negative_prompt=all_negatives[0],
                                           cfg_scale=guidance_scale))
        strength = hr.denoising_strength
    return [infotext_io.write(
        p, neg, steps=steps, sampler=choice.label, schedule_type=choice.infotext_schedule_type,
        cfg_scale=guidance_scale, seed=seeds[i], width=width, height=height, model_hash=model_hash,
        model=source.stem if source is not None and source.is_file() else (source.name if source else None),
        variation_seed=subseeds[i] if webui.subseed_strength else None,
        variation_seed_strength=webui.subseed_strength, denoising_strength=strength, clip_skip=(clip_skip or 0) + 1,
        ensd=webui.ensd if choice.uses_ensd(eta) else 0, token_merging_ratio=token_merging_ratio,
        # the hires pass merges at the same ratio (the webui's token_merging_ratio_hr option left at 0)
        token_merging_ratio_hr=token_merging_ratio if hires_on else 0.0,
        rng=webui.source, extra=extra)
        for i, (p, neg) in enumerate(zip(all_prompts, all_negatives))]
