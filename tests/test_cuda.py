"""CUDA: the same images as diffusers on the GPU (fp32 and fp16, CPU and CUDA generators), and
`compile=True`'s CUDA-graph replay equal to the eager UNet. Skipped without a GPU."""

import numpy as np
import pytest
import tiny
import torch
from conftest import max_abs
from test_generate import PROMPT, STEPS, to_uint8

import altdiff
from altdiff import compiled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pipes(m9_folder):
    def get(dtype):
        return (altdiff.load(m9_folder, device="cuda", dtype=dtype),
                tiny.load_reference(m9_folder).to("cuda", dtype))
    return get


def levels(a, b) -> float:
    diff = np.abs(to_uint8(a) - to_uint8(b)).max()
    print(f"max image difference: {diff:.0f} uint8 levels")
    return diff


@pytest.mark.parametrize("dtype, generator_device, allowed", [
    (torch.float32, "cpu", 1), (torch.float32, "cuda", 1), (torch.float16, "cpu", 2)])
def test_images_match_diffusers_on_cuda(pipes, dtype, generator_device, allowed):
    alt, ref = pipes(dtype)
    kw = dict(num_inference_steps=STEPS, output_type="np", negative_prompt="blurry", height=64, width=48)
    a = alt.generate(PROMPT, generator=torch.Generator(generator_device).manual_seed(3), progress=False, **kw)
    r = ref(PROMPT, generator=torch.Generator(generator_device).manual_seed(3), **kw)
    assert np.isfinite(a.images).all()
    assert levels(a.images, r.images) <= allowed
    assert a.nsfw_content_detected == r.nsfw_content_detected


def test_vae_tiling_on_cuda(pipes):
    alt, ref = pipes(torch.float32)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 40, 24, generator=g).cuda()
    for pipe in (alt, ref):
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 64, 8
    try:
        with torch.inference_mode():
            assert max_abs(alt.vae.decode(z).cpu(), ref.vae.decode(z).sample.cpu()) < 1e-4
    finally:
        for pipe in (alt, ref):
            pipe.vae.disable_tiling()


@pytest.mark.parametrize("graph_only", [True, False])
def test_cuda_graph_replay_equals_eager(m9_folder, monkeypatch, graph_only):
    """graph_only: capture the eager kernels (no inductor), so replay must equal eager to the bit."""
    if graph_only:
        monkeypatch.setattr(compiled.torch, "compile", lambda module, **kw: module)
    pipe = altdiff.load(m9_folder, device="cuda", dtype=torch.float32, compile=True, safety_checker=False)
    runner = pipe.unet_runner()
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).cuda()
    with torch.inference_mode():
        outs = []
        for side, t in ((8, 500), (8, 20), (16, 999)):  # two shapes: two graphs; a new timestep each replay
            x = torch.randn(2, 4, side, side, generator=g).cuda()
            t = torch.tensor(t, device="cuda")
            out = runner(x, t, c)
            outs.append(out)
            expected = pipe.unet(x, t, c)
            assert (torch.equal(out, expected) if graph_only else max_abs(out.cpu(), expected.cpu()) < 1e-4)
        assert len(runner.graphs) == 2 and not runner.failed
        assert outs[0].data_ptr() != outs[1].data_ptr() and not torch.equal(outs[0], outs[1])  # not aliased
        pipe.enable_freeu(0.9, 0.2, 1.2, 1.4)
        x = torch.randn(2, 4, 8, 8, generator=g).cuda()
        t = torch.tensor(300, device="cuda")
        out = pipe.unet_runner()(x, t, c)
        assert pipe.unet_runner() is not runner
        assert max_abs(out.cpu(), pipe.unet(x, t, c).cpu()) < (0 if graph_only else 1e-4) + 1e-12


def test_compiled_generate_on_cuda_equals_eager(m9_folder):
    fast = altdiff.load(m9_folder, device="cuda", dtype=torch.float16, compile=True)
    plain = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=0, sampler="euler_a")
    assert levels(fast.generate(PROMPT, **kw).images, plain.generate(PROMPT, **kw).images) <= 2
    assert not fast._compiled.failed
