"""extra-single-image and extra-batch-images with the webui's model-free upscalers (None, Lanczos, Nearest):
modules/upscaler.py's resize steps and scripts/postprocessing_upscale.py's scale-by / scale-to and crop."""

from __future__ import annotations

import base64
import html

import PIL.Image
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .. import webui
from ..images import encode_png
from .lists import UPSCALERS
from .models import Int, Str

router = APIRouter()

MAX_SIDE = 8192  # the webui's largest "Scale to" size
RESAMPLE = {"Lanczos": PIL.Image.Resampling.LANCZOS, "Nearest": PIL.Image.Resampling.NEAREST}


class ExtrasRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    resize_mode: Int = 0  # 0: scale by upscaling_resize, 1: scale to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: Int = 512
    upscaling_resize_h: Int = 512
    upscaling_crop: bool = True
    upscaler_1: Str = "None"
    upscaler_2: Str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleRequest(ExtrasRequest):
    image: Str = ""


class ImageItem(BaseModel):
    data: Str
    name: Str = ""


class ExtrasBatchRequest(ExtrasRequest):
    imageList: list[ImageItem]  # noqa: N815 (the webui's field name)


def _check(req: ExtrasRequest) -> None:
    for field in ("upscaler_1", "upscaler_2"):
        if getattr(req, field) not in UPSCALERS:
            raise webui.FieldError(field, f"{getattr(req, field)!r} is not one of altdiff's upscalers "
                                          f"{UPSCALERS}")
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, field) > 0:
            raise webui.FieldError(field, "altdiff has no face restoration models; send 0")
    if req.resize_mode not in (0, 1):
        raise webui.FieldError("resize_mode", "expected 0 (scale by) or 1 (scale to)")
    if req.resize_mode == 0 and not 0 < req.upscaling_resize <= 8:
        raise webui.FieldError("upscaling_resize", "expected a factor in (0, 8]")
    for field in ("upscaling_resize_w", "upscaling_resize_h"):
        if req.resize_mode == 1 and not 0 < getattr(req, field) <= MAX_SIDE:
            raise webui.FieldError(field, f"expected a size in 1..{MAX_SIDE}")


def upscale(image: PIL.Image.Image, name: str, scale: float) -> PIL.Image.Image:
    """modules/upscaler.py Upscaler.upscale: the upscaler's own resize by `scale` (up to 3 times, until the
    image covers the size rounded down to 8), then a Lanczos resize to exactly that size."""
    dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        if name in RESAMPLE:
            size = (int(image.width * scale), int(image.height * scale))
            image = image.resize(size, resample=RESAMPLE[name])
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=PIL.Image.Resampling.LANCZOS)
    return image


def postprocess(image: PIL.Image.Image, req: ExtrasRequest) -> tuple[PIL.Image.Image, str]:
    """One image through the webui's Upscale postprocessing step, and its info as the webui's html_info."""
    info: dict[str, str] = {}
    if req.upscaler_1 == "None":
        return image, "<p></p>"
    scale = req.upscaling_resize
    w, h = req.upscaling_resize_w, req.upscaling_resize_h
    if req.resize_mode == 1:
        scale = max(w / image.width, h / image.height)
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        info["Postprocess upscale by"] = f"{scale:g}"
    if max(image.width, image.height) * scale > MAX_SIDE:
        raise webui.FieldError("upscaling_resize", f"the result would be over {MAX_SIDE} pixels on a side")
    crop = req.resize_mode == 1 and req.upscaling_crop

    def run(name):
        out = upscale(image, name, scale)
        if crop:  # centred on black, as the webui's "Crop to fit"
            cropped = PIL.Image.new("RGB", (w, h))
            cropped.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = cropped
        return out
    upscaled = run(req.upscaler_1)
    if crop:
        info["Postprocess crop to"] = f"{w}x{h}"
    info["Postprocess upscaler"] = req.upscaler_1
    if req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0:
        second = run(req.upscaler_2)
        upscaled = PIL.Image.blend(upscaled, second.convert(upscaled.mode), req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = req.upscaler_2
    return upscaled, "<p>" + html.escape(", ".join(f"{k}: {v}" for k, v in info.items())) + "</p>"


def _run(req: ExtrasRequest, images: list[str], fields: list[str], max_pixels: int) -> tuple[list[str], str]:
    _check(req)
    out, info = [], "<p></p>"
    for data, field in zip(images, fields):
        image, info = postprocess(webui.decode_image(data, field, max_pixels), req)
        out.append(base64.b64encode(encode_png(image)).decode())
    return out, info


@router.post("/sdapi/v1/extra-single-image")
async def extra_single_image(req: ExtrasSingleRequest, request: Request):
    limits = request.app.state.config.limits
    images, info = await run_in_threadpool(_run, req, [req.image], ["image"], limits.max_upload_pixels)
    return {"html_info": info, "image": images[0]}


@router.post("/sdapi/v1/extra-batch-images")
async def extra_batch_images(req: ExtrasBatchRequest, request: Request):
    limits = request.app.state.config.limits
    fields = [f"imageList.{k}.data" for k in range(len(req.imageList))]
    images, info = await run_in_threadpool(_run, req, [item.data for item in req.imageList], fields,
                                           limits.max_upload_pixels)
    return {"html_info": info, "images": images}
