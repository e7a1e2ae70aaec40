"""The webui family's inpainting and hires fix in generate(), against k-diffusion 0.1.1.post1 driven by the
webui 1.10's recipe written out here from its source: processing.py (StableDiffusionProcessingImg2Img.init's
latent mask and fills, .sample's final blend; StableDiffusionProcessingTxt2Img.sample_hr_pass), the CFG
denoiser's blend of the init latent into each denoised prediction (sd_samplers_cfg_denoiser.py),
KDiffusionSampler.sample_img2img with setup_img2img_steps (an explicit step count in the hires pass), and
ImageRNG's per-image generators. The pixel side (blur, crop, fills, overlay) is altdiff.inpaint, checked
against OpenCV and the webui's docstrings in tests/test_inpaint.py; here its output is the recipe's input."""

import numpy as np
import PIL.Image
import pytest
import tiny
import torch
import torch.nn.functional as F
from kdiffusion_oracle import external, sampling

import altdiff
from altdiff import hires, infotext, inpaint, prompts
from altdiff.images import save_png

SIZE = 32
PROMPT = "a cat wearing a hat"
NEGATIVE = "oil painting"
STEPS = 4


@pytest.fixture(scope="module")
def pipes(m9_folder):
    return altdiff.load(str(m9_folder), safety_checker=False), tiny.load_reference(m9_folder)


class _LDM(torch.nn.Module):
    def __init__(self, unet, config):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5,
                               config["num_train_timesteps"], dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


def _image(seed=0, size=SIZE):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size=SIZE, box=(8, 8, 24, 24)):
    mask = np.zeros((size, size), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return PIL.Image.fromarray(mask)


def _cfg(model, cond, uncond, scale, blend=None):
    n = cond.shape[0]

    def denoise(x, sigma, **_):
        out = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        denoised = out[n:] + (out[:n] - out[n:]) * scale
        return denoised if blend is None else blend(denoised)
    return denoise


def _hijack(shape, generators):
    class Hijack:
        def __getattr__(self, item):
            return getattr(torch, item)

        @staticmethod
        def randn_like(x):
            return torch.stack([torch.randn(shape, generator=g) for g in generators])
    return Hijack()


def _encode_texts(pipe, n, prompt=PROMPT):
    cond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [prompt] * n, pipe.device)
    uncond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [NEGATIVE] * n, pipe.device)
    return cond, uncond


def _decode(pipe, latents):
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    return [PIL.Image.fromarray((255.0 * np.moveaxis(d.numpy(), 0, 2)).astype(np.uint8))
            for d in torch.clamp((decoded + 1.0) / 2.0, 0, 1)]


def _webui_inpaint(ref, pipe, seeds, options, strength, sampler="sample_euler_ancestral"):
    """img2img with a mask: the recipe's final latents and images (overlay pasted)."""
    prepared = inpaint.prepare(_image(), _mask(), SIZE, SIZE, options)
    n = len(seeds)
    with torch.no_grad():
        cond, uncond = _encode_texts(pipe, n)
        # as diffusers' numpy_to_pt lays it out (a numpy transpose): another memory layout takes other
        # convolution kernels (~1e-7 apart), which the hard latent mask of this tiny model amplifies to ~1e-3
        pixels = torch.from_numpy((np.asarray(prepared.image, np.float32)[None] / 255.0).transpose(0, 3, 1, 2))
        pixels = pixels * 2.0 - 1.0
        # altdiff seeds the VAE posterior with the first image's seed (the webui uses its global RNG); altdiff's
        # VAE (equal to diffusers' within ~1e-6, tests/test_vae.py), as the decode below, keeps this exact
        init = pipe.vae.encode(pixels).sample(torch.Generator().manual_seed(seeds[0]))
        init = (init * pipe.vae.config.scaling_factor).repeat(n, 1, 1, 1)
        latent_size = SIZE // pipe.vae_scale_factor
        small = np.asarray(prepared.mask.convert("RGB").resize((latent_size, latent_size)), np.float32)[..., 0] / 255
        nmask = torch.from_numpy(np.around(small))[None, None].expand(n, 4, -1, -1)
        mask = 1.0 - nmask
        shape = (4, latent_size, latent_size)
        if options.inpainting_fill == 2:
            init = init * mask + torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                                              for s in seeds]) * nmask
        elif options.inpainting_fill == 3:
            init = init * mask
        model = external.CompVisDenoiser(_LDM(ref.unet, ref.scheduler.config))
        sigmas = model.get_sigmas(STEPS)
        t_enc = int(min(strength, 0.999) * STEPS)
        sigma_sched = sigmas[STEPS - t_enc - 1:]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        saved, sampling.torch = sampling.torch, _hijack(shape, generators)
        try:
            latents = getattr(sampling, sampler)(
                _cfg(model, cond, uncond, 7.0, lambda d: d * nmask + init * mask),
                init + noise * sigma_sched[0], sigma_sched, disable=True)
        finally:
            sampling.torch = saved
        latents = latents * nmask + init * mask
        images = [inpaint.apply_overlay(i, prepared.overlay, prepared.paste_to) for i in _decode(pipe, latents)]
    return latents, images


