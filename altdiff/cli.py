"""The `altdiff` console script and all its subcommands: `altdiff "prompt" -o out.png` (PNGs carrying
AUTOMATIC1111 infotext), `altdiff batch` (altdiff.batch) and `altdiff serve` (altdiff.serve)."""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

from . import checks
from .images import open_image, save_png
from .infotext import SAMPLER_LABELS, image_infotext


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --no-safety-checker, --compile, --no-cuda-graphs, --medvram / --lowvram (`offload`):
    how a model is loaded, for `altdiff` and `altdiff batch`."""
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    p.add_argument("--no-safety-checker", action="store_true", help="skip the NSFW checker")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet, text encoder, VAE decoder and safety checker: minutes per image size "
                        "the first time, then faster images")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the UNet eagerly on CUDA instead of replaying a recorded CUDA graph per image size")
    vram = p.add_mutually_exclusive_group()
    vram.add_argument("--medvram", dest="offload", action="store_const", const="model",
                      help="keep each model in CPU memory until its turn (GPUs with ~4-6 GB; a little slower)")
    vram.add_argument("--lowvram", dest="offload", action="store_const", const="sequential",
                      help="bring each layer to the GPU only for its own call (under ~3 GB; much slower)")


def add_network_options(p: argparse.ArgumentParser) -> None:
    """--lora-dir and --embeddings-dir, for `altdiff` and `altdiff batch`."""
    p.add_argument("--lora-dir", default=None,
                   help="folder where <lora:NAME:w> prompt tags find NAME (with --a1111-prompts / a1111_prompts)")
    p.add_argument("--embeddings-dir", default=None,
                   help="folder of textual-inversion embeddings, each used where a prompt names its file stem")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="altdiff", description="Multilingual text-to-image with AltDiffusion.",
                                epilog="Many prompts: altdiff batch requests.jsonl --out DIR (altdiff batch -h). "
                                "A web API and page: altdiff serve (altdiff serve -h).")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt, in any of the model's languages (optional with --infotext)")
    p.add_argument("-n", "--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (recorded in the PNG)")
    p.add_argument("--sampler", default=None,
                   help="a webui sampler name (\"Euler a\", \"DPM++ 2M Karras\", ...; default DPM++ 2M): the webui "
                        "family, the webui's image for the infotext written; or a diffusers-family name, one of "
                        f"{', '.join(sorted(SAMPLER_LABELS))}: diffusers' image")
    p.add_argument("--scheduler", default=None, help="webui family: the schedule type (Karras, Exponential, ...)")
    p.add_argument("--rng", default=None, choices=("GPU", "CPU", "NV"), help="webui family: the noise source")
    p.add_argument("--ensd", type=int, default=0, help="webui family: eta noise seed delta (e.g. 31337)")
    p.add_argument("--infotext", default=None, metavar="TEXT|PNG",
                   help="remake a webui infotext (a PNG carrying one, or the text): its values fill every option "
                        "left at its default")
    p.add_argument("-W", "--width", type=int, default=None)
    p.add_argument("-H", "--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (one UNet batch)")
    p.add_argument("--batch-count", type=int, default=1, help="number of batches")
    p.add_argument("-i", "--init-image", default=None, help="img2img: the starting image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image")
    webui = p.add_argument_group("the webui's inpainting and hires fix (webui family)")
    webui.add_argument("--mask", default=None, metavar="PNG",
                       help="inpaint --init-image where the mask is white, at -W x -H (default: the image's size)")
    webui.add_argument("--mask-blur", type=int, default=4)
    webui.add_argument("--inpainting-fill", type=int, default=1, choices=range(4), metavar="{0,1,2,3}",
                       help="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    webui.add_argument("--only-masked", type=int, default=None, metavar="PADDING",
                       help="inpaint only the masked area (plus PADDING pixels) at full size, pasted back")
    webui.add_argument("--mask-invert", action="store_true", help="inpaint where the mask is black")
    webui.add_argument("--hr-scale", type=float, default=None, help="hires fix: upscale by this factor")
    webui.add_argument("--hr-upscaler", default="Latent",
                       help="hires fix: Latent, Latent (bicubic), ..., None, Lanczos or Nearest")
    webui.add_argument("--hr-steps", type=int, default=0, help="hires fix: second-pass steps (0: --steps)")
    webui.add_argument("--hr-denoise", type=float, default=0.7, help="hires fix: denoising strength")
    p.add_argument("--token-merging-ratio", type=float, default=None, metavar="R",
                   help="merge this share of the tokens before self-attention (ToMe, the webui's setting; e.g. 0.5)")
    p.add_argument("--model", default=None, help="hub repo id or diffusers folder (default BAAI/AltDiffusion-m9)")
    add_runtime_options(p)
    p.add_argument("-o", "--output", default="out-%d.png",
                   help="output path; %%d is replaced by the next free number (never overwrites)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing file without %%d")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--a1111-prompts", action="store_true",
                   help="read prompts as the AUTOMATIC1111 webui: (word:1.2) emphasis, BREAK, no 75-token limit, "
                        "<lora:NAME:w> tags")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA / LoHa / LoKr file at SCALE (default 1); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="load a textual-inversion embedding; its file name without extension is its prompt word; "
                        "repeatable")
    add_network_options(p)
    return p


def lora_option(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` of --lora (a Windows drive colon is part of FILE)."""
    path, sep, scale = spec.rpartition(":")
    try:
        return (Path(path), float(scale)) if sep and path else (Path(spec), 1.0)
    except ValueError:
        return Path(spec), 1.0


