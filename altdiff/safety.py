"""The Stable Diffusion safety checker: a CLIP ViT vision tower, a projection and concept scoring.

Equal to diffusers' `StableDiffusionSafetyChecker` (transformers `CLIPVisionModel` + `visual_projection` +
cosine scores against 17 concept and 3 special-care embeddings), and `preprocess` equals what the AltDiffusion
pipeline feeds it: the decoded image turned into uint8 PIL images, then `CLIPImageProcessor` (PIL resize,
center crop, rescale, normalize), here in torch with PIL's fixed-point resampling reproduced bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from altdiff.attention import attention
from altdiff.config import ConfigError, ImageProcessorConfig, SafetyConfig
from altdiff.weights import WeightsError, load_module, read_state_dict

# Older transformers saved CLIP's position ids (an arange) with the weights; we compute them.
IGNORED_KEYS = ("vision_model.vision_model.embeddings.position_ids",)

NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3
# diffusers raises every concept score by this much once any special-care concept scored positive.
SPECIAL_CARE_ADJUSTMENT = 0.01


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

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
        # position ids are arange(num_positions): the embedding table in order.
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


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
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
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


# PIL's resampling filters (Image.Resampling values) as (kernel, support); Pillow's Resample.c.
def _bilinear(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < 1, 1 - x, 0.0)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


PIL_FILTERS = {2: (_bilinear, 1.0), 3: (_bicubic, 2.0)}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images


def _pil_weights(in_size: int, out_size: int, resample: int) -> torch.Tensor:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` as an (in_size, out_size) float64 matrix of its
    fixed-point integer weights (scaled by 2**_PRECISION_BITS)."""
    kernel, support = PIL_FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; clamping to 0 afterwards makes it equal to floor here.
    first = (center - support + 0.5).floor().clamp(min=0).long()
    count = (center + support + 0.5).floor().clamp(max=in_size).long() - first
    offsets = torch.arange(taps)
    used = offsets[None, :] < count[:, None]
    w = kernel(((offsets[None, :] + first[:, None]).double() - center[:, None] + 0.5) * (1.0 / filterscale))
    w = torch.where(used, w, 0.0)
    total = torch.zeros(out_size, dtype=torch.float64)
    for j in range(taps):  # summed in C's order so the normalization rounds as Pillow's does
        total = total + w[:, j]
    w = torch.where(total[:, None] != 0, w / total[:, None], w)
    fixed = w * (1 << _PRECISION_BITS)
    fixed = torch.where(fixed < 0, -(0.5 - fixed).floor(), (fixed + 0.5).floor())
    index = (first[:, None] + offsets[None, :]).clamp(max=in_size - 1)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    return matrix.scatter_add_(1, index, torch.where(used, fixed, 0.0)).t()


def _pil_resample_last_dim(x: torch.Tensor, out_size: int, resample: int) -> torch.Tensor:
    """One pass of Pillow's 8-bit resampling along the last dim of a float64 image of integers 0..255.
    float64 keeps the fixed-point sums exact (they stay below 2**31), so a matmul gives Pillow's integers."""
    acc = x @ _pil_weights(x.shape[-1], out_size, resample) + (1 << (_PRECISION_BITS - 1))
    return torch.floor(acc / (1 << _PRECISION_BITS)).clamp(0, 255)


def pil_resize(x: torch.Tensor, size: tuple[int, int], resample: int = 3) -> torch.Tensor:
    """`PIL.Image.resize((w, h), resample)` of an 8-bit image given as a float64 CPU tensor (..., H, W) of
    integers 0..255: two separable passes, each rounded to 8 bits, as Pillow does."""
    height, width = size
    in_height, in_width = x.shape[-2:]

    def horizontal(x):
        return _pil_resample_last_dim(x, width, resample) if width != in_width else x

    def vertical(x):
        return _pil_resample_last_dim(x.transpose(-1, -2), height, resample).transpose(-1, -2) \
            if height != in_height else x

    # Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
    # as the width (older Pillow always goes horizontal first; the two agree unless an image is more than
    # about twice as tall as wide). The 8-bit rounding between passes makes the order visible.
    if 0 < in_height - height and in_height - height > 2 * (in_width - width):
        return horizontal(vertical(x))
    return vertical(horizontal(x))


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
    normalize). Values outside [0, 1] are clamped (diffusers clamps before quantizing). Runs on the CPU, as
    diffusers does, in float64 (exact for Pillow's fixed-point arithmetic); the result is a CPU tensor."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {_describe(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (batch, 3, height, width), got {tuple(images.shape)}")
    x = (images.detach().float().cpu().clamp(0, 1) * 255).round().double()
    if config.do_resize:
        x = pil_resize(x, _resize_size(x.shape[-2], x.shape[-1], config.resize_to), config.resample)
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
    if processor.do_resize and processor.resample not in PIL_FILTERS:
        raise ConfigError(f"{processor.source}: resample={processor.resample!r} is not supported "
                          f"(expected one of {sorted(PIL_FILTERS)}: PIL bilinear, bicubic)")
    if processor.do_center_crop and processor.crop_to != (cfg.image_size, cfg.image_size):
        raise ConfigError(f"{processor.source}: crop_size={processor.crop_size!r} does not match the checker's "
                          f"image_size={cfg.image_size}")


def _weights_file(folder: Path, variant: str | None) -> Path:
    # transformers names the file model[.variant].safetensors or pytorch_model[.variant].bin; a missing
    # variant falls back to the plain file, as altdiff.weights.find_weights does.
    names = [f"model.{variant}.safetensors", f"pytorch_model.{variant}.bin"] if variant else []
    names += ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no safety checker weights file (looked for {', '.join(names)})")


def load_safety_checker(checker_folder: str | Path, feature_extractor_folder: str | Path,
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        variant: str | None = None) -> SafetyChecker:
    """Load a diffusers `safety_checker/` folder and its `feature_extractor/` preprocessor config."""
    checker_folder, feature_extractor_folder = Path(checker_folder), Path(feature_extractor_folder)
    cfg = SafetyConfig.from_json(checker_folder / "config.json")
    processor = ImageProcessorConfig.from_json(feature_extractor_folder / "preprocessor_config.json")
    _check_processor(processor, cfg)
    path = _weights_file(checker_folder, variant)
    return load_module(lambda: SafetyChecker(cfg, processor), read_state_dict(path), str(path), dtype=dtype,
                       device=device, ignore=IGNORED_KEYS)
