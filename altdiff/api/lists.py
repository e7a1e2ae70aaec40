"""The lists: samplers, schedulers, loras, embeddings, scripts, prompt styles."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .. import webui
from ..lora import LORA_DIR_SUFFIXES
from ..textual_inversion import find_embeddings, read_embedding
from ..weights import WeightsError

router = APIRouter()


@router.get("/sdapi/v1/samplers")
async def samplers():
    return webui.samplers_list()


@router.get("/sdapi/v1/schedulers")
async def schedulers():
    return webui.schedulers_list()


@router.get("/sdapi/v1/loras")
async def loras(request: Request):
    """The files `<lora:NAME:w>` tags find in --lora-dir (by file stem)."""
    lora_dir = request.app.state.config.lora_dir
    if lora_dir is None:
        return []
    files = sorted(p for p in Path(lora_dir).rglob("*") if p.suffix.lower() in LORA_DIR_SUFFIXES and p.is_file())
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]


@router.get("/sdapi/v1/embeddings")
async def embeddings(request: Request):
    """Files of --embeddings-dir; "skipped" when their width does not fit the loaded model."""
    pipe, embeddings_dir = request.app.state.worker.pipe, request.app.state.config.embeddings_dir
    width = pipe.text_encoder.config.hidden_size if pipe is not None else None
    found = {"loaded": {}, "skipped": {}}
    files = find_embeddings(embeddings_dir) if embeddings_dir is not None else {}
    for stem, p in files.items():
        try:
            _, vectors = await run_in_threadpool(read_embedding, p, stem)
        except (ValueError, WeightsError):
            continue
        kind = "loaded" if width in (None, vectors.shape[-1]) else "skipped"
        found[kind][stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                             "shape": int(vectors.shape[-1]), "vectors": int(vectors.shape[0])}
    return found


@router.get("/sdapi/v1/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/sdapi/v1/prompt-styles")
async def prompt_styles():
    return []
