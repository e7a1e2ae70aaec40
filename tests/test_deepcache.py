"""DeepCache (altdiff.deepcache) against the deepcache 0.1.1 package's DeepCacheSDHelper on diffusers'
pipeline with the same weights: the same images, step for step (its uniform skip over the scheduler's
timesteps, PNDM's repeated timestep included)."""

import numpy as np
import pytest
import tiny
import torch
from DeepCache import DeepCacheSDHelper

import altdiff

SIZE = 32
PROMPT = "a cat wearing a hat"


@pytest.fixture(scope="module")
def pipes(m9_folder):
    ref = tiny.load_reference(m9_folder)
    ref.safety_checker = None
    return altdiff.load(str(m9_folder), safety_checker=False), ref


def _diffusers(ref, interval, branch, steps):
    helper = None
    if interval:
        helper = DeepCacheSDHelper(pipe=ref)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
    try:
        return ref(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE,
                   generator=torch.Generator().manual_seed(7), output_type="np").images
    finally:
        if helper is not None:
            helper.disable()


def _altdiff(pipe, interval, branch, steps, **kw):
    if interval:
        pipe.enable_deepcache(cache_interval=interval, cache_branch_id=branch)
    try:
        return altdiff.generate(PROMPT, model=pipe, num_inference_steps=steps, height=SIZE, width=SIZE, seed=7,
                                output_type="np", progress=False, **kw).images
    finally:
        pipe.disable_deepcache()


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 1), (3, 3), (5, 2)])
def test_images_equal_diffusers_with_deepcache(pipes, interval, branch):
    pipe, ref = pipes
    theirs = _diffusers(ref, interval, branch, steps=7)
    mine = _altdiff(pipe, interval, branch, steps=7)
    assert np.abs(mine - theirs).max() * 255 <= 1
    plain = _diffusers(ref, 0, 0, steps=7)
    assert np.abs(theirs - plain).max() * 255 > 1  # caching changes the image: the equality means something


def test_off_and_interval_one_are_the_plain_images(pipes):
    pipe, ref = pipes
    plain = _altdiff(pipe, 0, 0, steps=4)
    assert np.array_equal(_altdiff(pipe, 1, 0, steps=4), plain)  # every step full
    assert pipe.unet.deepcache is None and "forward" not in vars(pipe.unet.down_blocks[0])
    assert np.abs(plain - _diffusers(ref, 0, 0, steps=4)).max() * 255 <= 1


def test_cached_steps_skip_the_deep_blocks(pipes):
    """Interval 3: steps 0, 3 and 6 run the whole UNet; the others only the shallow branch (the middle
    block's layers do not run: the block returns its cached output)."""
    pipe, _ = pipes
    calls = []
    handle = pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        _altdiff(pipe, 3, 0, steps=7)
    finally:
        handle.remove()
    # PNDM: 8 UNet calls for 7 steps (its repeated timestep counts as step 1 twice); full at steps 0, 3, 6
    assert len(calls) == 3


def test_webui_family_caches_per_denoiser_call(pipes):
    pipe, _ = pipes
    kw = dict(sampler="Euler", family="webui")
    cached = _altdiff(pipe, 2, 0, steps=4, **kw)
    plain = _altdiff(pipe, 0, 0, steps=4, **kw)
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() * 255 > 1
    assert np.array_equal(_altdiff(pipe, 2, 0, steps=4, **kw), cached)  # repeatable: the cache is reset per call


@pytest.mark.parametrize("kwargs, name", [({"cache_interval": 0}, "cache_interval"),
                                          ({"cache_branch_id": 6}, "cache_branch_id"),
                                          ({"cache_branch_id": -1}, "cache_branch_id"),
                                          ({"cache_interval": 2.5}, "cache_interval")])
def test_bad_parameters_name_themselves(pipes, kwargs, name):
    pipe, _ = pipes
    with pytest.raises(ValueError, match=name):
        pipe.enable_deepcache(**kwargs)
    assert pipe.unet.deepcache is None
