"""Timing and peak-memory primitives: interleaved runs of two implementations, medians, memory deltas.

CUDA: every timing is bracketed by `torch.cuda.synchronize()`, memory is `max_memory_allocated()` above what
was allocated before the call (after `reset_peak_memory_stats()`). CPU: memory is the peak resident set size
above the RSS before the call, sampled every millisecond by a thread (freed heap is returned to the OS with
`malloc_trim` first, so one library's leftovers do not hide the other's growth).
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: skip trimming
    _libc = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """`with PeakMemory(device) as m: ...` → `m.peak`: bytes allocated (CUDA) or resident (CPU) at the peak of
    the block, above the level at its start."""

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            if _libc is not None:
                _libc.malloc_trim(0)
            self._process = psutil.Process()
            self._base = self._max = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._process.memory_info().rss)
            self.peak = self._max - self._base


@dataclass
class Result:
    """One row of the table. `times` are seconds per run; `unit_count` turns them into a rate (`unit`/s)
    when set. `error` is the max abs difference between the two implementations' outputs."""

    block: str
    shape: str
    times: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    error: float | None = None
    unit_count: int | None = None
    unit: str = "prompts"
    note: str = ""

    def median(self, lib: str) -> float | None:
        return statistics.median(self.times[lib]) if self.times.get(lib) else None

    @property
    def ratio(self) -> float | None:
        """diffusers' time / altdiff's time: above 1 means altdiff is faster."""
        alt, ref = self.median("altdiff"), self.median("diffusers")
        return ref / alt if alt and ref else None


def max_abs_diff(a, b) -> float:
    return (torch.as_tensor(a).double().cpu() - torch.as_tensor(b).double().cpu()).abs().max().item()


def compare(block: str, shape: str, runs: dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int = 1, error: Callable[[object, object], float] | None = max_abs_diff,
            unit_count: int | None = None, unit: str = "prompts") -> Result:
    """Run each implementation `warmup` times, then `repeats` timed rounds, alternating which one goes first
    each round so neither always runs on a warmer (or more contended) machine. Memory is the largest peak
    seen over the timed runs."""
    result = Result(block, shape, {lib: [] for lib in runs}, {lib: 0 for lib in runs}, unit_count=unit_count,
                    unit=unit)
    outputs = {}
    with torch.inference_mode():
        for fn in runs.values():
            for _ in range(warmup):
                fn()
        order = list(runs)
        for r in range(repeats):
            for lib in order if r % 2 == 0 else order[::-1]:
                with PeakMemory(device) as mem:
                    sync(device)
                    start = time.perf_counter()
                    outputs[lib] = runs[lib]()
                    sync(device)
                    result.times[lib].append(time.perf_counter() - start)
                result.memory[lib] = max(result.memory[lib], mem.peak)
    if error is not None and len(outputs) == 2:
        result.error = error(*outputs.values())
    return result
