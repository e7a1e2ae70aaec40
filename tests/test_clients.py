"""Real clients' calls replayed against `altdiff serve`, re-expressed here from their sources: the webui's own
API tests (AUTOMATIC1111/stable-diffusion-webui test/test_txt2img.py, test/test_img2img.py: their request
payloads and every variation they make), SillyTavern's stable-diffusion endpoint (src/endpoints/
stable-diffusion.js: its start-up list calls and the generate body it forwards whole, its own `url`, `auth`
and `clip_skip` fields included), Open WebUI's automatic1111 image backend (its model switch through
/options and its txt2img body) and the AIYA Discord bot (Kilvoctu/aiyabot core/settings.py and
core/stablecog.py: its start-up lists and its txt2img, hires and img2img bodies, with a fractional
`steps / 2` and strings for numbers). Every call gets a 200 in the webui's response shape, or a 422 naming the field
for a feature that needs another model or altdiff does not do (face restoration, tiling, the SD-upscale
script)."""

import ast
import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import requests
from serving import Server, decode

from altdiff.serve import ServeConfig


@pytest.fixture(scope="module")
def url(m9_folder, tmp_path_factory):
    s = Server(ServeConfig(models=[str(m9_folder)], device="cpu",
                           outdir=str(tmp_path_factory.mktemp("clients") / "out")))
    yield s.url
    s.close()


def b64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def images_answer(r: requests.Response, count: int) -> dict:
    """The webui's ImagesResponse: base64 PNGs carrying their infotext, the request echoed, `info` JSON."""
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == count
    info = json.loads(body["info"])
    assert len(info["all_seeds"]) == len(info["infotexts"]) >= 1
    for image in body["images"]:
        assert "Steps: " in decode(image).info["parameters"]
    return info


# --- the webui's own API tests -------------------------------------------------------------------------------

def webui_txt2img_payload() -> dict:
    """test_txt2img.py's simple_txt2img_request."""
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
            "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
            "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0,
            "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1,
            "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0,
            "tiling": False, "width": 64}


@pytest.mark.parametrize("change, count", [
    ({}, 1), ({"negative_prompt": "example negative prompt"}, 1),
    ({"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"}, 1),
    ({"height": 128}, 1), ({"enable_hr": True}, 1),
    ({"sampler_index": "PLMS"}, 1), ({"sampler_index": "DDIM"}, 1), ({"sampler_index": "UniPC"}, 1),
    ({"n_iter": 2}, 2), ({"batch_size": 2}, 2)])
def test_webui_txt2img_tests(url, change, count):
    """test_txt2img.py: each of its cases; the hires fix at its payload's denoising_strength 0 (the second
    pass plans no step, as in the webui: the upscaled first pass is the image)."""
    info = images_answer(requests.post(f"{url}/sdapi/v1/txt2img", json={**webui_txt2img_payload(), **change},
                                       timeout=300), count)
    if change.get("enable_hr"):
        assert (info["width"], info["height"]) == (64, 64) and "Hires upscale: 2.0" in info["infotexts"][0]


@pytest.mark.parametrize("change, field", [({"tiling": True}, "tiling"), ({"restore_faces": True}, "restore_faces")])
def test_webui_txt2img_tests_altdiff_refuses(url, change, field):
    """test_txt2img.py's tiling and face-restoration cases: face restoration needs another model, tiling
    another convolution padding altdiff does not have; each is a 422 naming the field."""
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**webui_txt2img_payload(), **change}, timeout=60)
    assert r.status_code == 422 and field in r.text


def webui_img2img_payload() -> dict:
    """test_img2img.py's simple_img2img_request (its init image: a random picture here)."""
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
            "include_init_images": False, "init_images": [b64(image)], "inpaint_full_res": False,
            "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
            "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
            "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
            "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
            "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}


def mask_b64() -> str:
    mask = PIL.Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    return b64(mask)


@pytest.mark.parametrize("change", [{}, {"mask": "MASK"}, {"mask": "MASK", "inpainting_mask_invert": True}])
def test_webui_img2img_tests(url, change):
    """test_img2img.py: simple, masked, inverted mask (a boolean, which the webui's model takes as int)."""
    change = {k: mask_b64() if v == "MASK" else v for k, v in change.items()}
    info = images_answer(requests.post(f"{url}/sdapi/v1/img2img", json={**webui_img2img_payload(), **change},
                                       timeout=300), 1)
    assert ("Mask blur: 4" in info["infotexts"][0]) == ("mask" in change)


