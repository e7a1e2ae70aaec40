"""LoRA and textual inversion against diffusers/PEFT on the tiny m9 and m18 pipelines.

The LoRAs are made with PEFT on diffusers' own modules (random A and B, so they move the image) and written
with diffusers' `save_lora_weights`; the kohya files are rewrites of those made here. diffusers cannot load a
LoRA into the XLM-R text encoder (its key conversion only knows CLIP), so the m9 oracle is diffusers'
pipeline carrying the PEFT adapters they were made with, and the m18 oracle is diffusers without LoRA on
weights fused by hand below.
"""

import logging

import numpy as np
import pytest
import tiny
import torch
from diffusers import AltDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import altdiff
from altdiff import lora, offload
from altdiff.weights import WeightsError

PROMPT = "一只戴着帽子的猫"
STEPS = 3
# Every Linear/Conv2d kind in the UNet: attention, feed-forward, projections, resnet convs (conv LoRA),
# shortcuts, time embedding, the stride-2 downsampler and the in/out convs.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1",
                "linear_2"]
TE_TARGETS = ["query", "key", "value", "dense", "transformation", "transformation_pre"]
RANK, UNET_ALPHA, TE_ALPHA = 4, 8, 4  # LoRA scales alpha/rank: 2 on the UNet, 1 on the text encoder
ALPHA = {"unet": UNET_ALPHA, "text_encoder": TE_ALPHA}


def gen():
    return torch.Generator().manual_seed(0)


def levels(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() * 255)


def add_peft_lora(ref, seed):
    torch.manual_seed(seed)
    unet_cfg = LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, init_lora_weights=False, target_modules=UNET_TARGETS)
    te_cfg = LoraConfig(r=RANK, lora_alpha=TE_ALPHA, init_lora_weights=False, target_modules=TE_TARGETS)
    ref.unet.add_adapter(unet_cfg)
    ref.text_encoder.add_adapter(te_cfg)
    return unet_cfg, te_cfg


def save_peft(ref, cfgs, folder, text_encoder=True):
    unet_cfg, te_cfg = cfgs
    AltDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder) if text_encoder else None,
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict() if text_encoder else None)
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(peft_file, out, factor=1.0):
    """kohya/A1111 naming of a diffusers PEFT file (lora_unet_* / lora_te_*, lora_down/up, alpha)."""
    kohya = {}
    for key, tensor in load_file(peft_file).items():
        model, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[model] + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = \
            tensor * factor if part.startswith("B") else tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(ALPHA[model]))
    save_file(kohya, str(out))
    return out


def fuse_by_hand(module, peft_file, prefix, factor):
    """W += factor * alpha/rank * B @ A for every layer of `prefix` in the file."""
    tensors = load_file(peft_file)
    named = dict(module.named_modules())
    with torch.no_grad():
        for key, down in tensors.items():
            if key.startswith(prefix + ".") and key.endswith(".lora_A.weight"):
                weight = named[key[len(prefix) + 1:-len(".lora_A.weight")]].weight
                up = tensors[key.replace("lora_A", "lora_B")]
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
                weight += factor * ALPHA[prefix] / RANK * delta


