"""`altdiff serve`: the AUTOMATIC1111 webui's `/sdapi/v1` API and a small web page, on FastAPI.

One worker thread per process owns the pipeline and runs jobs one at a time from a FIFO queue; request
handlers only parse, queue and wait. A full queue answers 503 with Retry-After; a client that disconnects has
its queued (or running) job dropped; /interrupt ends the running job at the next step and returns what it
has. The webui's semantics (samplers, seeds, grids, infotext) live in altdiff.webui. `run_ray` serves the same
app from N Ray Serve replicas, each with its own worker and pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from . import __version__, checks, webui
from .batch import ray_gpus_per_actor
from .config import ConfigError
from .generate import generate
from .images import encode_png, save_png
from .lora import LORA_DIR_SUFFIXES
from .pipeline import DEFAULT_MODEL, Pipeline, load
from .textual_inversion import find_embeddings, read_embedding
from .weights import WeightsError

logger = logging.getLogger("altdiff")

WEB = Path(__file__).parent / "web"
MODEL_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=list)  # --model sources; the first is loaded at start
    models_dir: str | None = None
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    outdir: str | None = None  # where save_images writes
    device: str | None = None
    dtype: str | None = None
    safety_checker: bool = True
    compile: bool = False
    cuda_graphs: bool = True
    offload: str | None = None  # --medvram 'model', --lowvram 'sequential'
    api_auth: str | None = None  # "user:password[,user2:password2]", as the webui's --api-auth
    max_queue: int = 64  # jobs waiting behind the running one
    max_body_bytes: int = 64 * 2**20
    limits: webui.Limits = field(default_factory=webui.Limits)


# --- the webui's request and response shapes (modules/api/models.py), for validation and /docs -------------

class _Request(BaseModel):
    # strict: "512" is not a width and 3.0 not a step count; unknown fields are named in the 422, not dropped.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
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
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] | None = Field(default=None, description="The generated images as base64 PNGs.")
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


# --- models, loras, embeddings on disk -------------------------------------------------------------------------

@dataclass
class ModelEntry:
    title: str  # what requests name (the webui's checkpoint title); never a path from a request
    model_name: str
    source: str  # hub id, diffusers folder or single file


def find_models(sources: list[str], models_dir: str | None) -> list[ModelEntry]:
    """--model sources (hub ids or paths), then --models-dir's diffusers folders and single files."""
    found = list(sources)
    if models_dir is not None:
        if not Path(models_dir).is_dir():
            raise ValueError(f"--models-dir: {models_dir} is not a folder")
        found += [str(p) for p in sorted(Path(models_dir).iterdir())
                  if (p / "model_index.json").is_file() or (p.is_file() and p.suffix in MODEL_SUFFIXES)]
    entries: dict[str, ModelEntry] = {}
    for source in found:
        p = Path(source)
        entry = (ModelEntry(p.name, p.stem if p.is_file() else p.name, str(p.resolve())) if p.exists()
                 else ModelEntry(source, source, source))  # a hub repo id
        entries.setdefault(entry.title, entry)
    return list(entries.values())


# --- the worker ---------------------------------------------------------------------------------------------

class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Job:
    def __init__(self, fn: Callable[[Job], Any], name: str):
        self.fn, self.name = fn, name
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.notify: Callable[[], None] = lambda: None


