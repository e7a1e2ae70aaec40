"""One function per benchmarked block: each builds the same inputs for altdiff and diffusers and returns the
`compare` result. `alt` is an altdiff Pipeline, `ref` a diffusers AltDiffusionPipeline over the same files."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from altdiff.samplers import get_sampler
from altdiff.schedules import make_schedule
from tests.tiny import CORPUS

from .measure import Result, compare, sync

PROMPT = "一只戴着帽子的猫, highly detailed oil painting"
NEGATIVE = "low quality"
GUIDANCE = 7.5
SAMPLER_STEPS = 50


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    size: int  # image side for UNet / VAE / end to end
    steps: int  # end-to-end sampler steps
    tiled_size: int  # image side for the tiled VAE decode
    tile: int  # tile side (pixels) for the tiled VAE decode
    repeats: int

    def latents(self, pipe, batch: int, size: int | None = None, seed: int = 0) -> torch.Tensor:
        side = (size or self.size) // pipe.vae_scale_factor
        g = torch.Generator().manual_seed(seed)
        shape = (batch, pipe.unet.config.in_channels, side, side)
        return torch.randn(shape, generator=g).to(self.device, self.dtype)


def tokenizer(alt, ref, s: Settings) -> Result:
    prompts = [line for line in CORPUS.splitlines() if line] * 4
    runs = {"altdiff": lambda: alt.tokenizer(prompts, padding="max_length", max_length=77,
                                             truncation=True)["input_ids"],
            "diffusers": lambda: ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                               return_tensors="pt").input_ids}
    return compare("tokenizer", f"{len(prompts)} prompts, pad 77", runs, s.device, s.repeats,
                   unit_count=len(prompts))


def text_encoder(alt, ref, s: Settings) -> Result:
    def embeds(pipe):
        return lambda: torch.cat(pipe.encode_prompt(PROMPT, s.device, 1, True, NEGATIVE))

    return compare("text encoder", "encode_prompt, CFG (2x77)", {"altdiff": embeds(alt), "diffusers": embeds(ref)},
                   s.device, s.repeats)


def _unet_inputs(alt, s: Settings):
    x = s.latents(alt, 2)
    context = torch.randn(2, 77, alt.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor(500, device=s.device), context.to(s.device, s.dtype)


def unet(alt, ref, s: Settings) -> Result:
    x, t, context = _unet_inputs(alt, s)
    runs = {"altdiff": lambda: alt.unet(x, t, context),
            "diffusers": lambda: ref.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]}
    return compare("UNet step", f"batch 2 (CFG), {tuple(x.shape)}", runs, s.device, s.repeats)


def _compiled(alt, ref):
    """altdiff's `compile=True` UNet, and diffusers' UNet as its docs compile it (mode reduce-overhead,
    fullgraph: CUDA graphs on CUDA). Each compiles on its first call; diffusers' is kept for later blocks,
    altdiff's while nothing switches the pipeline back (the caller sets `alt.compile = False` when done)."""
    if not hasattr(ref, "compiled_unet"):
        ref.compiled_unet = torch.compile(ref.unet, mode="reduce-overhead", fullgraph=True)
    alt.compile = True
    return alt.unet_runner(), ref.compiled_unet


def _first_calls(runs: dict[str, Callable[[], object]], s: Settings) -> str:
    """Run each once (compiling), timed: the note of a compiled row."""
    seconds = {}
    with torch.inference_mode():
        for lib, fn in runs.items():
            sync(s.device)
            start = time.perf_counter()
            fn()
            sync(s.device)
            seconds[lib] = time.perf_counter() - start
    return "first call (compiles) " + ", ".join(f"{lib} {t:.0f} s" for lib, t in seconds.items())


def unet_compiled(alt, ref, s: Settings) -> Result:
    """The UNet step with altdiff's compile=True against diffusers' compiled UNet. Opt-in: a minute or more
    of compilation per library."""
    x, t, context = _unet_inputs(alt, s)
    alt_unet, ref_unet = _compiled(alt, ref)
    try:
        runs = {"altdiff": lambda: alt_unet(x, t, context),
                "diffusers": lambda: ref_unet(x, t, encoder_hidden_states=context,
                                              return_dict=False)[0].clone()}
        note = _first_calls(runs, s)
        result = compare("UNet step, compiled", f"batch 2 (CFG), {tuple(x.shape)}", runs, s.device, s.repeats)
    finally:
        alt.compile = False
    result.note = note
    return result


