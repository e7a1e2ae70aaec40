"""`altdiff serve` driven by the AUTOMATIC1111 webui's own Python client (webuiapi) (its page: tests/test_page.py):
images equal generate(), webui-shaped answers, bad requests refused by field, a bounded load test, disconnects,
interrupts, auth, and Ray Serve replicas."""

import base64
import gc
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest
import requests
import torch
from serving import Server, decode, free_port, pixels
from test_prompt_networks import kohya_lora

import altdiff
from altdiff import cli, hires, inpaint
from altdiff.infotext import parse_infotext
from altdiff.serve import ServeConfig, run_ray

webuiapi = pytest.importorskip("webuiapi")

PROMPT = "一只戴着帽子的猫"
NEGATIVE = "低质量"
STEPS = 3
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pipe(m9_folder):
    return altdiff.load(m9_folder, device="cpu")


@pytest.fixture(scope="session")
def serve_root(tmp_path_factory, m9_folder, pipe):
    root = tmp_path_factory.mktemp("serve")
    (root / "models").mkdir()
    (root / "models" / "m9-copy").symlink_to(m9_folder, target_is_directory=True)
    (root / "loras").mkdir()
    kohya_lora(pipe, root / "loras" / "detail.safetensors", seed=1)
    (root / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "style"}, root / "embeddings" / "style.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}, "name": "wide"}, root / "embeddings" / "wide.pt")
    return root


@pytest.fixture(scope="session")
def server(serve_root, m9_folder):
    s = Server(ServeConfig(models=[str(m9_folder)], models_dir=str(serve_root / "models"), device="cpu",
                           lora_dir=str(serve_root / "loras"), embeddings_dir=str(serve_root / "embeddings"),
                           outdir=str(serve_root / "out"), max_body_bytes=2 * 2**20))
    yield s
    s.close()


@pytest.fixture(scope="session")
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def make(pipe, prompt=PROMPT, **kwargs):
    """The documented generate() call behind a request (webuiapi's cfg_scale default is 7)."""
    kwargs.setdefault("guidance_scale", 7.0)
    return pipe.generate(prompt, a1111_prompts=True, progress=False, **kwargs).images


def level_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def b64png(img: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def random_image(w, h, mode="RGB", seed=0):
    channels = len(mode)
    return PIL.Image.fromarray((np.random.default_rng(seed).random((h, w, channels)) * 255).astype(np.uint8), mode)


# --- images equal generate() -----------------------------------------------------------------------------------

def test_txt2img_images_equal_generate(api, pipe):
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, batch_size=2, n_iter=2, steps=STEPS,
                    cfg_scale=6.5, width=32, height=40, sampler_name="DPM++ 2M", scheduler="Karras")
    assert len(r.images) == 4 and r.info["all_seeds"] == [11, 12, 13, 14]
    assert r.info["all_prompts"] == [PROMPT] * 4 and r.info["index_of_first_image"] == 0
    for b in range(2):
        expected = make(pipe, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.5, width=32,
                        height=40, sampler="DPM++ 2M", num_images_per_prompt=2, seed=[11 + 2 * b, 12 + 2 * b])
        for j in range(2):
            assert np.array_equal(pixels(r.images[2 * b + j]), pixels(expected[j]))
    # Image 2 alone, from its own seed: the same within one level (batch of 2 vs 1 rounds differently).
    alone = make(pipe, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.5, width=32, height=40,
                 sampler="DPM++ 2M", seed=13)[0]
    assert level_diff(alone, r.images[2]) <= 1
    other = make(pipe, "beautiful landscape", negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                 guidance_scale=6.5, width=32, height=40, sampler="DPM++ 2M", seed=13)[0]
    assert level_diff(other, alone) > 30  # the prompt reaches the image: the equalities mean something
    for k, img in enumerate(r.images):
        text = img.info["parameters"]
        assert text == r.info["infotexts"][k]
        prompt, negative, params = parse_infotext(text)
        assert (prompt, negative) == (PROMPT, NEGATIVE)
        # the webui >= 1.9 form: Sampler and Schedule type apart
        assert params["Seed"] == str(11 + k) and params["Sampler"] == "DPM++ 2M"
        assert params["Schedule type"] == "Karras"
        assert params["Size"] == "32x40" and params["Steps"] == str(STEPS) and params["Model"] == "m9"


