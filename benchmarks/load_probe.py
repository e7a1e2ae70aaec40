"""`python -m benchmarks.load_probe LIB FOLDER DEVICE DTYPE [SIZE STEPS]`, run in a fresh process per library:
prints one JSON line with the load time from safetensors, the peak memory of loading and, when SIZE and STEPS
are given, the time and peak memory of one first end-to-end generation.

A fresh process is the only clean way to see a library's peak RSS: in the parent both libraries and their
allocator caches share one heap. Memory is `ru_maxrss` above the RSS after imports (CPU) or
`max_memory_allocated` (CUDA)."""

from __future__ import annotations

import json
import resource
import sys
import time

import psutil
import torch

from altdiff.pipeline import parse_dtype

from . import blocks
from .measure import sync
from .model import load_altdiff, load_diffusers


def peak(device: torch.device, base: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def main(argv: list[str]) -> dict:
    lib, folder, device = argv[0], argv[1], torch.device(argv[2])
    dtype = parse_dtype(argv[3], device)
    # Every import (diffusers resolves its classes lazily) happens before the baseline, whichever is measured.
    import diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series  # noqa: F401
    import diffusers.pipelines.stable_diffusion.safety_checker  # noqa: F401
    from diffusers import (  # noqa: F401
        AltDiffusionPipeline,
        AutoencoderKL,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, XLMRobertaTokenizer  # noqa: F401

    import altdiff  # noqa: F401

    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss
    start = time.perf_counter()
    pipe = (load_altdiff if lib == "altdiff" else load_diffusers)(folder, device, dtype)
    sync(device)
    out = {"load_s": time.perf_counter() - start, "load_peak": peak(device, base)}
    if len(argv) > 4:
        size, steps = int(argv[4]), int(argv[5])
        common = dict(num_inference_steps=steps, guidance_scale=blocks.GUIDANCE, negative_prompt=blocks.NEGATIVE,
                      height=size, width=size, output_type="np")
        start = time.perf_counter()
        with torch.inference_mode():
            if lib == "altdiff":
                pipe.generate(blocks.PROMPT, seed=0, progress=False, **common)
            else:
                pipe(blocks.PROMPT, generator=torch.Generator().manual_seed(0), **common)
        sync(device)
        out.update(e2e_s=time.perf_counter() - start, e2e_peak=peak(device, base))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
