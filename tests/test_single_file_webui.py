"""Single files as the AUTOMATIC1111 webui and LDM write them, read by `altdiff.load`.

The text encoder is rebuilt as the webui owns it (modules/xlmr.py, modules/xlmr_m18.py,
`BertSeriesModelWithTransformation`): a transformers `XLMRobertaModel` with its pooler, a `pre_LN` LayerNorm
(random here, far from the identity: m9 never uses it), `transformation` and, on m18,
`transformation_pre`; its state dict goes under `cond_stage_model.` with the `position_ids` buffer that
the transformers of the webui's time saved. UNet and VAE go under LDM names (the to-original tables, checked
against diffusers' own converter in test_convert.py), next to LDM's DDPM buffers and LitEma's counters, stored
in fp32/fp16/bf16 as the webui's "save as half" does, or as a training `.ckpt` (`state_dict`, `global_step`).
The oracle is diffusers running the matching diffusers folder with its weights rounded the same way.
"""

import logging

import numpy as np
import pytest
import tiny
import torch
from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
    RobertaSeriesModelWithTransformation,
)
from safetensors.torch import save_file
from tiny import tiny_options
from torch import nn
from transformers import XLMRobertaModel

import altdiff
from altdiff.single_file import DDPM_BUFFERS, TEXT_PREFIX, plan_conversion, to_original_state_dict
from altdiff.weights import WeightsError

PROMPT = "一只戴着帽子的猫"
OTHER_PROMPT = "a photograph of an astronaut riding a horse on the moon"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILES = [("fp32", ".safetensors"), ("bf16", ".safetensors"), ("fp16", ".ckpt")]


class WebuiXLMR(nn.Module):
    """The modules the webui's BertSeriesModelWithTransformation owns, by the same names."""

    def __init__(self, config, m18: bool):
        super().__init__()
        self.roberta = XLMRobertaModel(config)  # add_pooling_layer=True, as the webui builds it
        self.transformation = nn.Linear(config.hidden_size, config.project_dim)
        self.pre_LN = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if m18:
            self.transformation_pre = nn.Linear(config.hidden_size, config.project_dim)


def webui_state_dict(folder, variant: str) -> dict:
    """An fp32 webui/LDM-layout state dict of the tiny diffusers folder."""
    diffusers_te = RobertaSeriesModelWithTransformation.from_pretrained(folder / "text_encoder")
    text_encoder = WebuiXLMR(diffusers_te.config, variant == "m18")
    with torch.no_grad():
        text_encoder.pre_LN.weight.normal_(1.0, 0.5)
        text_encoder.pre_LN.bias.normal_(0.0, 0.5)
    missing, unexpected = text_encoder.load_state_dict(diffusers_te.state_dict(), strict=False)
    assert unexpected == [] and missing == ([] if variant == "m18" else ["pre_LN.weight", "pre_LN.bias"])
    text = {TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()}
    assert any(".pooler.dense." in k for k in text)
    assert TEXT_PREFIX + "roberta.embeddings.position_ids" not in text  # today's transformers no longer saves it
    text[TEXT_PREFIX + "roberta.embeddings.position_ids"] = torch.arange(
        diffusers_te.config.max_position_embeddings)[None]
    ldm = {k: v for k, v in to_original_state_dict(folder).items() if not k.startswith(TEXT_PREFIX)}
    counters = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int)}
    return {**ldm, **text, **tiny.ldm_schedule_buffers(), **counters}


def write(state_dict: dict, path, dtype: torch.dtype = torch.float32):
    """As the webui saves: every float32 tensor in `dtype`, integer buffers unchanged."""
    state_dict = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state_dict.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 3}, path)
    else:
        save_file(state_dict, path)
    return path


@pytest.fixture(scope="module")
def folders(m9_folder, m18_folder):
    return {"m9": m9_folder, "m18": m18_folder}


@pytest.fixture(scope="module")
def webui(folders):
    return {variant: webui_state_dict(folder, variant) for variant, folder in folders.items()}


@pytest.fixture(scope="module")
def webui_files(webui, tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    return {(variant, name, suffix): write(state_dict, root / f"{variant}-{name}{suffix}", DTYPES[name])
            for variant, state_dict in webui.items() for name, suffix in FILES}


def diffusers_image(folder, dtype: torch.dtype, prompt: str = PROMPT) -> np.ndarray:
    """diffusers on the folder, its weights rounded through the file's storage dtype, computed in fp32."""
    pipe = tiny.load_reference(folder)
    pipe.safety_checker = None
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in module.parameters():
                p.copy_(p.to(dtype).float())
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                output_type="np").images


def altdiff_image(path, folder, variant: str, prompt: str = PROMPT, **config) -> np.ndarray:
    pipe = altdiff.load(path, device="cpu", dtype=torch.float32, tokenizer=folder, safety_checker=None,
                        config=tiny_options(variant, **config))
    return pipe.generate(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                         output_type="np", progress=False).images


@pytest.fixture(scope="module")
def references(folders):
    cache = {}

    def get(variant: str, name: str) -> np.ndarray:
        if (variant, name) not in cache:
            cache[variant, name] = diffusers_image(folders[variant], DTYPES[name])
        return cache[variant, name]

    return get


def levels(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() * 255)


