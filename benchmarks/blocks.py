"""One function per benchmarked block: each builds the same inputs for altdiff and diffusers and returns the
`compare` result. `alt` is an altdiff Pipeline, `ref` a diffusers AltDiffusionPipeline over the same files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from altdiff.fast_unet import compiled
from altdiff.samplers import get_sampler
from altdiff.schedules import make_schedule
from tests.tiny import CORPUS

from .measure import Result, compare, max_abs_diff, sync

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


def _compile_diffusers(ref, s: Settings) -> None:
    """diffusers' UNet compiled, kept as `ref.compiled_unet`. On CUDA as diffusers' docs advise (mode
    reduce-overhead: CUDA graphs; fullgraph); on the CPU with the very inductor freezing altdiff uses
    (`fast_unet.compiled`): reduce-overhead has no graphs to record there and is slower than eager, and
    freezing is what makes compiled code pay on the CPU. It compiles on its first call."""
    if not hasattr(ref, "compiled_unet"):
        ref.compiled_unet = _compile_diffusers_unet(ref, s)


def _compile_diffusers_unet(ref, s: Settings):
    """A compiled callable of diffusers' UNet as it is now (with a package's patch, if any): see
    `_compile_diffusers`."""
    if s.device.type == "cpu":
        return compiled(ref.unet.forward, s.device)
    return torch.compile(ref.unet, mode="reduce-overhead", fullgraph=True)


@contextmanager
def _diffusers_compiled(ref, s: Settings, fast=None) -> Iterator[None]:
    """diffusers' pipeline calling its compiled UNet (`fast`, default `ref.compiled_unet`): on the CPU the
    compiled forward is set on the module (as altdiff's CompiledForward is) and a forward a package had set
    there (deepcache's) is put back afterwards; on CUDA the compiled module replaces it."""
    fast = ref.compiled_unet if fast is None else fast
    if s.device.type == "cpu":
        patched = ref.unet.__dict__.get("forward")
        ref.unet.forward = fast
        try:
            yield
        finally:
            if patched is None:
                del ref.unet.forward
            else:
                ref.unet.forward = patched
    else:
        eager, ref.unet = ref.unet, fast
        try:
            yield
        finally:
            ref.unet = eager


def _diffusers_unet_call(unet, x, t, context):
    # The arguments diffusers' pipeline passes, so the UNet row's compiled code serves the pipeline too.
    return unet(x, t, encoder_hidden_states=context, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=False)[0]


def _first_calls(runs: dict[str, Callable[[], object]], s: Settings) -> dict[str, float]:
    """Run each once, timed (for a compiled run: its compilation)."""
    seconds = {}
    with torch.inference_mode():
        for lib, fn in runs.items():
            sync(s.device)
            start = time.perf_counter()
            fn()
            sync(s.device)
            seconds[lib] = time.perf_counter() - start
    return seconds


def _four_way(name: str, shape: str, runs: dict[str, Callable[[], object]], s: Settings,
              error: Callable[[object, object], float]) -> list[Result]:
    """`runs` holds altdiff and diffusers, each compiled and eager. One first call each (compiling, or warming
    up), then `s.repeats` rounds of all four interleaved, so every ratio comes from the same rounds, under
    the same machine load. Rows: compiled against compiled, altdiff compiled against diffusers eager, and
    eager against eager."""
    outputs: dict[str, object] = {}

    def kept(key: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            outputs[key] = fn()
            return outputs[key]
        return run
    runs = {key: kept(key, fn) for key, fn in runs.items()}
    first = _first_calls(runs, s)
    rounds = compare(name, shape, runs, s.device, s.repeats, warmup=0, error=None)

    def pair(block: str, a: str, b: str) -> Result:
        return Result(block, shape, {"altdiff": rounds.times[a], "diffusers": rounds.times[b]},
                      {"altdiff": rounds.memory[a], "diffusers": rounds.memory[b]}, error(outputs[a], outputs[b]))
    rows = [pair(f"{name}, compiled", "altdiff compiled", "diffusers compiled"),
            pair(f"{name}, altdiff compiled vs diffusers eager", "altdiff compiled", "diffusers eager"),
            pair(f"{name}, eager (same rounds)", "altdiff eager", "diffusers eager")]
    gain = {lib: rounds.median(f"{lib} eager") / rounds.median(f"{lib} compiled") for lib in ("altdiff", "diffusers")}
    rows[0].note = (f"first call (compiles) altdiff {first['altdiff compiled']:.0f} s, diffusers "
                    f"{first['diffusers compiled']:.0f} s; over own eager: altdiff {gain['altdiff']:.2f}x, "
                    f"diffusers {gain['diffusers']:.2f}x")
    return rows


def unet_compiled(alt, ref, s: Settings) -> list[Result]:
    """The UNet step with altdiff's compile=True against diffusers' compiled UNet, and both eager, in the
    same rounds. Opt-in: a minute or more of compilation per library."""
    x, t, context = _unet_inputs(alt, s)
    _compile_diffusers(ref, s)
    alt.compile = True
    try:
        fast = alt.unet_runner()
        runs = {"altdiff compiled": lambda: fast(x, t, context),
                "diffusers compiled": lambda: _diffusers_unet_call(ref.compiled_unet, x, t, context).clone(),
                "altdiff eager": lambda: alt.unet(x, t, context),
                "diffusers eager": lambda: _diffusers_unet_call(ref.unet, x, t, context)}
        return _four_way("UNet step", f"batch 2 (CFG), {tuple(x.shape)}", runs, s, max_abs_diff)
    finally:
        alt.compile = False


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


def _e2e(alt, ref, size: int, steps: int, images: int = 1, **altdiff_only):
    common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, height=size,
                  width=size, output_type="np", num_images_per_prompt=images)
    return {"altdiff": lambda: alt.generate(PROMPT, seed=0, progress=False, **common, **altdiff_only).images,
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


def _unet_calls(module: torch.nn.Module, run: Callable[[], object]) -> int:
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def webui_family(alt, ref, s: Settings) -> list[Result]:
    """The webui family's cost per step: DPM++ 2M Karras end to end in each family of altdiff against
    diffusers' DPMSolverMultistepScheduler with Karras sigmas in the same rounds, with each run's UNet calls
    (cond and uncond batched in one call in all three)."""
    from diffusers import DPMSolverMultistepScheduler

    saved = ref.scheduler
    ref.scheduler = DPMSolverMultistepScheduler.from_config(saved.config, use_karras_sigmas=True)
    common = dict(num_inference_steps=s.steps, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, height=s.size,
                  width=s.size, output_type="np")
    runs = {"webui": lambda: alt.generate(PROMPT, seed=0, progress=False, sampler="DPM++ 2M", **common).images,
            "diffusers family": lambda: alt.generate(PROMPT, seed=0, progress=False, sampler="dpmpp_2m_karras",
                                                     **common).images,
            "diffusers": lambda: ref(PROMPT, generator=torch.Generator().manual_seed(0), **common).images}
    try:
        calls = {name: _unet_calls(alt.unet if name != "diffusers" else ref.unet, run) for name, run in runs.items()}
        shape = f"t2i {s.size}x{s.size}, {s.steps} steps, DPM++ 2M Karras"
        rows = []
        for family in ("webui", "diffusers family"):
            row = compare(f"e2e, altdiff {family} family".replace("family family", "family"), shape,
                          {"altdiff": runs[family], "diffusers": runs["diffusers"]}, s.device, s.repeats)
            row.note = f"UNet calls: altdiff {calls[family]}, diffusers {calls['diffusers']}"
            if family == "webui":
                row.error = None  # another recipe (the webui's sigmas, noise, conversion): not a parity figure
            rows.append(row)
    finally:
        ref.scheduler = saved
    return rows


def token_merging(alt, ref, s: Settings) -> list[Result]:
    """ToMe at ratio 0.5 as the webui applies it (tomesd: use_rand off, attention only): altdiff's
    `token_merging_ratio` against diffusers patched by tomesd 0.1.3, then both without it, end to end at
    `--size` (the issue's row: 512)."""
    import tomesd

    shape = f"t2i {s.size}x{s.size}, {s.steps} steps"
    tomesd.apply_patch(ref, ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    try:
        merged = compare("e2e, ToMe 0.5 (diffusers + tomesd)", shape,
                         _e2e(alt, ref, s.size, s.steps, token_merging_ratio=0.5), s.device, s.repeats,
                         error=_uint8_error)
    finally:
        tomesd.remove_patch(ref)
    plain = compare("e2e, no ToMe", shape, _e2e(alt, ref, s.size, s.steps), s.device, s.repeats,
                    error=_uint8_error)
    merged.note = (f"altdiff without ToMe {plain.median('altdiff'):.2f} s: "
                   f"{plain.median('altdiff') / merged.median('altdiff'):.2f}x faster with it")
    return [merged, plain]


def deep_cache(alt, ref, s: Settings) -> Result:
    """DeepCache at interval 3, branch 0: altdiff's enable_deepcache against diffusers with the deepcache
    package's DeepCacheSDHelper, end to end (the issue's row: 512², 50 PNDM steps on CUDA)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    alt.enable_deepcache(cache_interval=3, cache_branch_id=0)
    try:
        return compare("e2e, DeepCache 3 (diffusers + deepcache)", f"t2i {s.size}x{s.size}, {s.steps} steps",
                       _e2e(alt, ref, s.size, s.steps), s.device, s.repeats, error=_uint8_error)
    finally:
        helper.disable()
        alt.disable_deepcache()


def _with_compile(alt, run: Callable[[], object], compile: bool) -> Callable[[], object]:
    """`run` with altdiff's compile switch set first (it applies from the next generation)."""
    def call():
        alt.compile = compile
        return run()
    return call


def _knob_compiled(name: str, alt, ref, s: Settings, **altdiff_only) -> list[Result]:
    """A speed knob (already on in both pipelines) with altdiff's compile=True against diffusers + the knob's
    package with its patched UNet compiled as `_compile_diffusers` does, and both eager, in the same rounds.
    When diffusers with the package does not compile, altdiff compiled is set against diffusers + package
    eager alone."""
    common = _e2e(alt, ref, s.size, s.steps, **altdiff_only)
    shape = f"t2i {s.size}x{s.size}, {s.steps} steps"
    fast = _compile_diffusers_unet(ref, s)  # the package's patched UNet, not a cached plain one

    def ref_compiled():
        with _diffusers_compiled(ref, s, fast):
            return common["diffusers"]()
    runs = {"altdiff compiled": _with_compile(alt, common["altdiff"], True), "diffusers compiled": ref_compiled,
            "altdiff eager": _with_compile(alt, common["altdiff"], False), "diffusers eager": common["diffusers"]}
    try:
        return _four_way(name, shape, runs, s, _uint8_error)
    except Exception as e:  # noqa: BLE001 (the package's patch may not trace; the row says so)
        row = compare(f"{name}, altdiff compiled vs diffusers eager", shape, {"altdiff": runs["altdiff compiled"],
                      "diffusers": runs["diffusers eager"]}, s.device, s.repeats, error=_uint8_error)
        reason = " ".join(str(e).split())[:60]  # one line: it goes into a table cell
        row.note = f"diffusers + package does not compile ({type(e).__name__}: {reason})"
        return [row]
    finally:
        alt.compile = False


def tome_compiled(alt, ref, s: Settings) -> list[Result]:
    """ToMe 0.5 (the webui's tomesd settings) under compile: see `_knob_compiled` (opt-in)."""
    import tomesd

    tomesd.apply_patch(ref, ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    try:
        return _knob_compiled("e2e, ToMe 0.5", alt, ref, s, token_merging_ratio=0.5)
    finally:
        tomesd.remove_patch(ref)


def deepcache_compiled(alt, ref, s: Settings) -> list[Result]:
    """DeepCache interval 3, branch 0 under compile (a full and a cached step: two compiled specialisations
    each side): see `_knob_compiled` (opt-in)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    alt.enable_deepcache(cache_interval=3, cache_branch_id=0)
    try:
        return _knob_compiled("e2e, DeepCache 3", alt, ref, s)
    finally:
        helper.disable()
        alt.disable_deepcache()


def end_to_end_compiled(alt, ref, s: Settings) -> list[Result]:
    """End to end with altdiff's compile=True (UNet, text encoder, VAE decoder, safety checker) against
    diffusers with its UNet compiled (`_compile_diffusers`), and both eager, in the same rounds (opt-in)."""
    _compile_diffusers(ref, s)
    common = _e2e(alt, ref, s.size, s.steps)

    def ref_compiled():
        with _diffusers_compiled(ref, s):
            return common["diffusers"]()
    runs = {"altdiff compiled": _with_compile(alt, common["altdiff"], True), "diffusers compiled": ref_compiled,
            "altdiff eager": _with_compile(alt, common["altdiff"], False), "diffusers eager": common["diffusers"]}
    try:
        return _four_way("end to end", f"t2i {s.size}x{s.size}, {s.steps} steps, CFG {GUIDANCE}", runs, s,
                         _uint8_error)
    finally:
        alt.compile = False


def throughput(alt, ref, s: Settings) -> Result:
    """Images per second at batch 8: one generate() call making 8 images of one prompt (one UNet batch of
    16 with CFG), as `altdiff --batch-size 8` and `num_images_per_prompt=8` in diffusers."""
    runs = _e2e(alt, ref, s.size, s.steps, images=8)
    return compare("throughput, batch 8", f"t2i {s.size}x{s.size}, {s.steps} steps, 8 images per call", runs,
                   s.device, s.repeats, error=_uint8_error, unit_count=8, unit="images")


def _weights(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def offload(alt, ref, s: Settings) -> list[Result]:
    """CUDA: model and sequential CPU offload against diffusers' same modes, with the no-offload run of the
    same block for reference. Memory is the peak a generation reaches with its weights: nothing of an
    offloaded pipeline stays on the GPU between calls, and for the no-offload row the resident weights are
    added. Leaves diffusers' pipeline offloaded (sequential offload moves its weights to the meta device), so
    it runs last."""
    shape = f"t2i {s.size}x{s.size}, {s.steps} steps, CFG {GUIDANCE}"
    repeats = min(s.repeats, 2)  # sequential offload is slow; its peak does not vary
    plain = compare("end to end, no offload", shape, _e2e(alt, ref, s.size, s.steps), s.device, repeats,
                    error=_uint8_error)
    for lib, pipe in (("altdiff", alt), ("diffusers", ref)):
        plain.memory[lib] += _weights(pipe.text_encoder, pipe.unet, pipe.vae, pipe.safety_checker)
    plain.note = "peak incl. resident weights"
    rows = [plain]
    try:
        for mode, method in (("model", "enable_model_cpu_offload"), ("sequential", "enable_sequential_cpu_offload")):
            getattr(alt, method)(device=s.device)
            getattr(ref, method)(device=s.device)
            row = compare(f"end to end, {mode} offload", shape, _e2e(alt, ref, s.size, s.steps), s.device, repeats,
                          error=_uint8_error)
            row.note = f"altdiff {row.median('altdiff') / plain.median('altdiff'):.2f}x its no-offload time"
            rows.append(row)
    finally:
        alt.remove_all_hooks()
        alt.to(s.device)
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
    "webui_family": webui_family, "tome": token_merging, "deepcache": deep_cache,
    "tome_compiled": tome_compiled, "deepcache_compiled": deepcache_compiled,
    "e2e_tiled": end_to_end_tiled, "e2e_compiled": end_to_end_compiled, "throughput": throughput,
    "offload": offload,  # last: it leaves diffusers' pipeline offloaded
}
