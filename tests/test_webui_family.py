"""generate()'s webui family against k-diffusion 0.1.1.post1 driven by the AUTOMATIC1111 webui 1.10's recipe,
written out here from its source (processing.py, sd_samplers_kdiffusion.py KDiffusionSampler.sample,
sd_samplers_cfg_denoiser.py CFGDenoiser, rng.py ImageRNG): k-diffusion's CompVisDenoiser over diffusers' UNet
and the ldm model's float64-then-float32 alphas_cumprod, its sigma functions, the starting noise from one
torch generator per image, k-diffusion's torch.randn_like routed to those generators (the webui's
TorchHijack), its BrownianTreeNoiseSampler with the images' seeds, and the webui's truncating uint8 conversion."""

import numpy as np
import PIL.Image
import pytest
import tiny
import torch
from kdiffusion_oracle import external, sampling

import altdiff
from altdiff import infotext, prompts, webui

STEPS = 3
SIZE = 32
PROMPT = "a cat wearing a hat"
NEGATIVE = "oil painting"

# webui label -> (k-diffusion function name, the schedule its Automatic resolves to, discard_next_to_last_sigma)
GRID = {
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", False),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", False),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", False),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", False),
    "Euler a": ("sample_euler_ancestral", "uniform", False),
    "Euler": ("sample_euler", "uniform", False),
    "LMS": ("sample_lms", "uniform", False),
    "Heun": ("sample_heun", "uniform", False),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", True),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", True),
    # Restart (sd_samplers_extra) under 20 steps makes no restart: Heun (Euler into sigma 0) over Karras sigmas
    "Restart": ("sample_heun", "karras", False),
}


@pytest.fixture(scope="module")
def pipes(m9_folder):
    return altdiff.load(str(m9_folder), safety_checker=False), tiny.load_reference(m9_folder)


class _LDM(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser wraps: apply_model(x, t, cond) and the ldm alphas_cumprod."""

    def __init__(self, unet, config):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5,
                               config["num_train_timesteps"], dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


def _webui_reference(ref, pipe, label, seeds, *, prompt=PROMPT, negative=NEGATIVE, scale=7.0,
                     ensd=0, schedule=None):
    """The webui's txt2img for `label` (Automatic schedule unless `schedule`): final latents and uint8 images."""
    name, automatic, discard = GRID[label]
    schedule = schedule or automatic
    n = len(seeds)
    with torch.no_grad():
        cond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [prompt] * n, pipe.device)
        uncond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [negative] * n, pipe.device)
        model = external.CompVisDenoiser(_LDM(ref.unet, ref.scheduler.config))
        n_sigmas = STEPS + 1 if discard else STEPS
        if schedule == "uniform":
            sigmas = model.get_sigmas(n_sigmas)
        else:
            kw = dict(n=n_sigmas, sigma_min=model.sigmas[0].item(), sigma_max=model.sigmas[-1].item())
            sigmas = getattr(sampling, f"get_sigmas_{schedule}")(**kw)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        shape = (4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators])
        if ensd:
            generators = [torch.Generator().manual_seed(s + ensd) for s in seeds]

        def cfg(x, sigma, **_):
            out = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            c, u = out[:n], out[n:]
            return u + (c - u) * scale

        class Hijack:
            def __getattr__(self, item):
                return getattr(torch, item)

            @staticmethod
            def randn_like(x):
                return torch.stack([torch.randn(shape, generator=g) for g in generators])

        saved, sampling.torch = sampling.torch, Hijack()
        try:
            function = getattr(sampling, name)
            kwargs = {}
            if "sde" in name:  # the brownian_noise samplers
                kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
                    x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(seeds))
            latents = function(cfg, x * sigmas[0], sigmas, disable=True, **kwargs)
        finally:
            sampling.torch = saved
        # altdiff's VAE (equal to diffusers' within ~4e-6, tests/test_vae.py): the webui's truncation would turn
        # that float noise into a rare 1-level flip; this compares the sampling and the conversion exactly.
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        images = np.stack([(255.0 * np.moveaxis(d.numpy(), 0, 2)).astype(np.uint8)
                           for d in torch.clamp((decoded + 1.0) / 2.0, 0, 1)])
    return latents, images


