"""The webui's request and response shapes (modules/api/models.py), for validation and /docs."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .. import webui
from ..checks import SEED_MAX


# The webui's models are pydantic 1's (fastapi 0.94), which reads an int field as int(v) and a str field as
# str(v) for a number, and a dict field as dict(v). pydantic 2 refuses these; clients rely on them (AIYA sends
# `steps / 2` hires steps).
def _v1_int(v: Any) -> Any:
    return int(v) if isinstance(v, float) and math.isfinite(v) else v  # 12.5 is 12, -1.5 is -1


def _v1_str(v: Any) -> Any:
    return str(v) if isinstance(v, int | float) else v  # 123 is "123", True is "True"


def _v1_dict(v: Any) -> Any:
    if isinstance(v, dict):
        return v
    try:
        return dict(v)  # "" and [] are {} (an empty iterable of pairs)
    except (TypeError, ValueError):
        return v


Int = Annotated[int, BeforeValidator(_v1_int)]
Str = Annotated[str, BeforeValidator(_v1_str)]
Dict = Annotated[dict[str, Any], BeforeValidator(_v1_dict)]


class _Request(BaseModel):
    # Lax as the webui's pydantic models: "7.0" is a float, "512", 512.0 or 512.5 a width (512), 123 a prompt
    # ("123"), null is the default; unknown fields are kept aside (model_extra), ignored and reported. NaN and
    # infinities are refused.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    prompt: Str = ""
    negative_prompt: Str = ""
    styles: list[Str] | None = None
    seed: Int = -1
    subseed: Int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: Int = -1
    seed_resize_from_w: Int = -1
    sampler_name: Str | None = None
    scheduler: Str | None = None
    batch_size: Int = 1
    n_iter: Int = 1
    steps: Int = 50
    cfg_scale: float = 7.0
    width: Int = 512
    height: Int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: Dict | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: Str | None = None
    comments: Dict | None = None
    sampler_index: Str | None = "Euler"
    script_name: Str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: Dict = Field(default_factory=dict)
    force_task_id: Str | None = None
    infotext: Str | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    firstphase_width: Int = 0
    firstphase_height: Int = 0
    hr_scale: float = 2.0
    hr_upscaler: Str | None = None
    hr_second_pass_steps: Int = 0
    hr_resize_x: Int = 0
    hr_resize_y: Int = 0
    hr_checkpoint_name: Str | None = None
    hr_sampler_name: Str | None = None
    hr_scheduler: Str | None = None
    hr_prompt: Str = ""
    hr_negative_prompt: Str = ""


class Img2ImgRequest(_Request):
    init_images: list[Str] | None = None
    resize_mode: Int = 0
    image_cfg_scale: float | None = None
    mask: Str | None = None
    mask_blur_x: Int = 4
    mask_blur_y: Int = 4
    mask_blur: Int | None = None
    mask_round: bool = True
    inpainting_fill: Int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: Int = 0
    inpainting_mask_invert: Int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: Str | None = None
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] | None = Field(default=None, description="The generated images as base64 PNGs.")
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class Options(BaseModel):
    """The settings altdiff has (GET /sdapi/v1/options; POST takes any of them and refuses other keys)."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str = Field(description="A title or name from GET /sdapi/v1/sd-models.")
    CLIP_stop_at_last_layers: int = Field(1, ge=1, le=12, description="Recorded in the infotext; the webui's "
                                          "XLM-R encoder has no CLIP skip.")
    samples_format: Literal["png"] = "png"
    randn_source: Literal["GPU", "CPU", "NV"] = "GPU"
    eta_noise_seed_delta: int = Field(0, ge=0, le=SEED_MAX)
    token_merging_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    token_merging_ratio_img2img: float = Field(0.0, ge=0.0, lt=1.0)
    token_merging_ratio_hr: float = Field(0.0, ge=0.0, lt=1.0, description="0 or token_merging_ratio.")


def with_limits(schema: dict, limits: webui.Limits, model_names: list[str]) -> dict:
    """/openapi.json with this server's bounds (webui.field_ranges, its limits, its models), so what a
    schema-driven client sends as valid is what the server takes, cross-field rules aside."""
    side = min(2**16, limits.max_pixels // 8)  # the other side is at least 8
    for name in ("Txt2ImgRequest", "Img2ImgRequest"):
        properties = schema["components"]["schemas"][name]["properties"]
        for field, (low, high) in webui.field_ranges(limits).items():
            if field in properties:
                properties[field].update(minimum=low, maximum=high)
        for field in ("width", "height"):
            properties[field].update(maximum=side, multipleOf=8,
                                     description=f"width x height <= {limits.max_pixels} pixels")
        for field in ("prompt", "negative_prompt"):
            properties[field]["maxLength"] = limits.max_prompt_chars
    schema["components"]["schemas"]["Options"]["properties"]["sd_model_checkpoint"]["enum"] = model_names
    return schema
