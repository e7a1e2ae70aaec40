"""weights_convert and single-file loading: original LDM files ↔ diffusers folders.

Original files are written from the tiny diffusers folders with our inverse tables; diffusers' own LDM
converter (`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`) checks those tables independently,
and diffusers loads and runs every folder we write."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import RobertaSeriesConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_options

import altdiff
from altdiff.config import ConfigError
from altdiff.single_file import SCHEDULER, Options, plan_conversion
from altdiff.weights import WeightsError
from weights_convert import convert, to_original
from weights_convert.__main__ import main

PROMPT = "一只戴着帽子的猫"
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "safety_checker": "model.safetensors"}
# What shapes cannot tell about the tiny models (the real ones follow the default rules).
TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id",
               "eos_token_id", "project_dim", "has_pre_transformation", "hidden_act", "use_attention_mask")


@pytest.fixture(scope="module")
def folders(m9_folder, m18_folder):
    return {"m9": m9_folder, "m18": m18_folder}


@pytest.fixture(scope="module")
def originals(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    return {v: to_original(folders[v], root / f"{v}.safetensors", progress=False) for v in folders}


def original_state_dict(originals, variant) -> dict:
    return dict(load_file(originals[variant]))


def convert_tiny(src, out, variant, folder, **kwargs):
    kwargs.setdefault("config", tiny_options(variant))
    return convert(src, out, tokenizer=folder, safety_checker=folder, progress=False, **kwargs)


def assert_same_tensors(a_folder: Path, b_folder: Path, dtype=None):
    for component, name in WEIGHTS.items():
        a, b = load_file(a_folder / component / name), load_file(b_folder / component / name)
        assert a.keys() == b.keys(), component
        for key, tensor in a.items():
            expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            assert b[key].dtype == expected.dtype and torch.equal(b[key], expected), f"{component}: {key}"


def diffusers_configs(folder: Path) -> dict:
    """Each component as diffusers 0.35.2 loads it (this also proves it loads)."""
    te = RobertaSeriesConfig.from_pretrained(folder / "text_encoder")
    return {
        "unet": {k: v for k, v in UNet2DConditionModel.from_pretrained(folder / "unet").config.items()
                 if not k.startswith("_")},
        "vae": {k: v for k, v in AutoencoderKL.from_pretrained(folder / "vae").config.items() if not k.startswith("_")},
        "scheduler": {k: v for k, v in PNDMScheduler.from_pretrained(folder / "scheduler").config.items()
                      if not k.startswith("_")},
        # diffusers reads has_pre_transformation with getattr(config, ..., False), as here.
        "text_encoder": {k: getattr(te, k, False) for k in TEXT_FIELDS},
    }


def image(pipe, prompt=PROMPT):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                output_type="np").images


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("variant", ["m9", "m18"])
@pytest.mark.parametrize("dtype,suffix", [(None, ".safetensors"), (torch.float16, ".ckpt")])
def test_round_trip_is_identity(folders, tmp_path, variant, dtype, suffix):
    """diffusers → original (safetensors, or .ckpt with a state_dict wrapper) → diffusers: every tensor
    bit-identical, configs equal, tokenizer files byte-identical. The fp16 case starts from an fp16 folder."""
    src = folders[variant]
    if dtype is not None:
        src = convert(src, tmp_path / "src", dtype=dtype, progress=False)
        assert_same_tensors(folders[variant], src, dtype)
    original = to_original(src, tmp_path / f"model{suffix}", progress=False)
    if suffix == ".ckpt":
        assert set(torch.load(original, weights_only=True)) == {"state_dict"}
    out = convert_tiny(original, tmp_path / "out", variant, src)
    assert_same_tensors(src, out)
    assert diffusers_configs(out) == diffusers_configs(src)
    for name in ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / "tokenizer" / name).read_bytes() == (src / "tokenizer" / name).read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temp folder left behind


@pytest.mark.parametrize("variant", ["m9", "m18"])
def test_tables_agree_with_diffusers_converter(folders, originals, variant):
    """diffusers' own LDM → diffusers converter, fed our original file, gives back the source tensors."""
    ldm = original_state_dict(originals, variant)
    for component, cls, fn in (("unet", UNet2DConditionModel, convert_ldm_unet_checkpoint),
                               ("vae", AutoencoderKL, convert_ldm_vae_checkpoint)):
        expected = load_file(folders[variant] / component / WEIGHTS[component])
        converted = fn(dict(ldm), cls.load_config(folders[variant] / component))
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected), component
    assert {k for k in ldm if k.startswith("cond_stage_model.")} == {
        "cond_stage_model." + k for k in load_file(folders[variant] / "text_encoder" / WEIGHTS["text_encoder"])}