def _altdiff(pipe, label, seeds, **kw):
    latents = altdiff.generate(PROMPT, model=pipe, negative_prompt=NEGATIVE, sampler=label,
                               num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE, height=SIZE,
                               seed=list(seeds), num_images_per_prompt=len(seeds), output_type="latent",
                               progress=False, **kw).images
    images = altdiff.generate(PROMPT, model=pipe, negative_prompt=NEGATIVE, sampler=label,
                              num_inference_steps=STEPS, guidance_scale=7.0, width=SIZE, height=SIZE,
                              seed=list(seeds), num_images_per_prompt=len(seeds), progress=False, **kw)
    return latents, np.stack([np.asarray(i) for i in images.images]), images.infotexts


@pytest.mark.parametrize("label", list(GRID))
def test_every_sampler_equals_the_webui_recipe(pipes, label):
    pipe, ref = pipes
    seeds = [1234, 99]
    ref_latents, ref_images = _webui_reference(ref, pipe, label, seeds)
    latents, images, texts = _altdiff(pipe, label, seeds)
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    # LMS: k-diffusion integrates its coefficients with scipy's quad, altdiff exactly (1e-7 relative apart),
    # which the truncating conversion can turn into a 1-level flip. Every other sampler is exact.
    tolerance = 1 if label == "LMS" else 0
    assert np.abs(images.astype(int) - ref_images.astype(int)).max() <= tolerance
    assert f"Sampler: {label}," in texts[0] and "Seed: 1234," in texts[0] and "Seed: 99," in texts[1]


def test_the_prompt_and_seed_move_the_image(pipes):
    """The equalities above could not hold by accident: another prompt or seed moves the image by many
    levels."""
    pipe, ref = pipes
    _, base, _ = _altdiff(pipe, "Euler a", [1234])
    _, other = _webui_reference(ref, pipe, "Euler a", [1234], prompt="un chat portant un chapeau")
    _, other_seed = _webui_reference(ref, pipe, "Euler a", [5])
    assert np.abs(base.astype(int) - other.astype(int)).max() > 30
    assert np.abs(base.astype(int) - other_seed.astype(int)).max() > 30


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_schedule_types(pipes, schedule):
    pipe, ref = pipes
    ref_latents, _ = _webui_reference(ref, pipe, "Euler", [7], schedule=schedule)
    latents, _, texts = _altdiff(pipe, "Euler", [7], scheduler=schedule.capitalize())
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    assert f"Schedule type: {schedule.capitalize()}" in texts[0]


def test_ensd_reseeds_the_ancestral_noise(pipes):
    pipe, ref = pipes
    ref_latents, _ = _webui_reference(ref, pipe, "Euler a", [1234], ensd=31337)
    latents, _, texts = _altdiff(pipe, "Euler a", [1234], eta_noise_seed_delta=31337)
    plain, _, _ = _altdiff(pipe, "Euler a", [1234])
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    assert (latents - plain).abs().max().item() > 1e-2
    assert "ENSD: 31337" in texts[0]


def test_old_sampler_names_and_int_seeds_count_up(pipes):
    pipe, _ = pipes
    old = altdiff.generate(PROMPT, model=pipe, sampler="DPM++ 2M Karras", num_inference_steps=STEPS,
                           width=SIZE, height=SIZE, seed=5, num_images_per_prompt=2, output_type="latent",
                           progress=False)
    new = altdiff.generate(PROMPT, model=pipe, sampler="DPM++ 2M", scheduler="Karras",
                           num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=[5, 6],
                           num_images_per_prompt=2, output_type="latent", progress=False)
    assert torch.equal(old.images, new.images)
    assert "Seed: 6," in old.infotexts[1]


