"""`compile=True`: the FastUNet runner and the compiled text encoder, VAE decoder and safety checker
compute what the plain modules do, are rebuilt whenever what they froze changes (really recompiled: dynamo
would otherwise reuse code holding the old weights), step aside for hooks (unfused LoRA, sequential
offload), and fall back (with a warning) when compilation fails. One real inductor compilation of the tiny
pipeline (~1-2 min on 2 cores); the bookkeeping tests swap torch.compile for the identity so they cost
nothing. CUDA-graph capture is tested in test_cuda.py."""

import warnings

import numpy as np
import pytest
import torch
from conftest import max_abs

import altdiff
from altdiff import attention, fast_unet
from altdiff.cli import build_parser
from altdiff.lora import LoraState

GEN = dict(num_inference_steps=3, output_type="np", progress=False, seed=0)


@pytest.fixture
def no_inductor(monkeypatch):
    """torch.compile → the module itself: FastUNet's bookkeeping without minutes of compilation."""
    calls = []

    def fake_compile(module, **kwargs):
        calls.append(module)
        return module
    monkeypatch.setattr(fast_unet.torch, "compile", fake_compile)
    return calls


def unet_inputs(pipe, batch=2, side=8):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 4, side, side, generator=g), torch.tensor(500),
            torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g))


def regions(pipe):
    return [pipe.text_encoder.roberta.encoder, pipe.vae.decoder, pipe.safety_checker.vision_model]


def levels(a, b) -> float:
    return np.abs(np.round(a * 255) - np.round(b * 255)).max()


def test_compiled_pipeline_and_images_equal_eager(m9_folder, tmp_path):
    fast = altdiff.load(m9_folder, device="cpu", compile=True)
    plain = altdiff.load(m9_folder, device="cpu")
    image = fast.generate("a cat", **GEN).images
    assert isinstance(fast._fast_unet, fast_unet.FastUNet) and not fast._fast_unet.failed
    for module in regions(fast):
        forward = module.__dict__["forward"]
        assert isinstance(forward, fast_unet.CompiledForward) and forward.fn is not None and not forward.failed
    assert levels(image, plain.generate("a cat", **GEN).images) <= 1
    x, t, c = unet_inputs(fast)
    with torch.inference_mode():
        assert max_abs(fast.unet_runner()(x, t, c), plain.unet(x, t, c)) < 1e-5

    # A per-call embedding grows the word-embedding table, which sits outside the compiled layer stack: the
    # compiled text encoder is kept (not compiled again), and the image still equals eager's.
    folder = tmp_path / "embeddings"
    folder.mkdir()
    width = fast.text_encoder.roberta.embeddings.word_embeddings.weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 3
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x"}, folder / "shiny.pt")
    text_encoder = regions(fast)[0].__dict__["forward"]
    compiled_text_encoder = text_encoder.fn
    shiny = fast.generate("a shiny cat", embeddings_dir=folder, **GEN).images
    assert text_encoder.fn is compiled_text_encoder and not text_encoder.failed
    assert levels(shiny, image) > 5
    assert levels(shiny, plain.generate("a shiny cat", embeddings_dir=folder, **GEN).images) <= 1

    # An in-place weight change (as fuse_lora makes) recompiles: frozen code holding the old weights is not
    # reused. The change moves the image by many levels, and compiled still equals eager.
    for pipe in (fast, plain):
        with torch.no_grad():
            pipe.vae.decoder.conv_out.bias.add_(0.5)
    changed = fast.generate("a cat", **GEN).images
    assert levels(changed, image) > 50
    assert levels(changed, plain.generate("a cat", **GEN).images) <= 1

    fast.compile = False  # the next generation runs every module eagerly again
    forwards = [module.forward for module in regions(fast)]
    fast.generate("a cat", **GEN)
    assert all("forward" not in module.__dict__ for module in regions(fast))
    fast.compile = True  # and back, keeping what was compiled
    with fast.running():
        assert [module.forward for module in regions(fast)] == forwards


def test_runner_is_rebuilt_when_weights_dtype_freeu_or_slicing_change(m9_folder, no_inductor):
    pipe = altdiff.load(m9_folder, device="cpu", compile=True, safety_checker=False)
    first = pipe.unet_runner()
    assert isinstance(first, fast_unet.FastUNet) and pipe.unet_runner() is first  # cached while valid
    pipe.enable_freeu(0.9, 0.2, 1.2, 1.4)
    second = pipe.unet_runner()
    assert second is not first
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(0.0)  # an in-place write, as fuse_lora does
    third = pipe.unet_runner()
    assert third is not second
    attention.set_attention_slice(4)
    try:
        fourth = pipe.unet_runner()
    finally:
        attention.set_attention_slice(None)
    assert fourth is not third
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet_runner() is not fourth and len(no_inductor) == 5
    pipe.compile = False  # on the CPU there are no CUDA graphs: the plain UNet
    assert pipe.unet_runner() is pipe.unet


def test_compiled_forward_steps_aside_for_hooks_inside(m9_folder, no_inductor):
    pipe = altdiff.load(m9_folder, device="cpu", compile=True)
    pipe.generate("a cat", **GEN)
    assert len(no_inductor) == 4  # UNet, text encoder, VAE decoder, safety checker
    handle = pipe.vae.decoder.conv_in.register_forward_hook(lambda m, args, out: None)  # e.g. a LoRA layer
    with torch.no_grad():
        pipe.vae.decoder.conv_in.bias.add_(0.0)  # the key changed, but the hook keeps it eager: no rebuild
    pipe.generate("a cat", **GEN)
    assert len(no_inductor) == 4
    handle.remove()
    pipe.generate("a cat", **GEN)
    assert len(no_inductor) == 5


