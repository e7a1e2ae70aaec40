"""altdiff.unet against diffusers' UNet2DConditionModel (the oracle) on tiny saved weights, fp32 CPU."""

import pytest
import tiny
import torch
from conftest import max_abs
from diffusers import UNet2DConditionModel

from altdiff.attention import set_attention_slice
from altdiff.config import UNetConfig
from altdiff.unet import UNet, load_unet
from altdiff.weights import WeightsError

TOL = 1e-5
FREEU_SD15 = {"s1": 0.9, "s2": 0.2, "b1": 1.2, "b2": 1.4}


@pytest.fixture(scope="module")
def models(tiny_folder):
    """(diffusers reference, ours) for the m9 (SD1.x-style) and m18 (SD2-style) tiny UNets."""
    folder = tiny_folder / "unet"
    return UNet2DConditionModel.from_pretrained(folder).eval(), load_unet(folder)


def cfg_inputs(height: int, width: int, context_dim: int, tokens: int = 77):
    """CFG-shaped batch: the same latents twice, with two different text states."""
    latents = torch.randn(1, 4, height, width).repeat(2, 1, 1, 1)
    return latents, torch.randn(2, tokens, context_dim)


def run_both(ref, ours, latents, timestep, context, freeu=None, **kwargs):
    if freeu:
        ref.enable_freeu(**freeu)
        ours.enable_freeu(**freeu)
    try:
        with torch.no_grad():
            expected = ref(latents, timestep, context, **kwargs).sample
            got = ours(latents, timestep, context, **kwargs)
    finally:
        ref.disable_freeu()
        ours.disable_freeu()
    return expected, got


def build_saved(tmp_path, variant: str, **overrides):
    """A diffusers UNet with a config override, saved and loaded back with load_unet."""
    ref = UNet2DConditionModel(**tiny.unet_kwargs(variant, **overrides)).eval()
    ref.save_pretrained(tmp_path / "unet")
    return ref, load_unet(tmp_path / "unet")


def test_matches_diffusers_cfg_batch_non_square(models):
    ref, ours = models
    latents, context = cfg_inputs(40, 56, ours.config.cross_attention_dim)
    expected, got = run_both(ref, ours, latents, torch.tensor(981), context,
                             cross_attention_kwargs={"scale": 1.0})
    assert got.shape == (2, 4, 40, 56)
    assert max_abs(got, expected) <= TOL
    # The text states must matter, else the comparison would not see a broken cross-attention.
    assert max_abs(got[0], got[1]) > 1e-2


def test_freeu_matches_diffusers(models):
    ref, ours = models
    latents, context = cfg_inputs(24, 32, ours.config.cross_attention_dim)  # fft over 24 (odd) and 32 (2**n)
    expected, got = run_both(ref, ours, latents, 500, context, FREEU_SD15)
    assert max_abs(got, expected) <= TOL
    with torch.no_grad():
        plain = ours(latents, 500, context)
    assert max_abs(got, plain) > 1e-3


def test_odd_latent_size_forwards_upsample_size(models):
    """diffusers accepts any latent size (e.g. a 520px image → 65 latents) by forwarding skip sizes."""
    ref, ours = models
    latents, context = cfg_inputs(9, 13, ours.config.cross_attention_dim)
    expected, got = run_both(ref, ours, latents, torch.tensor([10, 999]), context, FREEU_SD15)
    assert got.shape == (2, 4, 9, 13)
    assert max_abs(got, expected) <= TOL


def test_zero_freeu_factor_disables_freeu_like_diffusers(models):
    ref, ours = models
    latents, context = cfg_inputs(8, 8, ours.config.cross_attention_dim)
    expected, got = run_both(ref, ours, latents, 500.0, context, {**FREEU_SD15, "s2": 0.0})
    with torch.no_grad():
        plain = ours(latents, 500.0, context)
    assert max_abs(got, expected) <= TOL
    assert max_abs(got, plain) == 0.0


def test_attention_slicing_keeps_output(models):
    ref, ours = models
    latents, context = cfg_inputs(16, 24, ours.config.cross_attention_dim)
    with torch.no_grad():
        expected = ref(latents, 700, context).sample
    set_attention_slice(50)  # 384 query tokens at the top level: several slices
    try:
        with torch.no_grad():
            got = ours(latents, 700, context)
    finally:
        set_attention_slice(None)
    assert max_abs(got, expected) <= TOL