def test_img2img_equals_generate_on_the_resized_flattened_image(api, pipe):
    init = random_image(48, 40, "RGBA")
    r = api.img2img(images=[init], prompt=PROMPT, seed=5, steps=4, denoising_strength=0.6, width=32, height=32,
                    sampler_name="Euler a")
    # The webui flattens alpha onto white, then resizes to width x height with Lanczos ("Just resize").
    flat = PIL.Image.alpha_composite(PIL.Image.new("RGBA", init.size, "white"), init).convert("RGB")
    expected = make(pipe, image=flat.resize((32, 32), PIL.Image.LANCZOS), strength=0.6, num_inference_steps=4,
                    sampler="Euler a", seed=[5], negative_prompt="")
    assert len(r.images) == 1 and np.array_equal(pixels(r.images[0]), pixels(expected[0]))
    assert level_diff(r.images[0], flat.resize((32, 32))) > 10  # something was generated
    assert parse_infotext(r.images[0].info["parameters"])[2]["Denoising strength"] == "0.6"
    assert r.parameters["init_images"] is None  # include_init_images is false


def test_inpainting_and_resize_modes_equal_generate(api, pipe):
    """A mask (webuiapi's mask_image) inpaints as generate(mask_image=..., inpaint_options=...) in the webui
    family, with the webui API's mask defaults (fill 0, "only masked" with padding 0); resize modes 1-2 size
    the init image as images.resize_image does."""
    init, mask = random_image(48, 40), PIL.Image.new("L", (48, 40))
    mask.paste(255, (10, 10, 30, 26))
    r = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=5, steps=4, denoising_strength=0.8,
                    width=32, height=32, sampler_name="Euler a", mask_blur=2, inpainting_fill=1)
    options = inpaint.InpaintOptions(mask_blur_x=2, mask_blur_y=2, inpainting_fill=1, inpaint_full_res=True,
                                     inpaint_full_res_padding=0)
    expected = make(pipe, image=init, mask_image=mask, inpaint_options=options, width=32, height=32,
                    strength=0.8, num_inference_steps=4, sampler="Euler a", seed=[5], negative_prompt="")
    assert r.images[0].size == (48, 40) and np.array_equal(pixels(r.images[0]), pixels(expected[0]))
    keep = np.asarray(inpaint.blur_mask(mask, 2, 2)) == 0
    assert np.array_equal(pixels(r.images[0])[keep], pixels(init)[keep])  # the overlay keeps the picture
    assert level_diff(r.images[0], init) > 10
    params = parse_infotext(r.images[0].info["parameters"])[2]
    assert params["Mask blur"] == "2" and params["Inpaint area"] == "Only masked"
    cropped = api.img2img(images=[init], prompt=PROMPT, seed=5, steps=4, denoising_strength=0.6, width=32,
                          height=32, sampler_name="Euler a", resize_mode=1)
    expected = make(pipe, image=inpaint.resize_image(1, init, 32, 32), strength=0.6, num_inference_steps=4,
                    sampler="Euler a", seed=[5], negative_prompt="")
    assert np.array_equal(pixels(cropped.images[0]), pixels(expected[0]))


def test_hires_fix_equals_generate(api, pipe):
    r = api.txt2img(prompt=PROMPT, seed=4, steps=3, width=32, height=32, sampler_name="Euler", enable_hr=True,
                    hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2, denoising_strength=0.5)
    options = hires.HiresOptions(hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2,
                                 denoising_strength=0.5)
    expected = make(pipe, num_inference_steps=3, width=32, height=32, sampler="Euler", seed=[4], hires=options,
                    negative_prompt="")
    assert r.images[0].size == (48, 48) and np.array_equal(pixels(r.images[0]), pixels(expected[0]))
    params = parse_infotext(r.images[0].info["parameters"])[2]
    assert params["Size"] == "32x32" and params["Hires upscale"] == "1.5" and params["Hires steps"] == "2"
    assert params["Denoising strength"] == "0.5" and params["Hires upscaler"] == "Latent (bicubic)"