def output_paths(pattern: str, count: int, overwrite: bool = False) -> list[Path]:
    """`count` paths from `pattern`: with %d, the next free numbers; without, the name itself (or name-1,
    name-2, ... for several images). Existing files are never replaced unless `overwrite`."""
    if "%d" in pattern:
        paths, n = [], 0
        while len(paths) < count:
            path = Path(pattern.replace("%d", str(n), 1))
            if not path.exists():
                paths.append(path)
            n += 1
        return paths
    base = Path(pattern)
    paths = [base] if count == 1 else [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(count)]
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise ValueError(f"output: {', '.join(taken)} already exists (use %d in -o for numbering, or --overwrite)")
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise ValueError(f"output: {', '.join(folders)} is a folder; name the image file (e.g. {base}/out-%d.png)")
    return paths


def _check_args(args: argparse.Namespace) -> None:
    if args.prompt is None and args.infotext is None:
        raise ValueError("prompt: give a prompt (or --infotext to remake one)")
    if args.mask is not None and args.init_image is None:
        raise ValueError("--mask: inpainting needs --init-image, the picture the mask applies to")
    if args.hr_scale is not None and args.init_image is not None:
        raise ValueError("--hr-scale: the hires fix is txt2img's second pass; drop --init-image")
    if args.sampler is not None and args.sampler not in SAMPLER_LABELS:
        from .webui_sampling import resolve
        resolve(args.sampler, args.scheduler)  # a ValueError naming the sampler or schedule type
    for name in ("steps", "batch_size", "batch_count"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.seed != -1:  # -1: random
        checks.seed("--seed", args.seed, args.batch_size * args.batch_count)
    for name, files in (("--lora", [lora_option(s)[0] for s in args.lora]), ("--embedding", args.embedding)):
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"{name}: file not found: {', '.join(missing)}")