@pytest.mark.parametrize("variant", ["m9", "m18"])
def test_diffusers_runs_converted_folder(folders, originals, tmp_path, variant):
    out = convert_tiny(originals[variant], tmp_path / "out", variant, folders[variant])
    ref = image(tiny.load_reference(folders[variant]))
    assert np.array_equal(image(tiny.load_reference(out)), ref)
    # Sensitivity: these images move with the prompt, so equal images mean equal models.
    assert np.abs(image(tiny.load_reference(out), "a photograph of an astronaut") - ref).max() * 255 > 30


def test_wrong_head_count_changes_the_image(folders, originals, tmp_path):
    """Heads are not in the shapes: a wrong override converts fine but gives another image, so the
    equality above also checks the inferred head counts."""
    out = convert_tiny(originals["m9"], tmp_path / "out", "m9", folders["m9"],
                       config=tiny_options("m9", unet={"attention_head_dim": 2}))
    assert np.abs(image(tiny.load_reference(out)) - image(tiny.load_reference(folders["m9"]))).max() * 255 > 1


@pytest.mark.parametrize("variant", ["m9", "m18"])
def test_altdiff_loads_single_file(folders, originals, variant):
    pipe = altdiff.load(originals[variant], device="cpu", dtype=torch.float32, tokenizer=folders[variant],
                        safety_checker=folders[variant], config=tiny_options(variant))
    ours = pipe.generate(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                         output_type="np", progress=False).images
    assert np.abs(ours - image(tiny.load_reference(folders[variant]))).max() * 255 <= 1
    assert pipe.safety_checker is not None and pipe.scheduler_config.steps_offset == 1
    bare = altdiff.load(originals[variant], device="cpu", tokenizer=folders[variant], safety_checker=None,
                        config=tiny_options(variant))
    assert bare.safety_checker is None


def test_ckpt_with_state_dict_wrapper_and_ema(folders, originals, tmp_path):
    """A training .ckpt: `state_dict` wrapper, schedule buffers, LitEma's dot-less EMA copies. EMA wins by
    default; ema=False takes the (here perturbed) live weights."""
    ldm = original_state_dict(originals, "m9")
    state = {}
    for key, tensor in ldm.items():
        if key.startswith("model.diffusion_model."):
            state["model_ema." + key[len("model."):].replace(".", "")] = tensor
            tensor = tensor + 1
        state[key] = tensor
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10),
                  **tiny.ldm_schedule_buffers()})
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, path)
    out = convert_tiny(path, tmp_path / "ema", "m9", folders["m9"])
    assert_same_tensors(folders["m9"], out)
    live = convert_tiny(path, tmp_path / "live", "m9", folders["m9"], config=tiny_options("m9", ema=False))
    source = load_file(folders["m9"] / "unet" / WEIGHTS["unet"])
    unet = load_file(live / "unet" / WEIGHTS["unet"])
    assert all(torch.equal(unet[k], source[k] + 1) for k in source)


def test_legacy_vae_attention_in_single_file(folders, originals, tmp_path):
    """Files from older diffusers-to-webui scripts keep VAE attention as [C, C] linear weights."""
    ldm = {k: v.flatten(1) if ".mid.attn_1." in k and v.ndim == 4 else v
           for k, v in original_state_dict(originals, "m9").items()}
    assert any(".mid.attn_1.q.weight" in k and v.ndim == 2 for k, v in ldm.items())
    save_file(ldm, tmp_path / "legacy.safetensors")
    assert_same_tensors(folders["m9"], convert_tiny(tmp_path / "legacy.safetensors", tmp_path / "out", "m9",
                                                    folders["m9"]))


def test_bin_folder_with_legacy_vae_names(folders, tmp_path):
    """Old hub repos: pickled .bin weights and query/key/value/proj_attn VAE attention names."""
    src = tmp_path / "bin"
    shutil.copytree(folders["m9"], src, ignore=shutil.ignore_patterns("*.safetensors"))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for component, name in WEIGHTS.items():
        state_dict = load_file(folders["m9"] / component / name)
        if component == "vae":
            for new, old in legacy.items():
                state_dict = {k.replace(f".{new}.", f".{old}."): v for k, v in state_dict.items()}
        bin_name = "pytorch_model.bin" if name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(state_dict, src / component / bin_name)
    out = convert(src, tmp_path / "out", dtype=torch.float16, progress=False)
    assert not list(out.rglob("*.bin"))
    assert_same_tensors(folders["m9"], out, torch.float16)
    assert diffusers_configs(out) == diffusers_configs(folders["m9"])