def test_webui_img2img_sd_upscale_script_is_refused(url):
    """test_img2img.py's SD upscale script: scripts are not run; a 422 naming script_name."""
    r = requests.post(f"{url}/sdapi/v1/img2img", timeout=60, json={
        **webui_img2img_payload(), "script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]})
    assert r.status_code == 422 and "script_name" in r.text


# --- SillyTavern ----------------------------------------------------------------------------------------------

def test_sillytavern_start_up_and_generate(url):
    """stable-diffusion.js: /ping reads /options; the lists it maps (`x.name`, `x.model_name`, `x.title`);
    /vaes tries /sd-vae and Forge's /sd-modules and takes whichever answers a list; /generate forwards its
    whole body (with its own url, auth, clip_skip) to txt2img, and /set-model polls /progress."""
    assert requests.get(f"{url}/sdapi/v1/options", timeout=60).json()["sd_model_checkpoint"]
    for route, key in (("upscalers", "name"), ("latent-upscale-modes", "name"), ("samplers", "name"),
                       ("schedulers", "name"), ("sd-models", "title")):
        rows = requests.get(f"{url}/sdapi/v1/{route}", timeout=60).json()
        assert isinstance(rows, list) and rows and all(key in row for row in rows), route
    assert isinstance(requests.get(f"{url}/sdapi/v1/sd-vae", timeout=60).json(), list)
    progress = requests.get(f"{url}/sdapi/v1/progress", timeout=60).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    body = {"url": url, "auth": "", "prompt": "a cat, (masterpiece:1.2)", "negative_prompt": "lowres",
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 3, "cfg_scale": 7, "width": 64,
            "height": 64, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 1.0,
            "hr_additional_modules": [], "denoising_strength": 0.5, "hr_second_pass_steps": 0, "seed": -1,
            "clip_skip": 1, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "save_images": False, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
    images_answer(r, 1)
    ignored = ast.literal_eval(r.headers["X-Altdiff-Ignored-Fields"])
    assert set(ignored) == {"url", "auth", "clip_skip", "hr_additional_modules"}
    hires = images_answer(requests.post(f"{url}/sdapi/v1/txt2img", timeout=300, json={
        **body, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2}), 1)
    assert "Hires upscale: 1.5" in hires["infotexts"][0]


# --- Open WebUI --------------------------------------------------------------------------------------------------

def test_open_webui_automatic1111_backend(url):
    """Open WebUI's images router for automatic1111: the model list and current model from /sd-models and
    /options, a model switch by POST /options, then txt2img with its prompt, batch_size, size, steps and
    negative prompt, reading `images` back as base64 PNGs."""
    models = requests.get(f"{url}/sdapi/v1/sd-models", timeout=60).json()
    current = requests.get(f"{url}/sdapi/v1/options", timeout=60).json()["sd_model_checkpoint"]
    assert current in [m["title"] for m in models]
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["title"]},
                         timeout=300).status_code == 200
    info = images_answer(requests.post(f"{url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "一只猫", "batch_size": 2, "width": 64, "height": 64, "steps": 3,
        "negative_prompt": "blurry"}), 2)
    assert info["all_prompts"] == ["一只猫", "一只猫"]


# --- AIYA (Discord bot) ------------------------------------------------------------------------------------------

def aiya_payload(steps=3) -> dict:
    """stablecog.py's payload at the bot's defaults (its config.toml keeps guidance and strength as strings)."""
    return {"prompt": "a cat", "negative_prompt": "", "steps": steps, "width": 64, "height": 64,
            "cfg_scale": "7.0", "sampler_index": "Euler a", "seed": 1234, "seed_resize_from_h": -1,
            "seed_resize_from_w": -1, "denoising_strength": None, "n_iter": 1, "batch_size": 1,
            "styles": ["None"], "override_settings": {"CLIP_stop_at_last_layers": 1}}


def test_aiya_start_up_lists(url):
    """settings.startup_check: /cmd-flags answers, /config and /version may 404 (it reads their JSON under a
    try), then every list is iterated with the keys it reads: a 404's {"detail": ...} would break it."""
    assert requests.get(f"{url}/sdapi/v1/cmd-flags", timeout=60).status_code == 200
    for route in ("config", "sdapi/v1/version"):
        assert isinstance(requests.get(f"{url}/{route}", timeout=60).json(), dict)
    keys = {"samplers": {"name"}, "prompt-styles": {"name", "prompt", "negative_prompt"}, "face-restorers": {"name"},
            "hypernetworks": {"name"}, "upscalers": {"name"}, "loras": {"alias"},
            "sd-models": {"filename", "title", "hash", "model_name"}}
    for route, needed in keys.items():
        rows = requests.get(f"{url}/sdapi/v1/{route}", timeout=60).json()
        assert isinstance(rows, list) and all(needed <= set(row) for row in rows), route
    embeddings = requests.get(f"{url}/sdapi/v1/embeddings", timeout=60).json()
    assert all(isinstance(embeddings[k], dict) for k in ("loaded", "skipped"))


def test_aiya_generates(url):
    """The /dream body; hires as the bot sends it (`hr_scale: 1`, `hr_second_pass_steps: int(steps) / 2`, a
    float with a fraction for odd steps, which the webui's pydantic 1 truncates); img2img with a data URL and
    the strength as a string; png-info on its answer; a model switch by POST /options."""
    title = requests.get(f"{url}/sdapi/v1/sd-models", timeout=60).json()[0]["title"]
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": title}, timeout=300).ok
    plain = images_answer(requests.post(f"{url}/sdapi/v1/txt2img", json=aiya_payload(), timeout=300), 1)
    assert "Sampler: Euler a" in plain["infotexts"][0] and "CFG scale: 7.0" in plain["infotexts"][0]
    hires = {**aiya_payload(), "enable_hr": True, "hr_upscaler": "Latent", "hr_second_pass_steps": 3 / 2,
             "denoising_strength": "0.75"}
    same_size = images_answer(requests.post(f"{url}/sdapi/v1/txt2img", json={**hires, "hr_scale": 1},
                                            timeout=300), 1)
    assert same_size["infotexts"] == plain["infotexts"]  # the webui: "the user has chosen to do nothing"
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**hires, "hr_scale": 2}, timeout=300)
    assert "Hires upscale: 2.0, Hires steps: 1, Hires upscaler: Latent" in images_answer(r, 1)["infotexts"][0]
    image = "data:image/png;base64," + r.json()["images"][0]
    png_info = requests.post(f"{url}/sdapi/v1/png-info", json={"image": image}, timeout=60).json()["info"]
    assert "Hires steps: 1" in png_info
    init = {**aiya_payload(), "init_images": ["data:image/png;base64," + b64(PIL.Image.new("RGB", (64, 64), "teal"))],
            "denoising_strength": "0.75"}
    info = images_answer(requests.post(f"{url}/sdapi/v1/img2img", json=init, timeout=300), 1)
    assert "Denoising strength: 0.75" in info["infotexts"][0]