def test_variation_seeds_with_ancestral_and_sde_samplers_repeat(pipes):
    """Two identical calls give identical images: every draw comes from the images' generators (the bug: an
    ancestral sampler with variation seeds drew from torch's global RNG)."""
    pipe, _ = pipes
    for label in ("Euler a", "DPM++ 2M SDE"):
        runs = [altdiff.generate(PROMPT, model=pipe, sampler=label, num_inference_steps=STEPS, width=SIZE,
                                 height=SIZE, seed=3, subseed=8, subseed_strength=0.4, output_type="latent",
                                 progress=False) for _ in range(2)]
        torch.manual_seed(len(label))  # the global RNG must not matter
        assert torch.equal(runs[0].images, runs[1].images)
        assert "Variation seed: 8, Variation seed strength: 0.4" in runs[0].infotexts[0]


def test_long_prompt_and_short_negative_run_separate_calls(pipes):
    """A 4-chunk prompt with a 1-chunk negative prompt: the webui runs cond and uncond as separate UNet calls
    instead of padding the negative prompt."""
    pipe, ref = pipes
    long_prompt = ", ".join(["a cat wearing a hat"] * 40)
    assert pipe.tokenizer and len(prompts.tokenize_chunks(pipe.tokenizer, long_prompt)) >= 4
    calls = []
    unet = pipe.unet

    def spy(module, args, kwargs, out):
        calls.append(args[0].shape[0])

    handle = unet.register_forward_hook(spy, with_kwargs=True)
    try:
        altdiff.generate(long_prompt, model=pipe, sampler="Euler", num_inference_steps=2, width=SIZE,
                         height=SIZE, seed=1, output_type="latent", progress=False)
    finally:
        handle.remove()
    assert calls == [1, 1, 1, 1]  # per step: cond, then uncond


