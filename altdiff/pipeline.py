"""`Pipeline`: the loaded components plus their switches; `load()` that builds one from a source; and the public
`generate()`, which takes a Pipeline or a source string (loaded once, the last few kept) and runs
altdiff.generate's loop on it."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import lora as lora_adapters
from . import textual_inversion, tome
from .checks import DTYPES, parse_device, parse_dtype  # noqa: F401  (DTYPES: weights_convert imports it here)
from .config import ModelIndex, SchedulerConfig
from .deepcache import DeepCache
from .fast_unet import FastUNet, set_compiled, state_key
from .generate import ModelSource
from .generate import encode_prompt as _encode_prompt
from .generate import generate as _generate
from .hub import resolve
from .offload import MODES, Offload, execution_device, released
from .offload import enable as enable_offload
from .safety import SafetyChecker, safety_checker_reader
from .single_file import is_single_file, load_single_file
from .text_encoder import TextEncoder, load_text_encoder
from .tokenizer import Tokenizer
from .unet import UNet, load_unet
from .vae import AutoencoderKL, load_vae

DEFAULT_MODEL = "BAAI/AltDiffusion-m9"


class Later:
    """A component `load()` reads on first use: `Later(read)` given as a Pipeline field; `read(device, dtype)`
    runs on the first access of the attribute, with the pipeline's device and dtype at that time."""

    def __init__(self, read: Callable[[torch.device, torch.dtype], object]):
        self.read = read


class _ReadOnFirstUse:
    """The descriptor behind a field that may hold a `Later` (set on the class after @dataclass, so the
    field keeps its plain default and stays out of repr, which would otherwise read it)."""

    def __init__(self, name: str):
        self.name = "_" + name

    def __get__(self, pipe, owner=None):
        if pipe is None:
            return self
        value = pipe.__dict__[self.name]
        if isinstance(value, Later):
            with torch.inference_mode(False):  # read inside generate(): still ordinary, editable tensors
                value = pipe.__dict__[self.name] = value.read(pipe._storage_device, pipe.dtype)
        return value

    def __set__(self, pipe, value) -> None:
        pipe.__dict__[self.name] = value


