"""The lists: samplers, schedulers, loras, embeddings, scripts, prompt styles, upscalers, flags, memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
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
async def prompt_styles(request: Request):
    """The --styles-file's styles."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in request.app.state.styles.values()]


# The webui's model-free upscalers (modules/upscaler.py: UpscalerNone, UpscalerLanczos, UpscalerNearest); its
# hires latent modes are listed apart, as the webui lists them.
UPSCALERS = ("None", "Lanczos", "Nearest")
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")


@router.get("/sdapi/v1/upscalers")
async def upscalers():
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in UPSCALERS]


@router.get("/sdapi/v1/latent-upscale-modes")
async def latent_upscale_modes():
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


# What altdiff has none of: no face restorers, RealESRGAN, hypernetworks, extensions or scripts.
for _path in ("face-restorers", "realesrgan-models", "hypernetworks", "sd-vae", "extensions", "script-info"):
    router.add_api_route(f"/sdapi/v1/{_path}", lambda: [], methods=["GET"], name=_path)


@router.get("/sdapi/v1/cmd-flags")
async def cmd_flags(request: Request):
    """The webui's command-line flags that mean something in altdiff, with altdiff's values; api_auth is
    always null (the webui returns the credentials, which no client needs)."""
    config = request.app.state.config
    host, port = getattr(request.app.state, "address", ("127.0.0.1", 7860))
    return {"api": True, "nowebui": False, "listen": host != "127.0.0.1", "server_name": host, "port": port,
            "api_auth": None, "medvram": config.offload == "model", "lowvram": config.offload == "sequential",
            "ckpt": config.models[0] if config.models else None, "ckpt_dir": config.models_dir,
            "lora_dir": config.lora_dir, "embeddings_dir": config.embeddings_dir, "vae_dir": None,
            "hypernetwork_dir": None, "no_half": config.dtype == "float32", "precision": "autocast",
            "device_id": None, "disable_safe_unpickle": False, "xformers": False, "opt_sdp_attention": True}


def _ram() -> dict:
    """This process's resident memory and the machine's total (Linux /proc; the webui uses psutil)."""
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(meminfo["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError) as e:
        return {"error": str(e)}
    return {"free": total - rss, "used": rss, "total": total}


def _cuda() -> dict:
    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(key):
        return {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}
    return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}


@router.get("/sdapi/v1/memory")
async def memory():
    return {"ram": _ram(), "cuda": _cuda()}
