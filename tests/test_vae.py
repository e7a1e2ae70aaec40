"""AutoencoderKL parity with diffusers 0.35.2 on the tiny saved VAE: encode, sample, decode, tiling, slicing,
legacy keys, the full-size layout, the float16 overflow retry and input errors."""

import json
import warnings

import pytest
import tiny
import torch
from conftest import max_abs
from diffusers import AutoencoderKL as RefVAE
from safetensors.torch import save_file

from altdiff.config import ConfigError, VAEConfig
from altdiff.vae import AutoencoderKL, DiagonalGaussian, load_vae
from altdiff.weights import WeightsError, read_state_dict

TOL = 1e-5


@pytest.fixture(scope="module")
def vae_folder(m9_folder):
    return m9_folder / "vae"


@pytest.fixture(scope="module")
def ref(vae_folder):
    return RefVAE.from_pretrained(vae_folder).eval().requires_grad_(False)


@pytest.fixture
def vae(vae_folder, ref):
    model = load_vae(vae_folder)
    # Each test sets the reference's switches itself; start both plain.
    ref.disable_tiling()
    ref.disable_slicing()
    ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 32, 16, 0.25
    return model


def _image(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(*shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_encode_posterior_matches_diffusers(vae, ref):
    x = _image(2, 3, 32, 48)
    theirs = ref.encode(x).latent_dist
    ours = vae.encode(x)
    assert ours.mean.shape == (2, 4, 16, 24)
    for name in ("mean", "logvar", "std", "var"):
        assert max_abs(getattr(ours, name), getattr(theirs, name)) <= TOL, name
    assert max_abs(ours.mode(), theirs.mode()) <= TOL


def test_posterior_clamps_logvar_like_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4)) * 40
    theirs, ours = DiagonalGaussianDistribution(moments), DiagonalGaussian(moments)
    assert (theirs.logvar == 20).any() and (theirs.logvar == -30).any()
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.sample(torch.Generator().manual_seed(5)),
                       theirs.sample(torch.Generator().manual_seed(5)))


def test_sample_with_seeded_generator(vae, ref):
    x = _image(2, 3, 32, 32)
    theirs = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
    ours = vae.encode(x).sample(torch.Generator().manual_seed(7))
    assert max_abs(ours, theirs) <= TOL
    assert max_abs(ours, vae.encode(x).sample(torch.Generator().manual_seed(8))) > 0.1


def test_sample_with_generator_list_matches_img2img_per_image_loop(vae, ref):
    # diffusers' img2img encodes image i alone and samples it with generator[i].
    x = _image(3, 3, 32, 32)
    theirs = torch.cat([ref.encode(x[i:i + 1]).latent_dist.sample(torch.Generator().manual_seed(10 + i))
                        for i in range(3)])
    ours = vae.encode(x).sample([torch.Generator().manual_seed(10 + i) for i in range(3)])
    assert max_abs(ours, theirs) <= TOL


