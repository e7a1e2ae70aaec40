"""The one worker thread per process that owns the pipeline and runs jobs one at a time from a FIFO queue;
request handlers only parse, queue and wait."""

from __future__ import annotations

import asyncio
import base64
import gc
import inspect
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Request

from .. import webui
from ..atomic import remove_stale_temps
from ..config import ConfigError
from ..generate import generate
from ..images import encode_png, save_numbered
from ..pipeline import DEFAULT_MODEL, Pipeline, load
from ..preview import cheap_preview
from ..weights import WeightsError

if TYPE_CHECKING:
    from ..serve import ServeConfig

logger = logging.getLogger("altdiff")

MODEL_SUFFIXES = (".safetensors", ".ckpt")


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
        self.sampling = False  # set at the first step: errors from then on are the server's, not the request's
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
    skipped: bool = False
    job_timestamp: str = "0"
    time_start: float = 0.0
    preview_latent: torch.Tensor | None = None  # the first image's latents at the last preview step
    preview_every: int = 10  # the webui's show_progress_every_n_steps default

    def dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                "job_no": self.job_no,
                "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def report(self) -> dict[str, Any]:
        """modules/api/api.py progressapi."""
        if self.job_count == 0:
            return {"progress": 0, "eta_relative": 0, "state": self.dict(), "current_image": None, "textinfo": None}
        progress = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            progress += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.time_start
        latent = self.preview_latent
        image = None if latent is None else base64.b64encode(encode_png(cheap_preview(latent))).decode()
        return {"progress": min(progress, 1), "eta_relative": elapsed / progress - elapsed, "state": self.dict(),
                "current_image": image, "textinfo": None}


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
                        "samples_format": "png", **webui.NOISE_SETTINGS, **webui.TOME_SETTINGS}
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
    def check_room(self) -> None:
        """QueueFull when no job can wait now: checked before a request's uploads are decoded, and on submit."""
        with self.cond:
            if len(self.waiting) >= self.config.max_queue:
                self.stats["rejected"] += 1
                mean = sum(self.durations) / len(self.durations) if self.durations else 1.0
                raise QueueFull(max(1, math.ceil(mean * (len(self.waiting) + 1))))

    def submit(self, job: Job) -> None:
        with self.cond:
            self.check_room()
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

    def skip(self) -> None:
        self.state.skipped = self.current is not None

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
            self.unload()
            source = next(m.source for m in self.models if m.title == title)
            c = self.config
            self.pipe = load(source, device=c.device, dtype=c.dtype, safety_checker=c.safety_checker,
                             compile=c.compile, cuda_graphs=c.cuda_graphs, offload=c.offload)
            self.pipe_title = title
        return self.pipe

    def set_options(self, options: dict[str, Any]) -> None:
        model = options.get("sd_model_checkpoint")
        if model is not None:
            self.pipeline(model)
            options = {**options, "sd_model_checkpoint": self.title(model)}
        self.options.update(options)

    def unload(self) -> None:
        self.pipe = self.pipe_title = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run_task(self, job: Job, task: webui.Task) -> webui.Result:
        overrides = task.request.get("override_settings") or {}
        if "CLIP_stop_at_last_layers" not in overrides:  # the options as they are when the job runs
            task.clip_skip = int(self.options["CLIP_stop_at_last_layers"])
        if "randn_source" not in overrides:
            task.rng = self.options["randn_source"]
        if "eta_noise_seed_delta" not in overrides:
            task.ensd = int(self.options["eta_noise_seed_delta"])
        pipe = self.pipeline(task.model)
        title = self.pipe_title
        state = self.state
        state.job, state.job_count, state.job_no, state.interrupted = job.name, task.n_iter, 0, False
        state.job_timestamp, state.time_start = task.timestamp, time.time()
        state.sampling_steps = task.steps if task.init_image is None else int(task.steps * task.denoising_strength)

        def on_step(pipe, i, t, tensors):
            state.sampling_step = min(i + 1, state.sampling_steps)
            job.sampling = True
            if state.preview_every > 0 and (i + 1) % state.preview_every == 0:
                state.preview_latent = tensors["latents"][0].detach().clone()
            if state.interrupted or state.skipped or job.cancelled:
                pipe._interrupt = True
            return {}

        images, nsfw, texts = [], [], []
        try:
            for b in range(task.n_iter):
                if state.interrupted or job.cancelled:
                    break
                state.job_no, state.sampling_step, state.skipped = b, 0, False  # a skip ends one image
                result = generate(**webui.generate_kwargs(task, pipe, b), callback_on_step_end=on_step)
                texts += result.infotexts
                images += result.images
                nsfw += result.nsfw_content_detected or [False] * len(result.images)
        finally:
            state.job_count = state.job_no = state.sampling_step = state.sampling_steps = 0
            state.skipped, state.preview_latent = False, None
            state.job = ""
        result = webui.finish(task, images, nsfw, title, texts)
        if not task.request.get("override_settings_restore_afterwards", True):
            self.options.update({k: v for k, v in overrides.items() if k in webui.OVERRIDABLE})
            if task.model is not None:
                self.options["sd_model_checkpoint"] = task.model
        if task.request.get("save_images") and not job.cancelled:
            self.save(task, result)
        return result

    def save(self, task: webui.Task, result: webui.Result) -> None:
        """PNGs with infotext, numbered on as the webui numbers them (NNNNN-seed.png, grid-NNNNN.png): into
        --outdir, or where the webui saves by default (outputs/txt2img-images/<date>/, grids in
        outputs/txt2img-grids/<date>/, img2img likewise) relative to the working directory."""
        kind, date = "img2img" if task.init_image is not None else "txt2img", time.strftime("%Y-%m-%d")
        for k, (image, text) in enumerate(zip(result.images, result.infotexts)):
            i = k - result.index_of_first_image
            folder = (Path(self.config.outdir) if self.config.outdir is not None
                      else Path("outputs", f"{kind}-{'grids' if i < 0 else 'images'}", date))
            remove_stale_temps_once(folder)
            save_numbered(image, folder, "grid-{number:05}.png" if i < 0 else f"{{number:05}}-{task.seeds[i]}.png",
                          text)


