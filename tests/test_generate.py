"""generate(): same arguments and generator as diffusers' AltDiffusion pipelines → the same image.

The tiny fixtures are made prompt-sensitive (tests/tiny.py), and `test_prompt_moves_image` proves it, so an
equality below would fail if the text path, negative prompt or guidance were wrong."""

import numpy as np
import PIL.Image
import pytest
import tiny
import torch
from diffusers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler

import altdiff

PROMPT = "一只戴着帽子的猫"
STEPS = 4


@pytest.fixture(scope="session")
def alt_pipes(m9_folder, m18_folder):
    return {"m9": altdiff.load(m9_folder, device="cpu", dtype=torch.float32),
            "m18": altdiff.load(m18_folder, device="cpu", dtype=torch.float32)}


@pytest.fixture(scope="session")
def ref_pipes(m9_folder, m18_folder):
    cache = {}
    folders = {"m9": m9_folder, "m18": m18_folder}

    def get(variant="m9", scheduler_cls=PNDMScheduler):
        key = (variant, scheduler_cls)
        if key not in cache:
            cache[key] = tiny.load_reference(folders[variant], scheduler_cls)
        return cache[key]
    return get


def gen(seed=0, n=None):
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def to_uint8(images):
    return (np.asarray(images, dtype=np.float64) * 255).round()


def assert_same_images(alt, ref, levels=1):
    assert alt.shape == ref.shape
    diff = np.abs(to_uint8(alt) - to_uint8(ref)).max()
    print(f"max image difference vs diffusers: {diff:.0f} uint8 levels")
    assert diff <= levels, f"images differ by {diff} uint8 levels"
    return diff


def both(ref_pipes, alt_pipes, variant="m9", scheduler_cls=PNDMScheduler, sampler=None, make_gen=gen,
         **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    ref = ref_pipes(variant, scheduler_cls)(generator=make_gen(), **kwargs)
    alt = alt_pipes[variant].generate(generator=make_gen(), sampler=sampler, progress=False, **kwargs)
    return alt, ref


def test_prompt_moves_image(alt_pipes):
    """Sensitivity guard: with these fixtures a different prompt changes the image by many levels."""
    a = alt_pipes["m9"].generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                                 progress=False).images
    b = alt_pipes["m9"].generate("a photograph of an astronaut", generator=gen(), num_inference_steps=STEPS,
                                 output_type="np", progress=False).images
    assert np.abs(to_uint8(a) - to_uint8(b)).max() > 30
    c = alt_pipes["m9"].generate(PROMPT, negative_prompt="кошка", generator=gen(), num_inference_steps=STEPS,
                                 output_type="np", progress=False).images
    assert np.abs(to_uint8(a) - to_uint8(c)).max() > 30


@pytest.mark.parametrize("scheduler_cls,sampler,extra", [
    (PNDMScheduler, None, {}),
    (DDIMScheduler, "ddim", {"eta": 0.0}),
    (DDIMScheduler, "ddim", {"eta": 0.5}),
    (LMSDiscreteScheduler, "lms", {}),
])
def test_text_to_image_matches_diffusers(ref_pipes, alt_pipes, scheduler_cls, sampler, extra):
    alt, ref = both(ref_pipes, alt_pipes, scheduler_cls=scheduler_cls, sampler=sampler, prompt=PROMPT, **extra)
    assert_same_images(alt.images, ref.images)
    assert alt.nsfw_content_detected == ref.nsfw_content_detected


def test_latents_within_1e4(ref_pipes, alt_pipes):
    alt, ref = both(ref_pipes, alt_pipes, prompt=PROMPT, output_type="latent")
    assert torch.allclose(alt.images, ref.images, atol=1e-4, rtol=0)
    assert alt.nsfw_content_detected is None


def test_batch_of_prompts_with_generator_list_and_negatives(ref_pipes, alt_pipes):
    kwargs = dict(prompt=[PROMPT, "a cat wearing a hat"], negative_prompt=["ugly", "кошка"],
                  num_images_per_prompt=2, make_gen=lambda: gen(3, 4))
    alt, ref = both(ref_pipes, alt_pipes, **kwargs)
    assert alt.images.shape[0] == 4
    assert_same_images(alt.images, ref.images)


@pytest.mark.parametrize("kwargs", [
    {"guidance_rescale": 0.7},
    {"guidance_scale": 1.0},
    {"negative_prompt": "低质量"},
    {"clip_skip": None, "guidance_scale": 3.0},
], ids=["rescale", "no-cfg", "negative", "cfg3"])
def test_guidance_variants(ref_pipes, alt_pipes, kwargs):
    alt, ref = both(ref_pipes, alt_pipes, prompt=PROMPT, **kwargs)
    assert_same_images(alt.images, ref.images)


