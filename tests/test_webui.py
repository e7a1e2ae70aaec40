"""altdiff.webui without a server: the webui's sampler names, seeds, grids and png-info parsing."""

import numpy as np
import PIL.Image
import pytest

from altdiff import webui

OPTIONS = {"sd_model_checkpoint": "m9", "CLIP_stop_at_last_layers": 1}


def task(**request):
    return webui.parse_task({"width": 32, "height": 32, **request}, img2img=False, limits=webui.Limits(),
                            options=OPTIONS, models=["m9"])


@pytest.mark.parametrize("name, scheduler, expected", [
    # k-diffusion samplers run in the webui family under their webui label (get_sampler_and_scheduler).
    ("Euler a", None, ("Euler a", "Euler a", "Automatic")),
    ("Euler a", "automatic", ("Euler a", "Euler a", "Automatic")),  # webuiapi's default spelling
    ("k_euler_a", "Uniform", ("Euler a", "Euler a", "Uniform")),
    ("Euler", "", ("Euler", "Euler", "Automatic")),
    ("Euler", "Exponential", ("Euler", "Euler", "Exponential")),
    ("LMS", None, ("LMS", "LMS", "Automatic")),
    ("Heun", None, ("Heun", "Heun", "Automatic")),
    # DDIM and PLMS are the webui's timestep samplers; it takes any schedule type with them and ignores it
    # (their timesteps are their own), recording it in the infotext.
    ("DDIM", None, ("DDIM", "DDIM", "Automatic")),
    ("ddim", "Karras", ("DDIM", "DDIM", "Karras")),
    ("PLMS", None, ("PLMS", "PLMS", "Automatic")),
    # DPM++ 2M's own schedule in the webui is Karras: naming it is Automatic again, as the webui converts it.
    ("DPM++ 2M", None, ("DPM++ 2M", "DPM++ 2M", "Automatic")),
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "DPM++ 2M", "Automatic")),
    ("DPM++ 2M", "uniform", ("DPM++ 2M", "DPM++ 2M", "Uniform")),
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "DPM++ 2M", "Automatic")),  # the pre-1.9 combined name
    ("LMS Karras", None, ("LMS", "LMS", "Karras")),
    (None, None, ("Euler", "Euler", "Automatic")),  # the API's sampler_index default
])
def test_webui_sampler_names_map_onto_altdiff_samplers(name, scheduler, expected):
    assert webui.resolve_sampler(name, scheduler) == expected


@pytest.mark.parametrize("name, scheduler, field", [
    ("No such sampler", None, "sampler_name"), ("Euler", "nope", "scheduler"), ("DDIM", "nope", "scheduler"),
])
def test_unknown_samplers_and_schedules_name_the_field(name, scheduler, field):
    with pytest.raises(webui.FieldError) as e:
        webui.resolve_sampler(name, scheduler)
    assert e.value.field == field


def test_seeds_count_up_and_variations_keep_the_seed():
    t = task(seed=7, batch_size=2, n_iter=2)
    assert t.seeds == [7, 8, 9, 10] and t.subseed_strength == 0
    t = task(seed=7, subseed=20, subseed_strength=0.25, batch_size=3)
    assert t.seeds == [7, 7, 7] and t.subseeds == [20, 21, 22]
    random = task(seed=-1, subseed=-1)
    assert 0 <= random.seeds[0] < 2**32 and 0 <= random.subseeds[0] < 2**32


@pytest.mark.parametrize("n, rows, cols", [(2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (6, 2, 3), (9, 3, 3)])
def test_grid_layout_is_the_webuis_default(n, rows, cols):
    images = [PIL.Image.new("RGB", (8, 6), (i * 20, 0, 0)) for i in range(n)]
    grid = webui.image_grid(images, batch_size=n)
    assert grid.size == (cols * 8, rows * 6)
    arr = np.asarray(grid)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        expected = (i * 20, 0, 0) if i < n else (255, 255, 255)
        assert tuple(arr[r * 6, c * 8]) == expected


def test_png_info_parses_as_the_webui():
    image = PIL.Image.new("RGB", (8, 8))
    image.info["parameters"] = 'a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Size: 512x768, Model: "a, b"'
    image.info["Software"] = "x"
    info = webui.png_info(image)
    assert info["items"] == {"Software": "x"}
    # parse_generation_parameters also fills its defaults (webui 1.10 infotext_utils.py).
    assert info["parameters"] == {"Prompt": "a cat", "Negative prompt": "blurry", "Steps": "20",
                                  "Sampler": "Euler a", "Size-1": "512", "Size-2": "768", "Model": "a, b",
                                  "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0,
                                  "Hires sampler": "Use same sampler", "Hires checkpoint": "Use same checkpoint",
                                  "Hires prompt": "", "Hires negative prompt": "", "Mask mode": "Inpaint masked",
                                  "Masked content": "original", "Inpaint area": "Whole picture",
                                  "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
                                  "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0,
                                  "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable"}