@dataclass(eq=False)
class Pipeline:
    """Everything `generate()` needs. Build with `altdiff.load(...)`; call `.generate(...)`."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: AutoencoderKL
    scheduler_config: SchedulerConfig
    # Read from disk on first use when load() gave a `Later` (it is needed only once an image is decoded).
    safety_checker: SafetyChecker | None = field(default=None, repr=False)
    source: str = ""
    # One generate() at a time per Pipeline: the modules and their switches are shared state.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # LoRA / LoHa / LoKr adapters (hooks on the UNet and text encoder): altdiff.lora sets it (set_lora_state).
    _lora: lora_adapters.LoraState | None = field(default=None, repr=False, init=False)
    # How generate() runs the UNet (altdiff.fast_unet): recorded as CUDA graphs on CUDA, torch.compile'd
    # when asked. Built on first use, rebuilt when weights or switches change.
    compile: bool = False
    cuda_graphs: bool = True
    _fast_unet: FastUNet | None = field(default=None, repr=False)
    # diffusers' convention: a callback_on_step_end sets `pipe._interrupt = True` to end sampling after the
    # current step; generate() then decodes the latents it has. Cleared when generate() starts.
    _interrupt: bool = field(default=False, repr=False)
    # enable_model_cpu_offload / enable_sequential_cpu_offload: altdiff.offload sets it (set_offload).
    _offload: Offload | None = field(default=None, repr=False, init=False)

    @property
    def lora(self) -> lora_adapters.LoraState | None:
        return self._lora

    def set_lora_state(self, state: lora_adapters.LoraState | None) -> None:
        self._lora = state

    @property
    def offload(self) -> Offload | None:
        return self._offload

    def set_offload(self, offload: Offload | None) -> None:
        """Install (or with None, drop) the offload hooks' state; the UNet's recording no longer fits."""
        self._offload = offload
        self.invalidate_runner()

    def invalidate_runner(self) -> None:
        """Forget the recorded / compiled UNet (its recording points at weights that moved); the next
        unet_runner() builds one again."""
        self._fast_unet = None

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (under offload: the GPU, while the weights rest on the CPU)."""
        return self.offload.device if self.offload is not None else self._storage_device

    @property
    def _storage_device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Pipeline:
        """Move and/or cast every component. Under offload only `dtype` may change (the weights stay on the
        CPU); call `remove_all_hooks()` first to move them."""
        if self.offload is not None and device is not None:
            raise ValueError(f"device: the pipeline offloads to {self.offload.device}; call remove_all_hooks() "
                             "before moving it")
        device = parse_device(device) if device is not None else self._storage_device
        dtype = parse_dtype(dtype, self.device) if dtype is not None else self.dtype
        if self.offload is not None:
            self.offload.release()
        for module in (self.text_encoder, self.unet, self.vae, self.__dict__["_safety_checker"]):
            if isinstance(module, torch.nn.Module):  # a Later is read onto the device and dtype of that time
                module.to(device=device, dtype=dtype)
        if self.lora is not None:
            self.lora.release()  # adapter copies made for the old device or dtype
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Keep each component in CPU memory until its turn (text encoder, UNet for the whole loop, VAE,
        safety checker), as diffusers does (the webui's --medvram): the GPU holds one component at a time.
        Same images; CUDA graphs and compile=True stay on (the UNet is recorded again each generation)."""
        enable_offload(self, "model", execution_device(device, gpu_id, "enable_model_cpu_offload"))

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: str | torch.device | None = None) -> None:
        """Bring each module's weights to the GPU only for its own call (the webui's --lowvram): lowest
        memory, slowest. Same images; the UNet runs without CUDA graphs or compilation."""
        enable_offload(self, "sequential", execution_device(device, gpu_id, "enable_sequential_cpu_offload"))

    def remove_all_hooks(self) -> None:
        """Turn offload off; every component stays on the CPU (move the pipeline with `to()`)."""
        if self.offload is not None:
            self.offload.remove()
            self.set_offload(None)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around one generation (generate() holds the lock): the compiled forwards follow `compile`, and
        under offload every component goes back to the CPU afterwards."""
        checker = self.__dict__.get("_safety_checker")
        if self.compile:
            checker = self.safety_checker  # compile it for the first image too
        regions = [self.text_encoder.roberta.encoder, self.vae.decoder]
        set_compiled(regions + ([checker.vision_model] if isinstance(checker, SafetyChecker) else []),
                     self.compile)
        with released(self):
            yield

    def unet_runner(self):
        """What generate() calls each step: the plain UNet, or a FastUNet (CUDA graphs on CUDA, torch.compile
        with `compile`) for the current weights and switches. Unfused LoRA adapters (forward hooks) always
        run on the plain UNet."""
        lora = self.lora
        graphs = self.cuda_graphs and self.device.type == "cuda"
        lora_hooks = lora is not None and lora.enabled and set(lora.weights) - lora.fused
        sequential = self.offload is not None and self.offload.mode == "sequential"
        # sequential offload: every module call copies weights, nothing to record
        if not (self.compile or graphs) or lora_hooks or sequential:
            return self.unet
        if self.offload is not None:
            self.offload.load_unet()
        fast = self._fast_unet
        wanted = (state_key(self.unet), self.compile, graphs)
        if fast is None or (fast.key, fast.compile, fast.cuda_graphs) != wanted:
            self._fast_unet = FastUNet(self.unet, compile=self.compile, cuda_graphs=graphs)
        return self._fast_unet

    def generate(self, prompt=None, **kwargs):
        return _generate(prompt, model=self, **kwargs)

    __call__ = generate

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None,
                      clip_skip=None, *, a1111_prompts: bool = False):
        """diffusers' signature and return: (prompt_embeds, negative_prompt_embeds)."""
        with self.lock, self.running():  # running()'s exit releases offloaded weights: not under a generate()
            return _encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                 negative_prompt, prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip,
                                 a1111_prompts=a1111_prompts)

    @staticmethod
    def get_guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512,
                                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sinusoidal embedding of guidance scales (VDM), for UNets with `time_cond_proj_dim`."""
        if w.ndim != 1:
            raise ValueError(f"w: expected a 1-D tensor of guidance scales, got shape {tuple(w.shape)}")
        w = w * 1000.0
        half = embedding_dim // 2
        freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        emb = w.to(dtype)[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
        return torch.nn.functional.pad(emb, (0, embedding_dim % 2))

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        self.unet.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def enable_token_merging(self, ratio: float, max_downsample: int = 1, sx: int = 2, sy: int = 2) -> None:
        """ToMe (altdiff.tome) with tomesd.apply_patch's arguments; use_rand is always off, as in the webui."""
        tome.apply(self.unet, tome.TokenMerging(ratio, max_downsample, sx, sy))

    def disable_token_merging(self) -> None:
        tome.apply(self.unet, None)

    def enable_deepcache(self, cache_interval: int = 1, cache_branch_id: int = 0) -> None:
        """DeepCache (altdiff.deepcache) with deepcache's DeepCacheSDHelper.set_params arguments."""
        cache = DeepCache(cache_interval, cache_branch_id)
        if cache_branch_id // 3 >= len(self.unet.down_blocks):
            raise ValueError(f"cache_branch_id: {cache_branch_id} is in block {cache_branch_id // 3}; this UNet "
                             f"has {len(self.unet.down_blocks)} blocks (ids 0 to {3 * len(self.unet.down_blocks) - 1})")
        self.disable_deepcache()
        cache.attach(self.unet)

    def disable_deepcache(self) -> None:
        if self.unet.deepcache is not None:
            DeepCache.detach(self.unet)

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def load_lora_weights(self, path_or_repo: str | Path, adapter_name: str | None = None,
                          weight: float | dict = 1.0, strict: bool = True, weight_name: str | None = None) -> str:
        """Add an adapter file (LoRA, LoHa or LoKr; kohya/webui/LyCORIS or diffusers/PEFT names) as an active
        adapter with `weight` (a number, or {"unet": w, "text_encoder": w}); returns its name."""
        return lora_adapters.load_lora_weights(self, path_or_repo, adapter_name, weight, strict, weight_name)

    def save_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> Path:
        return lora_adapters.save_lora_weights(self, path, adapter_name)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        lora_adapters.set_adapters(self, adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        lora_adapters.fuse_lora(self, lora_scale)

    def unfuse_lora(self) -> None:
        lora_adapters.unfuse_lora(self)

    def enable_lora(self) -> None:
        lora_adapters.enable_lora(self, True)

    def disable_lora(self) -> None:
        lora_adapters.enable_lora(self, False)

    def unload_lora_weights(self) -> None:
        lora_adapters.unload_lora_weights(self)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds); returns the
        new tokens."""
        return textual_inversion.load_textual_inversion(self, path, token)


Pipeline.safety_checker = _ReadOnFirstUse("safety_checker")


def _pipeline_scheduler_config(config: SchedulerConfig) -> SchedulerConfig:
    """The scheduler config as diffusers' AltDiffusion pipelines fix it up at construction: steps_offset 1
    and no x0 clipping (outdated hub configs lack both; DDIM would otherwise default to clip_sample=True)."""
    config.steps_offset = 1
    config.clip_sample = False
    return config


def load(source: str | Path = DEFAULT_MODEL, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, variant: str | None = None,
         safety_checker: bool | str | Path | None = True, tokenizer: str | Path | None = None,
         config: dict | None = None, compile: bool = False, cuda_graphs: bool = True,
         offload: str | None = None) -> Pipeline:
    """Load a pipeline from a hub repo id, a diffusers-layout folder or an original single file
    (.safetensors/.ckpt). `device` defaults to CUDA when present, `dtype` to fp16 on CUDA and fp32 on CPU;
    `safety_checker=None`/False skips the checker (otherwise a folder's checker is read on first use). For
    a single file, `tokenizer` and `safety_checker` (a folder or hub repo id) fill what the file lacks
    (default: the BAAI repo of the detected m9/m18) and `config` sets what its shapes cannot tell (see
    `altdiff.single_file.Options`). On CUDA the UNet is recorded as a CUDA graph per image size and replayed
    (same results, faster; `cuda_graphs=False` turns it off); `compile=True` also runs it, the text encoder,
    VAE decoder and safety checker through torch.compile: about a minute per image size, then faster steps
    (see altdiff.fast_unet). `offload="model"` / `"sequential"` reads the weights into CPU memory and runs
    on the GPU `device` under `enable_model_cpu_offload()` / `enable_sequential_cpu_offload()`."""
    for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if offload is None:
        device = parse_device(device)
        dtype = parse_dtype(dtype, device)
    elif offload in MODES:
        run_on = execution_device(device, None, "offload")
        dtype, device = parse_dtype(dtype, run_on), torch.device("cpu")
    else:
        raise ValueError(f"offload: expected None, 'model' or 'sequential', got {offload!r}")
    pipe = _load(source, device, dtype, variant, safety_checker, tokenizer, config)
    pipe.compile, pipe.cuda_graphs = compile, cuda_graphs
    if offload is not None:
        enable_offload(pipe, offload, run_on)
    return pipe


def _load(source, device: torch.device, dtype: torch.dtype, variant, safety_checker, tokenizer,
          config) -> Pipeline:
    if is_single_file(source):
        parts = load_single_file(source, dtype=dtype, device=device, tokenizer=tokenizer,
                                 safety_checker=safety_checker, config=config)
        parts["scheduler_config"] = _pipeline_scheduler_config(parts["scheduler_config"])
        return Pipeline(**parts, source=str(source))
    if tokenizer is not None or config is not None:
        raise ValueError("tokenizer/config: only a single-file source takes them; a folder or hub repo carries "
                         "its own")
    want_checker = bool(safety_checker)
    folder = resolve(source, variant=variant, include_safety_checker=want_checker)
    index = ModelIndex.from_json(folder / "model_index.json") if (folder / "model_index.json").is_file() \
        else ModelIndex()
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if not (folder / part).is_dir():
            raise ValueError(f"model: {folder} has no {part}/ folder; expected a diffusers-layout AltDiffusion "
                             "pipeline folder")
    checker = None
    if want_checker and index.has("safety_checker") and (folder / "safety_checker").is_dir():
        # Checked now (configs, keys, shapes), read on first use: it is needed only once an image is decoded.
        checker = Later(safety_checker_reader(folder / "safety_checker", folder / "feature_extractor", variant))
    readers = {"unet": load_unet, "text_encoder": load_text_encoder, "vae": load_vae}
    if device.type == "cpu":
        # The UNet first: a dtype conversion briefly holds its mapped file and the converted copy, the largest
        # transient of the load; with nothing else resident yet, peak RSS drops (bf16 m9: 6.2 → 4.9 GB).
        parts = {name: read(folder / name, dtype=dtype, device=device, variant=variant)
                 for name, read in readers.items()}
    else:
        # One thread per component: one file pages in while another's tensors are copied to the GPU. "cuda"
        # is this thread's current GPU, made explicit (a new thread's current GPU is GPU 0).
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with ThreadPoolExecutor(len(readers)) as pool:
            futures = {name: pool.submit(read, folder / name, dtype=dtype, device=device, variant=variant)
                       for name, read in readers.items()}
        parts = {name: future.result() for name, future in futures.items()}
    return Pipeline(
        tokenizer=Tokenizer.from_folder(folder / "tokenizer"),
        **parts,
        scheduler_config=_pipeline_scheduler_config(
            SchedulerConfig.from_json(folder / "scheduler" / "scheduler_config.json")),
        safety_checker=checker,
        source=str(source),
    )


# generate(model="source") cache: the last MAX_LOADED sources, keyed on the resolved path (or the hub id);
# the lock makes two threads asking for one source share one load.
MAX_LOADED = 2
_loaded: OrderedDict[str, Pipeline] = OrderedDict()
_loaded_lock = threading.Lock()


def get_model(model: Pipeline | str | None) -> Pipeline:
    """A Pipeline as is; a source string (default BAAI/AltDiffusion-m9) loaded once and cached."""
    if isinstance(model, Pipeline):
        return model
    source = DEFAULT_MODEL if model is None else model
    if not isinstance(source, str):
        raise TypeError(f"model: expected an altdiff.Pipeline or a source string, got {type(model).__name__}")
    key = str(Path(source).resolve()) if Path(source).exists() else source.strip()
    with _loaded_lock:
        if key not in _loaded:
            _loaded[key] = load(source)
            while len(_loaded) > MAX_LOADED:
                _loaded.popitem(last=False)
        _loaded.move_to_end(key)
        return _loaded[key]


@functools.wraps(_generate)
def generate(prompt=None, *, model: Pipeline | str | None = None, **kwargs):
    if not (model is None or isinstance(model, (Pipeline, str))):
        raise TypeError(f"model: expected an altdiff.Pipeline or a source string, got {type(model).__name__}")
    # A source string is loaded once the loop has checked the other arguments.
    return _generate(prompt, model=model if isinstance(model, Pipeline) else ModelSource(
        functools.partial(get_model, model)), **kwargs)