def _altdiff_inpaint(pipe, seeds, options, strength, sampler="Euler a", **kw):
    args = dict(model=pipe, image=_image(), mask_image=_mask(), inpaint_options=options, strength=strength,
                negative_prompt=NEGATIVE, sampler=sampler, num_inference_steps=STEPS, guidance_scale=7.0,
                seed=list(seeds), num_images_per_prompt=len(seeds), progress=False, **kw)
    latents = altdiff.generate(PROMPT, output_type="latent", **args).images
    result = altdiff.generate(PROMPT, **args)
    return latents, result


@pytest.mark.parametrize("fill, full_res, invert", [(0, False, False), (1, False, False), (2, False, False),
                                                    (3, False, False), (1, True, False), (2, True, True)])
def test_inpainting_equals_the_webui_recipe(pipes, fill, full_res, invert):
    """StableDiffusionProcessingImg2Img.init / .sample with each inpainting_fill, "only masked" and not,
    inverted and not."""
    pipe, ref = pipes
    options = inpaint.InpaintOptions(mask_blur_x=2, mask_blur_y=2, inpainting_fill=fill, inpaint_full_res=full_res,
                                     inpaint_full_res_padding=4, inpainting_mask_invert=invert)
    ref_latents, ref_images = _webui_inpaint(ref, pipe, [11, 12], options, 0.75)
    latents, result = _altdiff_inpaint(pipe, [11, 12], options, 0.75)
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    for mine, theirs in zip(result.images, ref_images):
        assert np.abs(np.asarray(mine, int) - np.asarray(theirs, int)).max() <= 1
    text = result.infotexts[0]
    assert "Mask blur: 2" in text and "Denoising strength: 0.75" in text
    assert ("Masked content: latent noise" in text) == (fill == 2) and ("Masked content: fill" in text) == (fill == 0)
    assert ("Inpaint area: Only masked" in text) == full_res and ("Mask mode: Inpaint not masked" in text) == invert


def test_the_mask_keeps_the_picture_and_moves_the_masked_area(pipes):
    """Outside the mask the result is the original picture (the overlay); inside, the sampler's work: the
    equality above is not the picture passed through."""
    pipe, _ = pipes
    options = inpaint.InpaintOptions(mask_blur_x=0, mask_blur_y=0)
    _, result = _altdiff_inpaint(pipe, [5], options, 0.9)
    out, original = np.asarray(result.images[0], int), np.asarray(_image(), int)
    keep = np.asarray(_mask()) == 0
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[~keep] - original[~keep]).max() > 30