def test_infotext_field_fills_what_the_request_leaves_unset(server, api, pipe):
    """The webui API's apply_infotext (modules/api/api.py): an infotext fills every field the client did not
    set, its RNG / ENSD / Clip skip go into override_settings, hires keys turn enable_hr on; the image is the
    one the infotext describes."""
    made = pipe.generate(PROMPT, negative_prompt=NEGATIVE, sampler="Euler a", num_inference_steps=STEPS,
                         width=32, height=32, seed=21, rng="NV", eta_noise_seed_delta=31337, guidance_scale=6.0,
                         progress=False)
    text = made.infotexts[0]
    assert "RNG: NV" in text and "ENSD: 31337" in text

    def post(body):
        r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return decode(r.json()["images"][0]), json.loads(r.json()["info"])

    image, info = post({"infotext": text})
    assert np.array_equal(pixels(image), pixels(made.images[0]))
    params = parse_infotext(info["infotexts"][0])[2]
    assert (params["RNG"], params["ENSD"], params["Seed"], params["CFG scale"]) == ("NV", "31337", "21", "6.0")
    other, info = post({"infotext": text, "seed": 22})  # a field the client sets wins
    assert info["all_seeds"] == [22] and level_diff(other, image) > 0
    cpu, info = post({"infotext": text, "override_settings": {"randn_source": "CPU"}})
    assert "RNG: CPU" in info["infotexts"][0] and level_diff(cpu, image) > 0
    hires_text = pipe.generate(PROMPT, sampler="Euler", num_inference_steps=2, width=32, height=32, seed=3,
                               hires={"hr_scale": 1.5}, progress=False).infotexts[0]
    big, info = post({"infotext": hires_text})
    assert big.size == (48, 48) and "Hires upscale: 1.5" in info["infotexts"][0]
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=60,
                      json={"infotext": "a\nSteps: 2, Sampler: Euler, VAE Decoder: TAESD"})
    assert r.status_code == 422 and "VAE Decoder" in r.text and "infotext" in r.text
    # POST /options sets the noise settings for later requests, as the webui's settings do
    api.set_options({"randn_source": "NV", "eta_noise_seed_delta": 31337})
    try:
        same, _ = post({"prompt": PROMPT, "negative_prompt": NEGATIVE, "sampler_name": "Euler a", "steps": STEPS,
                        "width": 32, "height": 32, "seed": 21, "cfg_scale": 6.0})
        assert np.array_equal(pixels(same), pixels(made.images[0]))
    finally:
        api.set_options({"randn_source": "GPU", "eta_noise_seed_delta": 0})


def test_token_merging_setting_as_the_webui(api, pipe):
    """override_settings' token_merging_ratio (sd_models.apply_token_merging through tomesd; altdiff.tome)."""
    kwargs = dict(prompt=PROMPT, seed=6, steps=2, width=32, height=32, sampler_name="Euler")
    merged = api.txt2img(override_settings={"token_merging_ratio": 0.5}, **kwargs).image
    expected = make(pipe, num_inference_steps=2, width=32, height=32, sampler="Euler", seed=[6],
                    token_merging_ratio=0.5, negative_prompt="")[0]
    assert np.array_equal(pixels(merged), pixels(expected)) and level_diff(merged, api.txt2img(**kwargs).image) > 0
    assert parse_infotext(merged.info["parameters"])[2]["Token merging ratio"] == "0.5"
    assert api.get_options()["token_merging_ratio"] == 0.0


def test_variation_seeds_as_the_webui(api, pipe):
    """Variation seeds run in the webui family: generate(seed, subseed, subseed_strength) (its ImageRNG
    slerps each image's seed noise toward its subseed's, tests/test_rng.py)."""
    r = api.txt2img(prompt=PROMPT, seed=9, subseed=100, subseed_strength=0.5, batch_size=2, steps=STEPS, width=32,
                    height=32, sampler_name="Euler")
    # With variations every image keeps the seed; the subseed counts up (processing.py).
    assert r.info["all_seeds"] == [9, 9] and r.info["all_subseeds"] == [100, 101]
    expected = make(pipe, seed=9, subseed=100, subseed_strength=0.5, num_inference_steps=STEPS, width=32, height=32,
                    sampler="Euler", num_images_per_prompt=2, negative_prompt="")
    for img, exp in zip(r.images, expected):
        assert np.array_equal(pixels(img), pixels(exp))
    params = parse_infotext(r.images[1].info["parameters"])[2]
    assert params["Variation seed"] == "101" and params["Variation seed strength"] == "0.5"
    plain = api.txt2img(prompt=PROMPT, seed=9, subseed=100, subseed_strength=0, steps=STEPS, width=32, height=32,
                        sampler_name="Euler").images[0]
    assert np.array_equal(pixels(plain), pixels(make(pipe, num_inference_steps=STEPS, width=32, height=32,
                                                     sampler="Euler", seed=[9], negative_prompt="")[0]))
    assert level_diff(plain, r.images[0]) > 10


def test_lora_tags_and_embeddings_in_prompts_apply_as_in_generate(api, pipe, serve_root):
    kwargs = dict(seed=8, steps=STEPS, width=32, height=32, sampler_name="Euler")
    prompt = "a cat, style <lora:detail:0.8>"
    r = api.txt2img(prompt=prompt, **kwargs)
    expected = make(pipe, prompt, num_inference_steps=STEPS, width=32, height=32, sampler="Euler", seed=[8],
                    negative_prompt="", lora_dir=serve_root / "loras", embeddings_dir=serve_root / "embeddings")
    assert np.array_equal(pixels(r.image), pixels(expected[0]))
    plain = api.txt2img(prompt="a cat, style", **kwargs).image
    assert level_diff(plain, r.image) > 10  # the tag did something
    params = parse_infotext(r.image.info["parameters"])[2]
    assert params["Lora hashes"].startswith("detail: ") and params["TI hashes"].startswith("style: ")
    assert parse_infotext(r.image.info["parameters"])[0] == prompt  # the prompt as given, tags included


