"""The webui's list, control and extras routes of `altdiff serve`, in the webui's response shapes
(modules/api/models.py) and as webuiapi reads them."""

from __future__ import annotations

import threading

import numpy as np
import PIL.Image
import pytest
import requests
import torch
from serving import Server, decode, pixels

from altdiff.api import worker as worker_module
from altdiff.preview import cheap_preview
from altdiff.serve import ServeConfig

webuiapi = pytest.importorskip("webuiapi")


STYLES_CSV = """name,prompt,negative_prompt
# a comment row,ignored,
cinematic,"{prompt}, film grain",blurry
painted,oil painting,
"""


@pytest.fixture(scope="module")
def server(m9_folder, tmp_path_factory):
    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text(STYLES_CSV, encoding="utf-8")
    s = Server(ServeConfig(models=[str(m9_folder)], device="cpu", styles_file=str(styles)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def image(w, h, seed=0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_lists_in_the_webuis_shapes(api):
    upscalers = api.get_upscalers()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in upscalers)
    modes = [m["name"] for m in api.get_latent_upscale_modes()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes
    for empty in (api.get_face_restorers, api.get_realesrgan_models, api.get_hypernetworks, api.get_sd_vae):
        assert empty() == []
    assert requests.get(f"{api.baseurl}/extensions", timeout=60).json() == []
    assert requests.get(f"{api.baseurl}/script-info", timeout=60).json() == []
    flags = api.get_cmd_flags()
    assert flags["api_auth"] is None and flags["medvram"] is False and flags["lowvram"] is False
    memory = api.get_memory()
    ram = memory["ram"]
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    assert memory["cuda"] == {"error": "unavailable"} or set(memory["cuda"]) == {
        "system", "active", "allocated", "reserved", "inactive", "events"}


def test_refresh_vae_and_interrogate(api):
    assert requests.post(f"{api.baseurl}/refresh-vae", timeout=60).json() == {}
    r = requests.post(f"{api.baseurl}/interrogate", json={"image": "", "model": "clip"}, timeout=60)
    assert r.status_code == 422 and "captioning model" in r.json()["detail"][0]["msg"]
    assert r.json()["detail"][0]["loc"] == ["body", "model"]


def test_unload_and_reload_checkpoint(server, api):
    assert server.worker.pipe is not None
    assert requests.post(f"{api.baseurl}/unload-checkpoint", timeout=60).json() == {}
    assert server.worker.pipe is None
    assert requests.post(f"{api.baseurl}/reload-checkpoint", timeout=300).json() == {}
    assert server.worker.pipe is not None


def test_extras_lanczos_and_nearest_as_pil(api):
    src = image(40, 24)
    out = api.extra_single_image(src, upscaler_1="Lanczos", upscaling_resize=2)
    assert out.info == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"
    assert (pixels(out.image) == pixels(src.resize((80, 48), PIL.Image.Resampling.LANCZOS))).all()
    nearest = api.extra_single_image(src, upscaler_1="Nearest", upscaling_resize=2).image
    assert (pixels(nearest) == pixels(src.resize((80, 48), PIL.Image.Resampling.NEAREST))).all()
    assert (pixels(nearest) != pixels(out.image)).any()
    unchanged = api.extra_single_image(src).image  # upscaler_1 "None": no upscale step
    assert (pixels(unchanged) == pixels(src)).all()
    # scale to 64x64 with crop: the image covers 64x64, then is centred on a black 64x64 canvas
    cropped = api.extra_single_image(src, resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64,
                                     upscaler_1="Lanczos")
    assert cropped.image.size == (64, 64) and "Postprocess crop to: 64x64" in cropped.info
    batch = api.extra_batch_images([src, image(16, 16, 1)], upscaler_1="Lanczos", upscaling_resize=2)
    assert [im.size for im in batch.images] == [(80, 48), (32, 32)]


@pytest.mark.parametrize("body, field", [
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"), ({"upscaler_2": "SwinIR 4x"}, "upscaler_2"),
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"),
    ({"codeformer_visibility": 1}, "codeformer_visibility"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize"),
    ({"resize_mode": 1, "upscaling_resize_h": 9000}, "upscaling_resize_h")])
def test_extras_refuses_what_altdiff_lacks_naming_the_field(server, body, field):
    r = requests.post(f"{server.url}/sdapi/v1/extra-single-image", timeout=60,
                      json={"image": webuiapi.b64_img(image(16, 16)), **body})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field]


def test_skip_ends_the_current_image_and_the_next_runs_whole(server, monkeypatch):
    reached, state = threading.Event(), server.worker.state
    generate = worker_module.generate

    def held_generate(**kwargs):  # holds the first image at its first step until /skip has landed
        callback = kwargs["callback_on_step_end"]

        def held(pipe, i, t, tensors):
            if i == 0 and state.job_no == 0:
                reached.set()
                for _ in range(3000):
                    if state.skipped:
                        break
                    threading.Event().wait(0.01)
            return callback(pipe, i, t, tensors)
        return generate(**{**kwargs, "callback_on_step_end": held})

    body = {"prompt": "a cat", "seed": 1, "steps": 4, "width": 32, "height": 32}
    monkeypatch.setattr(worker_module, "generate", held_generate)
    answer = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", requests.post(
        f"{server.url}/sdapi/v1/txt2img", json={**body, "n_iter": 2}, timeout=300)))
    thread.start()
    assert reached.wait(300)
    assert requests.post(f"{server.url}/sdapi/v1/skip", timeout=60).json() == {}
    thread.join(300)
    skipped = [pixels(decode(b)) for b in answer["r"].json()["images"]]
    monkeypatch.setattr(worker_module, "generate", generate)
    whole = [pixels(decode(requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "seed": s},
                                         timeout=300).json()["images"][0])) for s in (1, 2)]
    assert len(skipped) == 2
    assert (skipped[0] != whole[0]).any()  # image 1 stopped after its first step
    assert (skipped[1] == whole[1]).all()  # image 2 ran all its steps
    assert requests.get(f"{server.url}/sdapi/v1/progress", timeout=60).json()["state"]["skipped"] is False