def snapshot(pipe):
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def assert_unchanged(pipe, before, vocab):
    after = snapshot(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert pipe.lora is None and len(pipe.tokenizer) == vocab


@pytest.fixture(scope="module")
def lora_m9(m9_folder, tmp_path_factory):
    """diffusers m9 pipeline carrying PEFT adapters, the file diffusers wrote for them, and its rewrites."""
    root = tmp_path_factory.mktemp("lora-m9")
    ref = tiny.load_reference(m9_folder)
    cfgs = add_peft_lora(ref, seed=1)
    peft = save_peft(ref, cfgs, root / "peft")
    unet_only = save_peft(ref, cfgs, root / "unet-only", text_encoder=False)
    return dict(ref=ref, peft=peft, unet_only=unet_only, kohya=to_kohya(peft, root / "kohya.safetensors"),
                other=to_kohya(peft, root / "other.safetensors", factor=-1.5), images={})


def ref_lora_images(lora_m9, scale):
    """diffusers' m9 image with the PEFT adapters at `scale`, computed once."""
    if scale not in lora_m9["images"]:
        lora_m9["images"][scale] = run_ref(lora_m9["ref"], cross_attention_kwargs={"scale": scale})
    return lora_m9["images"][scale]


@pytest.fixture(scope="module")
def lora_m18(m18_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-m18")
    ref = tiny.load_reference(m18_folder)
    return save_peft(ref, add_peft_lora(ref, seed=2), root)


def alt(folder):
    return altdiff.load(folder, device="cpu", dtype=torch.float32)


def run_alt(pipe, prompt=PROMPT, **kwargs):
    return pipe.generate(prompt, generator=gen(), num_inference_steps=STEPS, output_type="np", progress=False,
                         **kwargs).images


def run_ref(ref, prompt=PROMPT, **kwargs):
    return ref(prompt, generator=gen(), num_inference_steps=STEPS, output_type="np", **kwargs).images


# LoRA -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_m9_matches_diffusers_peft(lora_m9, m9_folder, fmt):
    pipe = alt(m9_folder)
    plain = run_alt(pipe)
    pipe.load_lora_weights(lora_m9[fmt])
    images = {}
    for scale in (0.5, 1.0):
        images[scale] = run_alt(pipe, cross_attention_kwargs={"scale": scale})
        assert levels(images[scale], ref_lora_images(lora_m9, scale)) <= 1, f"scale {scale}"
    # Sensitivity: the LoRA and its scale move the image by many levels.
    assert levels(images[1.0], plain) > 30 and levels(images[0.5], images[1.0]) > 10


def test_lora_text_encoder_scale_matches_diffusers(lora_m9, m9_folder):
    pipe = alt(m9_folder)
    pipe.load_lora_weights(lora_m9["peft"])
    ref = lora_m9["ref"]
    for scale in (None, 0.5):
        ours = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="低质量", lora_scale=scale)
        theirs = ref.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="低质量", lora_scale=scale)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    plain = alt(m9_folder).encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert (plain - pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]).abs().max() > 0.1


def test_unet_lora_file_matches_diffusers_loader(lora_m9, m9_folder):
    """The UNet part read by diffusers' own load_lora_weights gives the image altdiff gives."""
    ref = tiny.load_reference(m9_folder)
    ref.load_lora_weights(lora_m9["unet_only"].parent)
    pipe = alt(m9_folder)
    pipe.load_lora_weights(lora_m9["unet_only"].parent)
    kwargs = {"cross_attention_kwargs": {"scale": 2.0}}
    assert levels(run_alt(pipe, **kwargs), run_ref(ref, **kwargs)) <= 1


def test_lora_m18_equals_hand_fused_reference(lora_m18, m18_folder):
    """diffusers cannot run this LoRA on m18; fuse it into diffusers' weights by hand instead."""
    ref = tiny.load_reference(m18_folder)
    plain = run_ref(ref)
    fuse_by_hand(ref.unet, lora_m18, "unet", 1.0)
    fuse_by_hand(ref.text_encoder, lora_m18, "text_encoder", 1.0)
    pipe = alt(m18_folder)
    pipe.load_lora_weights(lora_m18)
    ours = run_alt(pipe)
    assert levels(ours, run_ref(ref)) <= 1
    assert levels(ours, plain) > 30


