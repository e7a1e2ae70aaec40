"""altdiff.infotext: the webui's infotext written and read as the webui >= 1.9 does. Expected texts are
written by hand in the format the webui documents (its parse_generation_parameters docstring,
create_infotext's keys)."""

import hashlib
import time

import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from altdiff.images import save_png
from altdiff.infotext import InfotextError, model_hash, param_pairs, parse, text_of, to_generate_kwargs, write
from altdiff.networks import lora_hash

FULL = dict(steps=20, sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=7, seed=1234, width=512,
            height=768, model_hash="abcdef0123", model="m9", variation_seed=5, variation_seed_strength=0.3,
            clip_skip=2, ensd=31337, rng="NV", extra={"Lora hashes": "cat: 0123456789ab", "Eta": 0.5},
            version="v1.10.1")


def test_write_is_the_webui_text_in_its_key_order():
    text = write("a cat, (hat:1.2)\nsecond line", "blurry", **FULL)
    assert text == ("a cat, (hat:1.2)\nsecond line\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
                    "Size: 512x768, Model hash: abcdef0123, Model: m9, Variation seed: 5, "
                    "Variation seed strength: 0.3, Clip skip: 2, ENSD: 31337, RNG: NV, "
                    "Lora hashes: \"cat: 0123456789ab\", Eta: 0.5, Version: v1.10.1")
    plain = write("a cat", None, steps=20, sampler="Euler a", cfg_scale=7.0, seed=1, width=512, height=512,
                  version=None)
    assert plain == ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, "
                     "Size: 512x512")
    # JSON quoting for ',', ':' and newlines (and a leading '"', which the webui would misread bare).
    quoted = write("p", "", steps=1, sampler="Euler", cfg_scale=7, seed=1, width=8, height=8, model='a, "b"',
                   extra={"Note": "x\ny", "Q": '"z"'}, version=None)
    assert quoted.endswith('Model: "a, \\"b\\"", Note: "x\\ny", Q: "\\"z\\""')


def test_write_parse_round_trip_and_generate_kwargs():
    prompt, negative, params = parse(write("a cat\nin a hat", "blurry, lowres", **FULL))
    assert (prompt, negative) == ("a cat\nin a hat", "blurry, lowres")
    assert params["Size-1"] == "512" and params["Size-2"] == "768"
    assert params["Lora hashes"] == "cat: 0123456789ab"
    kwargs = to_generate_kwargs(prompt, negative, params)
    assert kwargs == {"family": "webui", "prompt": "a cat\nin a hat", "negative_prompt": "blurry, lowres",
                      "num_inference_steps": 20, "sampler": "DPM++ 2M", "scheduler": "Karras",
                      "guidance_scale": 7.0, "seed": 1234, "width": 512, "height": 768, "subseed": 5,
                      "subseed_strength": 0.3, "clip_skip": 1, "eta_noise_seed_delta": 31337, "rng": "NV",
                      "eta": 0.5}
    other = to_generate_kwargs(*parse(write("a cat", "", **{**FULL, "seed": 99, "rng": "CPU"})))
    assert other["seed"] == 99 and other["rng"] == "CPU"
    assert "rng" not in to_generate_kwargs(*parse(write("a", "", **{**FULL, "rng": "GPU"})))


def test_parses_the_webui_docstring_example():
    text = ("girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, "
            "heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, "
            "intricate\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
            "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), "
            "messy drawing\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    prompt, negative, params = parse(text)
    assert prompt.startswith("girl with") and prompt.endswith("intricate")
    assert negative.startswith("ugly, fat") and negative.endswith("messy drawing")
    keys = ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash")
    assert {k: params[k] for k in keys} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512",
        "Size-2": "512", "Model hash": "45dee52b"}
    # the defaults it fills
    assert params["Clip skip"] == "1" and params["RNG"] == "GPU" and params["Schedule type"] == "Automatic"
    assert params["Hires resize-1"] == 0 and params["Masked area padding"] == 32 and "Size" not in params