def test_grid_and_save_images(api, server, serve_root):
    out = serve_root / "out"
    before = set(out.glob("*.png")) if out.exists() else set()
    r = api.txt2img(prompt="a cat", seed=3, batch_size=3, steps=1, width=32, height=32, save_images=True)
    # A grid comes first when the webui saves images and more than one is made: round(sqrt(3)) = 2 rows.
    assert len(r.images) == 4 and r.info["index_of_first_image"] == 1 and r.images[0].size == (64, 64)
    assert np.array_equal(pixels(r.images[0])[:32, 32:], pixels(r.images[2]))
    assert (pixels(r.images[0])[32:, 32:] == 255).all()  # the empty spot: the webui's white background
    saved = sorted(set(out.glob("*.png")) - before)
    assert len(saved) == 4 and sum(p.name.startswith("grid-") for p in saved) == 1
    assert sorted(int(p.stem.split("-")[1]) for p in saved if not p.name.startswith("grid-")) == [3, 4, 5]
    for p in saved:
        assert PIL.Image.open(p).info["parameters"] in r.info["infotexts"]
    assert not list(out.glob(".*.tmp"))
    no_grid = api.txt2img(prompt="a cat", seed=3, batch_size=3, steps=1, width=32, height=32, save_images=True,
                          do_not_save_grid=True)
    assert len(no_grid.images) == 3
    assert len(api.txt2img(prompt="a cat", seed=3, batch_size=2, steps=1, width=32, height=32).images) == 2
    assert api.txt2img(prompt="a cat", steps=1, width=32, height=32, send_images=False).images == []


# --- the webui's other routes, shaped as its client expects ---------------------------------------------------

def test_models_samplers_options_pnginfo_loras_embeddings_shapes(api, server):
    models = api.get_sd_models()
    assert [m["title"] for m in models] == ["m9", "m9-copy"]
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    assert api.util_get_model_names() == ["m9", "m9-copy"] and api.util_get_current_model() == "m9"
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "LMS", "DDIM", "PLMS", "DPM++ 2M"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in api.get_samplers())
    assert {"automatic", "uniform", "karras"} <= set(api.util_get_scheduler_names())
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "m9" and options["CLIP_stop_at_last_layers"] == 1
    progress = api.get_progress()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"job_count", "job_no", "sampling_step", "sampling_steps", "interrupted"} <= set(progress["state"])
    assert api.get_scripts() == {"txt2img": [], "img2img": []} and api.get_prompt_styles() == []
    assert [(x["name"], Path(x["path"]).name) for x in api.get_loras()] == [("detail", "detail.safetensors")]
    embeddings = api.get_embeddings()
    assert embeddings["loaded"]["style"]["vectors"] == 2 and embeddings["loaded"]["style"]["shape"] == 32
    assert list(embeddings["skipped"]) == ["wide"]  # 768 wide: made for another model
    assert api.refresh_checkpoints() is None and api.interrupt() == {}  # as the webui answers

    image = api.txt2img(prompt="a cat\nwearing a hat", negative_prompt="blurry", seed=4, steps=1, width=32,
                        height=32).image
    info = api.png_info(image).json
    assert info["info"] == image.info["parameters"] and info["items"] == {}
    params = info["parameters"]
    assert params["Prompt"] == "a cat\nwearing a hat" and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "4" and params["Size-1"] == "32" and params["Size-2"] == "32"
    assert params["Clip skip"] == "1"
    bare = api.png_info(PIL.Image.new("RGB", (8, 8))).json
    assert bare["info"] == "" and bare["parameters"] == {}


