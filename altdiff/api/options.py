"""The options (the few settings altdiff has) and the checkpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .. import checks, webui
from ..pipeline import DEFAULT_MODEL
from .models import Options
from .worker import Job, find_models, wait

router = APIRouter()


@router.get("/sdapi/v1/options", response_model=Options)
async def get_options(request: Request):
    return request.app.state.worker.options


# The body is read as a plain object (the checks below name the field); the schema shows the keys it takes.
@router.post("/sdapi/v1/options", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/Options"}}}}})
async def set_options(options: dict[str, Any], request: Request):
    worker = request.app.state.worker
    known = {*webui.OVERRIDABLE, "samples_format"}
    for key in options:
        if key not in known:
            raise webui.FieldError(key, f"not a setting altdiff has (it has {sorted(known)})")
    model = options.get("sd_model_checkpoint")
    names = [n for m in worker.models for n in (m.title, m.model_name)]
    if model is not None and model not in names:
        raise webui.FieldError("sd_model_checkpoint", f"unknown model {model!r}; expected one of "
                               f"{[m.title for m in worker.models]}")
    if "CLIP_stop_at_last_layers" in options and not checks.is_int(options["CLIP_stop_at_last_layers"], 1, 12):
        raise webui.FieldError("CLIP_stop_at_last_layers", "expected an int in [1, 12]")
    webui.check_noise_settings(options)
    webui.check_tome_settings({**{k: worker.options[k] for k in webui.TOME_SETTINGS}, **options})
    if options.get("samples_format", "png") != "png":
        raise webui.FieldError("samples_format", "altdiff writes png only")
    # A worker job: options and model switches take effect in arrival order with the jobs around them (the
    # webui sets the options, then runs the next job), and a new model is loaded before the answer.
    await wait(worker, Job(lambda job: worker.set_options(options), "options"), request)
    return None


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request):
    return [{"title": m.title, "model_name": m.model_name, "hash": None, "sha256": None,
             "filename": m.source, "config": None} for m in request.app.state.worker.models]


@router.post("/sdapi/v1/refresh-checkpoints")
async def refresh_checkpoints(request: Request):
    worker, config = request.app.state.worker, request.app.state.config
    worker.models = find_models(config.models or ([] if config.models_dir else [DEFAULT_MODEL]),
                                config.models_dir) or worker.models