def os_error(e: OSError) -> str:
    """A failed read or write as one line: the file and the system's reason."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}"


def reported(prog: str, run: Callable[[], int]) -> int:
    """`run()`'s exit status, or a one-line error instead of a traceback: 2 for a bad argument, 1 for a failed
    read or write."""
    try:
        return run()
    except (ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: error: {os_error(e)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["batch"]:  # `altdiff -- batch` still makes an image of the word "batch"
        return batch_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)

    def make() -> int:
        _check_args(args)
        paths = output_paths(args.output, args.batch_size * args.batch_count, args.overwrite)
        for folder in dict.fromkeys(p.parent for p in paths):
            checks.writable("-o/--output", folder)
        init = open_image(args.init_image) if args.init_image else None
        mask = open_image(args.mask) if args.mask else None
        return _run(args, paths, init, mask)
    return reported("altdiff", make)


def _webui_options(args: argparse.Namespace, mask) -> dict:
    """generate()'s inpainting and hires-fix arguments from the CLI's webui options."""
    from .hires import HiresOptions
    from .inpaint import InpaintOptions

    options = {}
    if mask is not None:
        options.update(mask_image=mask, inpaint_options=InpaintOptions(
            mask_blur_x=args.mask_blur, mask_blur_y=args.mask_blur, inpainting_fill=args.inpainting_fill,
            inpaint_full_res=args.only_masked is not None, inpaint_full_res_padding=args.only_masked or 0,
            inpainting_mask_invert=args.mask_invert))
    if args.hr_scale is not None:
        options["hires"] = HiresOptions(hr_scale=args.hr_scale, hr_upscaler=args.hr_upscaler,
                                        hr_second_pass_steps=args.hr_steps, denoising_strength=args.hr_denoise)
    return options


def _run(args: argparse.Namespace, paths: list[Path], init, mask=None) -> int:
    from .generate import generate
    from .pipeline import DEFAULT_MODEL, load
    from .schedules import sampler_for_config
    from .webui_sampling import DEFAULT_SAMPLER

    model = args.model or DEFAULT_MODEL
    pipe = load(model, device=args.device, dtype=args.dtype, safety_checker=not args.no_safety_checker,
                compile=args.compile, cuda_graphs=not args.no_cuda_graphs, offload=args.offload)
    extra = _load_networks(pipe, args)
    if args.infotext is not None:  # the infotext's values; the prompt, when given, replaces its prompt
        result = generate(args.prompt, model=pipe, infotext=args.infotext, progress=not args.quiet,
                          token_merging_ratio=args.token_merging_ratio,
                          lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir)
        for img, text, path in zip(result.images, result.infotexts, paths):
            print(save_png(img, path, text))
        return 0
    webui_options = _webui_options(args, mask)
    # The webui family by default: the PNG's infotext is one the webui remakes into the same image. Adapters
    # loaded into the pipeline (--lora, --embedding) are not prompt tags the webui would apply, so those runs
    # keep the diffusers family and the model's own scheduler unless a webui sampler is named.
    pipeline_adapters = (args.lora or args.embedding) and not webui_options
    sampler = args.sampler or (sampler_for_config(pipe.scheduler_config) if pipeline_adapters else DEFAULT_SAMPLER)
    seed = random.randrange(2**32) if args.seed == -1 else args.seed
    written = iter(paths)
    for b in range(args.batch_count):
        # One generator per image (seed, seed+1, ...): each image can be remade alone from its own seed.
        seeds = [seed + b * args.batch_size + j for j in range(args.batch_size)]
        webui = dict(scheduler=args.scheduler, rng=args.rng, eta_noise_seed_delta=args.ensd)
        result = generate(args.prompt, model=pipe, negative_prompt=args.negative_prompt,
                          num_inference_steps=args.steps, guidance_scale=args.cfg_scale,
                          height=None if init and not mask else args.height,
                          width=None if init and not mask else args.width,
                          num_images_per_prompt=args.batch_size, seed=seeds, sampler=sampler, image=init,
                          strength=args.strength, progress=not args.quiet, a1111_prompts=args.a1111_prompts,
                          lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, **webui_options,
                          token_merging_ratio=args.token_merging_ratio,
                          **{k: v for k, v in webui.items() if v})
        if result.infotexts:  # the webui family writes the webui's own infotext, which the webui remakes
            for img, text in zip(result.images, result.infotexts):
                print(save_png(img, next(written), text))
            continue
        fields = {k: ", ".join(v for v in (extra.get(k), result.infotext.get(k)) if v)
                  for k in ("Lora hashes", "TI hashes")}
        for j, img in enumerate(result.images):
            nsfw = bool(result.nsfw_content_detected and result.nsfw_content_detected[j])
            text = image_infotext(img, args.prompt, args.negative_prompt, steps=args.steps, sampler=sampler,
                                  cfg_scale=args.cfg_scale, seed=seeds[j], model=model,
                                  strength=args.strength if init is not None else None, nsfw=nsfw,
                                  extra={k: v for k, v in fields.items() if v})
            print(save_png(img, next(written), text))
    return 0


def _load_networks(pipe, args: argparse.Namespace) -> dict[str, str]:
    """Load --lora and --embedding files; the infotext fields naming them (embeddings: where a prompt uses
    them, as the webui records them)."""
    from .networks import hashes_field, lora_hash
    from .textual_inversion import embedding_hash, mentioned

    loras = {}
    for spec in args.lora:
        path, scale = lora_option(spec)
        pipe.load_lora_weights(path, weight=scale)
        loras[path.stem] = path
    embeddings = {}
    texts = [args.prompt, args.negative_prompt or ""]
    for file in map(Path, args.embedding):
        pipe.load_textual_inversion(file, token=file.stem)
        if mentioned(file.stem, texts):
            embeddings[file.stem] = file
    fields = {"Lora hashes": hashes_field(loras, lora_hash), "TI hashes": hashes_field(embeddings, embedding_hash)}
    return {k: v for k, v in fields.items() if v}



def build_batch_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="altdiff batch", description="Run a JSONL file of generate() requests; "
                                "reruns skip requests whose images exist.")
    p.add_argument("requests", help="JSONL file, one JSON object of generate() arguments per line")
    p.add_argument("--out", required=True, help="folder for the PNGs and manifest.jsonl")
    p.add_argument("--model", default=None, help="model for requests that name none "
                   f"(default {DEFAULT_MODEL})")
    add_runtime_options(p)
    add_network_options(p)
    p.add_argument("--batch-size", type=int, default=1,
                   help="requests per UNet batch when only prompt, negative prompt and seed differ (images may "
                        "then differ from single runs by one uint8 level)")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (the cluster in RAY_ADDRESS, or local)")
    p.add_argument("--concurrency", type=int, default=1, help="--ray: number of workers, one pipeline each")
    p.add_argument("--num-gpus-per-worker", type=float, default=None,
                   help="--ray: GPUs per worker (default: 1 when the cluster has GPUs, else 0 for CPU workers)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def batch_main(argv: list[str] | None = None) -> int:
    from . import batch

    args = build_batch_parser().parse_args(argv)

    def run() -> int:
        entries = batch.run(args.requests, args.out, model=args.model, device=args.device, dtype=args.dtype,
                            safety_checker=not args.no_safety_checker, compile=args.compile,
                            cuda_graphs=not args.no_cuda_graphs, offload=args.offload, batch_size=args.batch_size,
                            use_ray=args.ray, concurrency=args.concurrency, num_gpus_per_worker=args.num_gpus_per_worker,
                            verbose=not args.quiet, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir)
        failed = [e for e in entries if e["error"]]
        print(f"altdiff batch: {len(entries) - len(failed)} requests done, {len(failed)} failed "
              f"(see {Path(args.out) / batch.MANIFEST})", file=sys.stderr)
        return 1 if failed else 0
    return reported("altdiff batch", run)


def build_serve_parser() -> argparse.ArgumentParser:
    from .webui import Limits

    limits = Limits()
    p = argparse.ArgumentParser(prog="altdiff serve", description="The AUTOMATIC1111 webui's /sdapi/v1 API and a "
                                "web page at http://HOST:PORT/.")
    p.add_argument("--model", action="append", default=[], help="hub repo id, diffusers folder or single file; "
                   "repeat for several (the first is loaded at start; default BAAI/AltDiffusion-m9)")
    p.add_argument("--models-dir", default=None, help="more models: diffusers folders and .safetensors/.ckpt files")
    add_network_options(p)
    p.add_argument("--outdir", default=None, help="where requests with save_images write their PNGs")
    p.add_argument("--styles-file", default=None, help="the webui's styles.csv (name, prompt, negative_prompt): "
                   "the styles a request's `styles` names")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP basic auth on every route, page included")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting behind the running one; more get 503")
    p.add_argument("--max-pixels", type=int, default=limits.max_pixels, help="width x height limit per image")
    p.add_argument("--max-steps", type=int, default=limits.max_steps)
    p.add_argument("--max-batch-size", type=int, default=limits.max_batch_size)
    p.add_argument("--max-n-iter", type=int, default=limits.max_n_iter, help="limit on a request's batch count")
    add_runtime_options(p)
    p.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas (the cluster in RAY_ADDRESS, "
                   "or a local one)")
    p.add_argument("--replicas", type=int, default=1, help="--ray: number of replicas, one pipeline each")
    p.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="--ray: default 1 when the Ray cluster has GPUs, else 0")
    return p


def serve_main(argv: list[str] | None = None) -> int:
    args = build_serve_parser().parse_args(argv)
    try:
        from . import serve
        from .offload import execution_device
        from .webui import Limits
    except ImportError as e:
        print(f"altdiff serve: error: {e.name} is not installed (pip install 'altdiff[serve]')", file=sys.stderr)
        return 2

    def run() -> int:
        if args.offload is not None:  # before any model, so the error names the flag, not --model
            execution_device(args.device, None, "--medvram/--lowvram")
        for name in ("port", "max_queue", "max_pixels", "max_steps", "max_batch_size", "max_n_iter", "replicas"):
            if getattr(args, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"--{name.replace('_', '-')}: must be >= {0 if name == 'max_queue' else 1}, "
                                 f"got {getattr(args, name)}")
        config = serve.ServeConfig(
            models=args.model, models_dir=args.models_dir, lora_dir=args.lora_dir,
            embeddings_dir=args.embeddings_dir, styles_file=args.styles_file, outdir=args.outdir,
            device=args.device, dtype=args.dtype,
            safety_checker=not args.no_safety_checker, compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
            offload=args.offload, api_auth=args.api_auth, max_queue=args.max_queue,
            limits=Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch_size=args.max_batch_size,
                          max_n_iter=args.max_n_iter))
        if args.ray:
            serve.run_ray(config, args.host, args.port, args.replicas, args.num_gpus_per_replica)
        else:
            serve.run(config, args.host, args.port)
        return 0
    return reported("altdiff serve", run)

if __name__ == "__main__":
    sys.exit(main())