@pytest.mark.parametrize("name, sampler, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("DPM2 a Karras", "DPM2 a", "Karras"),
    ("LMS Karras", "LMS", "Karras"), ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
    ("DPM++ SDE karras", "DPM++ SDE", "Karras"), ("Euler a", "Euler a", "Automatic"),
    ("DDIM", "DDIM", "Automatic"),
    ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", "Automatic")])
def test_old_sampler_names_split_into_sampler_and_schedule_type(name, sampler, schedule):
    _, _, params = parse(f"x\nSteps: 20, Sampler: {name}, CFG scale: 7, Seed: 1")
    assert (params["Sampler"], params["Schedule type"]) == (sampler, schedule)


def test_schedule_type_by_name_becomes_its_label():
    _, _, params = parse("x\nSteps: 20, Sampler: Euler, Schedule type: sgm_uniform, Seed: 1")
    assert params["Schedule type"] == "SGM Uniform"


def test_parse_details_as_the_webui():
    # quoted values are JSON; a value equal to nothing is dropped; lines are stripped; "WxH" anywhere splits.
    text = ('  a cat  \n more \nNegative prompt:   bad  \n  worse\n'
            'Steps: 20, Sampler: Euler, Model: "a, \\"b\\": c", Empty: , Seed resize from: 640x448, '
            'Hires upscale: 2, Hires upscaler: Latent, Denoising strength: 0.7, Lora hashes: "a: 1, b: 2"')
    prompt, negative, params = parse(text)
    assert (prompt, negative) == ("a cat\nmore", "bad\nworse")
    assert params["Model"] == 'a, "b": c' and "Empty" not in params and params["Lora hashes"] == "a: 1, b: 2"
    assert params["Seed resize from-1"] == "640" and params["Seed resize from-2"] == "448"
    # fewer than 3 pairs on the last line: it is prompt
    assert parse("a: b, c: d") == ("a: b, c: d", "", parse("a: b, c: d")[2])
    assert "a" not in parse("a: b, c: d")[2]
    # keys: word characters, spaces, '-' and '/', starting with a word character, at least 2 long
    assert param_pairs("x y: 1, -z: 2,  Hires CFG/x-y: 3,k:4") == [("x y", "1"), ("Hires CFG/x-y", "3")]
    assert param_pairs(r'a b c, dd: "q,\"r", ee: "x" y, f') == [("dd", r'"q,\"r"'), ("ee", '"x" y')]
    _, _, hyper = parse("p\nSteps: 1, Seed: 2, Hypernet: h1")
    assert parse("p\nSteps: 1, Seed: 2, Hypernet: h1")[0] == "p<hypernet:h1:1.0>"
    assert hyper["Hypernet"] == "h1"


def test_old_hires_fix_and_version_backcompat():
    _, _, params = parse("p\nSteps: 20, Size: 1024x768, First pass size: 0x0, Denoising strength: 0.5")
    # processing.old_hires_fix_first_pass_dimensions: 512*512 pixels, rounded up to multiples of 64.
    assert (params["Size-1"], params["Size-2"], params["Hires resize-1"], params["Hires resize-2"]) == (
        640, 448, 1024, 768)
    _, _, old = parse("[a:b:5]\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.5.1")
    assert old["Old prompt editing timelines"] and old["Pad conds v0"] and old["Downcast alphas_cumprod"]
    _, _, mid = parse("p\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.7.0-224-gabcdef")
    assert mid["Downcast alphas_cumprod"] and "Pad conds v0" not in mid
    for version in ("v1.7.0-225-gabcdef", "v1.10.1", "altdiff 0.1.0"):
        assert "Downcast alphas_cumprod" not in parse(f"p\nSteps: 20, Seed: 1, Version: {version}")[2]
    with pytest.raises(InfotextError, match="Downcast alphas_cumprod: .*v1.6.0"):
        to_generate_kwargs(*parse("p\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.6.0"))


def test_hires_keys_go_into_one_dict():
    text = ("p\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.55, "
            "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (nearest-exact)")
    kwargs = to_generate_kwargs(*parse(text))
    assert "strength" not in kwargs
    assert kwargs["hires"] == {"Hires upscale": "2", "Hires steps": "10",
                               "Hires upscaler": "Latent (nearest-exact)", "Denoising strength": 0.55}
    img2img = to_generate_kwargs(*parse("p\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.55"))
    assert img2img["strength"] == 0.55 and "hires" not in img2img


@pytest.mark.parametrize("extra, key", [
    ("Face restoration: CodeFormer", "Face restoration"), ("Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+",
                                                            "Hires upscaler"),
    ("Seed resize from: 640x448", "Seed resize from"), ("Token merging ratio hr: 0.3", "Token merging ratio hr"),
    ("RNG: cuda", "RNG"), ("Steps: abc", "Steps"), ("Tiling: True", "Tiling"),
    ("Emphasis: No norm", "Emphasis"),
    ("VAE Decoder: TAESD", "VAE Decoder"), ("Schedule rho: 5", "Schedule rho")])
def test_keys_altdiff_does_not_reproduce_are_errors_naming_the_key(extra, key):
    with pytest.raises(InfotextError, match=f"^{key}:"):
        to_generate_kwargs(*parse(f"p\nSteps: 20, Sampler: Euler, Seed: 1, {extra}"))


def test_pixel_neutral_keys_are_read_and_model_hash_checked():
    text = ("p\nSteps: 20, Sampler: Euler, Seed: 1, Model hash: abcdef0123, Model: m9, TI hashes: \"x: 12\", "
            "Clip skip: 2, Emphasis: Original, Token merging ratio: 0, Version: v1.10.1")
    kwargs = to_generate_kwargs(*parse(text), model_hash="abcdef0123")
    # Clip skip is carried so that the remade infotext records it; the webui family does not apply it (XLM-R)
    assert set(kwargs) == {"family", "prompt", "negative_prompt", "num_inference_steps", "sampler", "seed",
                           "clip_skip"} and kwargs["clip_skip"] == 1
    with pytest.raises(InfotextError, match="^Model hash: "):
        to_generate_kwargs(*parse(text), model_hash="0000000000")


def test_model_hash_is_the_webui_short_sha256(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    assert model_hash(checkpoint) == hashlib.sha256(b"weights" * 1000).hexdigest()[:10]
    checkpoint.write_bytes(b"other")  # a changed file (size, mtime) is hashed again
    assert model_hash(checkpoint) == hashlib.sha256(b"other").hexdigest()[:10]


def test_lora_hashes_find_the_files_in_the_folder(tmp_path):
    save_file({"w": torch.ones(3)}, str(tmp_path / "kitty.safetensors"))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "doggo.safetensors"))
    hashes = (f"cat: {lora_hash(tmp_path / 'kitty.safetensors')}, "
              f"dog: {lora_hash(tmp_path / 'doggo.safetensors')}")
    text = write("a <lora:cat:0.8> and <lora:dog:1>", "", steps=20, sampler="Euler", cfg_scale=7, seed=1,
                 width=64, height=64, extra={"Lora hashes": hashes})
    kwargs = to_generate_kwargs(*parse(text), lora_dir=tmp_path)
    assert kwargs["prompt"] == "a <lora:kitty:0.8> and <lora:doggo:1>"
    assert to_generate_kwargs(*parse(text))["prompt"] == "a <lora:cat:0.8> and <lora:dog:1>"  # no folder
    with pytest.raises(InfotextError, match="^Lora hashes: no file"):
        to_generate_kwargs(*parse(text.replace(lora_hash(tmp_path / "kitty.safetensors"), "0" * 12)),
                           lora_dir=tmp_path)


