"""Dataclass configs read from diffusers `config.json` / `model_index.json` / `scheduler_config.json`.

Unknown keys are ignored and missing keys take diffusers' defaults, as `from_pretrained` does. A known key
whose value has the wrong type (a string where an int belongs, a non-finite float) or an impossible value
(zero channels, group counts that do not divide the channels), and a config that asks for a block or feature
altdiff does not implement, raise `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is unreadable or names something altdiff cannot run."""


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# The field annotations' names (dataclass fields keep them as strings) → what a JSON value must be.
_JSON_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "dict": dict,
               "None": type(None)}


def _has_type(value, annotation: str) -> bool:
    if annotation == "Any":
        return True
    for name in annotation.split("|"):
        kind = _JSON_TYPES[name.strip()]
        if isinstance(value, bool) and kind is not bool:
            continue  # JSON true is not the number 1
        if isinstance(value, float) and not math.isfinite(value):
            continue  # NaN / Infinity are Python's JSON extensions, never a valid setting
        if isinstance(value, kind):
            return True
    return False


def _from_dict(cls, data: dict, source: str = "<dict>"):
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    # Tuples come from diffusers' in-memory configs (FrozenDict); files give lists.
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if k in fields}
    for name, value in kwargs.items():
        if not _has_type(value, fields[name]):
            raise ConfigError(f"{source}: {name}={value!r} has the wrong type (expected {fields[name]})")
    cfg = cls(**kwargs)
    cfg.source = source
    cfg.check()
    return cfg


