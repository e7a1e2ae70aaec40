"""CUDA: the same images as diffusers on the GPU (fp32 and fp16, CPU and CUDA generators, with the default
CUDA-graph replay of the UNet), replay bit-identical to the eager UNet, and `compile=True` close to it.
Skipped without a GPU."""

import numpy as np
import pytest
import tiny
import torch
from conftest import max_abs
from test_generate import PROMPT, STEPS, to_uint8

import altdiff
from altdiff import fast_unet

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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    err = ((a - b).norm() / b.norm()).item()
    print(f"relative error {err:.2e}")
    return err


def test_graph_replay_is_bit_identical_and_rebuilt_on_change(m9_folder):
    pipe = altdiff.load(m9_folder, device="cuda", dtype=torch.float32, safety_checker=False)
    runner = pipe.unet_runner()
    assert isinstance(runner, fast_unet.FastUNet) and runner.unet is pipe.unet and not runner.compile
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).cuda()
    with torch.inference_mode():
        outs = []
        for side, t in ((8, 500), (8, 20), (16, 999)):  # two shapes: two graphs; a new timestep each replay
            x = torch.randn(2, 4, side, side, generator=g).cuda()
            t = torch.tensor(t, device="cuda")
            outs.append(runner(x, t, c))
            assert torch.equal(outs[-1], pipe.unet(x, t, c))
        assert len(runner.graphs) == 2 and not runner.failed
        assert not torch.equal(outs[0], outs[1])  # each call its own output, not the graph's buffer
        pipe.enable_freeu(0.9, 0.2, 1.2, 1.4)
        x, t = torch.randn(2, 4, 8, 8, generator=g).cuda(), torch.tensor(300, device="cuda")
        assert pipe.unet_runner() is not runner
        assert torch.equal(pipe.unet_runner()(x, t, c), pipe.unet(x, t, c))


def test_default_graphs_generate_the_same_images_as_eager(m9_folder):
    graphs = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)
    eager = altdiff.load(m9_folder, device="cuda", dtype=torch.float16, cuda_graphs=False)
    assert eager.unet_runner() is eager.unet
    for sampler in ("pndm", "euler_a", "dpmpp_2m"):
        kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=0, sampler=sampler)
        assert np.array_equal(graphs.generate(PROMPT, **kw).images, eager.generate(PROMPT, **kw).images)


def test_compiled_unet_and_generate_on_cuda(m9_folder):
    fast = altdiff.load(m9_folder, device="cuda", dtype=torch.float32, compile=True)
    plain = altdiff.load(m9_folder, device="cuda", dtype=torch.float32, cuda_graphs=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).cuda()
    c = torch.randn(2, 77, plain.unet.config.cross_attention_dim, generator=g).cuda()
    t = torch.tensor(500, device="cuda")
    with torch.inference_mode():
        assert rel_err(fast.unet_runner()(x, t, c), plain.unet(x, t, c)) < 1e-3  # TF32 convolutions
    side = 8 * plain.vae_scale_factor  # the latent size compiled above: no second compilation
    kw = dict(num_inference_steps=STEPS, output_type="latent", progress=False, seed=0, height=side,
              width=side)
    assert rel_err(fast.generate(PROMPT, **kw).images, plain.generate(PROMPT, **kw).images) < 1e-2
    assert not fast._fast_unet.failed


def test_tensors_on_another_device_are_moved(m9_folder):
    pipe = altdiff.load(m9_folder, device="cpu", safety_checker=False)
    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=STEPS, guidance_scale=1.0, output_type="np", progress=False)
    want = pipe.generate(prompt_embeds=embeds, latents=latents, **kw).images
    assert np.array_equal(pipe.generate(prompt_embeds=embeds.cuda(), latents=latents.cuda(), **kw).images, want)
    want = pipe.generate(PROMPT, image=image, strength=0.5, seed=2, **kw).images
    assert np.array_equal(pipe.generate(PROMPT, image=image.cuda(), strength=0.5, seed=2, **kw).images, want)


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_on_cuda(m9_folder, mode):
    """Bit-identical images (model offload keeps the CUDA graphs, sequential runs eagerly), each component on
    the GPU only for its turn, pinned CPU weights afterwards, and the memory held during the UNet loop: the
    whole UNet under model offload but not the VAE as well; under sequential offload less than the UNet."""
    plain = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)
    pipe = altdiff.load(m9_folder, device="cuda", dtype=torch.float16, offload=mode)
    assert pipe.device.type == "cuda" and all(p.device.type == "cpu" for p in pipe.unet.parameters())
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=0, negative_prompt="blurry")
    unet, vae = nbytes(pipe.unet), nbytes(pipe.vae)
    on_gpu, held = [], []

    def step_end(p, i, t, tensors):
        torch.cuda.synchronize()
        on_gpu.append({name: {q.device.type for q in getattr(p, name).parameters()}
                       for name in ("text_encoder", "unet", "vae", "safety_checker")})
        if i > 0:  # a window of one step (the first also holds the text encoder and the recording)
            held.append(torch.cuda.max_memory_allocated() - before)
        torch.cuda.reset_peak_memory_stats()
        return {}

    for _ in range(2):  # the second generation records the UNet again onto its new copy
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        images = pipe.generate(PROMPT, callback_on_step_end=step_end, **kw).images
        assert np.array_equal(images, plain.generate(PROMPT, **kw).images)
    expected = {"text_encoder": {"cpu"}, "unet": {"cuda" if mode == "model" else "cpu"}, "vae": {"cpu"},
                "safety_checker": {"cpu"}}
    assert on_gpu and all(state == expected for state in on_gpu)
    everything = [p for name in ("text_encoder", "unet", "vae", "safety_checker")
                  for p in getattr(pipe, name).parameters()]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in everything) and not pipe.offload.stored
    if mode == "model":
        assert all(unet <= h < unet + vae for h in held), (held, unet, vae)
    else:
        assert all(h < unet for h in held), (held, unet)