def test_infotext_round_trip(pipes, tmp_path):
    pipe, _ = pipes
    result = altdiff.generate(PROMPT, model=pipe, negative_prompt=NEGATIVE, sampler="DPM++ 2S a",
                              num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=42, rng="NV",
                              eta_noise_seed_delta=31337, progress=False)
    path = tmp_path / "image.png"
    from altdiff.images import save_png
    save_png(result.images[0], path, result.infotexts[0])
    again = altdiff.generate(infotext=str(path), model=pipe, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    assert again.infotexts[0] == result.infotexts[0]
    assert "RNG: NV" in result.infotexts[0] and "ENSD: 31337" in result.infotexts[0]
    prompt, negative, params = infotext.parse(result.infotexts[0])
    assert (prompt, negative, params["Sampler"]) == (PROMPT, NEGATIVE, "DPM++ 2S a")


def test_errors_name_the_argument(pipes):
    pipe, _ = pipes
    cases = [(dict(sampler="Euler a", generator=torch.Generator()), "generator"),
             (dict(sampler="No such sampler", family="webui"), "sampler"),
             (dict(sampler="Euler", scheduler="Nope"), "scheduler"),
             (dict(sampler="Euler", rng="TPU"), "rng"),
             (dict(family="other"), "family"),
             (dict(sampler="Euler", guidance_rescale=0.5), "guidance_rescale"),
             # before: an infinite weight made an all-black image; a megabyte prompt held the pipeline
             (dict(sampler="Euler", prompt="(cat:" + "9" * 400 + ")"), "prompt: the emphasis weight"),
             (dict(sampler="Euler", prompt="a cat AND a dog:" + "9" * 400), "prompt: the AND weight"),
             (dict(sampler="Euler", prompt="x" * 20000), "prompt: 20000 characters"),
             (dict(sampler="euler", a1111_prompts=True, prompt="(((x:" + "9" * 20 + "):" + "9" * 20 + "):" + "9" * 20 + ")"),
              "prompt: the emphasis weight"),
             (dict(sampler="Euler", negative_prompt="y" * 20000), "negative_prompt: 20000")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            altdiff.generate(kwargs.pop("prompt", PROMPT), model=pipe, num_inference_steps=2, width=SIZE,
                             height=SIZE, progress=False, **kwargs)


def test_clip_skip_is_recorded_not_applied_as_the_webui_does_for_xlmr(pipes):
    """The webui's XLM-R encoder (sd_hijack_xlmr.py) has no CLIP skip: the setting changes no pixel, and its
    infotext records it ("Clip skip": the layer stopped at, generate()'s clip_skip + 1)."""
    pipe, _ = pipes
    kw = dict(model=pipe, sampler="Euler", num_inference_steps=2, width=SIZE, height=SIZE, seed=1, progress=False)
    plain = altdiff.generate(PROMPT, **kw)
    skipped = altdiff.generate(PROMPT, clip_skip=1, **kw)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(skipped.images[0]))
    assert "Clip skip: 2," in skipped.infotexts[0] and "Clip skip" not in plain.infotexts[0]
    again = altdiff.generate(infotext=skipped.infotexts[0], model=pipe, progress=False)
    assert again.infotexts[0] == skipped.infotexts[0]
    diffusers_family = altdiff.generate(PROMPT, clip_skip=1, model=pipe, sampler="euler", num_inference_steps=2,
                                        width=SIZE, height=SIZE, seed=1, output_type="latent", progress=False)
    plain_diffusers = altdiff.generate(PROMPT, model=pipe, sampler="euler", num_inference_steps=2, width=SIZE,
                                       height=SIZE, seed=1, output_type="latent", progress=False)
    assert (diffusers_family.images - plain_diffusers.images).abs().max() > 1e-3  # applied there


def test_diffusers_names_keep_the_diffusers_family(pipes):
    """sampler="euler_a" (altdiff's diffusers-family name) stays diffusers: equal to an explicit family."""
    pipe, _ = pipes
    a = altdiff.generate(PROMPT, model=pipe, sampler="euler_a", num_inference_steps=2, width=SIZE, height=SIZE,
                         seed=1, output_type="latent", progress=False)
    b = altdiff.generate(PROMPT, model=pipe, sampler="euler_a", family="diffusers", num_inference_steps=2,
                         width=SIZE, height=SIZE, seed=1, output_type="latent", progress=False)
    assert torch.equal(a.images, b.images) and a.infotexts == []


def test_prompt_editing_switches_conditioning_mid_run(pipes):
    """`[a:b:2]` (the webui wiki's "Prompt editing"): a until step 2, then b. The webui's schedule is
    [[2, a], [4, b]] and its CFG denoiser counts calls from 0, using a while the count is <= 2: a for calls
    0-2, b after. Against the recipe with exactly that conditioning per call."""
    pipe, ref = pipes
    a, b = "a cat wearing a hat", "un chat portant un chapeau"
    edited = altdiff.generate(f"[{a}:{b}:2]", model=pipe, sampler="Euler", num_inference_steps=4, width=SIZE,
                              height=SIZE, seed=3, output_type="latent", progress=False).images
    only_a = altdiff.generate(a, model=pipe, sampler="Euler", num_inference_steps=4, width=SIZE, height=SIZE,
                              seed=3, output_type="latent", progress=False).images
    only_b = altdiff.generate(b, model=pipe, sampler="Euler", num_inference_steps=4, width=SIZE, height=SIZE,
                              seed=3, output_type="latent", progress=False).images
    assert (edited - only_a).abs().max() > 1e-2 and (edited - only_b).abs().max() > 1e-2
    with torch.no_grad():
        # One encoder call for both texts (the emphasis mean is over both), as the webui encodes a schedule.
        both = prompts.encode(pipe.tokenizer, pipe.text_encoder, [a, b], pipe.device, joint_mean=True)
        uncond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [""], pipe.device)
        model = external.CompVisDenoiser(_LDM(ref.unet, ref.scheduler.config))
        sigmas = model.get_sigmas(4)
        x = torch.randn((1, 4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor),
                        generator=torch.Generator().manual_seed(3))
        calls = []

        def cfg(x, sigma, **_):
            cond = both[0:1] if len(calls) <= 2 else both[1:2]
            calls.append(1)
            out = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            return out[1:] + (out[:1] - out[1:]) * 7.5

        expected = sampling.sample_euler(cfg, x * sigmas[0], sigmas, disable=True)
    assert (edited - expected).abs().max().item() <= 1e-4