class Payload:
    """Unpickling this runs `exec`, which creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_malicious_pickle_is_not_executed(folders, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="refused to unpickle"):
        convert_tiny(path, out, "m9", folders["m9"])
    with pytest.raises(WeightsError, match="refused to unpickle"):
        altdiff.load(path, device="cpu", tokenizer=folders["m9"], safety_checker=None)
    assert not marker.exists() and nothing_written(out)


def hostile_files(originals, tmp_path):
    ldm = original_state_dict(originals, "m9")
    data = originals["m9"].read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": ldm}, tmp_path / "full.ckpt")
    ckpt = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    save_file({k: v for k, v in ldm.items() if not k.startswith("model.diffusion_model.")},
              tmp_path / "no_unet.safetensors")
    clip = {k: v for k, v in ldm.items() if not k.startswith("cond_stage_model.")}
    clip["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] = torch.zeros(77, 32)
    save_file(clip, tmp_path / "sd_clip.safetensors")


@pytest.mark.parametrize("name,message", [
    ("truncated.safetensors", "truncated"),
    ("truncated.ckpt", "unreadable checkpoint"),
    ("no_unet.safetensors", r"no UNet .*model\.diffusion_model\."),
    ("sd_clip.safetensors", "CLIP"),
])
def test_hostile_inputs_leave_out_untouched(folders, originals, tmp_path, name, message):
    hostile_files(originals, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match=message):
        convert_tiny(tmp_path / name, out, "m9", folders["m9"])
    assert nothing_written(out)


def test_late_failure_leaves_nothing(folders, originals, tmp_path):
    """A safety checker whose weights are corrupt fails after the UNet/VAE were written: still no OUT."""
    bad = tmp_path / "bad"
    shutil.copytree(folders["m9"], bad)
    (bad / "safety_checker" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="model.safetensors"):
        convert(originals["m9"], out, tokenizer=folders["m9"], safety_checker=bad, config=tiny_options("m9"),
                progress=False)
    assert nothing_written(out)


def edited(originals, tmp_path, edit) -> Path:
    ldm = original_state_dict(originals, "m9")
    edit(ldm)
    save_file(ldm, tmp_path / "edited.safetensors")
    return tmp_path / "edited.safetensors"


def _incomplete_ema(ldm):
    ldm["model_ema.diffusion_modelout2weight"] = ldm["model.diffusion_model.out.2.weight"].clone()


def _small_vocab(ldm):
    ldm["cond_stage_model.roberta.embeddings.word_embeddings.weight"] = torch.zeros(100, 32)


@pytest.mark.parametrize("edit,options,error,message", [
    (None, {"architecture": "m18"}, WeightsError, "config m18 was asked for, but the file is m9"),
    (None, {"ema": True}, WeightsError, "no model_ema"),
    (_incomplete_ema, {}, WeightsError, "EMA weights are incomplete"),
    (lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(1)}), {}, WeightsError,
     r"do not fit .*model\.diffusion_model\.extra\.weight"),
    (None, {"unet": {"cross_attention_dim": 48}}, WeightsError, r"\(unet\).*shape mismatches"),
    (None, {"unet": {"down_block_types": ["UNetMidBlock2D", "DownBlock2D"]}}, WeightsError,
     "inferred config is not usable"),
    (None, {"unet": {"no_such_field": 1}}, ValueError, r"unknown unet fields \['no_such_field'\]"),
    (None, {"colour": "red"}, ValueError, r"unknown keys \['colour'\]"),
    (None, {"architecture": "sd15"}, ValueError, "architecture='sd15'"),
    (None, {"image_size": 100}, ValueError, "image_size=100"),
    (None, {"ema": "yes"}, ValueError, "ema='yes'"),
    (None, {"vae": [1]}, ValueError, "vae must be a dict"),
    (_small_vocab, {}, ValueError, "302 tokens, more than the text encoder's 100"),
])
def test_conversion_errors(folders, originals, tmp_path, edit, options, error, message):
    src = edited(originals, tmp_path, edit) if edit else originals["m9"]
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        convert_tiny(src, out, "m9", folders["m9"], config={**tiny_options("m9"), **options})
    assert nothing_written(out)


def test_argument_errors(folders, originals, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert_tiny(originals["m9"], existing, "m9", folders["m9"])
    with pytest.raises(ValueError, match="SRC: .* neither a diffusers folder nor"):
        convert(tmp_path / "model.onnx", tmp_path / "o1")
    with pytest.raises(ValueError, match="no model_index.json"):
        convert(folders["m9"] / "unet", tmp_path / "o2")
    with pytest.raises(ValueError, match="only single files take them"):
        convert(folders["m9"], tmp_path / "o3", tokenizer=folders["m9"])
    with pytest.raises(ValueError, match="tokenizer: .* has no sentencepiece.bpe.model"):
        convert_tiny(originals["m9"], tmp_path / "o4", "m9", folders["m9"] / "unet")
    with pytest.raises(ValueError, match="tokenizer: .* neither a local folder nor a hub repo"):
        convert(originals["m9"], tmp_path / "o5", tokenizer="no/such/dir", config=tiny_options("m9"))
    with pytest.raises(ValueError, match="safety_checker: .* no safety_checker/"):
        convert(originals["m9"], tmp_path / "o6", tokenizer=folders["m9"], safety_checker=folders["m9"] / "unet",
                config=tiny_options("m9"))
    with pytest.raises(ValueError, match="OUT: .* must end in"):
        to_original(folders["m9"], tmp_path / "model.bin")
    with pytest.raises(ValueError, match="SRC: .* not a diffusers-layout folder"):
        to_original(originals["m9"], tmp_path / "o7.safetensors")
    with pytest.raises(ValueError, match="only a single-file source takes them"):
        altdiff.load(folders["m9"], device="cpu", config={})
    with pytest.raises(ConfigError, match="config file not found"):
        to_original(tmp_path, tmp_path / "o8.safetensors")
    assert all(nothing_written(tmp_path / f"o{i}") for i in range(1, 8))


@pytest.fixture(scope="module")
def ddim_m18(folders, tmp_path_factory):
    """A tiny m18 whose heads ([2, 4]), sample size (16) and scheduler (DDIM, other betas) all differ from
    what a single file's shapes give, written as an original file by the CLI."""
    root = tmp_path_factory.mktemp("ddim_m18")
    src = root / "src"
    shutil.copytree(folders["m18"], src)
    shutil.rmtree(src / "scheduler")
    DDIMScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(src / "scheduler")
    assert main([str(src), str(root / "model.safetensors"), "--to-original", "--quiet"]) == 0
    return src, root / "model.safetensors"