def test_styles_listed_and_applied_as_the_webui(server, api):
    assert api.get_prompt_styles() == [
        {"name": "cinematic", "prompt": "{prompt}, film grain", "negative_prompt": "blurry"},
        {"name": "painted", "prompt": "oil painting", "negative_prompt": ""}]
    body = {"seed": 3, "steps": 2, "width": 32, "height": 32}

    def run(**kwargs):
        r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, **kwargs}, timeout=300).json()
        return r, decode(r["images"][0])
    styles = ["cinematic", "painted", "nope"]
    styled, styled_image = run(prompt="a cat", negative_prompt="ugly", styles=styles)
    # cinematic puts the prompt at {prompt}, painted is appended with ", ", the unknown style is ignored
    plain, plain_image = run(prompt="a cat, film grain, oil painting", negative_prompt="ugly, blurry")
    unstyled = run(prompt="a cat", negative_prompt="ugly")[1]
    assert (pixels(styled_image) == pixels(plain_image)).all()
    assert (pixels(styled_image) != pixels(unstyled)).any()
    assert styled_image.info["parameters"] == plain_image.info["parameters"]
    expected = "a cat, film grain, oil painting\nNegative prompt: ugly, blurry\n"
    assert styled_image.info["parameters"].startswith(expected)
    assert styled["parameters"]["prompt"] == "a cat"  # the request is echoed as sent


def test_cheap_preview_maps_latent_channels_by_the_webuis_coefficients():
    assert np.asarray(cheap_preview(torch.zeros(4, 3, 5))).tolist() == [[[127] * 3] * 5] * 3
    latent = torch.zeros(4, 2, 2)
    latent[0] = 1  # channel 0 -> (0.298, 0.207, 0.208), then * 0.5 + 0.5 and * 255
    assert np.asarray(cheap_preview(latent))[0, 0].tolist() == [165, 153, 154]  # truncated
    with pytest.raises(ValueError, match="latent"):
        cheap_preview(torch.zeros(3, 2, 2))


def test_progress_preview_changes_over_steps_and_eta_is_positive(server, monkeypatch):
    generate, seen = worker_module.generate, {}
    reached, release = {9: threading.Event(), 19: threading.Event()}, threading.Event()

    def held_generate(**kwargs):  # pauses after steps 10 and 20 while the test reads /progress
        callback = kwargs["callback_on_step_end"]

        def held(pipe, i, t, tensors):
            out = callback(pipe, i, t, tensors)
            if i in reached:
                reached[i].set()
                release.wait(60)
                release.clear()
            return out
        return generate(**{**kwargs, "callback_on_step_end": held})

    monkeypatch.setattr(worker_module, "generate", held_generate)
    body = {"prompt": "a cat", "seed": 1, "steps": 25, "width": 64, "height": 48}
    thread = threading.Thread(target=lambda: requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300))
    thread.start()
    for i in reached:
        assert reached[i].wait(120)
        seen[i] = requests.get(f"{server.url}/sdapi/v1/progress", timeout=60).json()
        release.set()
    thread.join(300)
    previews = [decode(seen[i]["current_image"]) for i in reached]
    factor = server.worker.pipe.vae_scale_factor  # a preview has the latents' size
    assert [p.size for p in previews] == [(64 // factor, 48 // factor)] * 2
    assert (pixels(previews[0]) != pixels(previews[1])).any()
    assert all(seen[i]["eta_relative"] > 0 for i in reached)
    assert requests.get(f"{server.url}/sdapi/v1/progress", timeout=60).json()["current_image"] is None