def _euler_reference(ref, pipe, cond_at, combine, seed=3, steps=4):
    """k-diffusion's Euler with a CFG denoiser whose conditioning for call k is cond_at(k) (rows: the
    sub-prompts, then the uncond) and whose rows are combined by combine(out)."""
    with torch.no_grad():
        model = external.CompVisDenoiser(_LDM(ref.unet, ref.scheduler.config))
        sigmas = model.get_sigmas(steps)
        x = torch.randn((1, 4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor),
                        generator=torch.Generator().manual_seed(seed))
        calls = []

        def cfg(x, sigma, **_):
            cond = cond_at(len(calls))
            calls.append(1)
            n = cond.shape[0]
            return combine(model(x.expand(n, -1, -1, -1), sigma.expand(n), cond=cond))

        return sampling.sample_euler(cfg, x * sigmas[0], sigmas, disable=True)


def _webui_latents(pipe, prompt, steps=4):
    return altdiff.generate(prompt, model=pipe, sampler="Euler", num_inference_steps=steps, width=SIZE,
                            height=SIZE, seed=3, output_type="latent", progress=False).images


def test_alternation_changes_the_text_every_step(pipes):
    """`[cat|dog] in a hat` (the webui wiki's "Alternating words"): the schedule is cat, dog, cat, dog for
    steps 1-4, and the webui's denoiser counts calls from 0 and takes the first entry ending at or after the
    count: cat, cat, dog, cat. Both texts come from one encoder call."""
    pipe, ref = pipes
    with torch.no_grad():
        both = prompts.encode(pipe.tokenizer, pipe.text_encoder, ["cat in a hat", "dog in a hat"], pipe.device,
                              joint_mean=True)
        uncond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [""], pipe.device)
    row = [0, 0, 1, 0]
    expected = _euler_reference(ref, pipe, lambda k: torch.cat([both[row[k]:row[k] + 1], uncond]),
                                lambda out: out[1:] + (out[:1] - out[1:]) * 7.5)
    latents = _webui_latents(pipe, "[cat|dog] in a hat")
    assert (latents - expected).abs().max().item() <= 1e-4
    assert (latents - _webui_latents(pipe, "cat in a hat")).abs().max() > 1e-2


def test_and_combines_weighted_sub_prompts(pipes):
    """`a cat AND a dog:0.5` (the webui wiki's "Composable diffusion"): one UNet call over both sub-prompts and
    the uncond; denoised = u + 7.5 * (1.0 * (cat - u) + 0.5 * (dog - u)), in the webui's order of sums."""
    pipe, ref = pipes
    with torch.no_grad():
        enc = [prompts.encode(pipe.tokenizer, pipe.text_encoder, [t], pipe.device) for t in ("a cat", "a dog", "")]

    def combine(out):
        u = out[2:3]
        denoised = u.clone()
        denoised += (out[0:1] - u) * (1.0 * 7.5)
        denoised += (out[1:2] - u) * (0.5 * 7.5)
        return denoised

    expected = _euler_reference(ref, pipe, lambda k: torch.cat(enc), combine)
    latents = _webui_latents(pipe, "a cat AND a dog:0.5")
    assert (latents - expected).abs().max().item() <= 1e-4
    assert (latents - _webui_latents(pipe, "a cat AND a dog:1.5")).abs().max() > 1e-2


def test_nested_constructs_and_bad_syntax_run(pipes):
    """A nested edit inside alternation, and bad syntax (read as literal text, as the webui does) make images
    without crashing; their schedules are checked against lark in tests/test_conditioning.py."""
    pipe, _ = pipes
    nested = _webui_latents(pipe, "a [cat:[dog|bird]:2] in a hat")
    assert torch.isfinite(nested).all()
    assert torch.isfinite(_webui_latents(pipe, "a [cat:dog:x] (unclosed [ in a hat")).all()


