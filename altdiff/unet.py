"""The conditional UNet of Stable Diffusion / AltDiffusion, equal to diffusers' `UNet2DConditionModel` for the
configurations `UNetConfig` accepts (SD1.x and SD2.x layouts), with FreeU.

Submodule names are the diffusers checkpoint keys, so `load_unet` is a strict copy of the safetensors file.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checks, tome
from .attention import attention
from .config import UNetConfig
from .linear import Linear
from .resnet import Downsample, ResnetBlock, Upsample
from .weights import find_weights, load_module, open_weights


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps → (B, dim) fp32, in diffusers' `get_timestep_embedding` order
    of operations so the result is bit-identical."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - freq_shift)
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """FreeU's skip filter: scale the lowest spatial frequencies (a 2*threshold square around DC) by `scale`.
    Computed in fp32: fft does not support bf16, nor fp16 on CPU or for non-power-of-2 sizes."""
    h, w = x.shape[-2:]
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones((h, w), device=x.device)
    mask[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, cond_dim: int | None):
        super().__init__()
        # Guidance-scale embedding (LCM-style `timestep_cond`), added to the sinusoidal embedding.
        self.cond_proj = Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, t_emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is not None:
            t_emb = t_emb + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class CrossAttention(nn.Module):
    """Self-attention when `context` is None, else attention over the text states."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        # A list only for the checkpoint key `to_out.0` (diffusers' to_out.1 is a parameterless dropout).
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is diffusers' dropout; the identity keeps the checkpoint keys net.0 / net.2.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.token_merging: tome.TokenMerging | None = None  # set by tome.apply

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        merging = self.token_merging
        if merging is not None and size is not None:  # ToMe: self-attention over the merged tokens
            merge, unmerge = tome.bipartite_merge(x, *size, merging.sx, merging.sy, int(x.shape[1] * merging.ratio))
            x = unmerge(self.attn1(merge(self.norm1(x)))) + x
        else:
            x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """GroupNorm → proj_in → transformer blocks over the H*W tokens → proj_out, plus the residual.
    SD1 projects with 1x1 convs before flattening, SD2 (`use_linear_projection`) with linears after."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int, depth: int):
        super().__init__()
        inner = heads * (channels // heads)
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        proj = Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, cfg.cross_attention_dim, cfg.upcast_attention)
            for _ in range(depth))
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


def _per_layer(value: int | list, n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (`heads` given) or DownBlock2D (`heads` None)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, temb_ch: int, num_layers: int,
                 heads: int | None, depth: int | list, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(num_layers))
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2D(cfg, out_ch, heads, d) for d in _per_layer(depth, num_layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if add_downsample \
            else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, cfg: UNetConfig, channels: int, temb_ch: int, heads: int, depth: int | list):
        super().__init__()
        scale = cfg.mid_block_scale_factor
        self.attentions = nn.ModuleList([Transformer2D(cfg, channels, heads, _per_layer(depth, 1)[0])])
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_ch, cfg.norm_num_groups, cfg.norm_eps, scale) for _ in range(2))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (`heads` given) or UpBlock2D (`heads` None). Each resnet takes the
    running features concatenated with one skip from the matching down block, consumed last-first."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, prev_ch: int, temb_ch: int, num_layers: int,
                 heads: int | None, depth: int | list, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock((prev_ch if i == 0 else out_ch) + (in_ch if i == num_layers - 1 else out_ch), out_ch,
                        temb_ch, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(num_layers))
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2D(cfg, out_ch, heads, d) for d in _per_layer(depth, num_layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                upsample_size: tuple[int, int] | None, freeu: tuple[float, float] | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if freeu is not None:
                # FreeU as diffusers' apply_freeu: amplify the first half of the backbone channels by b,
                # damp the skip's low frequencies by s. In place like diffusers: without a mid block the
                # backbone *is* the first skip, which then sees the scaling too.
                s, b = freeu
                half = x.shape[1] // 2
                x[:, :half] = x[:, :half] * b
                skip = fourier_filter(skip, s)
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet(nn.Module):
    """diffusers' UNet2DConditionModel: predicts the noise (or v) for latents at a timestep given text states."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        n = len(ch)
        heads, layers = cfg.heads, cfg.per_block("layers_per_block")
        depths = cfg.per_block("transformer_layers_per_block")
        temb_ch = ch[0] * 4
        self.freeu: dict[str, float] | None = None
        self.token_merging: tome.TokenMerging | None = None  # tome.apply sets it with the blocks' own
        self.deepcache = None  # a deepcache.DeepCache routing the blocks' calls, when attached

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch, cfg.time_cond_proj_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, ch[max(i - 1, 0)], ch[i], temb_ch, layers[i],
                      heads[i] if kind == "CrossAttnDownBlock2D" else None, depths[i], i < n - 1)
            for i, kind in enumerate(cfg.down_block_types))
        self.mid_block = None if cfg.mid_block_type is None else MidBlock(cfg, ch[-1], temb_ch, heads[-1], depths[-1])
        rch, rheads, rlayers, rdepths = ch[::-1], heads[::-1], layers[::-1], depths[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, rch[min(i + 1, n - 1)], rch[i], rch[max(i - 1, 0)], temb_ch, rlayers[i] + 1,
                    rheads[i] if kind == "CrossAttnUpBlock2D" else None, rdepths[i], i < n - 1)
            for i, kind in enumerate(cfg.up_block_types))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (arXiv 2309.11497) on the first two up blocks: s* damp skip low frequencies, b* amplify the
        backbone. SD1.x values: s1=0.9, s2=0.2, b1=1.2, b2=1.4; SD2.x: s1=0.9, s2=0.2, b1=1.1, b2=1.2."""
        for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if not checks.is_number(value):
                raise TypeError(f"enable_freeu: {name} must be a finite number, got {value!r}")
        self.freeu = {"s1": float(s1), "s2": float(s2), "b1": float(b1), "b2": float(b2)}

    def disable_freeu(self) -> None:
        self.freeu = None

    def _freeu_for(self, up_index: int) -> tuple[float, float] | None:
        # diffusers' quirk reproduced: FreeU is active only if all four factors are truthy (a 0 disables it).
        if self.freeu is None or not all(self.freeu.values()) or up_index > 1:
            return None
        return self.freeu[f"s{up_index + 1}"], self.freeu[f"b{up_index + 1}"]

    def _check_inputs(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                      timestep_cond: torch.Tensor | None, cross_attention_kwargs: dict | None) -> None:
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"sample must be a (batch, {cfg.in_channels}, height, width) tensor, got {got}")
        if not sample.is_floating_point() or sample.dtype != self.dtype:
            raise TypeError(f"sample must have the UNet's dtype {self.dtype}, got {sample.dtype}")
        self._check_spatial_size(sample.shape[-2:])
        batch = sample.shape[0]
        if (not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim != 3
                or encoder_hidden_states.shape[0] != batch
                or encoder_hidden_states.shape[2] != cfg.cross_attention_dim):
            got = (tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor)
                   else type(encoder_hidden_states).__name__)
            raise ValueError(f"encoder_hidden_states must be a ({batch}, tokens, {cfg.cross_attention_dim}) "
                             f"tensor matching sample's batch, got {got}")
        if isinstance(timestep, torch.Tensor):
            if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
                raise ValueError(f"timestep must be a number, a 0-d tensor or a tensor of 1 or {batch} "
                                 f"(batch) entries, got shape {tuple(timestep.shape)}")
        elif not isinstance(timestep, numbers.Real) or isinstance(timestep, bool):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if timestep_cond is not None:
            if cfg.time_cond_proj_dim is None:
                raise ValueError("timestep_cond was given but this UNet has no time_cond_proj_dim "
                                 "(it takes no guidance-scale embedding)")
            if (not isinstance(timestep_cond, torch.Tensor) or timestep_cond.ndim != 2
                    or timestep_cond.shape[0] not in (1, batch) or timestep_cond.shape[1] != cfg.time_cond_proj_dim):
                got = (tuple(timestep_cond.shape) if isinstance(timestep_cond, torch.Tensor)
                       else type(timestep_cond).__name__)
                raise ValueError(f"timestep_cond must be a (1 or {batch}, {cfg.time_cond_proj_dim}) tensor, "
                                 f"got {got}")
        checks.cross_attention_kwargs(cross_attention_kwargs)

    def _check_spatial_size(self, size: torch.Size) -> None:
        """Refuse only the latent sizes diffusers would crash on. Any other size runs, as in diffusers: odd
        sizes are handled by forwarding upsample sizes, but each strided conv needs an input no smaller than
        its kernel after padding."""
        cfg = self.config
        for dim in size:
            d = dim + 2 * ((cfg.conv_in_kernel - 1) // 2) - cfg.conv_in_kernel + 1  # after conv_in
            for block in self.down_blocks:
                if d < 1:
                    break
                if block.downsamplers is not None:
                    # downsample_padding=0 means diffusers' one-sided (0, 1) pad before the conv.
                    padded = d + (1 if cfg.downsample_padding == 0 else 2 * cfg.downsample_padding)
                    d = (padded - 3) // 2 + 1
            if dim < 1 or d < 1:
                raise ValueError(f"sample: latent size {tuple(size)} is too small for this UNet "
                                 f"({len(self.up_blocks) - 1} downsamplings, downsample_padding="
                                 f"{cfg.downsample_padding})")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor, timestep_cond: torch.Tensor | None = None,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """sample (B, C, H, W), timestep a number, 0-d or (B,) tensor, encoder_hidden_states (B, T, D),
        timestep_cond (B, time_cond_proj_dim) or None → model output (B, out_channels, H, W).
        encoder_hidden_states and timestep_cond are cast to sample's dtype. `cross_attention_kwargs` accepts
        {"scale": float} (the LoRA scale: no effect without LoRA layers, as in diffusers)."""
        self._check_inputs(sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs)
        cfg, dtype, batch = self.config, sample.dtype, sample.shape[0]
        context = encoder_hidden_states.to(dtype)

        if not isinstance(timestep, torch.Tensor):
            # As diffusers: python floats become float64, ints int64 (the embedding casts to fp32 anyway).
            is_int = isinstance(timestep, numbers.Integral)
            timestep = torch.tensor([timestep], dtype=torch.int64 if is_int else torch.float64)
        timesteps = timestep.reshape(-1).to(sample.device).expand(batch)
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        cond = None if timestep_cond is None else timestep_cond.to(dtype)
        temb = self.time_embedding(t_emb.to(dtype), cond)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)

        # As diffusers: when H or W is not a multiple of the total downsampling factor, each upsampler is told
        # the size of the skip it will be concatenated with instead of doubling.
        factor = 2 ** (len(self.up_blocks) - 1)
        forward_size = any(d % factor for d in sample.shape[-2:])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if forward_size and block.upsamplers is not None else None
            x = block(x, block_skips, temb, context, size, self._freeu_for(i))

        return self.conv_out(F.silu(self.conv_norm_out(x)))


def load_unet(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              variant: str | None = None) -> UNet:
    """The UNet of a diffusers-layout `unet/` folder: config.json + diffusion_pytorch_model[.variant].*"""
    folder = Path(folder)
    cfg = UNetConfig.from_json(folder / "config.json")
    path = find_weights(folder, variant)
    return load_module(lambda: UNet(cfg), open_weights(path, device), str(path), dtype=dtype, device=device)