def test_timestep_samplers_blend_before_the_model_call(pipes):
    """DDIM and PLMS (CFGDenoiserTimesteps: mask_before_denoising) keep the init latent exactly where the mask
    keeps the picture, and repaint the rest."""
    pipe, _ = pipes
    options = inpaint.InpaintOptions(mask_blur_x=0, mask_blur_y=0)
    for sampler in ("DDIM", "PLMS"):
        latents, result = _altdiff_inpaint(pipe, [5], options, 0.8, sampler=sampler)
        plain = altdiff.generate(PROMPT, model=pipe, image=_image(), strength=0.8, negative_prompt=NEGATIVE,
                                 sampler=sampler, num_inference_steps=STEPS, seed=5, output_type="latent",
                                 progress=False).images
        latent = SIZE // pipe.vae_scale_factor
        keep = torch.from_numpy(np.asarray(_mask().resize((latent, latent))) == 0)
        assert (latents - plain)[..., ~keep].abs().max() > 1e-2
        assert f"Sampler: {sampler}," in result.infotexts[0]


def test_only_masked_pastes_the_crop_back_at_the_original_size(pipes):
    pipe, _ = pipes
    big = _image(3, size=48)
    mask = _mask(48, (30, 30, 40, 40))
    options = inpaint.InpaintOptions(inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur_x=0,
                                     mask_blur_y=0)
    result = altdiff.generate(PROMPT, model=pipe, image=big, mask_image=mask, inpaint_options=options,
                              width=SIZE, height=SIZE, sampler="Euler", num_inference_steps=STEPS, seed=1,
                              progress=False)
    out = np.asarray(result.images[0], int)
    assert out.shape == (48, 48, 3)
    assert np.array_equal(out[:20], np.asarray(big, int)[:20])  # far from the crop: the original
    assert "Inpaint area: Only masked, Masked area padding: 4" in result.infotexts[0]
    assert "Size: 32x32" in result.infotexts[0]