def test_prompt_embeds_given(ref_pipes, alt_pipes):
    ref_pipe = ref_pipes()
    embeds, negative = ref_pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="ugly")
    alt_embeds, alt_negative = alt_pipes["m9"].encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="ugly")
    assert torch.allclose(embeds, alt_embeds, atol=1e-5) and torch.allclose(negative, alt_negative, atol=1e-5)
    alt, ref = both(ref_pipes, alt_pipes, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert_same_images(alt.images, ref.images)


def test_freeu(ref_pipes, alt_pipes):
    ref_pipe, alt_pipe = ref_pipes(), alt_pipes["m9"]
    ref_pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    alt_pipe.enable_freeu(0.9, 0.2, 1.2, 1.4)
    try:
        alt, ref = both(ref_pipes, alt_pipes, prompt=PROMPT)
        plain = alt_pipe.generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                                  progress=False, sampler=None)
    finally:
        ref_pipe.disable_freeu()
        alt_pipe.disable_freeu()
    assert_same_images(alt.images, ref.images)
    unfree = alt_pipe.generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                               progress=False)
    assert np.abs(to_uint8(plain.images) - to_uint8(unfree.images)).max() > 1  # FreeU really acted


def test_vae_tiling(ref_pipes, alt_pipes):
    ref_pipe, alt_pipe = ref_pipes(), alt_pipes["m9"]
    ref_pipe.enable_vae_tiling()
    alt_pipe.enable_vae_tiling()
    try:  # 64x48 pixels = 32x24 latents > the tiny VAE's 16-latent tiles: several overlapping tiles
        alt, ref = both(ref_pipes, alt_pipes, prompt=PROMPT, height=64, width=48)
    finally:
        ref_pipe.disable_vae_tiling()
        alt_pipe.disable_vae_tiling()
    assert alt.images.shape == (1, 64, 48, 3)
    assert_same_images(alt.images, ref.images)


def test_m18_model(ref_pipes, alt_pipes):
    alt, ref = both(ref_pipes, alt_pipes, variant="m18", prompt=[PROMPT, "une femme"], make_gen=lambda: gen(5, 2))
    assert_same_images(alt.images, ref.images)


def test_pil_output_and_tuple_return(ref_pipes, alt_pipes):
    alt, ref = both(ref_pipes, alt_pipes, prompt=PROMPT, output_type="pil", return_dict=False)
    (alt_images, alt_nsfw), (ref_images, ref_nsfw) = alt, ref
    assert isinstance(alt_images[0], PIL.Image.Image) and alt_images[0].size == (32, 32)
    diff = np.abs(np.asarray(alt_images[0], dtype=int) - np.asarray(ref_images[0], dtype=int)).max()
    assert diff <= 1 and alt_nsfw == ref_nsfw


# --- img2img --------------------------------------------------------------------------------------------

def _init_image():
    rng = np.random.default_rng(0)
    return rng.random((32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def ref_img2img(m9_folder):
    from diffusers import AltDiffusionImg2ImgPipeline
    cache = {}

    def get(scheduler_cls=PNDMScheduler):
        if scheduler_cls not in cache:
            t2i = tiny.load_reference(m9_folder, scheduler_cls)
            cache[scheduler_cls] = AltDiffusionImg2ImgPipeline(**t2i.components)
            cache[scheduler_cls].set_progress_bar_config(disable=True)
        return cache[scheduler_cls]
    return get


@pytest.mark.parametrize("kind", ["pil", "np", "latents"])
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_img2img_matches_diffusers(ref_img2img, alt_pipes, kind, strength):
    arr = _init_image()
    if kind == "pil":
        image = PIL.Image.fromarray((arr * 255).round().astype(np.uint8))
    elif kind == "np":
        image = arr
    else:
        image = torch.randn(1, 4, 16, 16, generator=gen(11))  # the tiny VAE's latent size for 32x32
    kwargs = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=10, output_type="np")
    ref = ref_img2img()(generator=gen(), **kwargs)
    alt = alt_pipes["m9"].generate(generator=gen(), progress=False, **kwargs)
    assert_same_images(alt.images, ref.images)


@pytest.mark.parametrize("scheduler_cls,sampler,eta", [(DDIMScheduler, "ddim", 0.5), (LMSDiscreteScheduler, "lms", 0)])
def test_img2img_samplers_and_generator_list(ref_img2img, alt_pipes, scheduler_cls, sampler, eta):
    arr = _init_image()
    kwargs = dict(prompt=[PROMPT, "a hat"], image=[arr, arr[::-1].copy()], strength=0.6, num_inference_steps=8,
                  output_type="np", eta=eta)
    ref = ref_img2img(scheduler_cls)(generator=gen(7, 2), **kwargs)
    alt = alt_pipes["m9"].generate(generator=gen(7, 2), sampler=sampler, progress=False, **kwargs)
    assert_same_images(alt.images, ref.images)


# --- callbacks, safety ----------------------------------------------------------------------------------

def test_callback_on_step_end_sees_every_step_and_changes_latents(ref_pipes, alt_pipes):
    def make_callback(log):
        def callback(pipe, i, t, kwargs):
            log.append((i, int(t)))
            return {"latents": kwargs["latents"] * 0.9} if i == 1 else {}
        return callback

    ref_log, alt_log = [], []
    ref = ref_pipes()(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                      callback_on_step_end=make_callback(ref_log))
    alt = alt_pipes["m9"].generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                                   callback_on_step_end=make_callback(alt_log), progress=False)
    assert alt_log == ref_log and len(alt_log) == STEPS + 1  # PNDM: N steps, N+1 UNet calls
    assert_same_images(alt.images, ref.images)
    plain = alt_pipes["m9"].generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                                     progress=False)
    assert np.abs(to_uint8(plain.images) - to_uint8(alt.images)).max() > 1


