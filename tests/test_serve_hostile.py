"""`altdiff serve` under hostile input and faults (issue 24): every bad request is a 4xx with a JSON body
naming the field, never a 500 or a hang; options take effect in order with the jobs; saved files are never
lost or half-written, also with two processes on one folder or a save killed mid-write."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import operator
import os
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path

import PIL.Image
import pydantic
import pydantic.v1
import pytest
import requests
from PIL.PngImagePlugin import PngInfo
from serving import Server
from starlette.routing import Router

from altdiff.api.extras import ExtrasSingleRequest
from altdiff.api.models import Img2ImgRequest, Txt2ImgRequest
from altdiff.serve import Guard, ServeConfig, create_app

REPO = Path(__file__).resolve().parent.parent
BASE = {"prompt": "x", "steps": 1, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, m9_folder):
    root = tmp_path_factory.mktemp("hostile")
    (root / "models").mkdir()
    (root / "models" / "m9-b").symlink_to(m9_folder, target_is_directory=True)
    s = Server(ServeConfig(models=[str(m9_folder)], models_dir=str(root / "models"), device="cpu",
                           outdir=str(root / "out")))
    yield s
    s.close()


def png_with_text(value: str, chunks: int = 1) -> str:
    info = PngInfo()
    for k in range(chunks):
        info.add_text(f"k{k}", value, zip=True)  # zTXt: a few KiB that inflate to len(value)
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


BOMB = png_with_text("x" * 2 * 2**20)
# (route, raw JSON of the fields, field the 422 names): raw text, as a careless or hostile client sends it
HOSTILE = [
    ("txt2img", '"steps": 1e309', "steps"), ("txt2img", '"steps": NaN', "steps"),
    ("txt2img", '"cfg_scale": -Infinity', "cfg_scale"), ("txt2img", '"denoising_strength": NaN', "denoising_strength"),
    ("txt2img", '"sampler_name": "\\ud800"', "sampler_name"), ("txt2img", '"prompt": "\\udfff x"', "prompt"),
    ("txt2img", '"prompt": ' + "[" * 800 + "]" * 800, "prompt"),
    ("txt2img", '"styles": ' + "[" * 400 + "]" * 400, "styles"),
    ("txt2img", '"prompt": ' + json.dumps("(" * 100_000), "prompt"),  # over the prompt limit: refused at once
    ("txt2img", '"prompt": ' + json.dumps("a BREAK " * 2000), "prompt"),
    ("png-info", '"image": ' + json.dumps(BOMB), "image"),
    ("png-info", '"image": ' + json.dumps(png_with_text("y" * (2**20 - 1024), chunks=70)), "image"),
    ("img2img", '"init_images": ' + json.dumps([BOMB]), "init_images"),
]


@pytest.mark.parametrize("route,raw,field", HOSTILE, ids=[f"{r}-{k}" for k, (r, _, _) in enumerate(HOSTILE)])
def test_hostile_input_is_a_quick_422_with_a_json_body_naming_the_field(hostile, route, raw, field):
    body = "{" + raw + "}" if route == "png-info" else "{" + json.dumps(BASE)[1:-1] + ", " + raw + "}"
    start = time.monotonic()
    r = requests.post(f"{hostile.url}/sdapi/v1/{route}", data=body.encode(), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (r.status_code, r.text[:300])
    detail = r.json()["detail"]  # valid JSON whatever the request held
    assert isinstance(detail, list) and field in detail[0]["loc"], detail
    assert len(r.content) < 8000 and time.monotonic() - start < 10


def test_lax_values_are_read_as_the_webui_reads_them(hostile):
    r = requests.post(f"{hostile.url}/sdapi/v1/txt2img", timeout=120, json={
        **BASE, "steps": "1", "cfg_scale": "7.0", "width": 32.0, "seed": 3, "negative_prompt": None,
        "styles": ["None"], "sampler_name": "Euler a", "eta": 0, "controlnet_units": [], "extra": {"a": 1}})
    assert r.status_code == 200, r.text
    assert r.headers["X-Altdiff-Ignored-Fields"] == "['controlnet_units', 'extra']"
    assert r.json()["parameters"]["steps"] == 1 and "controlnet_units" not in r.json()["parameters"]


def _plain(tp):
    """A type without its Annotated validators, for pydantic 1."""
    if typing.get_origin(tp) is typing.Annotated:
        return _plain(typing.get_args(tp)[0])
    args = typing.get_args(tp)
    if not args:
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, map(_plain, args))
    return typing.get_origin(tp)[tuple(map(_plain, args))]


LAX = [12.5, -1.5, 512.0, 7, "12", " 12 ", "12.5", "7.0", "abc", "", True, False, 0, 1, "yes", "off", 123,
       1e30, [1], ["a", 2], [], ["ab"], {"a": 1}]


@pytest.mark.parametrize("model", [Txt2ImgRequest, Img2ImgRequest, ExtrasSingleRequest])
def test_request_fields_read_values_as_the_webuis_pydantic_1(model):
    """The webui's request models are pydantic 1's (fastapi 0.94): every field of ours, given each value,
    takes what pydantic 1 takes for the same type, read the same, and refuses what it refuses, but for a
    whole number in a string for an int ("7.0", which pydantic 2 reads as 7). NaN and infinities (refused on
    purpose) and null (the default) aside."""
    for name, field in model.model_fields.items():
        reference = pydantic.v1.create_model("Webui", **{name: (_plain(field.annotation), ...)})
        for value in LAX:
            try:
                expected = getattr(reference(**{name: value}), name)
            except pydantic.v1.ValidationError:
                expected = "refused"
            try:
                got = getattr(model.model_validate({name: value}), name)
            except pydantic.ValidationError:
                got = "refused"
            if expected == "refused" and value == "7.0" and _plain(field.annotation) in (int, int | None):
                expected = 7
            assert got == expected and type(got) is type(expected), (name, value, got, expected)


def test_options_answers_allow_with_every_method_and_auth_covers_websockets(hostile):
    r = requests.options(f"{hostile.url}/sdapi/v1/options", timeout=30)
    assert r.status_code == 200 and set(r.headers["Allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    async def send(message):
        sent.append(message)
    guard = Guard(app, {"a": "b"}, 1000, Router())
    asyncio.run(guard({"type": "websocket", "path": "/ws", "headers": []}, None, send))
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}]
    good = [(b"authorization", b"Basic " + base64.b64encode(b"a:b"))]
    asyncio.run(guard({"type": "websocket", "path": "/ws", "headers": good}, None, send))
    assert reached == ["websocket"]


def test_a_job_error_after_sampling_began_is_a_500_not_the_clients_fault(hostile, monkeypatch):
    from altdiff.api import worker as worker_module

    def failing(**kwargs):
        kwargs["callback_on_step_end"](kwargs["model"], 0, 0, {})
        raise ValueError("num_inference_steps: a bug in the server")  # looks like a check, comes from sampling
    monkeypatch.setattr(worker_module, "generate", failing)
    r = requests.post(f"{hostile.url}/sdapi/v1/txt2img", json=BASE, timeout=60)
    assert r.status_code == 500 and r.json()["error"] == "ValueError"


def test_options_take_effect_in_order_with_queued_jobs(hostile):
    """A model switch posted while the worker is busy applies to the txt2img queued after it (the webui
    sets the options, then runs the job), not to one queued before it."""
    gate = hostile.hold()
    answers = {}

    def post(name, route, body):
        answers[name] = requests.post(f"{hostile.url}/sdapi/v1/{route}", json=body, timeout=300)
    threads = [threading.Thread(target=post, args=("before", "txt2img", BASE)),
               threading.Thread(target=post, args=("options", "options", {"sd_model_checkpoint": "m9-b"})),
               threading.Thread(target=post, args=("after", "txt2img", BASE))]
    try:
        for k, t in enumerate(threads):
            t.start()
            deadline = time.monotonic() + 60
            while len(hostile.worker.waiting) <= k:  # each queued before the next is sent
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        gate.set()
    for t in threads:
        t.join(300)
    try:
        assert json.loads(answers["before"].json()["info"])["sd_model_name"] != "m9-b"
        assert json.loads(answers["after"].json()["info"])["sd_model_name"] == "m9-b"
    finally:
        first = hostile.worker.models[0].title
        requests.post(f"{hostile.url}/sdapi/v1/options", json={"sd_model_checkpoint": first}, timeout=300)


SAVER = """
import sys, PIL.Image
from altdiff.images import save_numbered
for k in range(int(sys.argv[2])):
    save_numbered(PIL.Image.new("RGB", (4, 4), (k, 0, 0)), sys.argv[1], "{number:05}-%s.png" % sys.argv[3])
"""


def test_two_processes_saving_into_one_folder_lose_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), "15", name], env=env)
             for name in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert not list(tmp_path.glob(".*.tmp"))  # besides the PNGs only the numbering lock file remains
    numbers = sorted(int(n[:5]) for n in names)
    assert len(names) == 30 and numbers == list(range(30))  # every image a file, every number used once


KILLED = """
import sys, time
from altdiff.atomic import atomic_path
with atomic_path(sys.argv[1] + "/00000-1.png") as tmp:
    tmp.write_bytes(b"half a png")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_save_killed_mid_write_leaves_nothing_after_the_next_start(tmp_path, m9_folder):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], env=env, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    (left,) = tmp_path.iterdir()
    assert left.name.endswith(".tmp")
    old = time.time() - 3600  # killed an hour ago: no live writer takes that long
    os.utime(left, (old, old))
    app = create_app(ServeConfig(models=[str(m9_folder)], device="cpu", outdir=str(tmp_path)))
    app.state.worker.stop()
    assert list(tmp_path.iterdir()) == []
