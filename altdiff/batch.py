"""`altdiff batch requests.jsonl --out DIR`: many generate() requests, resumable, in-process or on Ray Data.

Each line of the requests file is a JSON object of generate() keyword arguments. A request's images are named
by a stable hash of its arguments and of the run's settings that change pixels (device type, dtype, safety
checker, compile, batch size), so a rerun with the same settings skips every request whose images exist.
Images are written atomically with the CLI's infotext; manifest.jsonl gets a line as each request finishes and
is rewritten at the end of a run with exactly one line per request (request, key, files, seeds, nsfw, error).
A failing request is recorded with its error and the run goes on.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import checks
from .atomic import atomic_path
from .checks import is_int
from .generate import generate
from .images import open_image, save_png
from .infotext import image_infotext
from .pipeline import DEFAULT_MODEL, Pipeline, load
from .schedules import sampler_for_config

REQUEST_KEYS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "seed",
                "sampler", "model", "eta", "guidance_rescale", "clip_skip", "num_images_per_prompt", "image",
                "strength", "a1111_prompts")
ALIASES = {"steps": "num_inference_steps"}  # the CLI's name, as in the example lines
PER_IMAGE_KEYS = ("prompt", "negative_prompt", "seed")  # the only arguments that may differ inside one batch
MANIFEST = "manifest.jsonl"
DEFAULTS = {k: p.default for k, p in inspect.signature(generate).parameters.items()}


@dataclass
class Request:
    key: str  # hash of the arguments: names the image files
    args: dict[str, Any]  # generate() keyword arguments, seed filled in
    request: Any  # the line as given: a dict, or the raw text when it is not a usable JSON object
    error: str | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.args["seed"] + i for i in range(self.args.get("num_images_per_prompt", 1))]

    @property
    def files(self) -> list[str]:
        return [f"{self.key}-{i}.png" for i in range(len(self.seeds))]


def _hash(obj) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_request(line: str, model: str | None = None, base: Path = Path("."), settings: dict | None = None
                  ) -> Request:
    """One line of a requests file. `model` is the default for requests that name none; relative image
    paths are taken from `base`; `settings` (the run's pixel-changing options) join the arguments in the
    key. Problems are returned as a Request with `error`, never raised."""
    def bad(error: str, request: Any = line) -> Request:
        return Request(_hash(line), {}, request, error)

    try:
        request = json.loads(line)
        json.dumps(request, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeEncodeError) as e:
        return bad(f"not a valid JSON line ({e})")
    if not isinstance(request, dict):
        return bad(f"expected a JSON object of generate() arguments, got {type(request).__name__}", request)
    args = {ALIASES.get(k, k): v for k, v in request.items()}
    unknown = sorted(set(args) - set(REQUEST_KEYS))
    if unknown:
        return bad(f"unknown argument(s) {unknown}; expected generate() keywords {list(REQUEST_KEYS)}",
                   request)
    for name in ("prompt", "model", "image"):
        if not isinstance(args.get(name, ""), str) or (name == "prompt" and name not in args):
            return bad(f"{name}: expected a string, got {type(args.get(name)).__name__}", request)
    if not is_int(args.get("num_images_per_prompt", 1), 1, 2**63 - 1):
        return bad(f"num_images_per_prompt: expected a positive int, got {args['num_images_per_prompt']!r}",
                   request)
    if "seed" in args:
        try:
            checks.seed("seed", args["seed"], args.get("num_images_per_prompt", 1))
        except (TypeError, ValueError) as e:
            return bad(str(e), request)
    if model is not None:
        args.setdefault("model", model)
    for name, root in (("model", Path(".")), ("image", base)):
        # Absolute paths, so Ray workers (other working directories) find the same files.
        if name in args and (root / args[name]).exists():
            args[name] = str((root / args[name]).resolve())
    # A request without a seed gets one from the hash of its arguments: reruns, Ray workers and runs with
    # other settings make it with the same seed.
    args.setdefault("seed", int(_hash(args)[:8], 16))
    return Request(_hash({"args": args, "settings": settings or {}}), args, request)


def read_requests(path: str | Path, model: str | None = None, settings: dict | None = None) -> list[Request]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"requests: cannot read {path} ({e.strerror or e})") from None
    requests = []
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.decode("utf-8", errors="replace")
            requests.append(Request(_hash(line), {}, line, f"not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        requests.append(parse_request(line, model, path.parent, settings))
    return requests


def plan(requests: list[Request], out: Path, batch_size: int = 1) -> tuple[list[Request], list[list[Request]]]:
    """(finished requests, jobs to run). A job is up to `batch_size` requests that differ only in prompt,
    negative prompt and seed, so one generate() call makes them all; img2img requests run alone (diffusers
    encodes the init image with the first generator only)."""
    unique: dict[str, Request] = {}
    for r in requests:
        unique.setdefault(r.key, r)
    todo = [r for r in unique.values() if r.error is None]
    done = [r for r in todo if all((out / f).is_file() for f in r.files)]
    finished = {r.key for r in done}
    groups: dict[str, list[list[Request]]] = {}
    for r in todo:
        if r.key in finished:
            continue
        shared = r.key if "image" in r.args else _hash({k: v for k, v in r.args.items() if k not in PER_IMAGE_KEYS})
        jobs = groups.setdefault(shared, [[]])
        if len(jobs[-1]) == batch_size:
            jobs.append([])
        jobs[-1].append(r)
    return done, [job for jobs in groups.values() for job in jobs]


def _entry(r: Request, nsfw: list[bool] | None = None, error: str | None = None) -> dict:
    ok = r.error is None and error is None
    return {"request": r.request, "key": r.key, "files": r.files if ok else [], "seeds": r.seeds if r.args else [],
            "nsfw": nsfw, "error": r.error or error}


class Runner:
    """Runs jobs and writes their images. One per process (local) or per Ray actor, where Ray Data calls it
    on batches of serialized jobs; pipelines are loaded on first use and kept."""

    def __init__(self, out: str | Path, device: str | None = None, dtype: str | None = None,
                 safety_checker: bool = True, compile: bool = False, cuda_graphs: bool = True,
                 offload: str | None = None, lora_dir: str | None = None, embeddings_dir: str | None = None):
        self.out = Path(out)
        self.networks = {"lora_dir": lora_dir, "embeddings_dir": embeddings_dir}
        self.load_kwargs = {"device": device, "dtype": dtype, "safety_checker": safety_checker,
                            "compile": compile, "cuda_graphs": cuda_graphs, "offload": offload}
        self.pipes: dict[str, Pipeline] = {}

    def pipe(self, source: str | None) -> Pipeline:
        source = source or DEFAULT_MODEL
        if source not in self.pipes:
            self.pipes[source] = load(source, **self.load_kwargs)
        return self.pipes[source]

    def run(self, job: list[Request]) -> list[dict]:
        """Manifest entries of one job. A failing batch is retried request by request, so one bad request
        fails alone."""
        try:
            return self._generate(job)
        except Exception as e:
            if len(job) > 1:
                return [entry for r in job for entry in self.run([r])]
            return [_entry(job[0], error=f"{type(e).__name__}: {e}")]

    def _generate(self, job: list[Request]) -> list[dict]:
        args = {k: v for k, v in job[0].args.items() if k not in PER_IMAGE_KEYS}
        pipe = self.pipe(args.pop("model", None))
        image = open_image(args.pop("image")) if "image" in args else None
        prompts = [r.args["prompt"] for r in job]
        negatives = [r.args.get("negative_prompt") for r in job]
        if len(job) == 1:
            prompt, negative = prompts[0], negatives[0]
        else:  # an empty negative prompt encodes exactly as none
            prompt, negative = prompts, [n or "" for n in negatives] if any(negatives) else None
        result = generate(prompt, model=pipe, negative_prompt=negative, image=image,
                          seed=[s for r in job for s in r.seeds], progress=False, **self.networks, **args)
        sampler = args.get("sampler") or sampler_for_config(pipe.scheduler_config)
        images, flags = iter(result.images), iter(result.nsfw_content_detected or [])
        entries = []
        for r, neg in zip(job, negatives):
            nsfw = []
            for seed, name in zip(r.seeds, r.files):
                flag = next(flags, None)
                nsfw.append(flag)
                img = next(images)
                text = image_infotext(img, r.args["prompt"], neg,
                                      steps=args.get("num_inference_steps", DEFAULTS["num_inference_steps"]),
                                      sampler=sampler, seed=seed, model=pipe.source,
                                      cfg_scale=args.get("guidance_scale", DEFAULTS["guidance_scale"]),
                                      strength=args.get("strength", DEFAULTS["strength"]) if image else None,
                                      nsfw=bool(flag), extra=result.infotext)
                save_png(img, self.out / name, text)
            entries.append(_entry(r, nsfw=None if result.nsfw_content_detected is None else nsfw))
        return entries

    def __call__(self, batch: dict) -> dict[str, list[str]]:
        """Ray Data's entry point: a batch with a "job" column of JSON-encoded jobs."""
        entries = [e for job in batch["job"] for e in self.run([Request(**r) for r in json.loads(job)])]
        return {"entry": [json.dumps(e, ensure_ascii=False) for e in entries]}


def ray_gpus_per_actor(requested: float | None, flag: str, actors: int = 1) -> float:
    """Joins (or starts) the Ray cluster; the GPUs per actor (batch worker, serve replica): as asked, or 1
    when the cluster has GPUs and 0 when it has none."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray: Ray is not installed (pip install 'altdiff[ray]')") from None
    if not ray.is_initialized():
        ray.init()  # joins the cluster named by RAY_ADDRESS or `ray start`, else starts a local one
    gpus = ray.cluster_resources().get("GPU", 0)
    if requested is None:
        return 1 if gpus else 0
    if requested * actors > gpus:
        each = f" for each of {actors}" if actors > 1 else ""
        raise ValueError(f"{flag}: {requested:g} requested{each} but the Ray cluster has {gpus:g} GPUs (use 0 for "
                         "CPU workers)")
    return requested


def _run_ray(jobs: list[list[Request]], runner_kwargs: dict, concurrency: int,
             num_gpus_per_worker: float) -> Iterator[dict]:
    import ray

    items = [{"job": json.dumps([asdict(r) for r in job], ensure_ascii=False)} for job in jobs]
    # One job per call; each actor of the pool holds its own loaded Pipeline (one per GPU).
    ds = ray.data.from_items(items).map_batches(
        Runner, batch_size=1, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=1,
        num_gpus=num_gpus_per_worker, fn_constructor_kwargs=runner_kwargs)
    return (json.loads(row["entry"]) for row in ds.iter_rows())


def _read_manifest(path: Path) -> dict[str, dict]:
    entries = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the torn last line of an interrupted run
    return entries


def _write_manifest(path: Path, entries: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")


def run(requests_file: str | Path, out: str | Path, *, model: str | None = None, device: str | None = None,
        dtype: str | None = None, safety_checker: bool = True, compile: bool = False, cuda_graphs: bool = True,
        offload: str | None = None, batch_size: int = 1, use_ray: bool = False, concurrency: int = 1,
        num_gpus_per_worker: float | None = None, verbose: bool = False, lora_dir: str | None = None,
        embeddings_dir: str | None = None) -> list[dict]:
    """Run every unfinished request of `requests_file` into `out`; returns the manifest entries (one per
    distinct request, in file order). `<lora:NAME:w>` tags of requests with a1111_prompts are found in
    `lora_dir`; embeddings in `embeddings_dir` apply where a prompt names them. With `use_ray`,
    `num_gpus_per_worker` None means 1 when the Ray cluster has GPUs and 0 when it has none."""
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if not is_int(value, 1, 2**63 - 1):
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value!r}")
    if num_gpus_per_worker is not None and not (checks.is_number(num_gpus_per_worker) and num_gpus_per_worker >= 0):
        raise ValueError(f"--num-gpus-per-worker: must be >= 0, got {num_gpus_per_worker!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    checks.writable("--out", out)
    if use_ray:
        num_gpus_per_worker = ray_gpus_per_actor(num_gpus_per_worker, "--num-gpus-per-worker")
        # The device the workers will use: the driver (often a CPU-only head node) may have no GPU itself.
        device = device or ("cuda" if num_gpus_per_worker else "cpu")
        device_type = checks.parse_device(device, require_available=False).type
    else:
        device_type = checks.parse_device(device).type
    dtype_name = str(checks.parse_dtype(dtype, torch.device(device_type))).removeprefix("torch.")
    folders = {k: str(Path(v).resolve()) if v else None
               for k, v in (("lora_dir", lora_dir), ("embeddings_dir", embeddings_dir))}
    # What changes pixels joins the request's arguments in its key (the network folders: a prompt's tags are
    # read there); cuda_graphs does not (bit-identical replays).
    settings = {"device": device_type, "dtype": dtype_name, "safety_checker": bool(safety_checker),
                "compile": compile, "batch_size": batch_size, **folders}
    requests = read_requests(requests_file, model, settings)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    old = _read_manifest(manifest)
    done, jobs = plan(requests, out, batch_size)
    runner_kwargs = {"out": str(out.resolve()), "device": device, "dtype": dtype_name,
                     "safety_checker": safety_checker, "compile": compile, "cuda_graphs": cuda_graphs,
                     "offload": offload, **folders}
    if not jobs:
        results: Iterator[dict] = iter(())
    elif use_ray:
        results = _run_ray(jobs, runner_kwargs, concurrency, num_gpus_per_worker)
    else:
        runner = Runner(**runner_kwargs)
        results = (entry for job in jobs for entry in runner.run(job))
    finished = {}
    with open(manifest, "a", encoding="utf-8") as log:
        for entry in results:
            log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            log.flush()
            finished[entry["key"]] = entry
            if verbose:
                print(entry["error"] or " ".join(str(out / f) for f in entry["files"]),
                      file=sys.stderr if entry["error"] else sys.stdout)
    kept = {r.key: old.get(r.key) if old.get(r.key, {}).get("files") == r.files else _entry(r) for r in done}
    order = list(dict.fromkeys(r.key for r in requests))
    by_key = {r.key: r for r in requests}
    entries = [finished.get(k) or kept.get(k) or _entry(by_key[k]) for k in order]
    _write_manifest(manifest, entries)
    return entries