def test_interrupt_from_callback_decodes_the_latents_it_has(ref_pipes, alt_pipes):
    """`pipe._interrupt = True` in a callback (diffusers' convention) ends sampling after that step; the
    image is the decode of the latents at that step, as diffusers' VAE and image processor make it."""
    stop, seen = 2, {}

    def capture(pipe, i, t, kwargs):
        if i == stop:
            seen["latents"] = kwargs["latents"].clone()
        return {}
    ref = ref_pipes()
    ref(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="latent", callback_on_step_end=capture)
    with torch.no_grad():
        decoded = ref.vae.decode(seen["latents"] / ref.vae.config.scaling_factor).sample
    expected = ref.image_processor.postprocess(decoded, output_type="np")
    calls = []

    def interrupt(pipe, i, t, kwargs):
        calls.append(i)
        pipe._interrupt = i == stop
        return {}
    pipe = alt_pipes["m9"]
    alt = pipe.generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                        callback_on_step_end=interrupt, progress=False)
    assert calls == list(range(stop + 1)) and alt.nsfw_content_detected == [False]
    assert_same_images(alt.images, expected)
    full = pipe.generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np", progress=False)
    assert np.abs(to_uint8(full.images) - to_uint8(alt.images)).max() > 1  # the next call runs every step


def test_legacy_callback_and_callback_steps_match_diffusers(ref_pipes, alt_pipes):
    ref_log, alt_log = [], []
    ref_pipes()(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np", callback_steps=2,
                callback=lambda i, t, latents: ref_log.append((i, int(t), latents.sum().item())))
    alt_pipes["m9"].generate(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="np",
                             callback_steps=2, progress=False,
                             callback=lambda i, t, latents: alt_log.append((i, int(t), latents.sum().item())))
    assert [e[:2] for e in alt_log] == [e[:2] for e in ref_log] and len(ref_log) >= 2
    assert np.allclose([e[2] for e in alt_log], [e[2] for e in ref_log], rtol=1e-5)


def test_callback_returning_nan_latents_is_an_error(alt_pipes):
    def poison(pipe, i, t, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], float("nan"))}
    with pytest.raises(ValueError, match="callback_on_step_end"):
        alt_pipes["m9"].generate(PROMPT, num_inference_steps=2, callback_on_step_end=poison, progress=False)


def test_nsfw_flag_blackens_images(ref_pipes, alt_pipes):
    ref_pipe, alt_pipe = ref_pipes(), alt_pipes["m9"]
    ref_w = ref_pipe.safety_checker.concept_embeds_weights.clone()
    alt_w = alt_pipe.safety_checker.concept_embeds_weights.clone()
    with torch.no_grad():  # a threshold every image exceeds
        ref_pipe.safety_checker.concept_embeds_weights.fill_(-10.0)
        alt_pipe.safety_checker.concept_embeds_weights.fill_(-10.0)
    try:
        alt, ref = both(ref_pipes, alt_pipes, prompt=[PROMPT, "x"], make_gen=lambda: gen(0, 2))
    finally:
        with torch.no_grad():
            ref_pipe.safety_checker.concept_embeds_weights.copy_(ref_w)
            alt_pipe.safety_checker.concept_embeds_weights.copy_(alt_w)
    assert alt.nsfw_content_detected == ref.nsfw_content_detected == [True, True]
    assert alt.images.max() == 0


def test_safety_checker_off(m9_folder):
    pipe = altdiff.load(m9_folder, device="cpu", safety_checker=None)
    res = pipe.generate(PROMPT, num_inference_steps=2, seed=1, progress=False)
    assert pipe.safety_checker is None and res.nsfw_content_detected is None


