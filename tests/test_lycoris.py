"""LyCORIS LoHa, LoKr and LoCon files against the lycoris-lora package on the tiny m9 pipeline.

The adapters are made with LyCORIS's kohya wrapper (`lycoris.kohya.create_network`, with a preset naming the
diffusers UNet blocks and the XLM-R layer class) on diffusers' own UNet and text encoder, given random weights
so they move the image, and written with LyCORIS's own `save_weights` (kohya names: `lora_unet_*`,
`lora_te_roberta_*`). The oracle is diffusers' pipeline carrying the LyCORIS-applied modules.
"""

import logging

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

import altdiff
from altdiff.weights import WeightsError

lycoris_kohya = pytest.importorskip("lycoris.kohya")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

PROMPT = "一只戴着帽子的猫"
STEPS = 3
PRESET = """
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["XLMRobertaLayer"]
text_encoder_target_name = ["transformation"]
"""
# rank 4, linear alpha 2 (scale 0.5), conv alpha 1 (scale 0.25); Tucker cores on the 3x3 convs.
CASES = {
    "loha": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=2, use_tucker=True),  # w1 whole, w2 as a product or a Tucker core
    "locon": dict(algo="locon", use_tucker=True),  # LoRA with lora_mid on the 3x3 convs
}
MULTIPLIERS = {"loha": (0.5, 1.0), "lokr": (0.5, 1.0), "locon": (1.0,)}


def gen():
    return torch.Generator().manual_seed(0)


def levels(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() * 255)


def run_ref(ref, prompt=PROMPT):
    return ref(prompt, generator=gen(), num_inference_steps=STEPS, output_type="np").images


def run_alt(pipe, prompt=PROMPT, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe.generate(prompt, generator=gen(), num_inference_steps=STEPS, progress=False, **kwargs).images


def alt(folder):
    return altdiff.load(folder, device="cpu", dtype=torch.float32)


def make_network(ref, preset, **kwargs):
    net = lycoris_kohya.create_network(1.0, 4, 2.0, None, ref.text_encoder, ref.unet, preset=str(preset),
                                       conv_dim=4, conv_alpha=1.0, **kwargs)
    net.apply_to(ref.text_encoder, ref.unet, True, True)
    return net


def set_multiplier(net, multiplier):
    for module in net.loras:
        module.multiplier = multiplier


@pytest.fixture(scope="module")
def lyco(m9_folder, tmp_path_factory):
    """Per case: diffusers' m9 pipeline carrying the LyCORIS network, the network, and the file it wrote."""
    root = tmp_path_factory.mktemp("lycoris")
    preset = root / "altdiffusion.toml"
    preset.write_text(PRESET)
    cases = {}
    for seed, (case, kwargs) in enumerate(CASES.items()):
        ref = tiny.load_reference(m9_folder)
        torch.manual_seed(seed)
        net = make_network(ref, preset, **kwargs)
        with torch.no_grad():  # LyCORIS starts at delta W = 0; random factors make it move the image
            for param in net.parameters():
                param.normal_(0, 0.2)
        path = root / f"{case}.safetensors"
        net.save_weights(str(path), None, None)
        cases[case] = dict(ref=ref, net=net, path=path)
    return dict(root=root, preset=preset, cases=cases, plain=run_alt(alt(m9_folder)))


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_file_matches_lycoris(lyco, m9_folder, case):
    ref, net, path = (lyco["cases"][case][k] for k in ("ref", "net", "path"))
    keys = load_file(path)
    parts = {k.split(".", 1)[1] for k in keys}
    assert {"alpha", "lora_unet_down_blocks_0_resnets_0_conv1.alpha",
            "lora_te_roberta_encoder_layer_0_attention_self_query.alpha", "lora_te_transformation.alpha"} <= \
        parts | set(keys)
    expected_parts = {"loha": {"hada_w1_a", "hada_w2_b", "hada_t1", "hada_t2"},
                      "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
                      "locon": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}}[case]
    assert expected_parts <= parts
    pipe = alt(m9_folder)
    pipe.load_lora_weights(path, adapter_name="lyco")
    images = {}
    for multiplier in MULTIPLIERS[case]:
        set_multiplier(net, multiplier)
        pipe.set_adapters("lyco", multiplier)
        images[multiplier] = run_alt(pipe)
        assert levels(images[multiplier], run_ref(ref)) <= 1, f"multiplier {multiplier}"
        # and the latents (|x| up to ~20) within 2e-3: float drift is ~4e-4 here, a 1% scale error of the
        # adapter moves them by 0.027 or more (checked below); a uint8 level of the image would let it through
        ref_latents = torch.as_tensor(ref(PROMPT, generator=gen(), num_inference_steps=STEPS,
                                          output_type="latent").images)
        diff = (run_alt(pipe, output_type="latent") - ref_latents).abs().max().item()
        assert diff <= 2e-3, (multiplier, diff)
    pipe.set_adapters("lyco", 1.01 * max(MULTIPLIERS[case]))
    assert (run_alt(pipe, output_type="latent") - ref_latents).abs().max() > 1e-2
    # Sensitivity: the adapter and its multiplier move the image by many levels.
    assert levels(images[1.0], lyco["plain"]) > 30
    if 0.5 in images:
        assert levels(images[0.5], images[1.0]) > 10
    set_multiplier(net, 1.0)