def test_unfused_lora_runs_the_plain_unet(m9_folder, no_inductor):
    pipe = altdiff.load(m9_folder, device="cpu", compile=True, safety_checker=False)
    pipe.set_lora_state(LoraState(weights={"style": {"unet": 1.0, "text_encoder": 1.0}}))
    assert pipe.unet_runner() is pipe.unet
    pipe.lora.fused = {"style"}  # fused adapters live in the weights: compiling is fine
    assert isinstance(pipe.unet_runner(), fast_unet.FastUNet)


def on_backend(monkeypatch, backend):
    """torch.compile for real (dynamo traces, guards and recompiles) with a cheap `backend`."""
    real = torch.compile
    monkeypatch.setattr(fast_unet.torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw))
    torch._dynamo.reset()


def test_compilation_failure_warns_and_runs_eager(m9_folder, monkeypatch):
    def broken(gm, example_inputs):  # a backend failing as a missing C++ compiler makes inductor fail
        raise RuntimeError("no C++ compiler")
    on_backend(monkeypatch, broken)
    fast = altdiff.load(m9_folder, device="cpu", compile=True, safety_checker=False)
    plain = altdiff.load(m9_folder, device="cpu", safety_checker=False)
    with pytest.warns(RuntimeWarning, match="(?s)fast UNet: BackendCompilerFailed: .*no C\\+\\+ compiler"):
        image = fast.generate("a cat", **GEN).images
    assert np.array_equal(image, plain.generate("a cat", **GEN).images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then plain runs quietly
        fast.generate("a cat", **GEN)


def test_compile_survives_more_shapes_than_dynamos_recompile_limit(m9_folder, monkeypatch):
    """12 input shapes through real dynamo (fullgraph, dynamic=False) on the "eager" backend: the first 8 are
    compiled, the rest run eager, none raises FailOnRecompileLimitHit, every output is the plain UNet's."""
    on_backend(monkeypatch, "eager")
    # dynamo's own patch: monkeypatch's undo deletes a torch config entry (not in the module's __dict__), which
    # hides it from every later test
    patch = torch._dynamo.config.patch(recompile_limit=8)
    pipe = altdiff.load(m9_folder, device="cpu", compile=True, safety_checker=False)
    runner = pipe.unet_runner()
    assert isinstance(runner, fast_unet.FastUNet)
    with warnings.catch_warnings(), patch:
        warnings.simplefilter("error")  # no fallback warning either: nothing failed
        for k in range(12):
            x, t, c = unet_inputs(pipe, batch=1 + k % 2, side=8 + 8 * (k // 2))
            with torch.no_grad():
                assert max_abs(runner(x, t, c), pipe.unet(x, t, c)) < 1e-5, k
    assert not runner.failed


def test_bad_input_gets_the_unets_errors(m9_folder, no_inductor):
    pipe = altdiff.load(m9_folder, device="cpu", compile=True, safety_checker=False)
    x, t, c = unet_inputs(pipe)
    with pytest.raises(ValueError, match="sample must be a \\(batch, 4, height, width\\)"):
        pipe.unet_runner()(x[:, :3], t, c)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        pipe.unet_runner()(x, t, c[:1])
    with pytest.raises(ValueError, match="cross_attention_kwargs: unsupported keys \\['foo'\\]"):
        pipe.unet_runner()(x, t, c, cross_attention_kwargs={"foo": 1})


def test_compile_and_cuda_graphs_arguments(m9_folder):
    for name in ("compile", "cuda_graphs"):
        with pytest.raises(TypeError, match=f"{name}: expected True or False"):
            altdiff.load(m9_folder, device="cpu", **{name: "yes"})
    args = build_parser().parse_args(["a cat", "--compile", "--no-cuda-graphs"])
    assert args.compile and args.no_cuda_graphs
    args = build_parser().parse_args(["a cat"])
    assert not args.compile and not args.no_cuda_graphs


def test_token_merging_and_deepcache_compile(m9_folder):
    """The speed knobs under compile=True on a real dynamo backend: ToMe's merge traces with static shapes (it
    used nonzero(), a data-dependent shape that made the UNet fall back to eager) and DeepCache's full and
    cached steps are two compiled specialisations, no more (dynamo's recompile limit is set to 2: a guard on
    the kept features would recompile every step and fall back with a warning), whose cached steps read the
    latest full step's features (6 steps at interval 2: three cycles); each image equals the eager
    pipeline's with the knob."""
    fast = altdiff.load(m9_folder, device="cpu", compile=True, safety_checker=False)
    plain = altdiff.load(m9_folder, device="cpu", safety_checker=False)
    kw = dict(GEN, height=64, width=64, num_inference_steps=6, sampler="ddim")
    without = plain.generate("a cat", **kw).images
    for knob in ("tome", "deepcache"):
        for pipe in (fast, plain):
            pipe.disable_token_merging()
            pipe.disable_deepcache()
            if knob == "tome":
                pipe.enable_token_merging(0.5)
            else:
                pipe.enable_deepcache(cache_interval=2, cache_branch_id=0)
        with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=2):
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
            image = fast.generate("a cat", **kw).images
        runner = fast.unet_runner()
        assert isinstance(runner, fast_unet.FastUNet) and runner is fast._fast_unet and not runner.failed, knob
        eager = plain.generate("a cat", **kw).images
        assert levels(image, eager) <= 1, knob
        assert levels(eager, without) > 1, knob  # the knob acts