class _Config:
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        return _from_dict(cls, data, source)

    @classmethod
    def from_json(cls, path: str | Path):
        # Through cls.from_dict, so the overrides of SafetyConfig and ModelIndex apply to files too.
        return cls.from_dict(read_json(path), str(path))

    def check(self) -> None:
        pass

    def _refuse(self, name: str, expected: str) -> None:
        raise ConfigError(f"{self.source}: {name}={getattr(self, name)!r} is not supported (expected {expected})")

    def _positive(self, *names: str) -> None:
        """Each field a positive int, or a non-empty list of them (nested one level deep for per-layer values);
        None passes (an unset optional field)."""
        for name in names:
            value = getattr(self, name)
            values = [v for item in (value if isinstance(value, list) else [value])
                      for v in (item if isinstance(item, (list, tuple)) else [item])]
            if value is not None and (not values or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
                self._refuse(name, "positive integers" if isinstance(value, list) else "a positive int")

    def _divides(self, name: str, channels_name: str) -> None:
        """A group norm needs every channel count to be a multiple of its group count."""
        channels = getattr(self, channels_name)
        if any(c % getattr(self, name) for c in channels):
            self._refuse(name, f"a divisor of every {channels_name} entry ({channels})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TextEncoderConfig(_Config):
    """diffusers `RobertaSeriesConfig` (an `XLMRobertaConfig` plus the projection)."""

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    project_dim: int = 768
    has_pre_transformation: bool = False
    use_attention_mask: bool = True
    position_embedding_type: str = "absolute"

    def check(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size", "project_dim")
        if self.hidden_act not in ("gelu",):
            self._refuse("hidden_act", "'gelu'")
        if self.position_embedding_type != "absolute":
            self._refuse("position_embedding_type", "'absolute'")
        if self.hidden_size % self.num_attention_heads:
            self._refuse("num_attention_heads", f"a divisor of hidden_size={self.hidden_size}")
        if self.layer_norm_eps <= 0:
            self._refuse("layer_norm_eps", "a number > 0")
        if not 0 <= self.pad_token_id < self.vocab_size:
            self._refuse("pad_token_id", f"an id below vocab_size={self.vocab_size}")


UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig(_Config):
    """diffusers `UNet2DConditionModel` config, restricted to what SD1.x/SD2.x-style UNets use."""

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list = field(
        default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: list = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    only_cross_attention: bool | list = False
    block_out_channels: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int | list = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | list = 1
    attention_head_dim: int | list = 8
    num_attention_heads: int | list | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    encoder_hid_dim: int | None = None
    attention_type: str = "default"
    cross_attention_norm: str | None = None

    def check(self) -> None:
        self._positive("in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
                       "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                       "num_attention_heads", "sample_size", "time_cond_proj_dim", "conv_in_kernel",
                       "conv_out_kernel")
        for name in ("down_block_types", "up_block_types"):
            allowed = UNET_DOWN_BLOCKS if name.startswith("down") else UNET_UP_BLOCKS
            for b in getattr(self, name):
                if b not in allowed:
                    raise ConfigError(f"{self.source}: {name} contains {b!r}; supported blocks are {allowed}")
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(
                self.block_out_channels):
            self._refuse("block_out_channels", "one entry per down and up block")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            self._refuse("mid_block_type", "'UNetMidBlock2DCrossAttn' or null")
        for name, default in (("only_cross_attention", False), ("dual_cross_attention", False),
                              ("class_embed_type", None), ("addition_embed_type", None),
                              ("num_class_embeds", None), ("encoder_hid_dim", None),
                              ("resnet_time_scale_shift", "default"), ("time_embedding_type", "positional"),
                              ("time_embedding_act_fn", None), ("timestep_post_act", None),
                              ("attention_type", "default"), ("cross_attention_norm", None),
                              ("act_fn", "silu"), ("center_input_sample", False)):
            if getattr(self, name) != default:
                self._refuse(name, repr(default))
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                     "only_cross_attention"):
            if isinstance(getattr(self, name), list) and len(getattr(self, name)) != len(self.down_block_types):
                self._refuse(name, f"one value, or one per down block ({len(self.down_block_types)})")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 == 0:
                self._refuse(name, "an odd kernel size (the convolution keeps the latent size)")
        if self.downsample_padding < 0:
            self._refuse("downsample_padding", "an int >= 0")
        if self.norm_eps <= 0:
            self._refuse("norm_eps", "a number > 0")
        self._divides("norm_num_groups", "block_out_channels")

    def per_block(self, name: str) -> list:
        """An int-or-list field expanded to one value per down block."""
        value = getattr(self, name)
        if isinstance(value, (list, tuple)):
            return list(value)
        return [value] * len(self.down_block_types)

    @property
    def heads(self) -> list[int]:
        # diffusers quirk: SD configs put the head *count* in attention_head_dim (num_attention_heads is
        # only honoured when set).
        return self.per_block("num_attention_heads" if self.num_attention_heads is not None
                              else "attention_head_dim")


@dataclass
class VAEConfig(_Config):
    """diffusers `AutoencoderKL` config."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list = field(default_factory=lambda: ["DownEncoderBlock2D"])
    up_block_types: list = field(default_factory=lambda: ["UpDecoderBlock2D"])
    block_out_channels: list = field(default_factory=lambda: [64])
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | list = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # refused unless null/0 (see check)
    # Read and, as in diffusers' AltDiffusion/SD pipelines, not acted on (only its SDXL-family pipelines
    # upcast the VAE for fp16): altdiff decodes in fp16 and decodes again in fp32 only when that overflows.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def check(self) -> None:
        self._positive("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                       "norm_num_groups", "sample_size")
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != len(self.block_out_channels):
                self._refuse(name, f"one block per block_out_channels entry ({len(self.block_out_channels)})")
        self._divides("norm_num_groups", "block_out_channels")
        if self.scaling_factor <= 0:
            self._refuse("scaling_factor", "a number > 0")
        # diffusers' SD-style pipelines never read shift_factor (a Flux/SD3 VAE setting); latents made
        # without the shift would be wrong, so a VAE that needs one is refused.
        if self.shift_factor not in (None, 0):
            self._refuse("shift_factor", "null or 0: altdiff's pipelines apply no latent shift")
        if any(b != "DownEncoderBlock2D" for b in self.down_block_types):
            self._refuse("down_block_types", "only 'DownEncoderBlock2D'")
        if any(b != "UpDecoderBlock2D" for b in self.up_block_types):
            self._refuse("up_block_types", "only 'UpDecoderBlock2D'")
        if self.act_fn != "silu":
            self._refuse("act_fn", "'silu'")

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class SchedulerConfig(_Config):
    """A diffusers scheduler config. Fields left None take the chosen sampler's own diffusers default, as
    `XScheduler.from_config(pipe.scheduler.config)` does when switching schedulers."""

    _class_name: str | None = None
    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: list | None = None
    skip_prk_steps: bool | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    steps_offset: int | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    rescale_betas_zero_snr: bool | None = None
    use_karras_sigmas: bool | None = None
    thresholding: bool | None = None
    interpolation_type: str | None = None
    timestep_type: str | None = None
    final_sigmas_type: str | None = None
    algorithm_type: str | None = None
    solver_order: int | None = None
    solver_type: str | None = None
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    use_lu_lambdas: bool | None = None
    use_exponential_sigmas: bool | None = None
    use_beta_sigmas: bool | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None

    def set_fields(self) -> dict[str, Any]:
        """The fields the file actually set (None means unset)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "_class_name"}


@dataclass
class SafetyConfig(_Config):
    """The vision half of a `CLIPConfig` (diffusers' StableDiffusionSafetyChecker) plus projection_dim."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        # CLIPConfig nests the tower under vision_config; projection_dim sits at the top level.
        vision = dict(data.get("vision_config") or {})
        vision["projection_dim"] = data.get("projection_dim", 768)
        return _from_dict(cls, vision, source)

    def check(self) -> None:
        self._positive("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                       "patch_size", "num_channels", "projection_dim")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            self._refuse("hidden_act", "'quick_gelu' or 'gelu'")
        if self.hidden_size % self.num_attention_heads:
            self._refuse("num_attention_heads", f"a divisor of hidden_size={self.hidden_size}")
        if self.patch_size > self.image_size:
            self._refuse("patch_size", f"at most image_size={self.image_size}")


@dataclass
class ImageProcessorConfig(_Config):
    """`preprocessor_config.json` of the safety checker's CLIPImageProcessor."""

    do_resize: bool = True
    size: Any = 224
    resample: int = 3
    do_center_crop: bool = True
    crop_size: Any = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    do_convert_rgb: bool = True

    @staticmethod
    def _hw(value) -> tuple[int, int] | int:
        if isinstance(value, dict):
            if "shortest_edge" in value:
                return value["shortest_edge"]
            return value["height"], value["width"]
        return value

    @property
    def resize_to(self):
        """int: shortest edge; (h, w): exact size."""
        return self._hw(self.size)

    @property
    def crop_to(self) -> tuple[int, int]:
        c = self._hw(self.crop_size)
        return (c, c) if isinstance(c, int) else c


@dataclass
class ModelIndex(_Config):
    """`model_index.json`: which components a pipeline folder has (None entries are absent)."""

    components: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        comps = {k: v for k, v in data.items() if not k.startswith("_") and isinstance(v, (list, type(None)))}
        cfg = cls(components=comps)
        cfg.source = source
        return cfg

    def has(self, name: str) -> bool:
        value = self.components.get(name)
        return bool(value) and value[0] is not None