def test_fuse_unfuse_round_trip_is_bit_exact(lora_m9, m9_folder):
    pipe = alt(m9_folder)
    before = snapshot(pipe)
    plain = run_alt(pipe)
    pipe.load_lora_weights(lora_m9["peft"])
    hooked = run_alt(pipe)
    pipe.fuse_lora()
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(pipe).items())
    assert levels(run_alt(pipe), hooked) <= 1  # fused deltas, hooks off
    # Fusing again starts from the original weights; fuse_lora(s) scales every layer by s, as diffusers'.
    pipe.fuse_lora(0.5)
    ref = tiny.load_reference(m9_folder)
    fuse_by_hand(ref.unet, lora_m9["peft"], "unet", 0.5)
    fuse_by_hand(ref.text_encoder, lora_m9["peft"], "text_encoder", 0.5)
    assert levels(run_alt(pipe), run_ref(ref)) <= 1
    pipe.unfuse_lora()
    after = snapshot(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert np.array_equal(run_alt(pipe), hooked)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert_unchanged(pipe, before, len(pipe.tokenizer))
    assert np.array_equal(run_alt(pipe), plain)


def test_several_adapters_with_weights(lora_m9, m9_folder):
    """Adapters a (weight 0.7) and b (weight 0.3) act as W + 0.7 dWa + 0.3 dWb fused into diffusers' UNet."""
    pipe = alt(m9_folder)
    assert pipe.load_lora_weights(lora_m9["peft"], adapter_name="a", weight=0.7) == "a"
    assert pipe.load_lora_weights(lora_m9["other"]) == "default_1"
    pipe.set_adapters(["a", "default_1"], [0.7, 0.3])
    ref_unet = tiny.load_reference(m9_folder).unet
    fuse_by_hand(ref_unet, lora_m9["peft"], "unet", 0.7 + 0.3 * -1.5)  # b is a's rewrite with up * -1.5
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = ref_unet(sample, 10, context).sample
        assert torch.allclose(pipe.unet(sample, 10, context), expected, atol=1e-4, rtol=0)
        pipe.disable_lora()
        plain = pipe.unet(sample, 10, context)
        assert (plain - expected).abs().max() > 0.1
        pipe.enable_lora()
        pipe.set_adapters("a")
        only_a = pipe.unet(sample, 10, context)
    assert not torch.allclose(only_a, expected) and not torch.allclose(only_a, plain)


def test_save_lora_weights_writes_diffusers_format(lora_m9, m9_folder, tmp_path):
    pipe = alt(m9_folder)
    pipe.load_lora_weights(lora_m9["kohya"])
    saved = pipe.save_lora_weights(tmp_path / "out")
    assert saved == tmp_path / "out" / "pytorch_lora_weights.safetensors"
    original, written = load_file(lora_m9["peft"]), load_file(saved)
    assert written.keys() == {k for k in original if ".pooler." not in k}
    assert all(torch.equal(written[k], original[k]) for k in written)
    again = alt(m9_folder)
    again.load_lora_weights(saved)
    assert np.array_equal(run_alt(again), run_alt(pipe))
    # diffusers' own loader reads what altdiff writes, scales (alpha 8, rank 4) included; it can only take the
    # UNet part.
    unet_pipe = alt(m9_folder)
    unet_pipe.load_lora_weights(lora_m9["unet_only"])
    unet_saved = unet_pipe.save_lora_weights(tmp_path / "unet.safetensors")
    with safe_open(str(unet_saved), "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    ref = tiny.load_reference(m9_folder)
    ref.load_lora_weights(str(unet_saved))
    kwargs = {"cross_attention_kwargs": {"scale": 0.5}}
    assert levels(run_alt(unet_pipe, **kwargs), run_ref(ref, **kwargs)) <= 1


# LoRA errors: clear messages, the pipeline left as it was. --------------------------------------------------

def _rewrite(src, out, edit):
    tensors = load_file(src)
    edit(tensors)
    save_file(tensors, str(out))
    return out


def test_lora_with_unknown_keys(lora_m9, m9_folder, tmp_path, caplog):
    clip_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # an SD1.x CLIP LoRA layer
    bad = _rewrite(lora_m9["kohya"], tmp_path / "clip.safetensors", lambda t: t.update({
        f"{clip_key}.lora_down.weight": torch.zeros(4, 768),
        f"{clip_key}.lora_up.weight": torch.zeros(768, 4)}))
    pipe = alt(m9_folder)
    before, vocab = snapshot(pipe), len(pipe.tokenizer)
    with pytest.raises(WeightsError, match=f"2 LoRA keys name no layer.*{clip_key}.lora_down.weight"):
        pipe.load_lora_weights(bad)
    assert_unchanged(pipe, before, vocab)
    with caplog.at_level(logging.WARNING, logger="altdiff"):
        pipe.load_lora_weights(bad, strict=False)
    assert clip_key in caplog.text
    assert levels(run_alt(pipe), ref_lora_images(lora_m9, 1.0)) <= 1


@pytest.mark.parametrize("case", ["rank", "missing_up", "alpha", "m18_on_m9"])
def test_bad_lora_files_leave_model_unchanged(lora_m9, lora_m18, m9_folder, tmp_path, case):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"
    if case == "rank":
        path = _rewrite(lora_m9["peft"], tmp_path / "rank.safetensors",
                        lambda t: t.update({key: t[key][:, :3].contiguous()}))
        match = r"attn2.to_k: down \(4, 32\) / up \(32, 3\)"
    elif case == "missing_up":
        path = _rewrite(lora_m9["peft"], tmp_path / "up.safetensors", lambda t: t.pop(key))
        match = "attn2.to_k lacks its up weight"
    elif case == "alpha":
        alpha = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha"
        path = _rewrite(lora_m9["kohya"], tmp_path / "alpha.safetensors",
                        lambda t: t.update({alpha: t[alpha][None].repeat(2)}))
        match = r"attn2.to_k: alpha must be one number, got shape \(2,\)"
    else:
        path, match = lora_m18, "name no layer of this model: text_encoder.transformation_pre"
    pipe = alt(m9_folder)
    before, vocab = snapshot(pipe), len(pipe.tokenizer)
    with pytest.raises(WeightsError, match=match):
        pipe.load_lora_weights(path)
    assert_unchanged(pipe, before, vocab)
    if case == "m18_on_m9":  # the shapes do not fit either: SD2 linear proj_in vs SD1 1x1 conv
        with pytest.raises(WeightsError, match=r"proj_in: down \(4, 32\)"):
            pipe.load_lora_weights(path, strict=False)
        assert_unchanged(pipe, before, vocab)


def test_lora_file_level_errors(lora_m9, m9_folder, tmp_path, monkeypatch):
    pipe = alt(m9_folder)
    before, vocab = snapshot(pipe), len(pipe.tokenizer)
    clip_only = tmp_path / "clip.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)},
              str(clip_only))
    with pytest.raises(WeightsError, match="no LoRA layers for this model"):
        pipe.load_lora_weights(clip_only, strict=False)
    tensors = load_file(lora_m9["unet_only"])
    for metadata, match in (({"lora_adapter_metadata": '{"unet.use_dora": true}'}, "DoRA"),
                            ({"lora_adapter_metadata": "{not json"}, "corrupt lora_adapter_metadata")):
        save_file(tensors, str(tmp_path / "meta.safetensors"), metadata=metadata)
        with pytest.raises(WeightsError, match=match):
            pipe.load_lora_weights(tmp_path / "meta.safetensors")

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(WeightsError, match="could not get the LoRA from the hub.*no network"):
        pipe.load_lora_weights("someone/some-lora")
    assert_unchanged(pipe, before, vocab)


def test_lora_follows_the_pipeline_to_another_dtype(lora_m9, m9_folder):
    pipe = alt(m9_folder)
    pipe.load_lora_weights(lora_m9["peft"])
    pipe.to(dtype=torch.bfloat16)
    sample, context = torch.randn(1, 4, 16, 16, dtype=torch.bfloat16), torch.randn(1, 77, 32)
    with torch.no_grad():
        with_lora = pipe.unet(sample, 10, context)
        pipe.disable_lora()
        plain = pipe.unet(sample, 10, context)
    assert with_lora.dtype == torch.bfloat16 and torch.isfinite(with_lora).all()
    assert (with_lora.float() - plain.float()).abs().max() > 0.1


def test_lora_argument_errors(lora_m9, m9_folder, tmp_path):
    pipe = alt(m9_folder)
    with pytest.raises(WeightsError, match="LoRA file not found"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="no LoRA file found"):
        pipe.load_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="weight: must be a finite number"):
        pipe.load_lora_weights(lora_m9["peft"], weight=float("nan"))
    pipe.load_lora_weights(lora_m9["peft"], adapter_name="a")
    with pytest.raises(ValueError, match="'a' is already loaded"):
        pipe.load_lora_weights(lora_m9["kohya"], adapter_name="a")
    with pytest.raises(ValueError, match=r"\['b'\] not loaded"):
        pipe.set_adapters(["b"])
    with pytest.raises(ValueError, match="one finite number per adapter"):
        pipe.set_adapters(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="lora_scale: must be a finite number"):
        pipe.fuse_lora("1")
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="unfuse_lora"):
        pipe.set_adapters("a")
    pipe.unfuse_lora()
    with pytest.raises(TypeError, match=r"cross_attention_kwargs\['scale'\]: must be a finite number, got 'x'"):
        run_alt(pipe, cross_attention_kwargs={"scale": "x"})
    with pytest.raises(TypeError, match="cross_attention_kwargs: must be a dict"):  # the UNet's own check
        pipe.unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, 32), cross_attention_kwargs=[0.5])
    pipe.load_lora_weights(lora_m9["kohya"], adapter_name="b")
    with pytest.raises(ValueError, match="name the adapter to save"):
        pipe.save_lora_weights(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert levels(run_alt(pipe), run_alt(alt(m9_folder))) > 0  # still usable


# Textual inversion ------------------------------------------------------------------------------------------

class Unsafe:
    """Any class: weights_only loading must refuse to build it."""


def _write_embedding(kind, path, vectors, token):
    if kind == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token,
                    "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "m9"}, path)
    elif kind == "a1111_safetensors":
        save_file({"emb_params": vectors}, str(path))
    elif kind == "diffusers_bin":
        torch.save({token: vectors}, path)
    else:
        save_file({token: vectors}, str(path))
    return path


@pytest.mark.parametrize("kind,suffix,n", [
    ("a1111_pt", ".pt", 2), ("a1111_safetensors", ".safetensors", 1), ("diffusers_bin", ".bin", 1),
    ("diffusers_safetensors", ".safetensors", 3)])
def test_textual_inversion_matches_diffusers(m9_folder, tmp_path, kind, suffix, n):
    token = "<hat-cat>"
    vectors = torch.randn(n, 32) * 3
    path = _write_embedding(kind, tmp_path / f"hat-cat{suffix}", vectors if n > 1 else vectors[0], token)
    ref = tiny.load_reference(m9_folder)
    pipe = alt(m9_folder)
    # A1111 safetensors carry no name: the webui uses the file name, diffusers needs token=...
    ref.load_textual_inversion(str(path), token=token)
    added = pipe.load_textual_inversion(path, token=token if kind == "a1111_safetensors" else None)
    assert added == [token] + [f"{token}_{i}" for i in range(1, n)]
    prompt = f"a {token} on the moon"
    ids = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer)).input_ids
    assert pipe.tokenizer(prompt)["input_ids"][0, :len(ids)].tolist() == ids
    ours = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    theirs = ref.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - pipe.encode_prompt("a on the moon", "cpu", 1, False)[0]).abs().max() > 0.1
    rows = pipe.text_encoder.roberta.embeddings.word_embeddings.weight
    assert torch.equal(rows[-n:], vectors.reshape(n, 32))
    assert pipe.text_encoder.config.vocab_size == rows.shape[0] == len(pipe.tokenizer)
    if kind == "diffusers_safetensors":
        assert levels(run_alt(pipe, prompt), run_ref(ref, prompt)) <= 1