@dataclass
class Progress:
    """The webui's shared.state, as /sdapi/v1/progress reports it."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    job_timestamp: str = "0"
    time_start: float = 0.0

    def dict(self) -> dict[str, Any]:
        return {"skipped": False, "interrupted": self.interrupted, "stopping_generation": False, "job": self.job,
                "job_count": self.job_count, "job_timestamp": self.job_timestamp, "job_no": self.job_no,
                "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def report(self) -> dict[str, Any]:
        """modules/api/api.py progressapi."""
        if self.job_count == 0:
            return {"progress": 0, "eta_relative": 0, "state": self.dict(), "current_image": None, "textinfo": None}
        progress = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            progress += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.time_start
        return {"progress": min(progress, 1), "eta_relative": elapsed / progress - elapsed, "state": self.dict(),
                "current_image": None, "textinfo": None}


class Worker:
    """The one thread that owns the pipeline; jobs run one at a time in the order they came."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.models = find_models(config.models or ([] if config.models_dir else [DEFAULT_MODEL]),
                                  config.models_dir)
        if not self.models:
            raise ValueError(f"--models-dir: no diffusers folders or {'/'.join(MODEL_SUFFIXES)} files in "
                             f"{config.models_dir}, and no --model given")
        self.options = {"sd_model_checkpoint": self.models[0].title, "CLIP_stop_at_last_layers": 1,
                        "samples_format": "png"}
        self.pipe: Pipeline | None = None
        self.pipe_title: str | None = None
        self.state = Progress()
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.current: Job | None = None
        self.durations: deque[float] = deque(maxlen=20)
        self.stats = {"done": 0, "dropped": 0, "rejected": 0}
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="altdiff-worker", daemon=True)
        self.thread.start()
        # The first model loads at start; a failure is logged here and raised again by the next request.
        self.preload = Job(lambda job: self.pipeline(None), "load")
        self.preload.notify = self._log_preload
        self.submit(self.preload)

    def _log_preload(self) -> None:
        if self.preload.error is not None:
            logger.error("loading %s failed: %s", self.options["sd_model_checkpoint"], self.preload.error)

    # queue
    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.config.max_queue:
                self.stats["rejected"] += 1
                mean = sum(self.durations) / len(self.durations) if self.durations else 1.0
                raise QueueFull(max(1, math.ceil(mean * (len(self.waiting) + 1))))
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job whose client went away: removed from the queue, or stopped at its next step."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                self.stats["dropped"] += 1

    def interrupt(self) -> None:
        self.state.interrupted = self.current is not None

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                job = self.current = self.waiting.popleft()
            start = time.monotonic()
            try:
                job.result = job.fn(job)
            except BaseException as e:  # reported to the request; the worker keeps serving
                job.error = e
            finally:
                with self.cond:
                    self.current = None
                    self.durations.append(time.monotonic() - start)
                    self.stats["dropped" if job.cancelled else "done"] += 1
                job.done.set()
                job.notify()

    # work (on the worker thread)
    def title(self, name: str | None) -> str:
        return find_title(self.models, name) if name else self.options["sd_model_checkpoint"]

    def pipeline(self, name: str | None) -> Pipeline:
        """The loaded pipeline of a model title; one model is kept loaded, as the webui does by default."""
        title = self.title(name)
        if self.pipe_title != title:
            self.pipe = self.pipe_title = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            source = next(m.source for m in self.models if m.title == title)
            c = self.config
            self.pipe = load(source, device=c.device, dtype=c.dtype, safety_checker=c.safety_checker,
                             compile=c.compile, cuda_graphs=c.cuda_graphs, offload=c.offload)
            self.pipe_title = title
        return self.pipe

    def run_task(self, job: Job, task: webui.Task) -> webui.Result:
        pipe = self.pipeline(task.model)
        title = self.pipe_title
        state = self.state
        state.job, state.job_count, state.job_no, state.interrupted = job.name, task.n_iter, 0, False
        state.job_timestamp, state.time_start = task.timestamp, time.time()
        state.sampling_steps = task.steps if task.init_image is None else int(task.steps * task.denoising_strength)

        def on_step(pipe, i, t, tensors):
            state.sampling_step = min(i + 1, state.sampling_steps)
            if state.interrupted or job.cancelled:
                pipe._interrupt = True
            return {}

        images, nsfw, networks = [], [], {}
        try:
            for b in range(task.n_iter):
                if state.interrupted or job.cancelled:
                    break
                state.job_no, state.sampling_step = b, 0
                result = generate(**webui.generate_kwargs(task, pipe, b), callback_on_step_end=on_step)
                networks = result.infotext
                images += result.images
                nsfw += result.nsfw_content_detected or [False] * len(result.images)
        finally:
            state.job_count = state.job_no = state.sampling_step = state.sampling_steps = 0
            state.job = ""
        result = webui.finish(task, images, nsfw, title, networks)
        if task.request.get("save_images") and not job.cancelled:
            self.save(task, result)
        return result

    def save(self, task: webui.Task, result: webui.Result) -> None:
        """PNGs with infotext into --outdir, numbered on as the webui numbers them (NNNNN-seed.png)."""
        out = Path(self.config.outdir)
        out.mkdir(parents=True, exist_ok=True)
        taken = [int(m[1]) for p in out.glob("*.png") if (m := re.match(r"(?:grid-)?(\d+)", p.name))]
        number = max(taken, default=-1) + 1  # never replaces an earlier file
        for k, (image, text) in enumerate(zip(result.images, result.infotexts)):
            i = k - result.index_of_first_image
            save_png(image, out / (f"grid-{number:05}.png" if i < 0 else f"{number:05}-{task.seeds[i]}.png"), text)
            number += 1