def test_override_settings_and_options(api, pipe):
    kwargs = dict(prompt=PROMPT, seed=6, steps=2, width=32, height=32, sampler_name="DDIM", eta=0.0)
    default = api.txt2img(**kwargs).image
    skipped = api.txt2img(override_settings={"CLIP_stop_at_last_layers": 2}, **kwargs)
    # The webui's DDIM (its timesteps, the webui family); its XLM-R encoder has no CLIP skip, so the setting
    # changes no pixel and is recorded in the infotext, as the webui does.
    expected = make(pipe, num_inference_steps=2, width=32, height=32, sampler="DDIM", seed=[6], eta=0.0,
                    negative_prompt="")[0]
    assert np.array_equal(pixels(default), pixels(expected))
    assert np.array_equal(pixels(skipped.image), pixels(expected))
    assert parse_infotext(skipped.image.info["parameters"])[2]["Clip skip"] == "2"
    assert "Clip skip" not in default.info["parameters"] and "Sampler: DDIM," in default.info["parameters"]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1  # restored afterwards
    other = api.txt2img(override_settings={"sd_model_checkpoint": "m9-copy"}, **kwargs)  # the same weights
    assert other.info["sd_model_name"] == "m9-copy" and np.array_equal(pixels(other.image), pixels(default))
    assert api.get_options()["sd_model_checkpoint"] == "m9"
    api.util_set_model("m9-copy", find_closest=False)  # POST /options: loads it before answering
    assert api.util_get_current_model() == "m9-copy"
    assert api.txt2img(**kwargs).info["sd_model_name"] == "m9-copy"
    kept = api.txt2img(override_settings={"sd_model_checkpoint": "m9"}, override_settings_restore_afterwards=False,
                       **kwargs)
    assert kept.info["sd_model_name"] == "m9" and api.util_get_current_model() == "m9"
    # DDIM with the webui client's default eta (1.0) is the webui's "Eta DDIM" 1: noise from the image's seed.
    noisy = api.txt2img(**{**kwargs, "eta": 1.0}).image
    assert np.array_equal(pixels(noisy), pixels(make(pipe, num_inference_steps=2, width=32, height=32,
                                                     sampler="DDIM", seed=[6], eta=1.0, negative_prompt="")[0]))
    assert level_diff(noisy, default) > 0 and "Eta DDIM: 1.0" in noisy.info["parameters"]


# --- bad requests: 4xx JSON naming the field; the server keeps serving, nothing half-written ----------------

