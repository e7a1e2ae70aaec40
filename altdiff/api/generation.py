"""txt2img, img2img, png-info, progress and interrupt."""

from __future__ import annotations

import base64
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import webui
from ..images import encode_png
from ..styles import apply_styles
from .errors import MAX_EXCERPT
from .models import ImagesResponse, Img2ImgRequest, PNGInfoRequest, ProgressResponse, Txt2ImgRequest, _Request
from .worker import Job, wait

logger = logging.getLogger("altdiff")
router = APIRouter()
IGNORED_HEADER = "X-Altdiff-Ignored-Fields"  # the request's unknown fields, which altdiff ignored


async def _images(req: _Request, request: Request, response: Response, img2img: bool):
    worker, config = request.app.state.worker, request.app.state.config
    ignored = sorted(req.model_extra or {})
    if ignored:  # the webui drops unknown fields silently; altdiff says which
        logger.info("%s: ignored unknown fields %s", request.url.path, ignored)
        response.headers[IGNORED_HEADER] = ascii(ignored)[:MAX_EXCERPT]
    body = req.model_dump(exclude=set(ignored))
    worker.check_room()  # a full queue refuses before the uploads are decoded
    # api.py apply_infotext: the infotext fills what the client left unset, before styles apply
    filled = webui.apply_infotext(body, req.model_fields_set)
    models = {name: m.title for m in worker.models for name in (m.title, m.model_name)}
    # processing.py setup_prompts: styles apply to the prompts the image (and its infotext) is made from
    names, styled = body["styles"] or [], dict(filled)
    for key in ("prompt", "negative_prompt"):
        styled[key] = apply_styles(filled[key], names, request.app.state.styles, negative=key != "prompt")
    task = await run_in_threadpool(webui.parse_task, styled, img2img=img2img, limits=config.limits,
                                   options=dict(worker.options), models=list(models),
                                   lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir)
    if task.model is not None:
        task.model = models[task.model]
    result = await wait(worker, Job(lambda job: worker.run_task(job, task), "txt2img" if not img2img
                                    else "img2img"), request)
    if result is None:
        return JSONResponse({"detail": "client disconnected"}, 499)
    if img2img and not body["include_init_images"]:
        body["init_images"] = body["mask"] = None
    # off the event loop: a large image takes most of a second to encode
    encoded = await run_in_threadpool(lambda: [base64.b64encode(encode_png(img, text)).decode()
                                               for img, text in zip(result.images, result.infotexts)])
    return {"images": encoded if body["send_images"] else [], "parameters": body, "info": result.info}


@router.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
async def txt2img(req: Txt2ImgRequest, request: Request, response: Response):
    return await _images(req, request, response, img2img=False)


@router.post("/sdapi/v1/img2img", response_model=ImagesResponse)
async def img2img(req: Img2ImgRequest, request: Request, response: Response):
    return await _images(req, request, response, img2img=True)


@router.post("/sdapi/v1/png-info")
async def png_info(req: PNGInfoRequest, request: Request):
    limits = request.app.state.config.limits
    image = await run_in_threadpool(webui.decode_image, req.image, "image", limits.max_upload_pixels)
    return await run_in_threadpool(webui.png_info, image)  # parsing a long infotext: off the event loop


@router.get("/sdapi/v1/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False):
    return request.app.state.worker.state.report()


@router.post("/sdapi/v1/interrupt")
async def interrupt(request: Request):
    request.app.state.worker.interrupt()
    return {}
