"""Test helpers for `altdiff serve`: the app run by uvicorn on a free loopback port in a thread of the test
process, so tests can read its worker, and images decoded from the API's base64 PNGs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import PIL.Image
import uvicorn

from altdiff.serve import Job, ServeConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: ServeConfig):
        self.app = create_app(config)
        self.worker = self.app.state.worker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.worker.preload.done.wait(300)
        assert self.worker.preload.error is None, self.worker.preload.error

    def hold(self) -> threading.Event:
        """Occupy the worker until the returned event is set (requests then queue behind it)."""
        gate, running = threading.Event(), threading.Event()

        def wait(job):
            running.set()
            gate.wait(300)
        self.worker.submit(Job(wait, "hold"))
        running.wait(300)
        return gate

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def decode(b64: str) -> PIL.Image.Image:
    img = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=int)
