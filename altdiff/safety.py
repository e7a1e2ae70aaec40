"""The Stable Diffusion safety checker: a CLIP ViT vision tower, a projection and concept scoring.

Equal to diffusers' `StableDiffusionSafetyChecker` (transformers `CLIPVisionModel` + `visual_projection` +
cosine scores against 17 concept and 3 special-care embeddings), and `preprocess` equals what the AltDiffusion
pipeline feeds it: the decoded image turned into uint8 PIL images, then `CLIPImageProcessor` (PIL resize,
center crop, rescale, normalize) done with Pillow and torch, without transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from altdiff.attention import attention
from altdiff.config import ConfigError, ImageProcessorConfig, SafetyConfig
from altdiff.linear import Linear
from altdiff.weights import SafetensorsFile, check_weights, find_weights, load_module, open_weights

# Older transformers saved CLIP's position ids (an arange) with the weights; we compute them.
IGNORED_KEYS = ("vision_model.vision_model.embeddings.position_ids",)

NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3
# diffusers raises every concept score by this much once any special-care concept scored positive.
SPECIAL_CARE_ADJUSTMENT = 0.01
RESAMPLE_FILTERS = {int(f) for f in PIL.Image.Resampling}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        # position ids are arange(num_positions): the whole table, looked up (not read as `.weight`) so that
        # offload hooks see the use.
        positions = torch.arange(self.position_embedding.num_embeddings, device=patches.device)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(positions)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, as in transformers
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled output: the class token after the encoder, through post_layernorm."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(x[:, 0])


class CLIPVisionModel(nn.Module):
    """transformers' wrapper level, kept so parameter names carry its extra `vision_model.` prefix."""

    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a) @ F.normalize(b).t()


