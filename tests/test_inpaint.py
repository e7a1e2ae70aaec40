"""altdiff.inpaint against the webui's img2img mask handling (processing.StableDiffusionProcessingImg2Img.init,
modules/masking.py, images.resize_image, processing.apply_overlay).

Oracles: OpenCV's GaussianBlur (what the webui blurs masks with), the webui's docstring examples, and Pillow
for the resizes the webui delegates to it."""

import cv2
import numpy as np
import PIL.Image
import pytest
import tiny
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
)

import altdiff
from altdiff import inpaint
from altdiff.inpaint import InpaintError, InpaintOptions


def _noise_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return PIL.Image.fromarray(array[..., 0] if mode == "L" else array)


def _rect_mask(w, h, box):
    array = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    array[y1:y2, x1:x2] = 255
    return PIL.Image.fromarray(array)


@pytest.mark.parametrize("blur_x,blur_y", [(4, 4), (3, 0), (0, 7), (2, 5)])
def test_blur_mask_is_the_webuis_cv2_gaussian_blur(blur_x, blur_y):
    # processing.py: cv2.GaussianBlur(mask, (2*int(2.5*s+0.5)+1, 1), s) for x, (1, k) for y
    mask = _rect_mask(48, 40, (10, 12, 30, 25))
    expected = np.array(mask)
    for sigma, axis in ((blur_x, 0), (blur_y, 1)):
        if sigma > 0:
            k = 2 * int(2.5 * sigma + 0.5) + 1
            expected = cv2.GaussianBlur(expected, (k, 1) if axis == 0 else (1, k), sigma)
    got = np.array(inpaint.blur_mask(mask, blur_x, blur_y))
    # OpenCV blurs uint8 in fixed point: one uint8 level per blurred axis at most
    assert np.abs(got.astype(int) - expected).max() <= (blur_x > 0) + (blur_y > 0)
    assert not np.array_equal(got, np.array(mask))  # the blur does something


def test_blur_mask_axes_are_apart():
    mask = _rect_mask(40, 40, (10, 10, 30, 30))
    only_x = np.array(inpaint.blur_mask(mask, 4, 0))
    assert np.array_equal(only_x[:10], np.zeros_like(only_x[:10]))  # no vertical spread
    assert only_x[20, 8] > 0  # horizontal spread


def test_binary_mask_reads_alpha_as_create_binary_mask():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 100
    rgba[2:5, 2:5, 3] = 200
    image = PIL.Image.fromarray(rgba, "RGBA")
    rounded = np.array(inpaint.binary_mask(image, round=True))
    assert set(np.unique(rounded)) == {0, 255} and rounded[3, 3] == 255 and rounded[0, 0] == 0
    assert np.array_equal(np.array(inpaint.binary_mask(image, round=False)), rgba[..., 3])
    # opaque RGBA and other modes are read as luminance
    assert inpaint.binary_mask(PIL.Image.new("RGBA", (4, 4), (255, 255, 255, 255))).getpixel((0, 0)) == 255


def test_crop_region_follows_the_get_crop_region_docstring():
    # "if a user has painted the top-right part of a 512x512 image, the result may be (256, 0, 512, 256)"
    mask = _rect_mask(512, 512, (256, 0, 512, 256))
    assert inpaint.crop_region(mask) == (256, 0, 512, 256)
    assert inpaint.crop_region(mask, pad=32) == (224, 0, 512, 288)
    assert inpaint.crop_region(_rect_mask(16, 16, (0, 0, 0, 0))) is None


def test_expand_crop_region_follows_its_docstring():
    # "if user drew mask in a 128x32 region, and the dimensions for processing are 512x512, the region will
    # be expanded to 128x128"
    x1, y1, x2, y2 = inpaint.expand_crop_region((100, 200, 228, 232), 512, 512, 1024, 1024)
    assert (x2 - x1, y2 - y1) == (128, 128) and (x1, x2) == (100, 228)
    # near an edge the region slides back into the image rather than shrinking
    assert inpaint.expand_crop_region((0, 0, 32, 128), 512, 512, 1024, 1024) == (0, 0, 128, 128)
    assert inpaint.expand_crop_region((90, 0, 100, 40), 512, 512, 100, 100) == (60, 0, 100, 40)