def test_seed_equals_cpu_generator(alt_pipes):
    a = alt_pipes["m9"].generate(PROMPT, seed=42, num_inference_steps=2, output_type="np", progress=False)
    b = alt_pipes["m9"].generate(PROMPT, generator=gen(42), num_inference_steps=2, output_type="np",
                                 progress=False)
    assert np.array_equal(a.images, b.images)


def test_guidance_scale_embedding_matches_diffusers(ref_pipes, alt_pipes):
    w = torch.tensor([0.0, 6.5, 10.0])
    for dim in (32, 33):
        expected = ref_pipes().get_guidance_scale_embedding(w, embedding_dim=dim)
        assert torch.allclose(alt_pipes["m9"].get_guidance_scale_embedding(w, embedding_dim=dim), expected)


# --- bad input: clear errors before any model runs -------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(prompt=PROMPT, height=60), ValueError, "height"),
    (dict(prompt=PROMPT, width=-8), ValueError, "width"),
    (dict(prompt=PROMPT, prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "prompt_embeds"),
    (dict(), ValueError, "prompt"),
    (dict(prompt=42), TypeError, "prompt"),
    (dict(prompt=[PROMPT, "b"], negative_prompt=["x"]), ValueError, "negative_prompt"),
    (dict(prompt=[PROMPT], negative_prompt="x"), TypeError, "negative_prompt"),
    (dict(prompt=PROMPT, generator=[torch.Generator()] * 3), ValueError, "generator"),
    (dict(prompt=PROMPT, image=np.zeros((32, 32, 3), np.float32), strength=1.5), ValueError, "strength"),
    (dict(prompt=PROMPT, image=np.zeros((32, 32, 3), np.float32), strength=-0.1), ValueError, "strength"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(1, 70, 32)), ValueError,
     "negative_prompt_embeds"),
    (dict(prompt=PROMPT, output_type="jpeg"), ValueError, "output_type"),
    (dict(prompt=PROMPT, num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(prompt=PROMPT, guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(prompt=PROMPT, seed=1, generator=torch.Generator()), ValueError, "seed"),
    (dict(prompt=PROMPT, latents=torch.zeros(1, 4, 8, 8)), ValueError, "latents"),
    (dict(prompt=PROMPT, sampler="heun++"), ValueError, "sampler|heun"),
    (dict(prompt=PROMPT, callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end"),
    (dict(prompt=PROMPT, image=np.zeros((32, 32, 5), np.float32)), ValueError, "image"),
])
def test_bad_input(alt_pipes, monkeypatch, kwargs, exc, match):
    pipe = alt_pipes["m9"]
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(exc, match=match):
        pipe.generate(progress=False, **kwargs)
    assert not calls  # refused before any UNet call


def test_pipeline_usable_after_error(alt_pipes):
    with pytest.raises(ValueError):
        alt_pipes["m9"].generate(PROMPT, height=12)
    res = alt_pipes["m9"].generate(PROMPT, num_inference_steps=2, progress=False, output_type="np")
    assert res.images.shape == (1, 32, 32, 3)


# --- compat classes, hub cache ---------------------------------------------------------------------------

def test_compat_class_runs_readme_example(m9_folder, ref_pipes):
    pipe = altdiff.AltDiffusionPipeline.from_pretrained(m9_folder, torch_dtype=torch.float32)
    pipe = pipe.to("cpu")
    out = pipe(PROMPT, num_inference_steps=STEPS, generator=gen(), output_type="np", progress=False)
    ref = ref_pipes()(PROMPT, num_inference_steps=STEPS, generator=gen(), output_type="np")
    assert_same_images(out.images, ref.images)
    assert out.nsfw_content_detected == ref.nsfw_content_detected
    img2img = altdiff.AltDiffusionImg2ImgPipeline.from_pretrained(m9_folder, safety_checker=None)
    res = img2img(PROMPT, image=_init_image(), strength=0.5, num_inference_steps=4, progress=False)
    assert res.nsfw_content_detected is None and res.images[0].size == (32, 32)


def test_load_from_prefilled_hub_cache(m9_folder, tmp_path, monkeypatch):
    import shutil
    repo = tmp_path / "hub" / "models--tiny-org--tiny-alt"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(m9_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    pipe = altdiff.load("tiny-org/tiny-alt", device="cpu")
    assert pipe.source == "tiny-org/tiny-alt"
    res = pipe.generate(PROMPT, num_inference_steps=2, seed=0, progress=False)
    assert res.images[0].size == (32, 32)
    with pytest.raises(ValueError, match="tiny-org/missing"):
        altdiff.load("tiny-org/missing", device="cpu")
