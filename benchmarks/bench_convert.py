"""`python -m benchmarks.bench_convert [--tiny] [--dtype fp16|fp32] [--work DIR]`: conversion time and peak
memory of `weights_convert` on a random-weight AltDiffusion-m9 original single file built on the fly
(full size: UNet 860M, XLM-R large 560M, VAE 84M parameters; `--tiny`: the test-sized model, a smoke run).

Each measured step runs in a fresh process: its peak RSS (`ru_maxrss`) is its own. RSS counts the pages of the
memory-mapped input it has touched (clean, reclaimable file pages), so the anonymous peak (`RssAnon`, what the
converter itself allocates) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from altdiff.config import TextEncoderConfig, UNetConfig, VAEConfig
from altdiff.text_encoder import TextEncoder
from altdiff.unet import UNet
from altdiff.vae import AutoencoderKL

FULL = {
    "unet": UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "vae": VAEConfig(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=512),
    "text_encoder": TextEncoderConfig(),
}
TINY = {
    "unet": UNetConfig(sample_size=16, block_out_channels=[32, 64], cross_attention_dim=32, attention_head_dim=8,
                       down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    "vae": VAEConfig(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                     up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32),
    "text_encoder": TextEncoderConfig(vocab_size=302, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=37, max_position_embeddings=80, project_dim=32),
}
TINY_OPTIONS = {"image_size": 32, "text_encoder": {"num_attention_heads": 4}}
MODULES = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": TextEncoder}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}


def build_folder(folder: Path, configs: dict, dtype: torch.dtype) -> None:
    """A diffusers-layout folder of random weights (shapes from altdiff's modules built on meta), one
    component in memory at a time."""
    generator = torch.Generator().manual_seed(0)
    for component, cfg in configs.items():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in MODULES[component](cfg).state_dict().items()}
        state_dict = {k: (torch.randn(s, generator=generator) * 0.02).to(dtype) for k, s in shapes.items()}
        (folder / component).mkdir(parents=True)
        save_file(state_dict, folder / component / WEIGHT_FILES[component], metadata={"format": "pt"})
        (folder / component / "config.json").write_text(json.dumps(cfg.to_dict()))
        del state_dict


def measured(step: list[str]) -> dict:
    """Run `python -m benchmarks.bench_convert --step ...` in a fresh process; its JSON line."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_convert", "--step", *step],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def run_step(kind: str, src: str, out: str, options: str, tokenizer: str) -> None:
    """In the child: run one conversion, print time and memory as JSON."""
    from weights_convert import convert, to_original

    base_anon = _anon_kib()
    peak = {"anon": base_anon}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak["anon"] = max(peak["anon"], _anon_kib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    if kind == "to_original":
        to_original(src, out, progress=False)
    else:
        convert(src, out, tokenizer=tokenizer, safety_checker=None, config=json.loads(options), progress=False)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    print(json.dumps({"seconds": round(seconds, 2),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "peak_anon_mib": (peak["anon"] - base_anon) // 1024}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_convert")
    parser.add_argument("--tiny", action="store_true", help="the test-sized model (smoke run)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp32")
    parser.add_argument("--work", help="scratch folder (default: a temp dir)")
    parser.add_argument("--step", nargs=5, metavar=("KIND", "SRC", "OUT", "OPTIONS", "TOKENIZER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        run_step(*args.step)
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny  # the test fixtures' sentencepiece trainer: the converter needs a tokenizer that fits

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        dtype = torch.float16 if args.dtype == "fp16" else torch.float32
        start = time.perf_counter()
        build_folder(work / "diffusers", TINY if args.tiny else FULL, dtype)
        tokenizer = tiny.train_sentencepiece(work / "tokenizer").parent
        build_seconds = time.perf_counter() - start
        options = json.dumps(TINY_OPTIONS if args.tiny else {})
        original = work / "model.safetensors"
        results = {"model": "tiny" if args.tiny else "full-size m9", "dtype": args.dtype,
                   "build_seconds": round(build_seconds, 1),
                   "to_original": measured(["to_original", str(work / "diffusers"), str(original), options, "-"])}
        results["file_mib"] = original.stat().st_size // 2**20
        results["convert"] = measured(["convert", str(original), str(work / "out"), options, str(tokenizer)])
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