def test_resize_image_modes():
    image = _noise_image(40, 20)
    assert np.array_equal(np.array(inpaint.resize_image(0, image, 16, 16)),
                          np.array(image.resize((16, 16), resample=PIL.Image.Resampling.LANCZOS)))
    # crop and resize: height fills, the wider resized image is centred and cropped
    cropped = inpaint.resize_image(1, image, 16, 16)
    resized = image.resize((32, 16), resample=PIL.Image.Resampling.LANCZOS)
    assert np.array_equal(np.array(cropped), np.array(resized)[:, 8:24])
    # resize and fill: width fits, the empty bands repeat the resized image's edge rows
    filled = np.array(inpaint.resize_image(2, image, 16, 16))
    fitted = np.array(image.resize((16, 8), resample=PIL.Image.Resampling.LANCZOS))
    assert np.array_equal(filled[4:12], fitted)
    for band, edge, far in ((filled[:4], fitted[0], fitted[-1]), (filled[12:], fitted[-1], fitted[0])):
        assert (band == band[0]).all()  # a zero-height box stretches one row over the band
        assert np.abs(band[0].astype(int) - edge).mean() < np.abs(band[0].astype(int) - far).mean()
    with pytest.raises(InpaintError, match="resize_mode"):
        inpaint.resize_image(4, image, 16, 16)


def test_fill_takes_the_surrounding_colour():
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, :16] = (200, 20, 20)
    array[:, 16:] = (20, 20, 200)
    array[8:14, 4:10] = (0, 255, 0)  # a green patch in the red half, under the mask
    mask = _rect_mask(32, 32, (4, 8, 10, 14))
    out = np.array(inpaint.fill(PIL.Image.fromarray(array), mask)).astype(int)
    assert out[11, 6, 1] < 60 and out[11, 6, 0] > 150  # no green left: red from around it
    outside = np.array(mask) == 0
    assert np.abs(out[outside] - array[outside]).max() <= 1  # unmasked pixels kept


def test_latent_mask_and_fills():
    mask = _rect_mask(64, 64, (0, 0, 32, 64))  # left half repainted
    keep, repaint = inpaint.latent_mask(mask, 8, 8)
    assert keep.shape == (4, 8, 8) and torch.equal(keep + repaint, torch.ones(4, 8, 8))
    assert torch.equal(repaint[:, :, :4], torch.ones(4, 8, 4)) and torch.equal(keep[:, :, 4:], torch.ones(4, 8, 4))
    init = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    assert torch.equal(inpaint.fill_latent(init, keep, repaint, 1), init)
    assert torch.equal(inpaint.fill_latent(init, keep, repaint, 3)[..., :4], torch.zeros(1, 4, 8, 4))
    noisy = inpaint.fill_latent(init, keep, repaint, 2, noise)
    assert torch.equal(noisy[..., :4], noise[..., :4]) and torch.equal(noisy[..., 4:], init[..., 4:])
    with pytest.raises(InpaintError, match="inpainting_fill=2"):
        inpaint.fill_latent(init, keep, repaint, 2)


def test_unrounded_latent_mask_is_fractional():
    mask = inpaint.blur_mask(_rect_mask(64, 64, (0, 0, 32, 64)), 8, 0)
    _, repaint = inpaint.latent_mask(mask, 8, 8, round=False)
    assert ((repaint > 0) & (repaint < 1)).any()