def test_fixture_follows_ldm_and_the_webui(webui):
    """The file carries every group the issue names, and the schedule buffers are LDM's own list."""
    assert set(tiny.ldm_schedule_buffers()) == set(DDPM_BUFFERS)
    for variant, state_dict in webui.items():
        assert {f"{TEXT_PREFIX}pre_LN.weight", f"{TEXT_PREFIX}roberta.pooler.dense.weight",
                f"{TEXT_PREFIX}roberta.embeddings.position_ids", "model_ema.decay", "model_ema.num_updates",
                "posterior_mean_coef2"} <= set(state_dict)
        assert (f"{TEXT_PREFIX}transformation_pre.weight" in state_dict) == (variant == "m18")


@pytest.mark.parametrize("variant", ["m9", "m18"])
@pytest.mark.parametrize("name,suffix", FILES)
def test_webui_file_gives_diffusers_image(folders, webui_files, references, variant, name, suffix):
    ours = altdiff_image(webui_files[variant, name, suffix], folders[variant], variant)
    assert levels(ours, references(variant, name)) <= 1


@pytest.mark.parametrize("variant", ["m9", "m18"])
def test_images_follow_the_text_path(folders, webui_files, references, variant):
    """Sensitivity: the prompt moves these images by many levels, so the equalities above check the text
    encoder."""
    other = altdiff_image(webui_files[variant, "fp32", ".safetensors"], folders[variant], variant, OTHER_PROMPT)
    assert levels(other, references(variant, "fp32")) > 30


def test_debug_log_names_what_was_ignored(folders, webui_files, caplog):
    with caplog.at_level(logging.DEBUG, logger="altdiff"):
        plan_conversion(webui_files["m9", "fp16", ".ckpt"], tiny_options("m9"))
    for group in ("DDPM schedule buffers", "EMA counters", "XLM-R position_ids", "m9 pre_LN"):
        assert group in caplog.text
    assert "cond_stage_model.pre_LN.weight" in caplog.text and "posterior_variance" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="altdiff"):
        altdiff.load(webui_files["m18", "fp32", ".safetensors"], device="cpu", tokenizer=folders["m18"],
                     safety_checker=None, config=tiny_options("m18"))
    assert "DDPM schedule buffers" in caplog.text and "pre_LN" not in caplog.text  # m18 computes with pre_LN
    assert "roberta.pooler.dense.weight" in caplog.text  # altdiff's text encoder skips diffusers' pooler


def edited(webui, tmp_path, variant: str, edit, dtype: torch.dtype = torch.float32):
    state_dict = dict(webui[variant])
    edit(state_dict)
    return write(state_dict, tmp_path / "edited.safetensors", dtype)


LINEAR = tiny.ldm_schedule_buffers(1e-4, 2e-2)  # LDM's default range, not AltDiffusion's


@pytest.mark.parametrize("variant,edit,message", [
    ("m9", lambda sd: sd.update({"control_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}),
     r"1 tensors do not fit .*control_model\.input_blocks"),
    ("m9", lambda sd: sd.update({"model_ema.diffusion_modelno_such_weight": torch.zeros(2)}),
     r"do not fit .*model_ema\.diffusion_modelno_such_weight"),
    ("m9", lambda sd: sd.update({TEXT_PREFIX + "logit_scale": torch.tensor(2.0)}), r"do not fit .*logit_scale"),
    ("m18", lambda sd: [sd.pop(TEXT_PREFIX + f"pre_LN.{n}") for n in ("weight", "bias")],
     r"\(text_encoder\).*missing keys: pre_LN"),
    ("m9", lambda sd: sd.update(LINEAR), r"noise schedule \(betas, 1000 steps\) differs .*scaled_linear"),
    ("m9", lambda sd: sd.update(alphas_cumprod=LINEAR["alphas_cumprod"]), r"noise schedule \(alphas_cumprod"),
    ("m9", lambda sd: sd.update(alphas_cumprod_prev=sd["alphas_cumprod_prev"][:-1]),
     r"noise schedule \(alphas_cumprod_prev, 999 steps\)"),
    ("m9", lambda sd: sd.update(scale_factor=torch.tensor(1.0)), r"scale_factor=1\.0 differs .*0\.18215"),
])
def test_tensors_that_would_change_the_image_are_refused(folders, webui, tmp_path, variant, edit, message):
    path = edited(webui, tmp_path, variant, edit)
    with pytest.raises(WeightsError, match=message):
        altdiff.load(path, device="cpu", tokenizer=folders[variant], safety_checker=None,
                     config=tiny_options(variant))


def test_checked_groups_load_when_they_agree(folders, webui, references, tmp_path):
    """The same checks accept what agrees: a scale_factor buffer equal to the VAE's (rounded to fp16 by the
    webui; with a learned logvar, also unused), and LDM's default schedule once the scheduler config says so."""
    path = edited(webui, tmp_path, "m9", lambda sd: sd.update(scale_factor=torch.tensor(0.18215),
                                                              logvar=torch.zeros(1000)), torch.float16)
    assert levels(altdiff_image(path, folders["m9"], "m9"), references("m9", "fp16")) <= 1
    (tmp_path / "linear").mkdir()
    path = edited(webui, tmp_path / "linear", "m9", lambda sd: sd.update(LINEAR))
    # LDM's "linear" schedule is linear in sqrt(beta): diffusers' scaled_linear.
    conversion = plan_conversion(path, tiny_options("m9", scheduler={"beta_start": 1e-4, "beta_end": 2e-2}))
    assert conversion.configs["scheduler"]["beta_start"] == 1e-4