def _webui_hires(ref, pipe, seed, options, steps=STEPS):
    """txt2img with Euler, then sample_hr_pass with Euler: a latent upscaler, or the first pass decoded,
    truncated to uint8, upscaled in pixels (altdiff.hires.upscale_image, modules/upscaler.py's model-free
    upscalers; tests/test_hires.py) and encoded again (its posterior seeded with the image's seed)."""
    with torch.no_grad():
        cond, uncond = _encode_texts(pipe, 1)
        model = external.CompVisDenoiser(_LDM(ref.unet, ref.scheduler.config))
        small = SIZE // pipe.vae_scale_factor
        x = torch.randn((1, 4, small, small), generator=torch.Generator().manual_seed(seed))
        sigmas = model.get_sigmas(steps)
        first = sampling.sample_euler(_cfg(model, cond, uncond, 7.0), x * sigmas[0], sigmas, disable=True)
        factor = pipe.vae_scale_factor
        size = hires.target(SIZE, SIZE, options, factor)
        if options.hr_upscaler in hires.LATENT_UPSCALE_MODES:
            mode, antialias = hires.LATENT_UPSCALE_MODES[options.hr_upscaler]
            up = F.interpolate(first, size=(size.height // factor, size.width // factor), mode=mode,
                               antialias=antialias)
        else:
            low = _decode(pipe, first)[0]
            big = hires.upscale_image(low, size, options.hr_upscaler)
            pixels = torch.from_numpy((np.asarray(big, np.float32)[None] / 255.0).transpose(0, 3, 1, 2))
            up = pipe.vae.encode(pixels * 2.0 - 1.0).sample(torch.Generator().manual_seed(seed))
            up = (up * pipe.vae.config.scaling_factor).contiguous()
        noise = torch.randn(up.shape[1:], generator=torch.Generator().manual_seed(seed))[None]
        hr_steps = options.hr_second_pass_steps or steps
        # setup_img2img_steps with an explicit step count: a longer schedule, of which hr_steps are run
        schedule = int(hr_steps / min(options.denoising_strength, 0.999))
        all_sigmas = model.get_sigmas(schedule)
        sigma_sched = all_sigmas[schedule - (hr_steps - 1) - 1:]
        latents = sampling.sample_euler(_cfg(model, cond, uncond, 7.0), up + noise * sigma_sched[0], sigma_sched,
                                        disable=True)
    return latents, _decode(pipe, latents)


@pytest.mark.parametrize("upscaler,second_steps", [("Latent", 0), ("Latent (bicubic antialiased)", 3),
                                                    ("Lanczos", 2), ("None", 0)])
def test_hires_fix_equals_the_webui_recipe(pipes, upscaler, second_steps):
    """StableDiffusionProcessingTxt2Img.sample / sample_hr_pass, latent and pixel upscalers."""
    pipe, ref = pipes
    options = hires.HiresOptions(hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=second_steps,
                                 denoising_strength=0.6)
    ref_latents, ref_images = _webui_hires(ref, pipe, 21, options)
    args = dict(model=pipe, negative_prompt=NEGATIVE, sampler="Euler", num_inference_steps=STEPS, width=SIZE,
                guidance_scale=7.0,
                height=SIZE, seed=21, hires=options, progress=False)
    latents = altdiff.generate(PROMPT, output_type="latent", **args).images
    result = altdiff.generate(PROMPT, **args)
    assert latents.shape[-1] == 48 // pipe.vae_scale_factor and (latents - ref_latents).abs().max().item() <= 1e-4
    assert np.abs(np.asarray(result.images[0], int) - np.asarray(ref_images[0], int)).max() <= 1
    text = result.infotexts[0]
    assert "Size: 32x32" in text and "Denoising strength: 0.6" in text and "Hires upscale: 1.5" in text
    assert f"Hires upscaler: {upscaler}" in text and (f"Hires steps: {second_steps}" in text) == bool(second_steps)


def test_hires_infotext_round_trip_and_pixel_upscaler(pipes, tmp_path):
    pipe, _ = pipes
    result = altdiff.generate(PROMPT, model=pipe, sampler="DPM++ 2M", num_inference_steps=3, width=SIZE,
                              height=SIZE, seed=8, hires={"hr_resize_x": 48, "hr_resize_y": 40,
                                                          "hr_upscaler": "Latent (nearest)",
                                                          "denoising_strength": 0.5}, progress=False)
    assert result.images[0].size == (48, 40)
    path = tmp_path / "hires.png"
    save_png(result.images[0], path, result.infotexts[0])
    again = altdiff.generate(infotext=str(path), model=pipe, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    assert "Hires resize: 48x40" in result.infotexts[0]
    _, _, params = infotext.parse(result.infotexts[0])
    assert params["Denoising strength"] == "0.5"
    lanczos = altdiff.generate(PROMPT, model=pipe, sampler="Euler", num_inference_steps=2, width=SIZE,
                               height=SIZE, seed=8, hires={"hr_scale": 1.5, "hr_upscaler": "Lanczos"},
                               progress=False)
    assert lanczos.images[0].size == (48, 48) and "Hires upscaler: Lanczos" in lanczos.infotexts[0]


def test_errors_name_the_argument(pipes):
    pipe, _ = pipes
    base = dict(model=pipe, sampler="Euler", num_inference_steps=2, progress=False)
    cases = [(dict(image=_image(), hires={"hr_scale": 2}), "hires"),
             (dict(inpaint_options={"inpainting_fill": 1}), "inpaint_options"),
             (dict(mask_image=_mask(), family="webui"), "mask_image"),
             (dict(image=_image(), mask_image=_mask(), output_type="np"), "output_type"),
             (dict(hires={"hr_upscaler": "4x-UltraSharp"}), "hr_upscaler"),
             (dict(hires={"hr_scael": 2}), "hires"),
             (dict(image=_image(), mask_image=_mask(), inpaint_options={"inpainting_fill": 7}), "inpainting_fill"),
             (dict(hires={"hr_scale": 2}, family="diffusers", sampler=None), "hires")]
    for kwargs, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            altdiff.generate(PROMPT, **{**base, **kwargs})
