"""The results table (markdown, as pasted into benchmarks/README.md) and its JSON form."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path

import psutil
import torch

from .measure import Result


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f} MB"


def _time(r: Result, lib: str) -> str:
    t = r.median(lib)
    if t is None:
        return ""
    if r.unit_count:
        rate = r.unit_count / t
        return f"{rate:,.0f} {r.unit}/s" if rate >= 100 else f"{rate:,.3g} {r.unit}/s"
    return f"{t * 1e3:,.1f} ms" if t < 1 else f"{t:,.2f} s"


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        env["device"] = f"{_cpu_name()}, {psutil.cpu_count()} cores"
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: list[Result], header: dict) -> str:
    lines = [", ".join(f"{k} {v}" for k, v in header.items()), "",
             "| block | shape | altdiff | diffusers | diffusers/altdiff | altdiff peak mem | diffusers peak mem "
             "| max abs diff | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio else ""
        error = "" if r.error is None else f"{r.error:.2g}"
        lines.append(f"| {r.block} | {r.shape} | {_time(r, 'altdiff')} | {_time(r, 'diffusers')} | {ratio} | "
                     f"{_mb(r.memory.get('altdiff'))} | {_mb(r.memory.get('diffusers'))} | {error} | {r.note} |")
    return "\n".join(lines)


def write_json(path: str | Path, results: list[Result], header: dict) -> None:
    rows = [dict(dataclasses.asdict(r), median={lib: r.median(lib) for lib in r.times}, ratio=r.ratio)
            for r in results]
    Path(path).write_text(json.dumps({"settings": header, "results": rows}, indent=1, ensure_ascii=False),
                          encoding="utf-8")