class SafetyChecker(nn.Module):
    """diffusers' StableDiffusionSafetyChecker. `forward` returns only the per-image NSFW flags; blacking out
    flagged images is left to the caller."""

    def __init__(self, cfg: SafetyConfig, processor: ImageProcessorConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.processor = processor if processor is not None else ImageProcessorConfig()
        self.vision_model = CLIPVisionModel(cfg)
        self.visual_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.empty(NUM_CONCEPTS, cfg.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.empty(NUM_SPECIAL_CARE, cfg.projection_dim),
                                                requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.empty(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.empty(NUM_SPECIAL_CARE), requires_grad=False)

    def image_embeds(self, clip_input: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) CLIP pixel values → (B, projection_dim) image embeddings."""
        size = self.cfg.image_size
        if not isinstance(clip_input, torch.Tensor) or not clip_input.is_floating_point():
            raise TypeError(f"clip_input must be a floating-point tensor, got {_describe(clip_input)}")
        if clip_input.ndim != 4 or tuple(clip_input.shape[1:]) != (self.cfg.num_channels, size, size):
            raise ValueError(f"clip_input must have shape (batch, {self.cfg.num_channels}, {size}, {size}), "
                             f"got {tuple(clip_input.shape)}")
        return self.visual_projection(self.vision_model(clip_input))

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor) -> list[bool]:
        """has_nsfw_concepts for a batch of preprocessed images, exactly as diffusers computes them."""
        embeds = self.image_embeds(clip_input)
        # diffusers scores in float32 on the CPU (numpy), and rounds each score to 3 decimals before `> 0`.
        special = _cosine(embeds, self.special_care_embeds).cpu().float()
        concept = _cosine(embeds, self.concept_embeds).cpu().float()
        special_scores = special - self.special_care_embeds_weights.cpu().float()
        special_care = (torch.round(special_scores, decimals=3) > 0).any(dim=1)
        adjustment = special_care.float() * SPECIAL_CARE_ADJUSTMENT
        concept_scores = concept - self.concept_embeds_weights.cpu().float() + adjustment[:, None]
        return (torch.round(concept_scores, decimals=3) > 0).any(dim=1).tolist()

    @torch.no_grad()
    def check(self, images: torch.Tensor) -> list[bool]:
        """NSFW flags for decoded images (B, 3, H, W) with values in [0, 1], as the diffusers pipeline gets
        them from `run_safety_checker`."""
        weight = self.visual_projection.weight
        return self(preprocess(images, self.processor).to(device=weight.device, dtype=weight.dtype))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _resize_size(height: int, width: int, target) -> tuple[int, int]:
    # transformers' get_resize_output_image_size with default_to_square=False for a shortest edge.
    if not isinstance(target, int):
        return tuple(target)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (new_long, target) if width <= height else (target, new_long)


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # transformers' center_crop: top-left at (H - h) // 2, zero padding where the crop leaves the image.
    height, width = x.shape[-2:]
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return F.pad(x, (-left, left + size[1] - width, -top, top + size[0] - height))


def preprocess(images: torch.Tensor, config: ImageProcessorConfig) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [0, 1] → the float32 CLIP pixel values diffusers' pipeline builds:
    `(x * 255).round()` to uint8 PIL images, then CLIPImageProcessor (PIL resize, center crop, rescale,
    normalize). Resizing goes through Pillow itself, so it is exact whatever Pillow's version; the result
    is a CPU tensor."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {_describe(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (batch, 3, height, width), got {tuple(images.shape)}")
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    resized = []
    for array in pixels.numpy():
        img = PIL.Image.fromarray(array)
        if config.do_resize:
            height, width = _resize_size(img.height, img.width, config.resize_to)
            img = img.resize((width, height), resample=config.resample)
        resized.append(torch.from_numpy(np.asarray(img, dtype=np.float64)).permute(2, 0, 1))
    x = torch.stack(resized)
    if config.do_center_crop:
        x = _center_crop(x, config.crop_to)
    # transformers rescales in float64 and casts to float32, then normalizes in float32.
    x = (x * config.rescale_factor).float() if config.do_rescale else x.float()
    if config.do_normalize:
        mean = torch.tensor(config.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(config.image_std, dtype=torch.float32)[:, None, None]
        x = (x - mean) / std
    return x


def _check_processor(processor: ImageProcessorConfig, cfg: SafetyConfig) -> None:
    if processor.do_resize and processor.resample not in RESAMPLE_FILTERS:
        raise ConfigError(f"{processor.source}: resample={processor.resample!r} is not supported "
                          f"(expected one of {sorted(RESAMPLE_FILTERS)}: a PIL resampling filter)")
    if processor.do_center_crop and processor.crop_to != (cfg.image_size, cfg.image_size):
        raise ConfigError(f"{processor.source}: crop_size={processor.crop_size!r} does not match the checker's "
                          f"image_size={cfg.image_size}")


def safety_checker_reader(checker_folder: str | Path, feature_extractor_folder: str | Path,
                          variant: str | None = None) -> Callable[[torch.device | str | None, torch.dtype | None],
                                                                  SafetyChecker]:
    """Check a diffusers `safety_checker/` folder and its `feature_extractor/` preprocessor config now (configs,
    weight keys and shapes: for safetensors from the header alone) and return `read(device, dtype)`, which
    reads the weights (for `load()`, which reads them on first use)."""
    checker_folder, feature_extractor_folder = Path(checker_folder), Path(feature_extractor_folder)
    cfg = SafetyConfig.from_json(checker_folder / "config.json")
    processor = ImageProcessorConfig.from_json(feature_extractor_folder / "preprocessor_config.json")
    _check_processor(processor, cfg)
    path = find_weights(checker_folder, variant)

    def build() -> SafetyChecker:
        return SafetyChecker(cfg, processor)

    state_dict = open_weights(path)
    with torch.device("meta"):
        check_weights(build(), state_dict, str(path), IGNORED_KEYS)

    def read(device: torch.device | str | None, dtype: torch.dtype | None) -> SafetyChecker:
        weights = open_weights(path, device) if isinstance(state_dict, SafetensorsFile) else state_dict
        return load_module(build, weights, str(path), dtype=dtype, device=device, ignore=IGNORED_KEYS)
    return read


def load_safety_checker(checker_folder: str | Path, feature_extractor_folder: str | Path,
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        variant: str | None = None) -> SafetyChecker:
    """Load a diffusers `safety_checker/` folder and its `feature_extractor/` preprocessor config."""
    return safety_checker_reader(checker_folder, feature_extractor_folder, variant)(device, dtype)
