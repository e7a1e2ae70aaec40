"""altdiff.hires against the webui's hires fix (StableDiffusionProcessingTxt2Img.calculate_target_resolution,
sample_hr_pass, shared.latent_upscale_modes, modules/upscaler.py's UpscalerLanczos/UpscalerNearest)."""

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from altdiff import hires
from altdiff.hires import HiresError, HiresOptions, HiresTarget


def test_target_by_scale_and_by_resize():
    assert hires.target(64, 48, HiresOptions(hr_scale=2.0)) == HiresTarget(128, 96)
    assert hires.target(64, 48, HiresOptions(hr_scale=1.5)) == HiresTarget(96, 72)
    # one side given: the other keeps the aspect ratio (integer division)
    assert hires.target(64, 48, HiresOptions(hr_resize_x=100)) == HiresTarget(100, 75)
    assert hires.target(64, 48, HiresOptions(hr_resize_y=100)) == HiresTarget(133, 100)
    # both given: cover the box, then cut the overflow in latent units (8 px)
    assert hires.target(64, 48, HiresOptions(hr_resize_x=128, hr_resize_y=128)) == HiresTarget(170, 128, 5, 0)
    assert hires.target(48, 64, HiresOptions(hr_resize_x=128, hr_resize_y=64)) == HiresTarget(128, 170, 0, 13)
    # the same size: the webui skips the second pass
    assert hires.target(64, 48, HiresOptions(hr_scale=1.0)) is None


@pytest.mark.parametrize("name", list(hires.LATENT_UPSCALE_MODES))
def test_latent_upscale_modes(name):
    samples = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    out = hires.upscale_latent(samples, HiresTarget(128, 96), name)
    assert out.shape == (2, 4, 12, 16)
    mode, antialias = hires.LATENT_UPSCALE_MODES[name]
    assert torch.equal(out, F.interpolate(samples, size=(12, 16), mode=mode, antialias=antialias))


def test_latent_modes_differ():
    samples = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    outs = [hires.upscale_latent(samples, HiresTarget(80, 56), name) for name in hires.LATENT_UPSCALE_MODES]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])


def _image(w, h, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_nearest_upscaler_doubles_pixels():
    image = _image(16, 12)
    out = np.array(hires.upscale_image(image, HiresTarget(32, 24), "Nearest"))
    assert np.array_equal(out, np.array(image).repeat(2, axis=0).repeat(2, axis=1))


def test_lanczos_and_none_upscalers():
    image = _image(16, 12)
    lanczos = PIL.Image.Resampling.LANCZOS
    for name in ("Lanczos", "None"):
        out = hires.upscale_image(image, HiresTarget(32, 24), name)
        assert np.array_equal(np.array(out), np.array(image.resize((32, 24), resample=lanczos)))
    # Upscaler.upscale rounds down to a multiple of 8 before the final LANCZOS resize
    odd = hires.upscale_image(image, HiresTarget(36, 27), "Nearest")
    nearest = image.resize((36, 27), resample=PIL.Image.Resampling.NEAREST)
    via8 = nearest.resize((32, 24), resample=lanczos).resize((36, 27), resample=lanczos)
    assert odd.size == (36, 27) and np.array_equal(np.array(odd), np.array(via8))


def test_truncate_splits_the_overflow():
    samples = torch.arange(2 * 10 * 12, dtype=torch.float32).reshape(1, 2, 10, 12)
    out = hires.truncate(samples, HiresTarget(96, 80, truncate_x=3, truncate_y=0))
    assert torch.equal(out, samples[:, :, :, 1:10])


def test_pixels_truncate_not_round():
    decoded = torch.full((1, 3, 2, 2), 2 * (254.9 / 255) - 1)
    assert np.array(hires.to_pixels(decoded)[0]).max() == 254
    back = hires.from_pixels(hires.to_pixels(decoded))
    assert back.shape == (1, 3, 2, 2) and torch.allclose(back, torch.full_like(back, 254 / 255))


def test_infotext_keys_in_the_webuis_order():
    options = HiresOptions(hr_scale=2.0, hr_second_pass_steps=10, hr_sampler_name="Euler", hr_prompt="cat")
    params = hires.infotext_params(options, sampler="DPM++ 2M", scheduler="Karras", prompt="dog",
                                   negative_prompt="", cfg_scale=7.0)
    assert list(params.items()) == [("Denoising strength", 0.7), ("Hires sampler", "Euler"),
                                    ("Hires prompt", "cat"), ("Hires upscale", 2.0), ("Hires steps", 10),
                                    ("Hires upscaler", "Latent")]
    resized = hires.infotext_params(HiresOptions(hr_resize_x=640, hr_resize_y=0), sampler="Euler",
                                    scheduler=None, prompt="", negative_prompt="", cfg_scale=7.0)
    assert resized["Hires resize"] == "640x0" and "Hires upscale" not in resized


@pytest.mark.parametrize("kwargs,field", [({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
                                          ({"hr_scale": 0}, "hr_scale"),
                                          ({"hr_second_pass_steps": -1}, "hr_second_pass_steps"),
                                          ({"denoising_strength": 1.5}, "denoising_strength")])
def test_options_are_checked_by_name(kwargs, field):
    with pytest.raises(HiresError, match=field):
        HiresOptions(**kwargs)
