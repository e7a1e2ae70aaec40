"""The KL autoencoder (diffusers `AutoencoderKL`) with sliced and tiled encode / decode.

Submodule names equal the diffusers checkpoint keys (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...),
so a diffusers-layout `vae/` folder loads with a strict copy. `decode` takes *unscaled* latents: the caller
divides by `config.scaling_factor`, as the diffusers pipelines do.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .checks import is_int, is_number, plain
from .config import VAEConfig
from .linear import Linear
from .resnet import Downsample, ResnetBlock, Upsample
from .rng import Generator, randn_tensor
from .weights import find_weights, load_module, open_weights

# diffusers builds every VAE resnet, norm and attention with this epsilon.
EPS = 1e-6


class Attention(nn.Module):
    """The mid-block self-attention: group norm, one head spanning all channels, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Normalizing the (B, C, H*W) view, as diffusers does, keeps the reduction order bit-identical.
        tokens = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)
        # diffusers: heads = channels // attention_head_dim with attention_head_dim = channels, i.e. one head.
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), heads=1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block, groups,
                               downsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block + 1, groups,
                             upsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior, as diffusers' `DiagonalGaussianDistribution` (non-deterministic)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """mean + std * noise; a list of generators draws one batch item from each (diffusers' layout)."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.moments.device,
                             dtype=self.moments.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """diffusers' blend_v (dim 2) / blend_h (dim 3): fade the end of `a` into the start of `b`, in place.
    In-place matters: later tiles blend against the already blended neighbours, as in diffusers."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(b.dtype).to(b.device).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)
    return b


def _tiled(x: torch.Tensor, run, tile: int, step: int, blend: int, keep: int) -> torch.Tensor:
    """Run `run` on overlapping `tile`-sized tiles every `step` pixels, blend `blend` output pixels across
    each seam and keep the first `keep` output pixels of every tile (diffusers' tiled_encode/decode)."""
    rows = [[run(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], step)]
            for i in range(0, x.shape[2], step)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend(rows[i - 1][j], t, blend, dim=2)
            if j > 0:
                t = _blend(row[j - 1], t, blend, dim=3)
            out_row.append(t[:, :, :keep, :keep])
        out_rows.append(torch.cat(out_row, dim=3))
    return torch.cat(out_rows, dim=2)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`: `encode(image) -> DiagonalGaussian`, `decode(latents) -> image`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self._set_tile_sizes(None, None, None)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def enable_slicing(self) -> None:
        """Encode and decode one batch item at a time (lower peak memory, same results)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_latent_min_size: int | None = None,
                      tile_overlap_factor: float | None = None) -> None:
        """Encode images larger than `tile_sample_min_size` (default config.sample_size) and decode latents
        larger than `tile_latent_min_size` (default tile_sample_min_size / scale_factor) in overlapping,
        blended tiles; `tile_overlap_factor` defaults to 0.25. Same tiles and blending as diffusers."""
        self._set_tile_sizes(tile_sample_min_size, tile_latent_min_size, tile_overlap_factor)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _set_tile_sizes(self, sample: int | None, latent: int | None, overlap: float | None) -> None:
        sample, latent, overlap = plain(sample), plain(latent), plain(overlap)
        if sample is None:
            size = self.config.sample_size
            sample = size[0] if isinstance(size, (list, tuple)) else size
            default_latent = int(sample / self.config.scale_factor)
        else:
            default_latent = sample // self.config.scale_factor if is_int(sample) else None
        latent = default_latent if latent is None else latent
        overlap = 0.25 if overlap is None else overlap
        for name, value in (("tile_sample_min_size", sample), ("tile_latent_min_size", latent)):
            if not is_int(value, 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not is_number(overlap) or not 0 <= overlap < 1:
            raise ValueError(f"tile_overlap_factor must be a number in [0, 1), got {overlap!r}")
        if int(sample * (1 - overlap)) < 1 or int(latent * (1 - overlap)) < 1:
            raise ValueError(f"tile_overlap_factor={overlap} leaves no step between tiles of "
                             f"{sample} (image) / {latent} (latent) pixels; use a smaller factor")
        self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor = sample, latent, overlap

    def _check(self, name: str, x, channels: int, what: str, multiple: int = 1) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != channels or x.shape[0] == 0:
            raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name} height and width must be positive multiples of {multiple}, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        return x.to(device=self.device, dtype=self.dtype)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            step = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
            blend = int(self.tile_latent_min_size * self.tile_overlap_factor)
            return _tiled(x, self._encode_tile, self.tile_sample_min_size, step, blend,
                          self.tile_latent_min_size - blend)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        """image: (B, in_channels, H, W) in [-1, 1], H and W multiples of config.scale_factor → the posterior
        over (B, latent_channels, H / scale_factor, W / scale_factor) latents (unscaled; the caller multiplies
        by config.scaling_factor). The input is cast to the module's device and dtype."""
        c, f = self.config.in_channels, self.config.scale_factor
        x = self._check("image", image, c, f"(batch, {c}, H, W) with H and W multiples of {f}", f)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_one(s) for s in x.split(1)])
        else:
            moments = self._encode_one(x)
        return DiagonalGaussian(moments)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            step = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
            blend = int(self.tile_sample_min_size * self.tile_overlap_factor)
            return _tiled(z, self._decode_tile, self.tile_latent_min_size, step, blend,
                          self.tile_sample_min_size - blend)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_one(s) for s in z.split(1)])
        return self._decode_one(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, latent_channels, h, w), already divided by config.scaling_factor → images
        (B, out_channels, h * scale_factor, w * scale_factor), roughly in [-1, 1], on the module's device and
        in its dtype (the input is cast to them).

        In float16, a result with inf/NaN (activation overflow) is recomputed in float32 with a warning."""
        c = self.config.latent_channels
        z = self._check("latents", latents, c, f"(batch, {c}, h, w)")
        image = self._decode_batch(z)
        if self.dtype == torch.float16 and not torch.isfinite(image).all():
            warnings.warn("VAE decode overflowed in float16 (inf/NaN in the image); decoding again in float32",
                          RuntimeWarning, stacklevel=2)
            try:
                self.float()
                # From the caller's latents, not `z`: their float16 cast may itself have overflowed.
                image = self._decode_batch(latents.to(device=self.device, dtype=torch.float32))
            finally:
                self.half()
            image = image.to(torch.float16)
        return image


_LEGACY_ATTENTION = re.compile(r"(mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Old diffusers VAEs name the mid-block attention `query/key/value/proj_attn`; today's names are
    `to_q/to_k/to_v/to_out.0` (diffusers' `_convert_deprecated_attention_blocks`). Same shapes, new names.
    A state dict without legacy keys is returned as it is (a lazy one stays unread)."""
    if not any(_LEGACY_ATTENTION.search(k) for k in state_dict):
        return state_dict
    return {_LEGACY_ATTENTION.sub(lambda m: m[1] + _LEGACY_NAMES[m[2]] + ".", k): v for k, v in state_dict.items()}


def load_vae(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             variant: str | None = None) -> AutoencoderKL:
    """A diffusers-layout VAE folder (`config.json` + `diffusion_pytorch_model[.variant].safetensors|.bin`)."""
    folder = Path(folder)
    cfg = VAEConfig.from_json(folder / "config.json")
    path = find_weights(folder, variant)
    state_dict = rename_legacy_attention_keys(open_weights(path, device))
    return load_module(lambda: AutoencoderKL(cfg), state_dict, str(path), dtype=dtype, device=device)
