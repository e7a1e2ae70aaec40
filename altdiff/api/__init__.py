"""The routes of `altdiff serve` by area, each an APIRouter that altdiff.serve includes.

models (request/response shapes), worker (the job queue and the thread that owns the pipeline),
generation (txt2img, img2img, png-info, progress, interrupt), options (options and checkpoints),
lists (samplers, schedulers, loras, embeddings, scripts, styles), page (the web page).
Routes reach the worker and config through `request.app.state`.
"""
