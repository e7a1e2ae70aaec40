"""The `altdiff` command end to end on the tiny model, and the infotext/PNG helpers it uses."""

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import altdiff
from altdiff import cli, inpaint
from altdiff.images import read_infotext, save_png
from altdiff.infotext import SAMPLER_LABELS, format_infotext, parse_infotext


def test_cli_writes_png_with_parsable_infotext(m9_folder, tmp_path, capsys):
    prompt = "一只戴着帽子的猫, مرحبا"
    out = tmp_path / "img-%d.png"
    rc = cli.main([prompt, "-n", "低质量, blurry", "--steps", "3", "--cfg-scale", "6.5", "--seed", "1234",
                   "--sampler", "ddim", "--model", str(m9_folder), "--device", "cpu", "--dtype", "fp32",
                   "--batch-size", "2", "-o", str(out), "--quiet"])
    assert rc == 0
    files = sorted(tmp_path.glob("img-*.png"))
    assert [f.name for f in files] == ["img-0.png", "img-1.png"]
    text = read_infotext(files[1])
    p, n, params = parse_infotext(text)
    assert p == prompt and n == "低质量, blurry"
    assert params["Steps"] == "3" and params["Sampler"] == "DDIM" and params["CFG scale"] == "6.5"
    assert params["Seed"] == "1235" and params["Size"] == "32x32"  # second image: seed + 1
    # The seed recorded for an image regenerates that image alone.
    import altdiff
    pipe = altdiff.load(m9_folder, device="cpu")
    again = pipe.generate(prompt, negative_prompt="低质量, blurry", num_inference_steps=3, guidance_scale=6.5,
                          seed=1235, sampler="ddim", progress=False).images[0]
    saved = [np.asarray(PIL.Image.open(f), dtype=int) for f in files]
    # Within one level: a batch of 2 and a batch of 1 round differently inside the convolutions.
    assert np.abs(np.asarray(again, dtype=int) - saved[1]).max() <= 1
    assert np.abs(saved[0] - saved[1]).max() > 30
    # Running again never overwrites: numbering continues.
    assert cli.main([prompt, "--steps", "1", "--model", str(m9_folder), "--device", "cpu", "-o", str(out),
                     "--quiet", "--seed", "1"]) == 0
    assert (tmp_path / "img-2.png").exists()


def test_cli_random_seed_is_recorded_and_img2img(m9_folder, tmp_path):
    init = tmp_path / "init.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((40, 36, 4)) * 255).astype(np.uint8), "RGBA").save(init)
    out = tmp_path / "o.png"
    assert cli.main(["a cat", "-i", str(init), "--strength", "0.5", "--steps", "4", "--model", str(m9_folder),
                     "--device", "cpu", "-o", str(out), "--quiet"]) == 0
    _, _, params = parse_infotext(read_infotext(out))
    assert int(params["Seed"]) >= 0 and params["Denoising strength"] == "0.5"
    assert PIL.Image.open(out).size == (36, 40)


def test_cli_refuses_overwrite_and_bad_args(m9_folder, tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    assert cli.main(["a", "--model", str(m9_folder), "-o", str(out), "--quiet"]) == 2
    assert out.read_bytes() == b"keep" and "already exists" in capsys.readouterr().err
    assert cli.main(["a", "--steps", "0", "-o", str(tmp_path / "y.png")]) == 2
    assert "--steps" in capsys.readouterr().err
    assert cli.main(["a", "-i", str(tmp_path / "missing.png"), "-o", str(tmp_path / "z.png")]) == 2
    assert "image" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "y.png").exists()
    # an unknown sampler is refused before any model loads
    assert cli.main(["a", "--sampler", "nope", "-o", str(tmp_path / "s.png")]) == 2
    assert "sampler" in capsys.readouterr().err


def test_save_png_is_atomic_on_failure(tmp_path, monkeypatch):
    img = PIL.Image.new("RGB", (8, 8))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(PIL.Image.Image, "save", boom)
    with pytest.raises(OSError):
        save_png(img, tmp_path / "a.png", "x")
    assert list(tmp_path.iterdir()) == []


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"), max_size=60)


@settings(max_examples=200, deadline=None)
@given(prompt=text.filter(lambda s: not s.startswith("Negative prompt:")),
       negative=text.filter(lambda s: s == s.strip()), sampler=st.sampled_from(list(SAMPLER_LABELS.values())),
       seed=st.integers(0, 2**32), cfg=st.floats(1, 30, allow_nan=False))