def png_claiming(width, height) -> str:
    """A 1x1 PNG whose header claims width x height (a decompression bomb as far as a reader can tell)."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return base64.b64encode(bytes(data)).decode()


PNG = b64png(random_image(40, 40))
BAD = [
    # The webui's pydantic 1 reads 64.5 as 64, 5 as "5" and [] as {}; these it refuses too.
    ("txt2img", {"steps": "2.5"}, "steps"), ("txt2img", {"width": "64.5"}, "width"),
    ("txt2img", {"prompt": {"a": 1}}, "prompt"), ("txt2img", {"seed": "x"}, "seed"),
    ("txt2img", {"override_settings": "x"}, "override_settings"),
    ("txt2img", {"width": 36}, "width"), ("txt2img", {"height": 20}, "height"),
    ("txt2img", {"steps": 0}, "steps"), ("txt2img", {"steps": 151}, "steps"),
    ("txt2img", {"width": 2048, "height": 2048}, "width"), ("txt2img", {"batch_size": 9}, "batch_size"),
    ("txt2img", {"n_iter": 17}, "n_iter"), ("txt2img", {"cfg_scale": -1}, "cfg_scale"),
    ("txt2img", {"seed": -2}, "seed"), ("txt2img", {"seed": 2**64 - 1, "batch_size": 2}, "seed"),
    ("txt2img", {"subseed_strength": 1.5}, "subseed_strength"),
    ("txt2img", {"sampler_name": "No such sampler"}, "sampler_name"),
    ("txt2img", {"sampler_name": None, "sampler_index": "nope"}, "sampler_index"),
    ("txt2img", {"scheduler": "No such schedule"}, "scheduler"),
    ("txt2img", {"eta": 1.5}, "eta"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"sd_vae": "x.pt"}}, "sd_vae"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}}, "CLIP_stop_at_last_layers"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ("txt2img", {"enable_hr": True, "hr_scale": 64}, "hr_scale"),
    ("txt2img", {"enable_hr": True, "hr_checkpoint_name": "other"}, "hr_checkpoint_name"),
    ("txt2img", {"enable_hr": True, "hr_sampler_name": "nope"}, "hr_sampler_name"),
    ("txt2img", {"restore_faces": True}, "restore_faces"),
    ("txt2img", {"tiling": True}, "tiling"), ("txt2img", {"styles": "cinematic"}, "styles"),
    ("txt2img", {"script_name": "x/y/z plot"}, "script_name"),
    ("txt2img", {"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
    ("txt2img", {"s_churn": 0.5}, "s_churn"), ("txt2img", {"prompt": "x" * 8193}, "prompt"),
    ("txt2img", {"seed_resize_from_w": 64}, "seed_resize_from_w"),
    ("txt2img", {"firstphase_width": 64}, "firstphase_width"),
    ("txt2img", {"infotext": "a\nSteps: 2, Sampler: Euler, Face restoration: CodeFormer"}, "infotext"),
    ("txt2img", {"override_settings": {"randn_source": "TPU"}}, "randn_source"),
    ("txt2img", {"override_settings": {"token_merging_ratio": 1.5}}, "token_merging_ratio"),
    ("txt2img", {"override_settings": {"token_merging_ratio_hr": 0.3}}, "token_merging_ratio_hr"),
    ("txt2img", {"disable_extra_networks": True}, "disable_extra_networks"),
    ("txt2img", {"prompt": "a cat <lora:missing:1>"}, "missing"),  # generate() refuses: a 422 all the same
    ("img2img", {}, "init_images"), ("img2img", {"init_images": [PNG, PNG]}, "init_images"),
    ("img2img", {"init_images": ["not base64!"]}, "init_images"),
    ("img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
    ("img2img", {"init_images": [png_claiming(5000, 5000)]}, "init_images"),
    ("img2img", {"init_images": [png_claiming(30000, 30000)]}, "init_images"),
    ("img2img", {"init_images": [base64.b64encode(base64.b64decode(PNG)[:300]).decode()]}, "init_images"),
    ("img2img", {"init_images": [PNG], "mask": "not base64!"}, "mask"),
    ("img2img", {"init_images": [PNG], "mask": PNG, "inpainting_fill": 4}, "inpainting_fill"),
    ("img2img", {"init_images": [PNG], "mask": PNG, "mask_blur": -1}, "mask_blur"),
    ("img2img", {"init_images": [PNG], "resize_mode": 3}, "resize_mode"),
    ("img2img", {"init_images": [PNG], "resize_mode": 4}, "resize_mode"),
    ("img2img", {"init_images": [PNG], "denoising_strength": 1.5}, "denoising_strength"),
    ("img2img", {"init_images": [PNG], "denoising_strength": 0.2, "steps": 2}, "denoising_strength"),
    ("img2img", {"init_images": [PNG], "subseed_strength": 0.3}, "subseed_strength"),
    ("img2img", {"init_images": [PNG], "initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
    ("png-info", {"image": "%%%"}, "image"), ("png-info", {"image": png_claiming(30000, 30000)}, "image"),
    ("options", {"sd_model_checkpoint": "nope"}, "sd_model_checkpoint"),
    ("options", {"CLIP_stop_at_last_layers": 13}, "CLIP_stop_at_last_layers"),
    ("options", {"show_progressbar": True}, "show_progressbar"),
]


def test_every_bad_request_class_is_a_4xx_naming_the_field(server, serve_root):
    out = serve_root / "out"
    before = sorted(out.iterdir()) if out.exists() else []
    base = {"prompt": "x", "steps": 2, "width": 32, "height": 32, "save_images": True}
    for route, body, name in BAD:
        payload = {**base, **body} if route in ("txt2img", "img2img") else body
        r = requests.post(f"{server.url}/sdapi/v1/{route}", json=payload, timeout=300)
        assert r.status_code == 422, (route, body, r.status_code, r.text)
        assert name in r.text, (route, body, r.text)
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=b"{not json", timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "json" in r.text.lower()
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x" * 3 * 2**20}, timeout=60)
    assert r.status_code == 413
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=iter([b'{"prompt": "x"}']), timeout=60,
                      headers={"Content-Type": "application/json"})  # chunked: no Content-Length to check
    assert r.status_code == 411
    assert (sorted(out.iterdir()) if out.exists() else []) == before  # no file, not even a half-written one
    good = requests.post(f"{server.url}/sdapi/v1/txt2img", json={**base, "save_images": False}, timeout=300)
    assert good.status_code == 200 and len(good.json()["images"]) == 1
    wrapped = base64.encodebytes(base64.b64decode(PNG)).decode()  # base64 with line breaks, as some clients send
    good = requests.post(f"{server.url}/sdapi/v1/img2img", json={**base, "save_images": False, "init_images": [
        f"data:image/png;base64,{wrapped}"]}, timeout=300)
    assert good.status_code == 200 and len(good.json()["images"]) == 1


# --- running it for real ----------------------------------------------------------------------------------------

def test_four_concurrent_clients_get_the_sequential_images(server, pipe):
    prompts = ["a cat", "一只猫", "кошка в шляпе", "قطة"]

    def client(k):
        return webuiapi.WebUIApi(port=server.port).txt2img(prompt=prompts[k], seed=100 + k, steps=2, width=32,
                                                           height=32, sampler_name="Euler a").image
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(client, range(4)))
    for k, img in enumerate(images):
        expected = make(pipe, prompts[k], num_inference_steps=2, width=32, height=32, sampler="Euler a",
                        seed=[100 + k], negative_prompt="")[0]
        assert np.array_equal(pixels(img), pixels(expected))
    assert level_diff(images[0], images[1]) > 10


def test_load_every_request_gets_its_image_or_503_and_memory_stays_flat(m9_folder, pipe):
    """60 requests at a held worker from 16 threads: exactly --max-queue of them wait and get their image, the
    rest a 503 at once. Then rounds of 60 from 8 threads (never more than the queue holds): every request
    gets its own image, once, and the process's memory does not grow from round to round."""
    server = Server(ServeConfig(models=[str(m9_folder)], device="cpu", max_queue=8))
    body = {"prompt": "a cat", "steps": 1, "width": 32, "height": 32, "sampler_name": "Euler a"}
    made, rss = {}, []

    def call(seed):
        return seed, requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "seed": seed}, timeout=600)

    def check(results):
        ok = {seed: r.json() for seed, r in results if r.status_code == 200}
        busy = [r for _, r in results if r.status_code == 503]
        assert len(ok) + len(busy) == len(results), [r.status_code for _, r in results]
        assert all(int(r.headers["Retry-After"]) >= 1 for r in busy)
        for seed, answer in ok.items():
            assert len(answer["images"]) == 1 and json.loads(answer["info"])["all_seeds"] == [seed]
            assert seed not in made
            made[seed] = decode(answer["images"][0])
            assert parse_infotext(made[seed].info["parameters"])[2]["Seed"] == str(seed)
        return len(ok), len(busy)

    try:
        gate = server.hold()
        try:
            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(call, seed) for seed in range(60)]
                deadline = time.monotonic() + 300
                while server.worker.stats["rejected"] < 52:
                    assert time.monotonic() < deadline, server.worker.stats
                    time.sleep(0.01)
                gate.set()
                assert check([f.result() for f in futures]) == (8, 52)
        finally:
            gate.set()
        for round_ in (1, 2, 3):
            with ThreadPoolExecutor(8) as pool:
                assert check(list(pool.map(call, range(round_ * 1000, round_ * 1000 + 60)))) == (60, 0)
            gc.collect()
            rss.append(psutil.Process().memory_info().rss)
        print("RSS after rounds 1-3 (MiB):", [round(r / 2**20) for r in rss])
        assert not server.worker.waiting and server.worker.stats["dropped"] == 0
        assert server.worker.stats["done"] == len(made) + 2  # each accepted request ran once (+ load, hold)
    finally:
        server.close()
    # which 8 of the first 60 got in depends on the threads' order: check one of them and one later image
    for seed in (min(made), 3059):
        assert np.array_equal(pixels(made[seed]), pixels(make(pipe, "a cat", num_inference_steps=1, width=32,
                                                              height=32, sampler="Euler a", seed=[seed],
                                                              negative_prompt="")[0]))
    assert rss[2] - rss[1] < 32 * 2**20, [r / 2**20 for r in rss]


