"""txt2img, img2img, png-info, progress and interrupt."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import webui
from ..images import encode_png
from .models import ImagesResponse, Img2ImgRequest, PNGInfoRequest, ProgressResponse, Txt2ImgRequest, _Request
from .worker import Job, wait

router = APIRouter()


async def _images(req: _Request, request: Request, img2img: bool):
    worker, config = request.app.state.worker, request.app.state.config
    body = req.model_dump()
    models = {name: m.title for m in worker.models for name in (m.title, m.model_name)}
    task = await run_in_threadpool(webui.parse_task, body, img2img=img2img, limits=config.limits,
                                   options=dict(worker.options), models=list(models),
                                   lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir)
    if task.model is not None:
        task.model = models[task.model]
    if body["save_images"] and config.outdir is None:
        raise webui.FieldError("save_images", "the server has no --outdir to save to")
    result = await wait(worker, Job(lambda job: worker.run_task(job, task), "txt2img" if not img2img
                                    else "img2img"), request)
    if result is None:
        return JSONResponse({"detail": "client disconnected"}, 499)
    if not body["override_settings_restore_afterwards"]:
        worker.options.update({k: v for k, v in (body["override_settings"] or {}).items()
                               if k in webui.OVERRIDABLE})
        if task.model is not None:
            worker.options["sd_model_checkpoint"] = task.model
    if img2img and not body["include_init_images"]:
        body["init_images"] = body["mask"] = None
    encoded = [base64.b64encode(encode_png(img, text)).decode() for img, text in zip(result.images,
                                                                                    result.infotexts)]
    return {"images": encoded if body["send_images"] else [], "parameters": body, "info": result.info}


@router.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
async def txt2img(req: Txt2ImgRequest, request: Request):
    return await _images(req, request, img2img=False)


@router.post("/sdapi/v1/img2img", response_model=ImagesResponse)
async def img2img(req: Img2ImgRequest, request: Request):
    return await _images(req, request, img2img=True)


@router.post("/sdapi/v1/png-info")
async def png_info(req: PNGInfoRequest, request: Request):
    limits = request.app.state.config.limits
    image = await run_in_threadpool(webui.decode_image, req.image, "image", limits.max_upload_pixels)
    return webui.png_info(image)


@router.get("/sdapi/v1/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False):
    return request.app.state.worker.state.report()


@router.post("/sdapi/v1/interrupt")
async def interrupt(request: Request):
    request.app.state.worker.interrupt()
    return {}