def test_infotext_round_trip(prompt, negative, sampler, seed, cfg):
    params = {"Steps": 20, "Sampler": sampler, "CFG scale": cfg, "Seed": seed, "Size": "512x512",
              "Model": "AltDiffusion-m9"}
    p, n, parsed = parse_infotext(format_infotext(prompt, negative or None, params))
    assert p == prompt and n == (negative or "")
    assert parsed == {k: str(v) for k, v in params.items()}


def test_infotext_survives_png_utf8(tmp_path):
    text = format_infotext("一只猫 قطة кошка 猫", "低质量", {"Steps": 1, "Sampler": "DDIM", "Seed": 1})
    save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "u.png", text)
    assert read_infotext(tmp_path / "u.png") == text


def test_cli_webui_family_writes_the_webui_infotext_and_remakes_it(m9_folder, tmp_path, capsys):
    """A webui sampler name runs the webui family; its PNG carries the webui >= 1.9 infotext, and
    `--infotext PNG` remakes the same pixels from it (and `altdiff` without a prompt or infotext refuses)."""
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(m9_folder), "--device", "cpu", "--quiet", "--no-safety-checker"]
    assert cli.main(["a cat wearing a hat", "--sampler", "DPM++ 2M Karras", "--steps", "3", "--seed", "7",
                     "--rng", "NV", "--ensd", "31337", *common, "-o", str(first)]) == 0
    _, _, params = parse_infotext(read_infotext(first))
    assert (params["Sampler"], params["Schedule type"], params["RNG"]) == ("DPM++ 2M", "Karras", "NV")
    assert cli.main(["--infotext", str(first), *common, "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(first)), np.asarray(PIL.Image.open(again)))
    assert read_infotext(again) == read_infotext(first)
    assert cli.main([*common, "-o", str(tmp_path / "c.png")]) == 2
    assert "prompt" in capsys.readouterr().err


def test_cli_inpaints_and_runs_the_hires_fix_as_generate(m9_folder, tmp_path, capsys):
    """--mask and --hr-scale are generate()'s webui-family mask_image/inpaint_options and hires: the same
    pixels; their infotext remakes the hires image; a mask without an image is refused naming --mask."""
    common = ["--model", str(m9_folder), "--device", "cpu", "--quiet", "--no-safety-checker"]
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    m = PIL.Image.new("L", (32, 32))
    m.paste(255, (8, 8, 24, 24))
    m.save(mask)
    out = tmp_path / "inpainted.png"
    assert cli.main(["a cat", "-i", str(init), "--mask", str(mask), "--mask-blur", "2", "--steps", "3",
                     "--seed", "5", "--sampler", "Euler a", "--strength", "0.9", *common, "-o", str(out)]) == 0
    pipe = altdiff.load(str(m9_folder), device="cpu", safety_checker=False)
    expected = pipe.generate("a cat", image=PIL.Image.open(init), mask_image=PIL.Image.open(mask), seed=[5],
                             sampler="Euler a", strength=0.9, num_inference_steps=3, progress=False,
                             inpaint_options=inpaint.InpaintOptions(mask_blur_x=2, mask_blur_y=2))
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected.images[0]))
    hr = tmp_path / "hires.png"
    assert cli.main(["a cat", "-W", "32", "-H", "32", "--hr-scale", "1.5", "--hr-steps", "2", "--steps", "2",
                     "--seed", "3", *common, "-o", str(hr)]) == 0
    assert PIL.Image.open(hr).size == (48, 48)
    params = parse_infotext(read_infotext(hr))[2]
    assert params["Sampler"] == "DPM++ 2M" and params["Hires upscale"] == "1.5"
    again = tmp_path / "again.png"
    assert cli.main(["--infotext", str(hr), *common, "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(hr)), np.asarray(PIL.Image.open(again)))
    merged = tmp_path / "merged.png"
    assert cli.main(["a cat", "-W", "32", "-H", "32", "--steps", "2", "--seed", "3", "--token-merging-ratio", "0.5",
                     *common, "-o", str(merged)]) == 0
    assert parse_infotext(read_infotext(merged))[2]["Token merging ratio"] == "0.5"
    assert cli.main(["a cat", "--mask", str(mask), *common, "-o", str(tmp_path / "x.png")]) == 2
    assert "--mask" in capsys.readouterr().err
