"""`python -m benchmarks`: altdiff against diffusers 0.35.2, block by block, on the same full-size weights.

    python -m benchmarks [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--size 512] [--blocks unet e2e ...]
                         [--json out.json] [--folder DIR | --workdir DIR [--vocab-size N]]

Without --folder, a random-weight AltDiffusion-m9-sized pipeline is built once by diffusers and cached under
--workdir. CPU defaults are scaled down to finish in minutes on 2 cores (256², 5 steps, tiled decode 384² in
256² tiles, 3 repeats); CUDA defaults are the real workload (512², 50 steps, tiled 1024² in 512² tiles).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from altdiff.pipeline import parse_device, parse_dtype

from . import blocks
from .measure import Result
from .model import DEFAULT_WORKDIR, REAL_VOCAB, build_folder, load_altdiff, load_diffusers
from .report import environment, table, write_json

LIBS = ("altdiff", "diffusers")
ALL_BLOCKS = ("load", *blocks.BLOCKS)
# Minutes of compilation; a large image; 8 images per call; offload (CUDA only, last: it leaves diffusers'
# pipeline offloaded).
OPT_IN = ("unet_compiled", "e2e_compiled", "e2e_tiled", "throughput", "tome", "deepcache", "tome_compiled",
          "deepcache_compiled", "offload")
CUDA_ONLY = ("offload",)
MEMORY_BLOCKS = ("offload",)  # built with the real 250,002-row vocabulary unless --vocab-size says otherwise
DEFAULT_BLOCKS = tuple(b for b in ALL_BLOCKS if b not in OPT_IN)
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--size", type=int, default=None, help="image side (default 512 CUDA, 256 CPU)")
    p.add_argument("--steps", type=int, default=None, help="end-to-end steps (default 50 CUDA, 5 CPU)")
    p.add_argument("--tiled-size", type=int, default=None, help="tiled decode side (default 1024 CUDA, 384 CPU)")
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default 512 CUDA, 256 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per library (default 5 CUDA, 3 CPU)")
    p.add_argument("--blocks", nargs="+", default=list(DEFAULT_BLOCKS), choices=ALL_BLOCKS, metavar="BLOCK",
                   help=f"any of {', '.join(ALL_BLOCKS)} (default: all but {', '.join(OPT_IN)})")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--folder", type=Path, default=None, help="an existing diffusers-layout AltDiffusion folder")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache for the built random model")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="text encoder vocabulary of the built model (default: the small tokenizer's, or the real "
                        f"{REAL_VOCAB} when a memory block ({', '.join(MEMORY_BLOCKS)}) runs)")
    args = p.parse_args(argv)
    try:
        args.device = parse_device(args.device)
    except ValueError as e:
        p.error(str(e))
    cuda = args.device.type == "cuda"
    for name, on_cuda, on_cpu in (("size", 512, 256), ("steps", 50, 5), ("tiled_size", 1024, 384),
                                  ("tile", 512, 256), ("repeats", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
        elif getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int")
    args.dtype = parse_dtype(args.dtype, args.device)
    if args.vocab_size is None and set(args.blocks) & set(MEMORY_BLOCKS):
        args.vocab_size = REAL_VOCAB  # memory is what these rows are for: the embedding table is 0.5 GB of it
    if not cuda and set(args.blocks) & set(CUDA_ONLY):
        p.error(f"--blocks {' '.join(sorted(set(args.blocks) & set(CUDA_ONLY)))}: CUDA only (weights are "
                "offloaded to the CPU)")
    return args


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def load_rows(folder: Path, args: argparse.Namespace, with_e2e: bool) -> list[Result]:
    """Load time and peak memory in a fresh process per library and repeat, alternating libraries; the first
    round also runs one generation (its peak memory is what a user's process reaches)."""
    load = Result("load", "safetensors → ready pipeline, fresh process", {lib: [] for lib in LIBS},
                  {lib: 0 for lib in LIBS}, note="page cache warm")
    first = Result("first e2e, fresh process", f"t2i {args.size}², {args.steps} steps; peak incl. weights",
                   {lib: [] for lib in LIBS}, {lib: 0 for lib in LIBS})
    to_image = Result("load → first image, fresh process", "the two rows above, one after the other",
                      {lib: [] for lib in LIBS}, {lib: 0 for lib in LIBS})
    for r in range(args.repeats):
        for lib in LIBS if r % 2 == 0 else LIBS[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.load_probe", lib, str(folder), str(args.device),
                   dtype_name(args.dtype)] + ([str(args.size), str(args.steps)] if with_e2e and r == 0 else [])
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"load probe for {lib} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            load.times[lib].append(out["load_s"])
            load.memory[lib] = max(load.memory[lib], out["load_peak"])
            if "e2e_s" in out:
                first.times[lib].append(out["e2e_s"])
                first.memory[lib] = max(first.memory[lib], out["e2e_peak"])
                to_image.times[lib].append(out["load_s"] + out["e2e_s"])
                to_image.memory[lib] = first.memory[lib]
    return [load, first, to_image] if with_e2e else [load]


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    folder = args.folder or build_folder(args.workdir, args.vocab_size)
    settings = blocks.Settings(args.device, args.dtype, args.size, args.steps, args.tiled_size, args.tile,
                               args.repeats)
    header = dict(environment(args.device), dtype=dtype_name(args.dtype), size=args.size, steps=args.steps,
                  repeats=args.repeats, model=str(folder))
    results = load_rows(folder, args, "e2e" in args.blocks) if "load" in args.blocks else []
    todo = [name for name in blocks.BLOCKS if name in args.blocks]
    if todo:
        alt = load_altdiff(folder, args.device, args.dtype)
        ref = load_diffusers(folder, args.device, args.dtype)
        for name in todo:
            rows = blocks.BLOCKS[name](alt, ref, settings)
            rows = rows if isinstance(rows, list) else [rows]
            results += rows
            for line in table(rows, {}).splitlines()[-len(rows):]:
                print(line, file=sys.stderr, flush=True)
            if args.json:  # after every block: a run cut short still leaves its numbers
                write_json(args.json, results, header)
    print(table(results, header))
    if args.json:
        write_json(args.json, results, header)
    return results


if __name__ == "__main__":
    main()