def test_to_original_stores_the_config(ddim_m18, tmp_path):
    """--to-original writes what shapes cannot tell into __metadata__, so the file converts back and loads
    with no config= and gives diffusers' image of the folder it came from."""
    src, original = ddim_m18
    with safe_open(original, framework="pt") as f:
        stored = json.loads(f.metadata()["altdiff.config"])
    assert stored["architecture"] == "m18" and stored["unet"]["attention_head_dim"] == [2, 4]
    assert stored["scheduler"]["_class_name"] == "DDIMScheduler"
    out = convert(original, tmp_path / "out", tokenizer=src, safety_checker=src, progress=False)
    assert diffusers_configs(out) == diffusers_configs(src)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["beta_start"] == 0.001
    pipe = altdiff.load(original, device="cpu", dtype=torch.float32, tokenizer=src, safety_checker=None)
    ours = pipe.generate(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                         output_type="np", progress=False).images
    reference = tiny.load_reference(src, DDIMScheduler)
    reference.safety_checker = None
    assert np.abs(ours - image(reference)).max() * 255 <= 1
    # Sensitivity: the stored DDIM config matters (the default PNDM gives another image).
    pndm = altdiff.load(original, device="cpu", tokenizer=src, safety_checker=None,
                        config={"scheduler": dict(SCHEDULER)})
    other = pndm.generate(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                          output_type="np", progress=False).images
    assert np.abs(other - ours).max() * 255 > 1


def test_explicit_config_wins_over_stored(ddim_m18):
    _, original = ddim_m18
    configs = plan_conversion(original, {"image_size": 64, "unet": {"attention_head_dim": [4, 4]},
                                         "scheduler": {"beta_end": 0.03}}).configs
    assert configs["unet"]["attention_head_dim"] == [4, 4] and configs["unet"]["sample_size"] == 32
    assert configs["vae"]["sample_size"] == 64
    assert configs["scheduler"]["beta_end"] == 0.03 and configs["scheduler"]["_class_name"] == "DDIMScheduler"
    assert configs["text_encoder"]["num_attention_heads"] == 4  # stored, not overridden