def test_a1111_safetensors_token_defaults_to_file_name(m9_folder, tmp_path):
    path = _write_embedding("a1111_safetensors", tmp_path / "mystyle.safetensors", torch.randn(1, 32), None)
    pipe = alt(m9_folder)
    assert pipe.load_textual_inversion(path) == ["mystyle"]
    assert pipe.tokenizer.encode("mystyle")[0] == len(pipe.tokenizer) - 1


def test_textual_inversion_errors_leave_model_unchanged(m18_folder, tmp_path):
    pipe = alt(m18_folder)
    before, vocab = snapshot(pipe), len(pipe.tokenizer)
    wide = _write_embedding("diffusers_safetensors", tmp_path / "wide.safetensors", torch.randn(768), "<w>")
    with pytest.raises(WeightsError, match="embedding width 768 does not fit this text encoder"):
        pipe.load_textual_inversion(wide)
    bare = tmp_path / "bare.pt"
    torch.save(torch.randn(32), bare)
    with pytest.raises(ValueError, match="names no token"):
        pipe.load_textual_inversion(bare)
    taken = _write_embedding("diffusers_safetensors", tmp_path / "taken.safetensors", torch.randn(32), "<s>")
    with pytest.raises(ValueError, match=r"\['<s>'\] already in the tokenizer"):
        pipe.load_textual_inversion(taken)
    pickled = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.randn(32)}, "name": "x", "obj": Unsafe()}, pickled)
    with pytest.raises(WeightsError, match="only weights_only loading is allowed"):
        pipe.load_textual_inversion(pickled)
    junk = _write_embedding("diffusers_safetensors", tmp_path / "junk.safetensors", torch.randn(32), "a")
    save_file({"a": torch.randn(32), "b": torch.randn(32)}, str(junk))
    with pytest.raises(WeightsError, match="not a textual-inversion embedding"):
        pipe.load_textual_inversion(junk)
    with pytest.raises(WeightsError, match="not found"):
        pipe.load_textual_inversion(tmp_path / "none.pt")
    assert_unchanged(pipe, before, vocab)
    ok = _write_embedding("diffusers_safetensors", tmp_path / "ok.safetensors", torch.randn(32), "<ok>")
    assert pipe.load_textual_inversion(ok) == ["<ok>"]