def unet_variants(alt, ref, s: Settings) -> list[Result]:
    """altdiff's UNet step other ways, each against diffusers eager: channels_last weights and activations,
    and (CUDA) replayed as a CUDA graph, as generate() runs it (the `unet` row is the plain eager call)."""
    from altdiff.fast_unet import FastUNet

    x, t, context = _unet_inputs(alt, s)
    ref_run = lambda: ref.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]  # noqa: E731
    rows = []
    alt.unet.to(memory_format=torch.channels_last)
    try:
        x_cl = x.to(memory_format=torch.channels_last)
        rows.append(compare("UNet step, channels_last", f"batch 2 (CFG), {tuple(x.shape)}",
                            {"altdiff": lambda: alt.unet(x_cl, t, context), "diffusers": ref_run},
                            s.device, s.repeats))
    finally:
        alt.unet.to(memory_format=torch.contiguous_format)
    if s.device.type == "cuda":
        graphed = FastUNet(alt.unet, compile=False, cuda_graphs=True)  # what generate() runs on CUDA
        rows.append(compare("UNet step, CUDA graph replay", f"batch 2 (CFG), {tuple(x.shape)}",
                            {"altdiff": lambda: graphed(x, t, context), "diffusers": ref_run},
                            s.device, s.repeats))
    return rows


def vae_decode(alt, ref, s: Settings) -> Result:
    z = s.latents(alt, 1)
    runs = {"altdiff": lambda: alt.vae.decode(z), "diffusers": lambda: ref.vae.decode(z, return_dict=False)[0]}
    return compare("VAE decode", f"{s.size}x{s.size}", runs, s.device, s.repeats)


def vae_encode(alt, ref, s: Settings) -> Result:
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(1, 3, s.size, s.size, generator=g) * 2 - 1).to(s.device, s.dtype)
    runs = {"altdiff": lambda: alt.vae.encode(image).mean,
            "diffusers": lambda: ref.vae.encode(image).latent_dist.mean}
    return compare("VAE encode", f"{s.size}x{s.size}", runs, s.device, s.repeats)


def vae_tiled_decode(alt, ref, s: Settings) -> Result:
    z = s.latents(alt, 1, size=s.tiled_size)
    factor = alt.vae_scale_factor
    alt.vae.enable_tiling(tile_sample_min_size=s.tile)
    ref.vae.enable_tiling()
    ref.vae.tile_sample_min_size, ref.vae.tile_latent_min_size = s.tile, s.tile // factor
    try:
        runs = {"altdiff": lambda: alt.vae.decode(z),
                "diffusers": lambda: ref.vae.decode(z, return_dict=False)[0]}
        return compare("VAE tiled decode", f"{s.tiled_size}x{s.tiled_size}, tiles {s.tile}", runs, s.device,
                       s.repeats)
    finally:
        alt.vae.disable_tiling()
        ref.vae.disable_tiling()
        config = ref.vae.config
        ref.vae.tile_sample_min_size = config.sample_size
        ref.vae.tile_latent_min_size = int(config.sample_size / 2 ** (len(config.block_out_channels) - 1))


def safety(alt, ref, s: Settings) -> Result:
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(1, 3, s.size, s.size, generator=g) * 2 - 1).to(s.device, s.dtype)
    runs = {"altdiff": lambda: alt.safety_checker.check(image / 2 + 0.5),
            "diffusers": lambda: ref.run_safety_checker(image, s.device, s.dtype)[1]}
    return compare("safety checker", f"1 image {s.size}x{s.size}", runs, s.device, s.repeats,
                   error=lambda a, b: float(a != b))