def test_loha_without_alpha_scales_by_one(lyco, m9_folder, tmp_path):
    """No alpha: scale 1 (the webui's calc_scale), i.e. LyCORIS with scale 1 on every module."""
    ref, net, path = (lyco["cases"]["loha"][k] for k in ("ref", "net", "path"))
    no_alpha = tmp_path / "no-alpha.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith(".alpha")}, str(no_alpha))
    pipe = alt(m9_folder)
    pipe.load_lora_weights(no_alpha)
    scales = [m.scale for m in net.loras]
    sample, ids = torch.randn(1, 4, 16, 16), pipe.tokenizer(PROMPT)["input_ids"]
    try:
        for module in net.loras:
            module.scale = 1.0
        with torch.no_grad():
            context = ref.text_encoder(ids)[0]
            assert torch.allclose(pipe.text_encoder(ids), context, atol=1e-5, rtol=0)
            expected = ref.unet(sample, 10, context).sample
            assert torch.allclose(pipe.unet(sample, 10, context), expected, atol=1e-4, rtol=0)
    finally:
        for module, scale in zip(net.loras, scales):
            module.scale = scale
    with torch.no_grad():
        assert (ref.unet(sample, 10, context).sample - expected).abs().max() > 0.1  # alpha did matter


def test_several_kinds_at_once_fuse_and_unfuse(lyco, m9_folder):
    """LoHa at 0.7 and LoKr at 0.3 together equal both LyCORIS networks on one model; fusing them gives the
    same image and unfusing restores the weights bit for bit."""
    ref = tiny.load_reference(m9_folder)
    for case, multiplier in (("loha", 0.7), ("lokr", 0.3)):
        # LyCORIS's create_network_from_weights misreads its own factor=2 LoKr file: rebuild, then load.
        net = make_network(ref, lyco["preset"], **CASES[case])
        assert not net.load_weights(str(lyco["cases"][case]["path"]))  # no missing or unexpected keys
        set_multiplier(net, multiplier)
    pipe = alt(m9_folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(lyco["cases"]["loha"]["path"], adapter_name="loha", weight=0.7)
    pipe.load_lora_weights(lyco["cases"]["lokr"]["path"], adapter_name="lokr", weight=0.3)
    hooked = run_alt(pipe)
    assert levels(hooked, run_ref(ref)) <= 1
    pipe.fuse_lora()
    assert levels(run_alt(pipe), hooked) <= 1
    pipe.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert np.array_equal(run_alt(pipe), hooked)


def test_dora_is_refused(lyco, m9_folder, tmp_path):
    ref = tiny.load_reference(m9_folder)
    net = make_network(ref, lyco["preset"], algo="loha", dora_wd=True)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), None, None)
    pipe = alt(m9_folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(WeightsError, match="dora_scale: DoRA .* not supported"):
        pipe.load_lora_weights(path)
    assert pipe.lora is None and all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_bad_lycoris_files(lyco, m9_folder, tmp_path):
    tensors = load_file(lyco["cases"]["lokr"]["path"])
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    cases = {
        "shape": ({f"{key}.lokr_w1": torch.randn(3, 2)}, "down_blocks.0.resnets.0.conv1: LoKr factors .* give"),
        "incomplete": ({f"{key}.lokr_w1": None}, "conv1 has an incomplete set of adapter weights"),
        "ia3": ({f"{key}.on_input": torch.tensor(True), f"{key}.weight": torch.randn(32)}, "on_input: IA3"),
    }
    pipe = alt(m9_folder)
    for name, (edit, match) in cases.items():
        changed = dict(tensors)
        for k, v in edit.items():
            if v is None:
                del changed[k]
            else:
                changed[k] = v
        path = tmp_path / f"{name}.safetensors"
        save_file(changed, str(path))
        with pytest.raises(WeightsError, match=match):
            pipe.load_lora_weights(path)
        assert pipe.lora is None
    pipe.load_lora_weights(lyco["cases"]["lokr"]["path"])
    with pytest.raises(ValueError, match="holds LoKr layers, which have no diffusers file format"):
        pipe.save_lora_weights(tmp_path / "out")


def test_runtime_scale_acts_on_loha_as_on_lora(lyco, m9_folder):
    """cross_attention_kwargs={"scale": s} scales LoHa layers as diffusers scales LoRA: all but conv_in and the
    time embedding, which run before the UNet reads the scale."""
    ref, net, path = (lyco["cases"]["loha"][k] for k in ("ref", "net", "path"))
    pipe = alt(m9_folder)
    pipe.load_lora_weights(path)
    for module in net.loras:
        unscaled = module.lora_name.startswith(("lora_unet_conv_in", "lora_unet_time_embedding"))
        module.multiplier = 1.0 if unscaled else 0.5
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    try:
        with torch.no_grad():
            expected = ref.unet(sample, 10, context).sample
            ours = pipe.unet(sample, 10, context, cross_attention_kwargs={"scale": 0.5})
            assert torch.allclose(ours, expected, atol=1e-4, rtol=0)
            assert (pipe.unet(sample, 10, context) - expected).abs().max() > 0.01  # 100x the tolerance
    finally:
        set_multiplier(net, 1.0)


def test_loha_delta_is_rebuilt_once_until_released(lyco, m9_folder, monkeypatch):
    """LoHa's delta W is rebuilt once per layer, not on every call (the text encoder runs twice and the UNet
    once per step), kept across generations, and under sequential offload made per call and never kept."""
    from altdiff import lora, offload

    rebuilds = []
    original = lora.Loha.rebuild
    monkeypatch.setattr(lora.Loha, "rebuild", lambda self, *args: rebuilds.append(self) or original(self, *args))
    pipe = alt(m9_folder)
    pipe.load_lora_weights(lyco["cases"]["loha"]["path"], adapter_name="lyco")
    layers = [a for layer in pipe.lora.layers.values() for a in layer.adapters.values()]
    rebuilds.clear()
    first = run_alt(pipe)
    assert len(rebuilds) == len(set(map(id, rebuilds))) == len(layers)
    rebuilds.clear()
    assert np.array_equal(run_alt(pipe), first) and rebuilds == []
    offload.enable(pipe, "sequential", torch.device("cpu"))
    assert np.array_equal(run_alt(pipe), first)
    assert len(rebuilds) > 2 * len(layers) and all(a.cached is None for a in layers)
