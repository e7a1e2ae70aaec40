"""Tiny random AltDiffusion pipelines built with diffusers itself (the oracle), saved in diffusers layout.

Test-only: imports diffusers/transformers. `build_pipeline_folder(root, variant)` writes a folder laid out
like BAAI/AltDiffusion-m9 (variant "m9") or -m18 (variant "m18") and returns it; `load_reference(folder)`
loads it back as a diffusers AltDiffusionPipeline, component by component (diffusers 0.35.2 cannot load an
AltDiffusion folder through the pipeline's own from_pretrained).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

# A small multilingual corpus for a ~300-piece sentencepiece BPE model (the 9 m9 languages and more).
CORPUS = """\
a cat wearing a hat, highly detailed oil painting
a photograph of an astronaut riding a horse on the moon
beautiful landscape with mountains and a river at sunset
一只戴着帽子的猫 一幅美丽的风景画 山和河流 日落时分
宇宙飛行士が月で馬に乗っている写真 美しい風景
모자를 쓴 고양이 아름다운 풍경 산과 강
قطة ترتدي قبعة منظر طبيعي جميل
кошка в шляпе красивый пейзаж с горами и рекой
टोपी पहने एक बिल्ली सुंदर परिदृश्य
un chat portant un chapeau, peinture à l'huile
una gata con sombrero, paisaje hermoso con montañas
eine Katze mit Hut, schöne Landschaft mit Bergen
um gato usando um chapéu, paisagem bonita
un gatto con un cappello, bellissimo paesaggio
een kat met een hoed, mooi landschap
kot w kapeluszu, piękny krajobraz z górami
şapka takan bir kedi, güzel manzara
con mèo đội mũ, phong cảnh đẹp
แมวใส่หมวก ทิวทัศน์ที่สวยงาม
"""

SENSITIVITY = 20.0  # see DESIGN.md "Sensitivity trap": makes the prompt move tiny images by many levels


def train_sentencepiece(out_dir: Path, vocab_size: int = 300) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    prefix = out_dir / "sentencepiece.bpe"
    # The real XLM-R layout: <unk>=0, <s>=1, </s>=2, no pad piece; the tokenizer adds the fairseq offset.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, byte_fallback=False,
        num_threads=1, minloglevel=2)
    corpus.unlink()
    (out_dir / "sentencepiece.bpe.vocab").unlink()
    return out_dir / "sentencepiece.bpe.model"


def text_encoder_config(variant: str, vocab_size: int):
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import RobertaSeriesConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=80, type_vocab_size=1, layer_norm_eps=1e-5,
        project_dim=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if variant == "m18":
        kwargs["has_pre_transformation"] = True
    return RobertaSeriesConfig(**kwargs)


def unet_kwargs(variant: str, **overrides) -> dict:
    kwargs = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if variant == "m9":
        kwargs.update(attention_head_dim=8)
    else:  # SD2-style: per-block head counts, linear projections
        kwargs.update(attention_head_dim=(2, 4), use_linear_projection=True)
    kwargs.update(overrides)
    return kwargs


def vae_kwargs(**overrides) -> dict:
    kwargs = dict(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=32,
    )
    kwargs.update(overrides)
    return kwargs


def safety_checker_and_processor(image_size: int = 32):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=100),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=4),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    # The real checker's concept embeddings are learned; random ones give a realistic mix of scores.
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.concept_embeds_weights.fill_(0.5)
        checker.special_care_embeds_weights.fill_(0.5)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return checker, processor


def make_sensitive(unet, text_encoder, factor: float = SENSITIVITY) -> None:
    """Scale cross-attention values/outputs and the text projection so prompts visibly move the image."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_v") or name.endswith("attn2.to_out.0"):
                module.weight.mul_(factor ** 0.5)
        for name in ("transformation", "transformation_pre"):
            if hasattr(text_encoder, name):
                getattr(text_encoder, name).weight.mul_(factor)


def tiny_options(variant: str, **extra) -> dict:
    """`config=` for a tiny model's single file without stored config: what its shapes cannot tell (the real
    models follow altdiff's default rules)."""
    unet = {"attention_head_dim": [2, 4]} if variant == "m18" else {}
    return {"image_size": 32, "text_encoder": {"num_attention_heads": 4}, "unet": unet, **extra}


def ldm_schedule_buffers(linear_start: float = 0.00085, linear_end: float = 0.012,
                         timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """The buffers LDM's `DDPM.register_schedule()` saves in every checkpoint (ldm/models/diffusion/ddpm.py,
    beta_schedule "linear", v_posterior 0), computed as it does: float64 numpy, stored as float32."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def build_components(variant: str, tokenizer_dir: Path, seed: int = 0, unet_overrides: dict | None = None):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesModelWithTransformation,
    )
    from transformers import XLMRobertaTokenizer

    spm_file = train_sentencepiece(tokenizer_dir)
    tokenizer = XLMRobertaTokenizer(vocab_file=str(spm_file), model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = RobertaSeriesModelWithTransformation(text_encoder_config(variant, len(tokenizer))).eval()
    unet = UNet2DConditionModel(**unet_kwargs(variant, **(unet_overrides or {}))).eval()
    vae = AutoencoderKL(**vae_kwargs()).eval()
    make_sensitive(unet, text_encoder)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    checker, processor = safety_checker_and_processor()
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=checker, feature_extractor=processor)


def build_pipeline_folder(root: Path, variant: str = "m9", seed: int = 0, **kw) -> Path:
    """Save a tiny AltDiffusion pipeline in diffusers layout under root/<variant>, like the hub repos."""
    from diffusers import AltDiffusionPipeline

    folder = Path(root) / variant
    comps = build_components(variant, Path(root) / f"{variant}-spm", seed=seed, **kw)
    pipe = AltDiffusionPipeline(**comps, requires_safety_checker=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The hub repos ship the sentencepiece model; save_pretrained may only write tokenizer.json.
    shutil.copy(Path(root) / f"{variant}-spm" / "sentencepiece.bpe.model", folder / "tokenizer")
    return folder


def load_reference(folder: Path, scheduler_cls=None):
    """The diffusers AltDiffusionPipeline for a saved folder, loaded component by component."""
    from diffusers import AltDiffusionPipeline, AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesModelWithTransformation,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, XLMRobertaTokenizer

    folder = Path(folder)
    scheduler_cls = scheduler_cls or PNDMScheduler
    pipe = AltDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=RobertaSeriesModelWithTransformation.from_pretrained(folder / "text_encoder"),
        tokenizer=XLMRobertaTokenizer(vocab_file=str(folder / "tokenizer" / "sentencepiece.bpe.model"),
                                      model_max_length=77),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=scheduler_cls.from_pretrained(folder / "scheduler"),
        safety_checker=StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker"),
        feature_extractor=CLIPImageProcessor.from_pretrained(folder / "feature_extractor"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