def find_title(models: list[ModelEntry], name: str) -> str:
    """The title of a model named by its title or model_name (the webui accepts both)."""
    return next(m.title for m in models if name in (m.title, m.model_name))


# --- the app --------------------------------------------------------------------------------------------------

def _credentials(api_auth: str | None) -> dict[str, str] | None:
    if not api_auth:
        return None
    pairs = [item.split(":", 1) for item in api_auth.split(",")]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise ValueError("--api-auth: expected user:password[,user2:password2]")
    return dict(pairs)


class Guard:
    """ASGI middleware on every route (/, /docs and static files included): HTTP basic auth when
    --api-auth is set, and a request body limit read from Content-Length (chunked bodies are refused, so
    every body has one)."""

    def __init__(self, app, credentials: dict[str, str] | None, max_body_bytes: int):
        self.app, self.credentials, self.max_body_bytes = app, credentials, max_body_bytes

    def _authorized(self, header: bytes | None) -> bool:
        if not header or not header.lower().startswith(b"basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.credentials is not None and not self._authorized(headers.get(b"authorization")):
                response = JSONResponse({"detail": "Incorrect username or password"}, 401,
                                        headers={"WWW-Authenticate": "Basic"})
                return await response(scope, receive, send)
            length = headers.get(b"content-length", b"0")
            if b"transfer-encoding" in headers:
                return await JSONResponse({"detail": "send a Content-Length"}, 411)(scope, receive, send)
            if not length.isdigit() or int(length) > self.max_body_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _wait(worker: Worker, job: Job, request: Request) -> Any:
    """Queue a job and wait for it; a client that goes away has its job dropped."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    job.notify = lambda: loop.call_soon_threadsafe(finished.set)
    worker.submit(job)
    while not finished.is_set():
        try:
            await asyncio.wait_for(finished.wait(), 0.25)
        except TimeoutError:
            if await request.is_disconnected():
                worker.cancel(job)
                return None
    if isinstance(job.error, (ValueError, TypeError)) and not isinstance(job.error, (WeightsError, ConfigError)):
        raise HTTPException(422, str(job.error))  # generate() refusing an argument the request made
    if job.error is not None:
        raise job.error
    return job.result


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app with its own worker (started here: one per process, or per Ray Serve replica)."""
    credentials = _credentials(config.api_auth)
    for flag, folder in (("--lora-dir", config.lora_dir), ("--embeddings-dir", config.embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{flag}: {folder} is not a folder")
    if config.outdir is not None:
        checks.writable("--outdir", config.outdir)
    worker = Worker(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="altdiff", version=__version__, lifespan=lifespan,
                  description="The AUTOMATIC1111 webui's /sdapi/v1 API on altdiff (AltDiffusion).")
    app.state.worker = worker
    app.add_middleware(Guard, credentials=credentials, max_body_bytes=config.max_body_bytes)
    app.mount("/web", StaticFiles(directory=WEB), name="web")

    @app.exception_handler(webui.FieldError)
    async def field_error(request: Request, e: webui.FieldError):
        return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", *e.field.split(".")],
                                         "msg": e.message}]}, 422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # the webui's JSON shape for server errors
        return JSONResponse({"error": type(e).__name__, "detail": str(e)}, 500)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    async def images(req: _Request, request: Request, img2img: bool):
        body = req.model_dump()
        models = {name: m.title for m in worker.models for name in (m.title, m.model_name)}
        task = await run_in_threadpool(webui.parse_task, body, img2img=img2img, limits=config.limits,
                                       options=dict(worker.options), models=list(models),
                                       lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir)
        if task.model is not None:
            task.model = models[task.model]
        if body["save_images"] and config.outdir is None:
            raise webui.FieldError("save_images", "the server has no --outdir to save to")
        result = await _wait(worker, Job(lambda job: worker.run_task(job, task), "txt2img" if not img2img
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

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await images(req, request, img2img=False)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse)
    async def img2img(req: Img2ImgRequest, request: Request):
        return await images(req, request, img2img=True)

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: PNGInfoRequest):
        image = await run_in_threadpool(webui.decode_image, req.image, "image", config.limits.max_upload_pixels)
        return webui.png_info(image)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        return worker.state.report()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return worker.options

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any], request: Request):
        known = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format"}
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
        if options.get("samples_format", "png") != "png":
            raise webui.FieldError("samples_format", "altdiff writes png only")
        if model is not None:  # loaded now, in the queue, as the webui loads it before answering
            await _wait(worker, Job(lambda job: worker.pipeline(model), "load"), request)
            options = {**options, "sd_model_checkpoint": worker.title(model)}
        worker.options.update(options)
        return None

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return webui.samplers_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return webui.schedulers_list()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": m.title, "model_name": m.model_name, "hash": None, "sha256": None,
                 "filename": m.source, "config": None} for m in worker.models]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        worker.models = find_models(config.models or ([] if config.models_dir else [DEFAULT_MODEL]),
                                    config.models_dir) or worker.models

    @app.get("/sdapi/v1/loras")
    async def loras():
        """The files `<lora:NAME:w>` tags find in --lora-dir (by file stem)."""
        if config.lora_dir is None:
            return []
        files = sorted(p for p in Path(config.lora_dir).rglob("*")
                       if p.suffix.lower() in LORA_DIR_SUFFIXES and p.is_file())
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        """Files of --embeddings-dir; "skipped" when their width does not fit the loaded model."""
        pipe = worker.pipe
        width = pipe.text_encoder.config.hidden_size if pipe is not None else None
        found = {"loaded": {}, "skipped": {}}
        files = find_embeddings(config.embeddings_dir) if config.embeddings_dir is not None else {}
        for stem, p in files.items():
            try:
                _, vectors = await run_in_threadpool(read_embedding, p, stem)
            except (ValueError, WeightsError):
                continue
            kind = "loaded" if width in (None, vectors.shape[-1]) else "skipped"
            found[kind][stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                   "shape": int(vectors.shape[-1]), "vectors": int(vectors.shape[0])}
        return found

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():
        return []

    return app


