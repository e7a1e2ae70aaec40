"""`altdiff serve`: the AUTOMATIC1111 webui's `/sdapi/v1` API and a small web page, on FastAPI.

One worker thread per process owns the pipeline and runs jobs one at a time from a FIFO queue; request
handlers only parse, queue and wait. A full queue answers 503 with Retry-After; a client that disconnects has
its queued (or running) job dropped; /interrupt ends the running job at the next step and returns what it
has. The webui's semantics (samplers, seeds, grids, infotext) live in altdiff.webui. `run_ray` serves the same
app from N Ray Serve replicas, each with its own worker and pipeline.
"""

from __future__ import annotations

import base64
import binascii
import copy
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Router

from . import __version__, checks, webui
from .api import control, errors, extras, generation, lists, models, options, page
from .api.worker import Job, Worker
from .atomic import remove_stale_temps
from .batch import ray_gpus_per_actor
from .styles import read_styles

__all__ = ["Job", "ServeConfig", "create_app", "run", "run_ray"]


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=list)  # --model sources; the first is loaded at start
    models_dir: str | None = None
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    styles_file: str | None = None  # the webui's styles.csv
    outdir: str | None = None  # where save_images writes; None: the webui's outputs/<kind>-images/<date>/
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


# --- the app --------------------------------------------------------------------------------------------------

def _credentials(api_auth: str | None) -> dict[str, str] | None:
    if not api_auth:
        return None
    pairs = [item.split(":", 1) for item in api_auth.split(",")]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise ValueError("--api-auth: expected user:password[,user2:password2]")
    return dict(pairs)


class Guard:
    """ASGI middleware on every route and scope (/, /docs, static files, websockets): HTTP basic auth when
    --api-auth is set, a request body limit read from Content-Length (chunked bodies are refused, so every
    body has one), and OPTIONS answered with every method the path has."""

    def __init__(self, app, credentials: dict[str, str] | None, max_body_bytes: int, router: Router):
        self.app, self.credentials, self.max_body_bytes, self.router = app, credentials, max_body_bytes, router

    def _authorized(self, header: bytes | None) -> bool:
        if not header or not header.lower().startswith(b"basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    def _allowed(self, scope) -> set[str]:
        # probed per method through the routes' public matching (included routers are routes of their own)
        return {m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
                if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in self.router.routes)}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.credentials is not None and not self._authorized(headers.get(b"authorization")):
            if scope["type"] == "websocket":  # closing before accepting answers the handshake with a 403
                return await send({"type": "websocket.close", "code": 1008})
            response = JSONResponse({"detail": "Incorrect username or password"}, 401,
                                    headers={"WWW-Authenticate": "Basic"})
            return await response(scope, receive, send)
        if scope["type"] == "http":
            length = headers.get(b"content-length", b"0")
            if b"transfer-encoding" in headers:
                return await JSONResponse({"detail": "send a Content-Length"}, 411)(scope, receive, send)
            if not length.isdigit() or int(length) > self.max_body_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, 413)
                return await response(scope, receive, send)
            if scope["method"] == "OPTIONS" and (allowed := self._allowed(scope)):
                allow = ", ".join(sorted(allowed | {"OPTIONS"}))
                return await Response(status_code=200, headers={"Allow": allow})(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app with its own worker (started here: one per process, or per Ray Serve replica)."""
    credentials = _credentials(config.api_auth)
    for flag, folder in (("--lora-dir", config.lora_dir), ("--embeddings-dir", config.embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{flag}: {folder} is not a folder")
    if config.outdir is not None:
        checks.writable("--outdir", config.outdir)
        remove_stale_temps(config.outdir)
    worker = Worker(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="altdiff", version=__version__, lifespan=lifespan,
                  description="The AUTOMATIC1111 webui's /sdapi/v1 API on altdiff (AltDiffusion).")
    app.state.worker, app.state.config = worker, config
    app.state.styles = read_styles(config.styles_file) if config.styles_file is not None else {}
    app.add_middleware(Guard, credentials=credentials, max_body_bytes=config.max_body_bytes, router=app.router)
    app.mount("/web", StaticFiles(directory=page.WEB), name="web")

    errors.install(app)
    for router in (generation.router, options.router, lists.router, control.router, extras.router, page.router):
        app.include_router(router)
    schema = app.openapi  # FastAPI's, cached: each answer edits a copy with the current models
    app.openapi = lambda: models.with_limits(copy.deepcopy(schema()), config.limits, list(dict.fromkeys(
        name for m in worker.models for name in (m.title, m.model_name))))
    return app


# --- running it ---------------------------------------------------------------------------------------------

def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    app = create_app(config)
    app.state.address = (host, port)  # for /sdapi/v1/cmd-flags
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