VARIANTS = {
    "upcast_attention": ("m18", {"upcast_attention": True}, (12, 16), None),
    "transformer_layers_2": ("m9", {"transformer_layers_per_block": 2}, (12, 16), FREEU_SD15),
    "transformer_layers_list": ("m18", {"transformer_layers_per_block": [1, 2]}, (12, 16), None),
    "no_mid_block": ("m9", {"mid_block_type": None}, (16, 16), FREEU_SD15),
    # downsample_padding=0 pads right/bottom; (2, 5) is the smallest height this config can run.
    "misc_fields": ("m18", {"layers_per_block": 1, "downsample_padding": 0, "mid_block_scale_factor": 1.414,
                            "norm_num_groups": 16, "norm_eps": 1e-6, "flip_sin_to_cos": False, "freq_shift": 1,
                            "conv_in_kernel": 1, "conv_out_kernel": 5}, (2, 5), None),
    "three_blocks_odd": ("m18", {"block_out_channels": (32, 64, 64), "attention_head_dim": (2, 4, 8),
                                 "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                 "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2},
                         (11, 13), FREEU_SD15),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_variants_match_diffusers(tmp_path, name):
    variant, overrides, (h, w), freeu = VARIANTS[name]
    ref, ours = build_saved(tmp_path, variant, **overrides)
    latents, context = cfg_inputs(h, w, 32, tokens=7)
    expected, got = run_both(ref, ours, latents, torch.tensor([10, 999]), context, freeu)
    assert max_abs(got, expected) <= TOL


def test_time_cond_proj_dim(tmp_path):
    ref, ours = build_saved(tmp_path, "m9", time_cond_proj_dim=32)
    assert ours.time_embedding.cond_proj.weight.shape == (32, 32)
    latents, context = cfg_inputs(8, 12, 32, tokens=7)
    cond = torch.randn(2, 32)
    expected, got = run_both(ref, ours, latents, 400, context, timestep_cond=cond)
    assert max_abs(got, expected) <= TOL
    # Without timestep_cond diffusers skips the embedding; so do we.
    expected_none, got_none = run_both(ref, ours, latents, 400, context)
    assert max_abs(got_none, expected_none) <= TOL
    assert max_abs(got, got_none) > 1e-3


def test_bfloat16_matches_diffusers_bfloat16(tmp_path):
    """Dtype plumbing: the time embedding is projected in the sample's dtype, FreeU's fft runs in fp32 and is
    cast back (bf16 has no fft). Measured: bit-identical to diffusers on CPU; allow one bf16 ulp at ~2."""
    ref, _ = build_saved(tmp_path, "m9")
    ours = load_unet(tmp_path / "unet", dtype=torch.bfloat16)
    ref.to(torch.bfloat16)
    latents, context = cfg_inputs(12, 16, 32, tokens=7)
    latents, context = latents.bfloat16(), context.bfloat16()
    expected, got = run_both(ref, ours, latents, torch.tensor(500), context, FREEU_SD15)
    assert got.dtype == torch.bfloat16
    assert max_abs(got, expected) <= 1.6e-2


def test_load_unet_variant_and_dtype(tmp_path):
    ref = UNet2DConditionModel(**tiny.unet_kwargs("m9")).eval()
    ref.save_pretrained(tmp_path, variant="fp16")
    ours = load_unet(tmp_path, dtype=torch.float16, variant="fp16")
    assert ours.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in ours.parameters())
    with pytest.raises(TypeError, match="sample"):
        ours(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 32))


def test_load_unet_without_weights_raises(tmp_path):
    UNet2DConditionModel(**tiny.unet_kwargs("m9")).save_config(tmp_path)
    with pytest.raises(WeightsError, match="diffusion_pytorch_model"):
        load_unet(tmp_path)