_cleaned: set[Path] = set()


def remove_stale_temps_once(folder: Path) -> None:
    """A save killed mid-write (SIGKILL) leaves a temporary file: removed the first time a process saves
    into a folder (--outdir is also cleaned at start)."""
    if folder not in _cleaned and folder.is_dir():
        remove_stale_temps(folder)
        _cleaned.add(folder)


def find_title(models: list[ModelEntry], name: str) -> str:
    """The title of a model named by its title or model_name (the webui accepts both)."""
    return next(m.title for m in models if name in (m.title, m.model_name))


async def wait(worker: Worker, job: Job, request: Request) -> Any:
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
    if is_client_error(job):
        raise request_field_error(job.error)
    if job.error is not None:
        raise job.error  # a 500, its traceback logged by the app's handler
    return job.result


# generate()'s argument names (its errors start with one) -> the request field a webui client set
GENERATE_FIELDS = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "sampler": "sampler_name",
                   "num_images_per_prompt": "batch_size", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
                   "image": "init_images", "strength": "denoising_strength", "latents": "subseed",
                   "lora_dir": "prompt", "embeddings_dir": "prompt"}


def is_client_error(job: Job) -> bool:
    """generate()'s checks refusing what the request asked for: a ValueError/TypeError raised before
    sampling began (checks and prompt parsing run first). Errors of the model files (WeightsError,
    ConfigError) and anything raised later are server errors."""
    return (isinstance(job.error, (ValueError, TypeError)) and not isinstance(job.error, (WeightsError, ConfigError))
            and not job.sampling)


def request_field_error(e: Exception) -> webui.FieldError:
    """The FieldError naming the request field behind one of generate()'s argument errors (their messages
    start with the argument's name)."""
    if isinstance(e, webui.FieldError):
        return e
    m = re.match(r"([a-z_]+)(?::| )", str(e))
    name = m[1] if m and m[1] in inspect.signature(generate).parameters else ""
    return webui.FieldError(GENERATE_FIELDS.get(name, name), str(e))
