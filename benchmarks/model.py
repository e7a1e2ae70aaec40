"""A full-size AltDiffusion-m9 pipeline with random weights, built once by diffusers and saved in diffusers
layout, so altdiff and diffusers load the very same safetensors files.

The architecture is the real m9 one (SD1.x UNet, SD VAE, 24-layer XLM-R-large + 768 projection, CLIP
ViT-L/14 safety checker). Only the vocabulary differs by default: the tokenizer is a small sentencepiece
model trained here (no hub access), so the text encoder's word embedding has that many rows instead of
250002 (`vocab_size` pads it to any size; compute is the same, only load size and memory change).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.tiny import train_sentencepiece

REAL_VOCAB = 250002
DEFAULT_WORKDIR = Path.home() / ".cache" / "altdiff-bench"


def unet_config() -> dict:
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def vae_config() -> dict:
    return dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def text_encoder_config(vocab_size: int):
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import RobertaSeriesConfig

    return RobertaSeriesConfig(vocab_size=vocab_size, hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                               type_vocab_size=1, layer_norm_eps=1e-5, project_dim=768, pad_token_id=1)


def safety_checker_and_processor():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                           num_hidden_layers=24, image_size=224, patch_size=14),
                        projection_dim=768)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # torch.empty in diffusers' __init__: give the scores real values
        for p in (checker.concept_embeds, checker.special_care_embeds):
            p.copy_(torch.randn_like(p))
        checker.concept_embeds_weights.fill_(0.5)
        checker.special_care_embeds_weights.fill_(0.5)
    return checker, CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def build_folder(workdir: Path = DEFAULT_WORKDIR, vocab_size: int | None = None, seed: int = 0) -> Path:
    """The cached m9-sized folder under `workdir` (built on first use, a few minutes and ~6 GB on disk).
    `vocab_size` None uses the small trained tokenizer's own size; REAL_VOCAB matches the real checkpoint."""
    from diffusers import AltDiffusionPipeline, AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesModelWithTransformation,
    )
    from transformers import XLMRobertaTokenizer

    workdir = Path(workdir)
    folder = workdir / f"m9-vocab{vocab_size or 'small'}"
    if (folder / "model_index.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    spm_file = train_sentencepiece(workdir / "spm")
    tokenizer = XLMRobertaTokenizer(vocab_file=str(spm_file), model_max_length=77)
    torch.manual_seed(seed)
    checker, processor = safety_checker_and_processor()
    pipe = AltDiffusionPipeline(
        vae=AutoencoderKL(**vae_config()).eval(),
        text_encoder=RobertaSeriesModelWithTransformation(text_encoder_config(vocab_size or len(tokenizer))).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config()).eval(),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                                set_alpha_to_one=False),
        safety_checker=checker, feature_extractor=processor, requires_safety_checker=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    shutil.copy(spm_file, partial / "tokenizer")
    partial.rename(folder)  # only a complete folder counts as cached
    return folder


def load_diffusers(folder: Path, device: torch.device, dtype: torch.dtype):
    """diffusers' AltDiffusionPipeline for `folder`, component by component: diffusers 0.35.2's own
    `AltDiffusionPipeline.from_pretrained` cannot resolve the text encoder class named in model_index.json."""
    from diffusers import AltDiffusionPipeline, AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesModelWithTransformation,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, XLMRobertaTokenizer

    folder = Path(folder)
    pipe = AltDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype),
        text_encoder=RobertaSeriesModelWithTransformation.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
        tokenizer=XLMRobertaTokenizer(vocab_file=str(folder / "tokenizer" / "sentencepiece.bpe.model"),
                                      model_max_length=77),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype),
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker", torch_dtype=dtype),
        feature_extractor=CLIPImageProcessor.from_pretrained(folder / "feature_extractor"),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_altdiff(folder: Path, device: torch.device, dtype: torch.dtype):
    import altdiff

    return altdiff.load(str(folder), device=device, dtype=dtype)