def test_ddim_and_plms_make_the_webuis_number_of_unet_calls(pipes):
    """The webui's DDIM walks range(0, 1000, 1000 // steps) + 1, one UNet call per interval: 19 at 20 steps
    (diffusers makes 20; at 30 steps the range has 31 entries, so 30 calls); PLMS one more for its first step
    (sd_samplers_timesteps_impl.py).
    DDIM with eta 1 draws each step's noise from the images' generators: repeatable, and unlike eta 0."""
    pipe, _ = pipes
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        ddim = altdiff.generate(PROMPT, model=pipe, sampler="DDIM", num_inference_steps=20, width=SIZE,
                                height=SIZE, seed=4, output_type="latent", progress=False)
        n_ddim, calls[:] = len(calls), []
        altdiff.generate(PROMPT, model=pipe, sampler="PLMS", num_inference_steps=10, width=SIZE, height=SIZE,
                         seed=4, output_type="latent", progress=False)
        n_plms = len(calls)
    finally:
        handle.remove()
    assert (n_ddim, n_plms) == (19, 10)
    eta = [altdiff.generate(PROMPT, model=pipe, sampler="DDIM", num_inference_steps=5, width=SIZE, height=SIZE,
                            seed=4, eta=1.0, output_type="latent", progress=False) for _ in range(2)]
    plain = altdiff.generate(PROMPT, model=pipe, sampler="DDIM", num_inference_steps=5, width=SIZE, height=SIZE,
                             seed=4, output_type="latent", progress=False)
    assert torch.equal(eta[0].images, eta[1].images) and (eta[0].images - plain.images).abs().max() > 1e-2
    assert "Eta DDIM: 1.0" in eta[0].infotexts[0] and ddim.infotexts[0].count("Sampler: DDIM,") == 1


def test_ddim_cfgpp_and_lcm_run_in_the_webui_family(pipes):
    """DDIM CFG++ makes DDIM's UNet calls with the guidance scaled by 1/12.5 and the unconditional eps for the
    direction back (its function is checked in tests/test_timestep_samplers.py); LCM runs over its own
    denoiser and schedule (tests/test_k_samplers.py), one call per step."""
    pipe, _ = pipes
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    kw = dict(model=pipe, num_inference_steps=5, width=SIZE, height=SIZE, seed=4, output_type="latent",
              progress=False)
    try:
        ddim = altdiff.generate(PROMPT, sampler="DDIM", **kw).images
        n_ddim, calls[:] = len(calls), []
        cfgpp = altdiff.generate(PROMPT, sampler="DDIM CFG++", **kw)
        n_cfgpp, calls[:] = len(calls), []
        lcm = altdiff.generate(PROMPT, sampler="LCM", **kw)
        n_lcm = len(calls)
    finally:
        handle.remove()
    assert n_cfgpp == n_ddim and n_lcm == 5
    assert (cfgpp.images - ddim).abs().max() > 1e-2 and (lcm.images - ddim).abs().max() > 1e-2
    assert "Sampler: DDIM CFG++," in cfgpp.infotexts[0] and "Sampler: LCM," in lcm.infotexts[0]
    karras = altdiff.generate(PROMPT, sampler="LCM", scheduler="Karras", **kw)
    assert (karras.images - lcm.images).abs().max() > 1e-3
    with pytest.raises(ValueError, match="scheduler"):
        altdiff.generate(PROMPT, sampler="LCM", scheduler="SGM Uniform", **kw)


