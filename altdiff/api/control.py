"""Job control and model lifecycle: skip, unload/reload the checkpoint, refresh-vae, interrogate."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .worker import Job, wait

router = APIRouter()


@router.post("/sdapi/v1/skip")
async def skip(request: Request):
    """Ends the current image (batch) at its next step; the job's next image runs (the webui's skip)."""
    request.app.state.worker.skip()
    return {}


@router.post("/sdapi/v1/unload-checkpoint")
async def unload_checkpoint(request: Request):
    """Drops the pipeline, in queue order (jobs before it finish with it); the next job loads it again."""
    worker = request.app.state.worker
    await wait(worker, Job(lambda job: worker.unload(), "unload"), request)
    return {}


@router.post("/sdapi/v1/reload-checkpoint")
async def reload_checkpoint(request: Request):
    worker = request.app.state.worker
    await wait(worker, Job(lambda job: worker.pipeline(None), "reload"), request)
    return {}


@router.post("/sdapi/v1/refresh-vae")
async def refresh_vae():
    return {}  # altdiff has no VAE folder to rescan


@router.post("/sdapi/v1/interrogate")
async def interrogate():
    # A refusal of the request (4xx naming the field), not a server fault: no captioning model exists here.
    return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", "model"],
                                     "msg": "interrogate needs a captioning model (CLIP interrogator or "
                                            "DeepBooru), which altdiff does not have"}]}, 422)