def _cached(pipe) -> list:
    return [adapter.cached for layer in pipe.lora.layers.values() for adapter in layer.adapters.values()
            if adapter.cached is not None]


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_with_lora_and_textual_inversion(lora_m9, m9_folder, tmp_path, mode):
    """The same image with and without offload when a LoRA and an embedding are loaded. The pipeline runs in
    bf16 while the adapter's factors rest in fp32, so each call needs a converted copy of them, as it does on
    a GPU under offload: model offload keeps the copies for the generation and drops them with the weights;
    sequential offload makes one per call; without offload they are kept."""
    token = "<hat-cat>"
    embedding = _write_embedding("diffusers_safetensors", tmp_path / "hat-cat.safetensors",
                                 torch.randn(2, 32) * 3, token)
    pipes = {}
    for name in ("plain", mode):
        pipe = alt(m9_folder)
        pipe.load_lora_weights(lora_m9["kohya"], adapter_name="style")
        pipe.load_textual_inversion(embedding)
        if name != "plain":
            offload.enable(pipe, mode, torch.device("cpu"))
        pipe.to(dtype=torch.bfloat16)
        pipes[name] = pipe
    prompt = f"a {token} in the rain"
    seen = []
    original = lora.Lora.__call__

    def spy(adapter, x, module, cache=True):
        seen.append(cache)
        return original(adapter, x, module, cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora.Lora, "__call__", spy)
        images = run_alt(pipes[mode], prompt)
    assert seen and set(seen) == {mode == "model"}
    assert pipes[mode].offload.stored == {} and _cached(pipes[mode]) == []
    plain = run_alt(pipes["plain"], prompt)
    assert len(_cached(pipes["plain"])) == len(pipes["plain"].lora.layers) > 0  # kept without offload
    assert np.array_equal(images, plain)
    pipes["plain"].disable_lora()
    assert levels(run_alt(pipes["plain"], prompt), plain) > 10  # the LoRA moves the image