def test_unipc_equals_diffusers_unipc_where_their_steps_agree(pipes):
    """The webui's UniPC (sd_samplers_timesteps_impl.unipc: bh1, order 3, lower order final, time-uniform)
    walks t = 1 .. 1/1000 in len(timesteps) equal steps, calling the model at (t - 1/1000) * 1000. At 26 webui
    steps range(0, 1000, 38) has 27 entries, so the model times are 999 * (1 - k/27): the integer timesteps
    999, 962, ..., 37 and a last step to t = 0, exactly where diffusers' UniPCMultistepScheduler (bh1, order
    3, lower_order_final, linspace spacing, final sigma = sigma_min) steps with the same UniP/UniC updates."""
    from diffusers import UniPCMultistepScheduler

    pipe, ref = pipes
    latents = altdiff.generate(PROMPT, model=pipe, negative_prompt=NEGATIVE, sampler="UniPC", num_inference_steps=26,
                               guidance_scale=7.0, width=SIZE, height=SIZE, seed=5, output_type="latent",
                               progress=False)
    with torch.no_grad():
        cond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [PROMPT], pipe.device)
        uncond = prompts.encode(pipe.tokenizer, pipe.text_encoder, [NEGATIVE], pipe.device)

    def diffusers_unipc(solver_type):
        scheduler = UniPCMultistepScheduler.from_config(
            ref.scheduler.config, solver_order=3, solver_type=solver_type, lower_order_final=True,
            predict_x0=True, timestep_spacing="linspace", final_sigmas_type="sigma_min", prediction_type="epsilon")
        scheduler.set_timesteps(27)
        assert scheduler.timesteps.tolist() == [999 - 37 * k for k in range(27)]
        x = torch.randn((1, 4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor),
                        generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = ref.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
                x = scheduler.step(out[1:] + (out[:1] - out[1:]) * 7.0, t, x).prev_sample
        return x

    expected = diffusers_unipc("bh1")
    # diffusers takes alpha, sigma and lambda from its float32 alphas_cumprod, the webui's UniPC from the
    # interpolated log-alpha of the model's: float rounding over 27 steps of a random model whose latents
    # reach |75|. Relative 2e-5 (measured 1.1e-5); bh2 instead of bh1 is ~0.6 away.
    tolerance = 2e-5 * expected.abs().max().item()
    assert (latents.images - expected).abs().max().item() <= tolerance
    assert (diffusers_unipc("bh2") - expected).abs().max().item() > 100 * tolerance
    assert "Sampler: UniPC," in latents.infotexts[0]
    ddim = altdiff.generate(PROMPT, model=pipe, negative_prompt=NEGATIVE, sampler="DDIM", num_inference_steps=26,
                            guidance_scale=7.0, width=SIZE, height=SIZE, seed=5, output_type="latent",
                            progress=False).images
    assert (latents.images - ddim).abs().max() > 1e-2
    with pytest.raises(ValueError, match="num_inference_steps"):
        altdiff.generate(PROMPT, model=pipe, sampler="UniPC", num_inference_steps=2, width=SIZE, height=SIZE,
                         progress=False)


def test_unipc_img2img_starts_at_the_strengths_timestep(pipes):
    """sample_img2img with UniPC (is_img2img): the solver starts just above timesteps[t_enc - 1] and makes
    one model call per step of the t_enc it runs."""
    pipe, _ = pipes
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out = altdiff.generate(PROMPT, model=pipe, image=image, strength=0.5, sampler="UniPC",
                               num_inference_steps=10, seed=2, output_type="latent", progress=False)
    finally:
        handle.remove()
    assert len(calls) == 5 and torch.isfinite(out.images).all()
    assert "Denoising strength: 0.5" in out.infotexts[0]


@pytest.mark.parametrize("label", [row["name"] for row in webui.samplers_list()])
def test_every_sampler_round_trips_through_its_infotext(pipes, label):
    """image -> its infotext -> generate(infotext=...) -> the same pixels, for each of the webui's samplers."""
    pipe, _ = pipes
    made = altdiff.generate(PROMPT, model=pipe, negative_prompt=NEGATIVE, sampler=label, num_inference_steps=4,
                            width=SIZE, height=SIZE, seed=31, progress=False)
    again = altdiff.generate(infotext=made.infotexts[0], model=pipe, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(made.images[0]))
    assert again.infotexts == made.infotexts and f"Sampler: {label}," in made.infotexts[0]