def test_whole_picture_inpaint_overlay_keeps_the_unmasked_original():
    original = _noise_image(32, 32, seed=1)
    mask = _rect_mask(32, 32, (8, 8, 20, 20))
    prepared = inpaint.prepare(original, mask, 32, 32, InpaintOptions(mask_blur_x=0, mask_blur_y=0))
    assert prepared.paste_to is None and prepared.image.size == (32, 32)
    generated = _noise_image(32, 32, seed=2)
    out = np.array(inpaint.apply_overlay(generated, prepared.overlay, prepared.paste_to))
    inside = np.array(mask) > 0
    assert np.array_equal(out[~inside], np.array(original)[~inside])
    assert np.array_equal(out[inside], np.array(generated)[inside])
    inverted = inpaint.prepare(original, mask, 32, 32, InpaintOptions(0, 0, inpainting_mask_invert=True))
    out = np.array(inpaint.apply_overlay(generated, inverted.overlay))
    assert np.array_equal(out[inside], np.array(original)[inside])


def test_only_masked_inpaint_works_on_the_crop_and_pastes_it_back():
    original = _noise_image(64, 48, seed=3)
    mask = _rect_mask(64, 48, (40, 30, 48, 38))
    options = InpaintOptions(mask_blur_x=0, mask_blur_y=0, inpaint_full_res=True, inpaint_full_res_padding=4)
    prepared = inpaint.prepare(original, mask, 32, 32, options)
    # padded box (36, 26, 52, 42) is square already; the crop is resized up to the processing size
    assert prepared.paste_to == (36, 26, 16, 16)
    crop = original.crop((36, 26, 52, 42)).resize((32, 32), resample=PIL.Image.Resampling.LANCZOS)
    assert np.array_equal(np.array(prepared.image), np.array(crop))
    assert prepared.mask.size == (32, 32) and prepared.overlay.size == (64, 48)
    generated = PIL.Image.new("RGB", (32, 32), (0, 255, 0))
    out = np.array(inpaint.apply_overlay(generated, prepared.overlay, prepared.paste_to))
    inside = np.array(mask) > 0
    assert (out[inside] == (0, 255, 0)).all()
    assert np.array_equal(out[~inside], np.array(original)[~inside])


def test_blank_mask_with_only_masked_falls_back_to_whole_picture():
    prepared = inpaint.prepare(_noise_image(32, 32), _rect_mask(32, 32, (0, 0, 0, 0)), 32, 32,
                               InpaintOptions(inpaint_full_res=True))
    assert prepared.paste_to is None


def test_fill_mode_zero_changes_the_masked_pixels_only():
    original = _noise_image(32, 32, seed=4)
    mask = _rect_mask(32, 32, (8, 8, 20, 20))
    kept = inpaint.prepare(original, mask, 32, 32, InpaintOptions(0, 0, inpainting_fill=1)).image
    filled = inpaint.prepare(original, mask, 32, 32, InpaintOptions(0, 0, inpainting_fill=0)).image
    assert np.array_equal(np.array(kept), np.array(original))
    assert not np.array_equal(np.array(filled)[8:20, 8:20], np.array(original)[8:20, 8:20])


@pytest.mark.parametrize("field,value", [("mask_blur_x", -1), ("inpainting_fill", 4), ("resize_mode", 5),
                                         ("inpaint_full_res_padding", 1.5)])
def test_options_are_checked_by_name(field, value):
    with pytest.raises(InpaintError, match=field):
        InpaintOptions(**{field: value})


# --- the diffusers family: generate(image=..., mask_image=...) -------------------------------------------

PROMPT = "一只戴着帽子的猫"


@pytest.fixture(scope="session")
def inpaint_pipes(m9_folder):
    """altdiff's tiny m9 model and diffusers' StableDiffusionInpaintPipeline built from the same parts (the
    XLM-R text encoder and tokenizer passed to its constructor)."""
    refs = {}
    for cls in (PNDMScheduler, DDIMScheduler, EulerAncestralDiscreteScheduler):
        parts = tiny.load_reference(m9_folder, cls).components
        refs[cls.__name__] = StableDiffusionInpaintPipeline(**parts)
        refs[cls.__name__].set_progress_bar_config(disable=True)
    return altdiff.load(m9_folder, device="cpu", dtype=torch.float32), refs


def _gen(seed, n=None):
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("scheduler,sampler,strength,eta", [("PNDMScheduler", None, 0.75, 0.0),
                                                            ("PNDMScheduler", None, 1.0, 0.0),
                                                            ("DDIMScheduler", "ddim", 0.6, 0.5),
                                                            ("EulerAncestralDiscreteScheduler", "euler_a", 0.8, 0.0)])