def sampler(alt, ref, s: Settings) -> Result:
    """The sampler's own cost: a model that returns a fixed prediction, so only the update arithmetic and
    the schedule set-up are timed (PNDM, 50 steps = 51 model calls)."""
    from diffusers import PNDMScheduler

    x0 = s.latents(alt, 1)
    eps = s.latents(alt, 1, seed=4)
    sample_pndm = get_sampler("pndm")

    def run_alt():
        schedule = make_schedule("pndm", alt.scheduler_config, SAMPLER_STEPS, device=s.device)
        return sample_pndm(lambda x, t: eps, x0, schedule)

    def run_ref():
        scheduler = PNDMScheduler.from_config(ref.scheduler.config)
        scheduler.set_timesteps(SAMPLER_STEPS, device=s.device)
        x = x0
        for t in scheduler.timesteps:
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x

    result = compare("sampler overhead", f"PNDM {SAMPLER_STEPS} steps, {tuple(x0.shape)}",
                     {"altdiff": run_alt, "diffusers": run_ref}, s.device, s.repeats)
    result.note = "whole loop; per step = / 51"
    return result


def _e2e(alt, ref, size: int, steps: int):
    common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, height=size,
                  width=size, output_type="np")
    return {"altdiff": lambda: alt.generate(PROMPT, seed=0, progress=False, **common).images,
            "diffusers": lambda: ref(PROMPT, generator=torch.Generator().manual_seed(0), **common).images}


def _uint8_error(a, b) -> float:
    return 255 * float(abs(a - b).max())  # in uint8 levels, as the images would be saved


def _resident(s: Settings) -> str:
    if s.device.type != "cuda":
        return ""
    return f"weights resident {torch.cuda.memory_allocated(s.device) / 2**20:,.0f} MB"


def end_to_end(alt, ref, s: Settings) -> list[Result]:
    """Defaults against defaults; on CUDA also altdiff with cuda_graphs=False (every kernel launched from
    Python, as diffusers does)."""
    shape = f"t2i {s.size}x{s.size}, {s.steps} steps, CFG {GUIDANCE}"
    rows = [compare("end to end", shape, _e2e(alt, ref, s.size, s.steps), s.device, s.repeats,
                    error=_uint8_error)]
    rows[0].note = _resident(s)
    if s.device.type == "cuda":
        alt.cuda_graphs = False
        try:
            rows.append(compare("end to end, altdiff without CUDA graphs", shape,
                                _e2e(alt, ref, s.size, s.steps), s.device, s.repeats, error=_uint8_error))
        finally:
            alt.cuda_graphs = True
    return rows


def end_to_end_compiled(alt, ref, s: Settings) -> list[Result]:
    """End to end with altdiff's compile=True against diffusers with its compiled UNet, then against
    diffusers as it comes (eager) (opt-in)."""
    shape = f"t2i {s.size}x{s.size}, {s.steps} steps, CFG {GUIDANCE}"
    _compiled(alt, ref)
    eager_unet, ref.unet = ref.unet, ref.compiled_unet
    try:
        runs = _e2e(alt, ref, s.size, s.steps)
        note = _first_calls(runs, s)
        rows = [compare("end to end, compiled", shape, runs, s.device, s.repeats, error=_uint8_error)]
        ref.unet = eager_unet
        rows.append(compare("end to end, altdiff compiled vs diffusers eager", shape,
                            _e2e(alt, ref, s.size, s.steps), s.device, s.repeats, error=_uint8_error))
    finally:
        ref.unet, alt.compile = eager_unet, False
    rows[0].note = note
    return rows


def end_to_end_tiled(alt, ref, s: Settings) -> Result:
    """A large image with VAE tiling, for its peak memory: 2 steps (the peak does not grow with steps)."""
    alt.vae.enable_tiling()
    ref.vae.enable_tiling()
    try:
        result = compare("end to end, VAE tiling", f"t2i {s.tiled_size}x{s.tiled_size}, 2 steps",
                         _e2e(alt, ref, s.tiled_size, 2), s.device, 1, error=_uint8_error)
    finally:
        alt.vae.disable_tiling()
        ref.vae.disable_tiling()
    result.note = _resident(s)
    return result


# Every block; `python -m benchmarks` runs all but the opt-in ones (__main__.OPT_IN) unless told.
BLOCKS: dict[str, Callable[..., Result | list[Result]]] = {
    "tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "unet_variants": unet_variants,
    "unet_compiled": unet_compiled, "vae_decode": vae_decode, "vae_encode": vae_encode,
    "vae_tiled_decode": vae_tiled_decode, "safety": safety, "sampler": sampler, "e2e": end_to_end,
    "e2e_tiled": end_to_end_tiled, "e2e_compiled": end_to_end_compiled,
}