SD1_FULL = {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
            "attention_head_dim": 8, "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
FULL = {"m9": SD1_FULL,
        "m18": {**SD1_FULL, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
                "use_linear_projection": True}}


@pytest.mark.parametrize("variant", ["m9", "m18"])
def test_full_size_keys_shapes_and_parameter_count(variant):
    with torch.device("meta"):
        ref = UNet2DConditionModel(**FULL[variant])
        ours = UNet(UNetConfig.from_dict(dict(ref.config)))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    count = sum(p.numel() for p in ours.parameters())
    print(f"{variant} UNet parameters: {count / 1e6:.2f}M")
    assert count == sum(p.numel() for p in ref.parameters())
    if variant == "m9":
        assert round(count / 1e6, 2) == 859.52


# --- errors at the public boundary (checked before any compute, so a meta-built UNet suffices) ---

def meta_unet(variant="m9", **overrides) -> UNet:
    with torch.device("meta"):
        return UNet(UNetConfig.from_dict(tiny.unet_kwargs(variant, **overrides)))


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (4, 8, 8)], ids=["channels", "3d"])
def test_bad_sample_shape(shape):
    with pytest.raises(ValueError, match="sample must be a .*4, height, width"):
        meta_unet()(torch.randn(shape), 1, torch.randn(1, 7, 32))


def test_bad_sample_type_and_dtype():
    with pytest.raises(ValueError, match="sample"):
        meta_unet()([[1.0]], 1, torch.randn(1, 7, 32))
    with pytest.raises(TypeError, match="sample must have the UNet's dtype"):
        meta_unet()(torch.randn(1, 4, 8, 8, dtype=torch.float64), 1, torch.randn(1, 7, 32))


def test_sample_size_that_would_crash_is_refused():
    overrides = {"downsample_padding": 0}
    ref = UNet2DConditionModel(**tiny.unet_kwargs("m9", **overrides)).eval()
    latents, context = torch.randn(1, 4, 1, 8), torch.randn(1, 7, 32)
    with pytest.raises(RuntimeError), torch.no_grad():
        ref(latents, 1, context)  # diffusers dies deep inside conv2d
    with pytest.raises(ValueError, match="sample: latent size .* too small"):
        meta_unet(**overrides)(latents, 1, context)
    with pytest.raises(ValueError, match="sample: latent size"):
        meta_unet()(torch.randn(1, 4, 0, 8), 1, context)


@pytest.mark.parametrize("context", [torch.randn(1, 7, 16), torch.randn(2, 7, 32), torch.randn(7, 32)],
                         ids=["width", "batch", "2d"])
def test_bad_encoder_hidden_states(context):
    with pytest.raises(ValueError, match="encoder_hidden_states must be a"):
        meta_unet()(torch.randn(1, 4, 8, 8), 1, context)


def test_bad_cross_attention_kwargs():
    unet, args = meta_unet(), (torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 32))
    with pytest.raises(ValueError, match="cross_attention_kwargs: unsupported keys \\['gligen'\\]"):
        unet(*args, cross_attention_kwargs={"gligen": {}})
    with pytest.raises(TypeError, match="cross_attention_kwargs\\['scale'\\]"):
        unet(*args, cross_attention_kwargs={"scale": "high"})
    with pytest.raises(TypeError, match="cross_attention_kwargs: must be a dict"):
        unet(*args, cross_attention_kwargs=[("scale", 1.0)])


def test_bad_timestep():
    unet, latents, context = meta_unet(), torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with pytest.raises(ValueError, match="timestep must be .* got shape \\(3,\\)"):
        unet(latents, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="timestep must be"):
        unet(latents, torch.ones(2, 1), context)
    with pytest.raises(TypeError, match="timestep must be a number or a tensor"):
        unet(latents, "10", context)


def test_bad_timestep_cond():
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with pytest.raises(ValueError, match="timestep_cond was given but .* no time_cond_proj_dim"):
        meta_unet()(latents, 1, context, timestep_cond=torch.randn(2, 32))
    with pytest.raises(ValueError, match="timestep_cond must be a \\(1 or 2, 32\\) tensor"):
        meta_unet(time_cond_proj_dim=32)(latents, 1, context, timestep_cond=torch.randn(2, 16))


def test_enable_freeu_rejects_non_numbers():
    with pytest.raises(TypeError, match="enable_freeu: b2 must be a finite number"):
        meta_unet().enable_freeu(0.9, 0.2, 1.2, None)