def test_generate_inpaints_as_the_diffusers_inpaint_pipeline(inpaint_pipes, scheduler, sampler, strength, eta):
    alt, refs = inpaint_pipes
    image = _noise_image(32, 32, seed=5)
    mask = _rect_mask(32, 32, (4, 6, 20, 26))
    kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=4,
                  eta=eta, output_type="np")
    ref = refs[scheduler](generator=_gen(3), height=32, width=32, **kwargs).images
    got = alt.generate(generator=_gen(3), sampler=sampler, progress=False, **kwargs).images
    assert np.abs(np.round(got * 255) - np.round(ref * 255)).max() <= 1
    # sensitivity: another mask gives another image
    other = alt.generate(generator=_gen(3), sampler=sampler, progress=False,
                         **{**kwargs, "mask_image": _rect_mask(32, 32, (16, 0, 32, 16))}).images
    assert np.abs(other - got).max() > 0.05


def test_generate_inpaint_with_a_generator_per_image(inpaint_pipes):
    alt, refs = inpaint_pipes
    image, mask = _noise_image(32, 32, seed=6), _rect_mask(32, 32, (8, 8, 24, 24))
    kwargs = dict(prompt=[PROMPT, "a hat"], image=image, mask_image=mask, strength=0.7, num_inference_steps=4,
                  eta=0.3, output_type="np")
    ref = refs["DDIMScheduler"](generator=_gen(9, 2), height=32, width=32, **kwargs).images
    got = alt.generate(generator=_gen(9, 2), sampler="ddim", progress=False, **kwargs).images
    assert np.abs(np.round(got * 255) - np.round(ref * 255)).max() <= 1


def test_mask_image_needs_image(inpaint_pipes):
    alt, _ = inpaint_pipes
    with pytest.raises(ValueError, match="mask_image"):
        alt.generate(PROMPT, mask_image=_rect_mask(32, 32, (0, 0, 8, 8)), num_inference_steps=2, progress=False)
    with pytest.raises(TypeError, match="mask_image"):
        alt.generate(PROMPT, image=_noise_image(32, 32), mask_image="mask.png", num_inference_steps=2,
                     progress=False)


def test_infotext_keys_as_img2img_init_adds_them():
    options = InpaintOptions(mask_blur_x=4, mask_blur_y=4, inpainting_fill=2, inpaint_full_res=True,
                             inpaint_full_res_padding=32, inpainting_mask_invert=True)
    assert list(inpaint.infotext_params(options, only_masked=True).items()) == [
        ("Mask mode", "Inpaint not masked"), ("Mask blur", 4), ("Inpaint area", "Only masked"),
        ("Masked area padding", 32), ("Masked content", "latent noise")]
    # "original" adds no key; unequal blurs have no single "Mask blur"
    assert inpaint.infotext_params(InpaintOptions(mask_blur_x=2, mask_blur_y=3), only_masked=False) == {}


def test_resize_modes_reach_the_mask_and_the_overlay():
    original, mask = _noise_image(40, 20, seed=7), _rect_mask(40, 20, (10, 5, 30, 15))
    filled = inpaint.prepare(original, mask, 32, 32, InpaintOptions(0, 0, resize_mode=2))
    assert filled.image.size == filled.mask.size == filled.overlay.size == (32, 32)
    assert np.array_equal(np.array(filled.image), np.array(inpaint.resize_image(2, original, 32, 32)))
    # mode 3 ("latent upscale"): the image keeps its size for the encoder, the overlay follows it
    latent = inpaint.prepare(original, mask, 32, 32, InpaintOptions(0, 0, resize_mode=3))
    assert latent.image.size == latent.overlay.size == (40, 20) and latent.mask.size == (32, 32)
    with pytest.raises(InpaintError, match="resize_mode=3"):
        inpaint.prepare(original, mask, 32, 32, InpaintOptions(0, 0, resize_mode=3, inpainting_fill=0))
