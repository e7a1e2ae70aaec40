"""Token merging (altdiff.tome) against tomesd 0.1.3, the package the webui applies it with
(sd_models.apply_token_merging: use_rand=False, merge_attn only, sx = sy = 2, max_downsample = 1), on
diffusers' pipeline with the same weights."""

import numpy as np
import pytest
import tiny
import tomesd
import torch
from tomesd.merge import bipartite_soft_matching_random2d

import altdiff
from altdiff import infotext, tome
from altdiff.fast_unet import state_key

SIZE = 32
PROMPT = "a cat wearing a hat"


@pytest.fixture(scope="module")
def pipes(m9_folder):
    return altdiff.load(str(m9_folder), safety_checker=False), tiny.load_reference(m9_folder)


@pytest.mark.parametrize("h, w, r", [(16, 16, 128), (12, 10, 30), (9, 7, 20), (8, 8, 0)])
def test_merge_and_unmerge_equal_tomesds(h, w, r):
    """bipartite_soft_matching_random2d(no_rand=True), odd sizes included: the same tokens merge into the
    same destinations (the merged sequence's order may differ; attention does not see order)."""
    g = torch.Generator().manual_seed(h * w)
    metric = torch.randn(2, h * w, 16, generator=g)
    x = torch.randn(2, h * w, 24, generator=g)
    theirs_merge, theirs_unmerge = bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, no_rand=True)
    mine_merge, mine_unmerge = tome.bipartite_merge(metric, h, w, 2, 2, r)
    assert mine_merge(x).shape == theirs_merge(x).shape
    # a per-token map between merge and unmerge, as the attention block is for a fixed merged set
    assert torch.allclose(mine_unmerge(mine_merge(x) * 3 - 1), theirs_unmerge(theirs_merge(x) * 3 - 1), atol=1e-6)
    if r:
        assert (mine_unmerge(mine_merge(x)) - x).abs().max() > 0.1  # merging really averages tokens


def _diffusers_images(ref, ratio, seed=3, steps=3):
    tomesd.remove_patch(ref)
    if ratio:
        tomesd.apply_patch(ref, ratio=ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
                           merge_mlp=False)
    try:
        return ref(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(seed), output_type="np").images
    finally:
        tomesd.remove_patch(ref)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_images_equal_diffusers_with_tomesd(pipes, ratio):
    pipe, ref = pipes
    ref.safety_checker = None
    theirs = _diffusers_images(ref, ratio)
    mine = altdiff.generate(PROMPT, model=pipe, num_inference_steps=3, height=SIZE, width=SIZE, seed=3,
                            token_merging_ratio=ratio, output_type="np", progress=False).images
    assert np.abs(mine - theirs).max() * 255 <= 1
    plain = _diffusers_images(ref, 0)
    assert np.abs(theirs - plain).max() * 255 > 5  # merging changes the image: the equality means something
    off = altdiff.generate(PROMPT, model=pipe, num_inference_steps=3, height=SIZE, width=SIZE, seed=3,
                           output_type="np", progress=False).images
    assert np.abs(off - plain).max() * 255 <= 1 and pipe.unet.token_merging is None  # restored after the call


def test_webui_family_records_and_remakes_the_ratio(pipes):
    pipe, _ = pipes
    kw = dict(model=pipe, sampler="Euler a", num_inference_steps=3, width=SIZE, height=SIZE, seed=4, progress=False)
    merged = altdiff.generate(PROMPT, token_merging_ratio=0.5, **kw)
    plain = altdiff.generate(PROMPT, **kw)
    assert "Token merging ratio: 0.5" in merged.infotexts[0] and "Token merging" not in plain.infotexts[0]
    assert np.abs(np.asarray(merged.images[0], int) - np.asarray(plain.images[0], int)).max() > 5
    again = altdiff.generate(infotext=merged.infotexts[0], model=pipe, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(merged.images[0]))
    hires = altdiff.generate(PROMPT, token_merging_ratio=0.5, hires={"hr_scale": 1.5}, **kw)
    assert "Token merging ratio: 0.5, Token merging ratio hr: 0.5" in hires.infotexts[0]
    _, _, params = infotext.parse(hires.infotexts[0])
    assert infotext.to_generate_kwargs("p", "", params)["token_merging_ratio"] == 0.5


def test_enable_disable_and_compiled_runner_bookkeeping(pipes):
    """pipe.enable_token_merging sets it on the blocks at the latent's resolution only (max_downsample 1), and
    changes the key a recorded or compiled UNet is rebuilt on."""
    pipe, _ = pipes
    before = state_key(pipe.unet)
    pipe.enable_token_merging(0.4)
    try:
        on = [b.token_merging is not None for _, t in tome.transformer_levels(pipe.unet)
              for b in t.transformer_blocks]
        levels = [lvl for lvl, t in tome.transformer_levels(pipe.unet) for _ in t.transformer_blocks]
        assert on == [lvl == 0 for lvl in levels] and any(on)
        assert state_key(pipe.unet) != before
        kept = altdiff.generate(PROMPT, model=pipe, num_inference_steps=2, width=SIZE, height=SIZE, seed=1,
                                output_type="latent", progress=False).images
        explicit = altdiff.generate(PROMPT, model=pipe, num_inference_steps=2, width=SIZE, height=SIZE, seed=1,
                                    token_merging_ratio=0.4, output_type="latent", progress=False).images
        assert torch.equal(kept, explicit) and pipe.unet.token_merging.ratio == 0.4
    finally:
        pipe.disable_token_merging()
    assert state_key(pipe.unet) == before


@pytest.mark.parametrize("ratio", [1.0, -0.1, "half", float("nan")])
def test_bad_ratio_names_the_argument(pipes, ratio):
    pipe, _ = pipes
    with pytest.raises(ValueError, match="token_merging_ratio"):
        altdiff.generate(PROMPT, model=pipe, num_inference_steps=1, token_merging_ratio=ratio, progress=False)