def test_a_disconnected_clients_queued_work_is_dropped(server):
    gate = server.hold()
    try:
        stats = dict(server.worker.stats)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32,
                                                                  "height": 32}, timeout=1.0)
        deadline = time.monotonic() + 30
        while server.worker.stats["dropped"] == stats["dropped"]:
            assert time.monotonic() < deadline, "the queued job was not dropped"
            time.sleep(0.05)
        assert not server.worker.waiting
    finally:
        gate.set()
    deadline = time.monotonic() + 30
    while server.worker.current is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.worker.stats["done"] == stats["done"] + 1  # the hold only: the dropped job never ran


def test_a_disconnected_clients_running_job_stops_at_its_next_step(server):
    """README: a client that disconnects has its running work dropped too: the job is cancelled and the
    sampler stops at its next step instead of making all 150."""
    calls = []
    handle = server.worker.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=1.5, json={
                "prompt": "x", "steps": 150, "width": 128, "height": 128, "sampler_name": "Euler"})
        deadline = time.monotonic() + 120
        while server.worker.current is not None or not calls:
            assert time.monotonic() < deadline, "the running job did not stop"
            time.sleep(0.05)
    finally:
        handle.remove()
    assert 0 < len(calls) < 150


def test_interrupt_ends_the_job_at_the_next_step_and_returns_what_it_has(server):
    answer = {}

    def long_request():
        answer["r"] = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=600, json={
            "prompt": "a cat", "seed": 1, "steps": 150, "n_iter": 3, "width": 32, "height": 32})
    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 300
    while True:
        progress = requests.get(f"{server.url}/sdapi/v1/progress", timeout=60).json()
        if progress["state"]["sampling_step"] >= 1:
            break
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    assert progress["state"]["job_count"] == 3 and 0 < progress["progress"] < 1
    assert requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=60).json() == {}
    thread.join(300)
    result = answer["r"].json()
    info = json.loads(result["info"])
    assert 1 <= len(result["images"]) < 3 and info["all_seeds"] == [1, 2, 3]
    for k, b64 in enumerate(result["images"]):
        assert parse_infotext(decode(b64).info["parameters"])[2]["Seed"] == str(1 + k)
    after = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "a cat", "steps": 1, "n_iter": 2, "width": 32, "height": 32}).json()
    assert len(after["images"]) == 2  # the next job runs whole