def test_decode_matches_diffusers(vae, ref):
    z = _latents(2, 4, 16, 24)
    out = vae.decode(z)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    assert max_abs(out, ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("tiles, latent_hw", [
    (None, (40, 56)),  # config defaults: 32-pixel image tiles, 16-latent tiles, overlap 0.25 → 4 x 5 tiles
    ((48, 24, 0.25), (30, 40)),
    ((24, 12, 0.5), (14, 18)),
])
def test_tiled_encode_and_decode_match_diffusers(vae, ref, tiles, latent_hw):
    if tiles is None:
        vae.enable_tiling()
    else:
        vae.enable_tiling(*tiles)
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = tiles
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == (
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor)
    ref.enable_tiling()
    h, w = latent_hw
    x, z = _image(1, 3, 2 * h, 2 * w), _latents(1, 4, h, w)
    mean, image = vae.encode(x).mean, vae.decode(z)
    assert mean.shape == (1, 4, h, w) and image.shape == (1, 3, 2 * h, 2 * w)
    assert max_abs(mean, ref.encode(x).latent_dist.mean) <= TOL
    assert max_abs(image, ref.decode(z).sample) <= TOL
    # Tiling really happened: the tiled result differs from the one-shot one.
    vae.disable_tiling()
    assert max_abs(mean, vae.encode(x).mean) > 1e-3 and max_abs(image, vae.decode(z)) > 1e-3


def test_tiling_not_triggered_at_tile_size(vae, vae_folder):
    vae.enable_tiling()
    x, z = _image(1, 3, 32, 32), _latents(1, 4, 16, 16)
    plain = load_vae(vae_folder)
    assert torch.equal(vae.encode(x).mean, plain.encode(x).mean)
    assert torch.equal(vae.decode(z), plain.decode(z))


def test_sliced_encode_and_decode(vae, ref):
    x, z = _image(3, 3, 32, 32), _latents(3, 4, 16, 16)
    vae.enable_slicing()
    ref.enable_slicing()
    mean, image = vae.encode(x).mean, vae.decode(z)
    assert max_abs(mean, ref.encode(x).latent_dist.mean) <= TOL
    assert max_abs(image, ref.decode(z).sample) <= TOL
    vae.disable_slicing()
    assert max_abs(mean, vae.encode(x).mean) <= TOL and max_abs(image, vae.decode(z)) <= TOL


def test_sliced_and_tiled_together(vae, ref):
    x = _image(2, 3, 40, 48)
    vae.enable_slicing()
    vae.enable_tiling()
    ref.enable_slicing()
    ref.enable_tiling()
    assert max_abs(vae.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL
    z = _latents(2, 4, 20, 24)
    assert max_abs(vae.decode(z), ref.decode(z).sample) <= TOL


def test_legacy_attention_keys_load_identically(vae, vae_folder, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in read_state_dict(vae_folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    assert not any(".to_q." in k for k in renamed)
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    old = load_vae(tmp_path)
    z, x = _latents(1, 4, 16, 16), _image(1, 3, 32, 32)
    assert torch.equal(old.decode(z), vae.decode(z))
    assert torch.equal(old.encode(x).mean, vae.encode(x).mean)


@pytest.mark.parametrize("overrides", [{"mid_block_add_attention": False},
                                       {"use_quant_conv": False, "use_post_quant_conv": False}])
def test_config_switches_match_diffusers(tmp_path, overrides):
    torch.manual_seed(3)
    ref = RefVAE(**tiny.vae_kwargs(**overrides)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_vae(tmp_path)
    x, z = _image(1, 3, 32, 32), _latents(1, 4, 16, 16)
    with torch.no_grad():
        assert max_abs(ours.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL
        assert max_abs(ours.decode(z), ref.decode(z).sample) <= TOL


def test_full_size_sd_vae_layout_matches_diffusers_on_meta():
    kwargs = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                  "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
                  "sample_size": 512, "in_channels": 3, "out_channels": 3, "norm_num_groups": 32}
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.from_dict(kwargs))
        theirs = RefVAE(**kwargs)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    count = sum(p.numel() for p in ours.parameters())
    print(f"full-size VAE parameters: altdiff {count:,} diffusers {sum(p.numel() for p in theirs.parameters()):,}")
    assert count == sum(p.numel() for p in theirs.parameters())
    assert 83.6e6 < count < 83.7e6
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size) == (512, 64)
    assert ours.config.scaling_factor == 0.18215


def _fp16_or_skip(vae_folder):
    # Probe the platform with a bare convolution: an error from the model under test must fail the test.
    half = torch.zeros(1, 1, 3, 3, dtype=torch.float16)
    try:
        torch.nn.functional.conv2d(half, half)
    except RuntimeError as e:
        pytest.skip(f"float16 convolution unsupported on this CPU build: {e}")
    return load_vae(vae_folder, dtype=torch.float16)


def test_fp16_decode_overflow_retries_in_fp32(vae_folder):
    model = _fp16_or_skip(vae_folder)
    z = _latents(1, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normal = model.decode(z)  # a normal latent decodes in float16 without the retry
    assert normal.dtype == torch.float16 and torch.isfinite(normal).all()

    huge = z * 3e4  # activations past float16's 65504 in the decoder's first layers
    with torch.no_grad():
        assert not torch.isfinite(model.post_quant_conv(huge.half())).all()
    with pytest.warns(RuntimeWarning, match="float32"):
        out = model.decode(huge)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert model.dtype == torch.float16 and all(p.dtype == torch.float16 for p in model.parameters())
    expected = load_vae(vae_folder, dtype=torch.float16).float().decode(huge).half()
    assert torch.equal(out, expected)


def test_fp16_retry_runs_in_float32_on_forced_nan(vae_folder, monkeypatch):
    model = _fp16_or_skip(vae_folder)
    conv_out = model.decoder.conv_out
    forward = conv_out.forward

    def nan_in_half(x):  # stand-in for an overflow that only float16 hits
        y = forward(x)
        return torch.full_like(y, float("nan")) if y.dtype == torch.float16 else y

    monkeypatch.setattr(conv_out, "forward", nan_in_half)
    z = _latents(1, 4, 16, 16)
    with pytest.warns(RuntimeWarning, match="overflowed in float16"):
        out = model.decode(z)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("shape, match", [
    ((3, 32, 32), r"image must have shape \(batch, 3, H, W\)"),
    ((1, 4, 32, 32), r"image must have shape \(batch, 3, H, W\)"),
    ((1, 3, 31, 32), "image height and width must be positive multiples of 2"),
    ((1, 3, 32, 33), "image height and width must be positive multiples of 2"),
    ((0, 3, 32, 32), "image must have shape"),
])
def test_encode_rejects_bad_image(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(4, 16, 16), (1, 3, 16, 16), (1, 8, 16, 16), (1, 4, 0, 16)])
def test_decode_rejects_bad_latents(vae, shape):
    with pytest.raises(ValueError, match=r"latents"):
        vae.decode(torch.zeros(shape))


def test_non_tensor_inputs_raise_type_error(vae):
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        vae.encode([[0.0]])
    with pytest.raises(TypeError, match="latents must be a torch.Tensor"):
        vae.decode(None)


@pytest.mark.parametrize("kwargs, match", [
    ({"tile_sample_min_size": 0}, "tile_sample_min_size must be a positive int"),
    ({"tile_sample_min_size": 32.0}, "tile_sample_min_size must be a positive int"),
    ({"tile_latent_min_size": -1}, "tile_latent_min_size must be a positive int"),
    ({"tile_overlap_factor": 1.0}, r"tile_overlap_factor must be a number in \[0, 1\)"),
    ({"tile_sample_min_size": 2, "tile_latent_min_size": 1, "tile_overlap_factor": 0.5}, "leaves no step"),
])
def test_enable_tiling_rejects_bad_sizes(vae, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vae.enable_tiling(**kwargs)
    assert not vae.use_tiling


def test_load_vae_errors(vae_folder, tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights file"):
        load_vae(tmp_path)
    sd = read_state_dict(vae_folder / "diffusion_pytorch_model.safetensors")
    sd.pop("decoder.conv_out.bias")
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match="missing keys: decoder.conv_out.bias"):
        load_vae(tmp_path)
    config = json.loads((vae_folder / "config.json").read_text())
    config["down_block_types"] = ["AttnDownEncoderBlock2D"] * 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="down_block_types"):
        load_vae(tmp_path)


def test_load_vae_variant_and_dtype(vae_folder, tmp_path):
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    sd = read_state_dict(vae_folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    model = load_vae(tmp_path, dtype=torch.float32, variant="fp16")
    assert model.dtype == torch.float32
    assert torch.equal(model.decoder.conv_out.weight, sd["decoder.conv_out.weight"].half().float())