@pytest.mark.parametrize("stored,message", [
    ("{not json", "is not JSON"),
    ('{"architecture": "m9"}', "says 'm9', but the tensors are m18"),
    ('{"unet": [1]}', "expected a JSON object"),
    ('{"colour": "red"}', "expected a JSON object"),
])
def test_bad_stored_config(ddim_m18, tmp_path, stored, message):
    _, original = ddim_m18
    path = tmp_path / "bad.safetensors"
    save_file(load_file(original), path, metadata={"format": "pt", "altdiff.config": stored})
    with pytest.raises(WeightsError, match=r"bad\.safetensors: __metadata__\['altdiff\.config'\]"):
        plan_conversion(path)
    with pytest.raises(WeightsError, match=message):
        plan_conversion(path)


def test_stored_config_is_checked_against_the_tensors(ddim_m18, tmp_path):
    _, original = ddim_m18
    with safe_open(original, framework="pt") as f:
        stored = json.loads(f.metadata()["altdiff.config"])
    stored["unet"]["cross_attention_dim"] = 48
    path = tmp_path / "bad.safetensors"
    save_file(load_file(original), path, metadata={"format": "pt", "altdiff.config": json.dumps(stored)})
    with pytest.raises(WeightsError, match=r"\(unet\).*shape mismatches"):
        plan_conversion(path)


def test_to_original_refuses_unknown_tensors(folders, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(folders["m9"], src)
    path = src / "unet" / WEIGHTS["unet"]
    save_file({**load_file(path), "class_embedding.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match=r"no place in the original layout .*class_embedding"):
        to_original(src, tmp_path / "out.safetensors", progress=False)
    assert nothing_written(tmp_path / "out.safetensors")


def test_plan_detects_architecture(originals):
    assert plan_conversion(originals["m9"], tiny_options("m9")).architecture == "m9"
    conversion = plan_conversion(originals["m18"], Options.from_dict(tiny_options("m18")))
    assert conversion.architecture == "m18"
    assert conversion.configs["unet"]["use_linear_projection"] is True
    assert conversion.configs["text_encoder"]["has_pre_transformation"] is True


def test_default_head_rules(originals):
    """Without overrides the released models' rules apply: 8 heads (m9), width/64 (m18), hidden/64 (XLM-R);
    on the tiny shapes those give configs that do not fit, which the check reports."""
    from altdiff.single_file import CheckpointFile, infer_text_encoder_config, infer_unet_config

    shapes = CheckpointFile(originals["m18"]).shapes
    assert infer_unet_config(shapes, 512, 8, "x")["attention_head_dim"] == [0, 1]  # 32/64, 64/64
    assert infer_unet_config(CheckpointFile(originals["m9"]).shapes, 512, 8, "x")["attention_head_dim"] == 8
    assert infer_text_encoder_config(shapes, "x")["num_attention_heads"] == 0
    assert infer_unet_config(shapes, 512, 8, "x")["sample_size"] == 64


def test_cli(folders, originals, tmp_path, capsys):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({k: v for k, v in tiny_options("m9").items() if k != "image_size"}))
    out = tmp_path / "out"
    args = [str(originals["m9"]), str(out), "--tokenizer", str(folders["m9"]), "--safety-checker", "none",
            "--config", "m9", "--image-size", "32", "--config-json", str(overrides), "--dtype", "bf16", "--quiet"]
    assert main(args) == 0
    assert load_file(out / "unet" / WEIGHTS["unet"])["conv_in.weight"].dtype == torch.bfloat16
    assert not (out / "safety_checker").exists()
    assert altdiff.load(out, device="cpu", dtype=torch.float32).safety_checker is None
    assert main([str(out), str(tmp_path / "back.ckpt"), "--to-original", "--quiet"]) == 0
    assert main(args) == 1 and "already exists" in capsys.readouterr().err


def test_bench_convert_smoke():
    """The benchmark runs end to end on the tiny model (numbers are not asserted)."""
    from benchmarks.bench_convert import main as bench

    results = bench(["--tiny"])
    assert results["convert"]["seconds"] > 0 and results["to_original"]["seconds"] > 0
    assert isinstance(results["file_mib"], int) and results["convert"]["peak_rss_mib"] > 0