def test_safetensors_read_straight_onto_the_gpu(m9_folder):
    from altdiff.weights import SafetensorsFile, find_weights

    weights = SafetensorsFile(find_weights(m9_folder / "unet"), "cuda")
    assert weights["conv_in.weight"].device.type == "cuda"
    pipe = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)  # three components in parallel threads
    assert all(p.device.type == "cuda" and p.dtype == torch.float16
               for m in (pipe.text_encoder, pipe.unet, pipe.vae, pipe.safety_checker) for p in m.parameters())


def test_compiled_decoder_and_safety_checker_on_cuda(m9_folder):
    """compile=True through the whole pipeline to pixels: the compiled VAE decoder and safety checker run
    (latent output skips both) and give the eager pipeline's images."""
    fast = altdiff.load(m9_folder, device="cuda", dtype=torch.float32, compile=True)
    plain = altdiff.load(m9_folder, device="cuda", dtype=torch.float32, cuda_graphs=False)
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=0, height=64, width=64)
    a, b = fast.generate(PROMPT, **kw), plain.generate(PROMPT, **kw)
    for module in (fast.vae.decoder, fast.safety_checker.vision_model):
        compiled = module.__dict__.get("forward")
        assert isinstance(compiled, fast_unet.CompiledForward) and compiled.fn is not None and not compiled.failed
    assert levels(a.images, b.images) <= 2  # TF32 convolutions
    assert a.nsfw_content_detected == b.nsfw_content_detected


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_with_lora_leaves_nothing_on_the_gpu(m9_folder, tmp_path, mode):
    """LoRA factors rest on the CPU with the weights: after a generation under offload the GPU holds what it
    held before (before the fix they moved to the GPU at the first step and stayed)."""
    from test_adapters import add_peft_lora, save_peft

    ref = tiny.load_reference(m9_folder)
    lora_file = save_peft(ref, add_peft_lora(ref, seed=1), tmp_path / "peft")
    plain = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)
    pipe = altdiff.load(m9_folder, device="cuda", dtype=torch.float16, offload=mode)
    for p in (plain, pipe):
        p.load_lora_weights(lora_file)
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    images = pipe.generate(PROMPT, **kw).images
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert all(a.cached is None for layer in pipe.lora.layers.values() for a in layer.adapters.values())
    assert all(a.down.device.type == "cpu" for layer in pipe.lora.layers.values() for a in layer.adapters.values())
    assert np.array_equal(images, plain.generate(PROMPT, **kw).images)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_load_on_the_current_gpu(m9_folder):
    """device="cuda" is the caller's current GPU, also for the loader threads (whose own current GPU is 0)."""
    with torch.cuda.device(1):
        pipe = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)
    assert {p.device for m in (pipe.text_encoder, pipe.unet, pipe.vae) for p in m.parameters()} == {
        torch.device("cuda", 1)}


@pytest.mark.parametrize("knob", ["tome", "deepcache"])
def test_speed_knobs_with_cuda_graphs(m9_folder, knob):
    """ToMe and DeepCache on the recorded UNet give the eager UNet's images bit for bit; DeepCache records
    a full-step and a cached-step graph per shape (the cached one reads the full one's kept features)."""
    graphs = altdiff.load(m9_folder, device="cuda", dtype=torch.float16)
    eager = altdiff.load(m9_folder, device="cuda", dtype=torch.float16, cuda_graphs=False)
    for pipe in (graphs, eager):
        if knob == "tome":
            pipe.enable_token_merging(0.5)
        else:
            pipe.enable_deepcache(cache_interval=2, cache_branch_id=0)
    for extra in (dict(sampler="pndm"), dict(sampler="DPM++ 2M", family="webui")):
        kw = dict(num_inference_steps=5, output_type="np", progress=False, seed=0, height=64, width=64, **extra)
        for _ in range(2):  # the second generation replays what the first recorded
            assert np.array_equal(graphs.generate(PROMPT, **kw).images, eager.generate(PROMPT, **kw).images)
    runner = graphs.unet_runner()
    assert isinstance(runner, fast_unet.FastUNet) and not runner.failed
    if knob == "deepcache":
        assert {mode for _, mode in runner.graphs} == {(True, 0), (False, 0)}