# --- running it ---------------------------------------------------------------------------------------------

def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    app = create_app(config)
    preload = app.state.worker.preload
    preload.done.wait()  # a model that does not load stops the command before it listens
    if preload.error is not None:
        app.state.worker.stop()
        raise ValueError(f"--model: {preload.error}")
    uvicorn.run(app, host=host, port=port, log_level="info")


def run_ray(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860, replicas: int = 1,
            num_gpus_per_replica: float | None = None, blocking: bool = True):
    """The same app on Ray Serve: `replicas` copies, each with its own worker and pipeline (one GPU each
    when the cluster has GPUs). /progress and /interrupt reach whichever replica the proxy picks."""
    num_gpus_per_replica = ray_gpus_per_actor(num_gpus_per_replica, "--num-gpus-per-replica", replicas)
    try:
        from ray import serve
    except ImportError:
        raise ValueError("--ray: Ray Serve is not installed (pip install 'altdiff[ray]')") from None

    def build_app():  # runs in each replica (Ray Serve calls plain functions as app builders)
        return create_app(config)

    ingress = serve.ingress(build_app)()
    deployment = serve.deployment(ingress, name="altdiff", num_replicas=replicas,
                                  # the app queues and refuses (503) on its own
                                  max_ongoing_requests=config.max_queue + 1,
                                  ray_actor_options={"num_gpus": num_gpus_per_replica, "num_cpus": 1})
    serve.start(http_options={"host": host, "port": port})
    return serve.run(deployment.bind(), name="altdiff", route_prefix="/", blocking=blocking)