def test_long_lines_parse_in_linear_time():
    cases = ["a" * 6000, "a b " * 1500, '"x, ' * 1500, "k: " + '"\\' * 3000, "word" + " w" * 2998 + ":",
             ", ".join(f"Key {i}: {i}" for i in range(600))[:6000]]
    for line in cases:
        start = time.perf_counter()
        parse(f"prompt\n{line}")
        assert time.perf_counter() - start < 0.05, line[:20]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab :,"\\\n-/x1') + ["\t", "é"]), max_size=80))
def test_parse_never_raises(text):
    prompt, negative, params = parse(text)
    assert isinstance(prompt, str) and isinstance(negative, str)
    assert "RNG" in params and "Schedule type" in params


def test_text_of_reads_pngs_and_images(tmp_path):
    text = write("a cat", "", steps=2, sampler="Euler", cfg_scale=7, seed=1, width=8, height=8)
    path = save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "x.png", text)
    assert text_of(path) == text and text_of(str(path)) == text and text_of(text) == text
    with PIL.Image.open(path) as img:
        assert text_of(img) == text
    with pytest.raises(InfotextError, match="parameters"):
        text_of(PIL.Image.new("RGB", (8, 8)))
    with pytest.raises(TypeError, match="infotext"):
        text_of(3)


line = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(prompt=st.lists(line.filter(lambda s: not s.startswith("Negative prompt:")), max_size=3),
       negative=st.lists(line, max_size=2), model=line.filter(bool), seed=st.integers(0, 2**32),
       cfg=st.floats(1, 30, allow_nan=False), strength=st.floats(0, 1))
def test_write_parse_round_trip_any_text(prompt, negative, model, seed, cfg, strength):
    prompt, negative = "\n".join(prompt).strip(), "\n".join(negative).strip()
    text = write(prompt, negative, steps=20, sampler="Euler", cfg_scale=cfg, seed=seed, width=512, height=512,
                 model=model, variation_seed=seed + 1, variation_seed_strength=strength)
    got_prompt, got_negative, params = parse(text)
    assert (got_prompt, got_negative) == (prompt, negative)
    assert params["Model"] == model and params["Seed"] == str(seed) and params["CFG scale"] == str(cfg)
    kwargs = to_generate_kwargs(got_prompt, got_negative, params)
    assert kwargs["seed"] == seed and kwargs["guidance_scale"] == cfg
    assert kwargs.get("subseed_strength", 0.0) == strength