def test_cli_serve_basic_auth_on_every_route_and_loopback_only(m9_folder, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # run in tmp_path: save_images without --outdir writes there
    proc = subprocess.Popen([sys.executable, "-m", "altdiff.cli", "serve", "--model", str(m9_folder), "--device",
                             "cpu", "--port", str(port), "--api-auth", "alice:s3cret,bob:pw"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                requests.get(f"{url}/sdapi/v1/options", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.2)
        for path in ("/", "/docs", "/openapi.json", "/web/app.js", "/sdapi/v1/options", "/sdapi/v1/sd-models"):
            bare = requests.get(url + path, timeout=30)
            assert bare.status_code == 401 and bare.headers["WWW-Authenticate"] == "Basic", path
            assert requests.get(url + path, auth=("alice", "wrong"), timeout=30).status_code == 401
            assert requests.get(url + path, auth=("alice", "s3cret"), timeout=30).status_code == 200, path
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=30)
        assert r.status_code == 401
        api = webuiapi.WebUIApi(port=port, username="bob", password="pw")
        assert len(api.txt2img(prompt="a cat", steps=1, width=32, height=32).images) == 1
        r = requests.post(f"{url}/sdapi/v1/txt2img", auth=("bob", "pw"), timeout=60,
                          json={"prompt": "x", "steps": 1, "width": 32, "height": 32, "save_images": True,
                                "seed": 5})
        assert r.status_code == 200  # no --outdir: where the webui saves by default (shared_options.py)
        assert [p.relative_to(tmp_path).parts for p in tmp_path.rglob("*.png")] == [
            ("outputs", "txt2img-images", time.strftime("%Y-%m-%d"), "00000-5.png")]
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    finally:
        proc.terminate()
        proc.wait(60)


def test_cli_serve_refuses_bad_arguments(tmp_path, capsys):
    assert cli.build_serve_parser().parse_args([]).host == "127.0.0.1"
    (tmp_path / "file.txt").write_text("not a folder")
    for argv, message in ((["--max-queue", "-1"], "--max-queue"), (["--replicas", "0"], "--replicas"),
                          (["--api-auth", "nocolon"], "--api-auth"), (["--model", str(tmp_path)], "--model"),
                          (["--models-dir", str(tmp_path)], "--models-dir"),
                          (["--models-dir", str(tmp_path / "missing")], "--models-dir"),
                          (["--lora-dir", str(tmp_path / "missing")], "--lora-dir"),
                          (["--outdir", str(tmp_path / "file.txt" / "out")], "--outdir")):
        assert cli.main(["serve", "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err


def test_ray_serve_two_cpu_replicas(m9_folder, pipe):
    ray = pytest.importorskip("ray")
    from ray import serve

    port = free_port()
    config = ServeConfig(models=[str(m9_folder)], device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    try:
        with pytest.raises(ValueError, match="GPUs"):
            run_ray(config, port=port, replicas=2, num_gpus_per_replica=1, blocking=False)
        run_ray(config, port=port, replicas=2, num_gpus_per_replica=0, blocking=False)
        replicas = serve.status().applications["altdiff"].deployments["altdiff"].replica_states
        assert replicas.get("RUNNING") == 2, replicas

        def client(k):
            return webuiapi.WebUIApi(port=port).txt2img(prompt="a cat", seed=30 + k, steps=2, width=32, height=32,
                                                        sampler_name="Euler").image
        with ThreadPoolExecutor(4) as pool:
            images = list(pool.map(client, range(4)))
    finally:
        serve.shutdown()
        ray.shutdown()
    for k, img in enumerate(images):
        expected = make(pipe, "a cat", num_inference_steps=2, width=32, height=32, sampler="Euler", seed=[30 + k],
                        negative_prompt="")[0]
        assert level_diff(img, expected) <= 1  # replicas run torch with one thread: one level of rounding
