"""The UNet as generate() runs it: on CUDA each input shape is recorded once as a CUDA graph and replayed
every step (the same kernels as eager, so the same bits, without ~1,500 kernel launches from Python per step:
2.7x faster per step on an H200); with `compile=True` the UNet is also `torch.compile`d first (a minute of
compilation per shape, then 1.7x faster again on the H200; on the CPU, with inductor freezing, 1.4x faster
than eager).

A graph bakes in every pointer and Python-side switch it saw at capture, and on the CPU freezing folds the
weights in as constants. So a `FastUNet` is only valid for the weights, device, dtype, FreeU and
attention-slicing settings it was built with: `Pipeline.unet_runner()` compares `state_key(unet)` before
each generation and rebuilds when anything moved (a `.to()`, `fuse_lora`, `enable_freeu`). Unfused LoRA
adapters act through forward hooks that read run-time scales, so while any is active the plain UNet runs
instead.

`compile=True` also compiles the text encoder's transformer, the VAE decoder and the safety checker's vision
tower (`CompiledForward`, installed on those modules so every caller gets it). They are called once or twice
per image, so they are compiled without CUDA graphs.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import attention
from .unet import UNet

MAX_GRAPHS = 4  # input shapes kept recorded; each holds its activations (~130 MB at 512² fp16, batch 2)


# Compile failures that fall back to eager: dynamo's own, and its recompile limit under fullgraph (not a
# TorchDynamoException).
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", None) or config.cache_size_limit


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    """What makes dynamo (dynamic=False) specialise again: the arguments' structure, tensor shapes, dtypes,
    devices and Python values."""
    def one(x):
        return (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)[:200]
    leaves, spec = tree_flatten((args, kwargs))
    return str(spec), tuple(one(x) for x in leaves)


def compiled(forward, device: torch.device):
    """`torch.compile` of a module's bound forward for `device`, one specialisation per input shape; the
    module's own hooks stay outside the compiled code. On the CPU with inductor freezing: weights become
    constants, prepacked for oneDNN (CPU UNet step 1.4x; without it the compiled UNet is slower than eager).
    Freezing is an inductor config read at compile time, so it is set around the calls
    (`torch.compile(options=...)` did not apply it). Dynamo keeps compiled code per code object across
    torch.compile calls, and a frozen one holds the weights it saw: it is dropped first, or a rebuild after
    an in-place weight change (fuse_lora) would reuse the old weights. fullgraph: no graph break, so no
    resumed-frame code that the reset would miss.

    The one compile-cache policy for every compiled part: the first shapes (up to dynamo's recompile limit,
    8 by default) are compiled and kept; a call with a further shape runs eager, so size, batch, clip skip
    and chunk count never hit the limit (which under fullgraph raises)."""
    fn = torch.compile(forward, dynamic=False, fullgraph=True)
    if device.type == "cpu":
        torch._dynamo.reset_code(forward.__code__)
    shapes: set[tuple] = set()

    def call(*args, variant=None, **kwargs):
        # variant: Python-side state the traced code also specialises on (DeepCache's step kind)
        key = (_shape_key(args, kwargs), variant)
        if key not in shapes:
            if len(shapes) >= _recompile_limit():
                return forward(*args, **kwargs)
            shapes.add(key)
        if device.type != "cpu":
            return fn(*args, **kwargs)
        with torch._inductor.config.patch(freezing=True):
            return fn(*args, **kwargs)
    return call


class CaptureError(RuntimeError):
    """The UNet could not be recorded as a CUDA graph."""


def state_key(module: nn.Module) -> tuple:
    """What a recorded or compiled module depends on: each parameter's storage and in-place version, FreeU,
    token merging and DeepCache (the UNet's) and attention slicing."""
    params = tuple((p.data_ptr(), p._version, p.dtype) for p in module.parameters())
    freeu = getattr(module, "freeu", None)
    cache = getattr(module, "deepcache", None)
    deepcache = (cache.cache_interval, cache.cache_branch_id) if cache is not None else None
    return (params, tuple(sorted(freeu.items())) if freeu else None, getattr(module, "token_merging", None),
            deepcache, attention._slice_size)


def _warn_fallback(what: str, e: Exception) -> None:
    # A missing C++/CUDA toolchain or an op that cannot be compiled or captured must not cost the user the image.
    warnings.warn(f"{what}: {type(e).__name__}: {str(e)[:500]}; running the plain {what.split()[-1]}",
                  RuntimeWarning, stacklevel=3)


class FastUNet:
    """Call like `UNet.forward`; returns a fresh tensor each call (never a graph's reused output buffer,
    which the next replay would overwrite). `cross_attention_kwargs` is checked, and has nothing to act on:
    the LoRA scale it carries matters only while LoRA hooks run, and then the plain UNet runs instead."""

    def __init__(self, unet: UNet, compile: bool, cuda_graphs: bool):
        self.unet, self.compile, self.cuda_graphs = unet, compile, cuda_graphs
        self.key = state_key(unet)
        # Compiled code holds no hooks (the forward); recorded eager calls keep them (the module).
        self.forward = unet.forward if compile else unet
        step = self._deepcache_step if unet.deepcache is not None else self.forward
        # Compiled: every latent size (and DeepCache step kind) gets its own specialised code, as CUDA graphs
        # need anyway.
        self.fn = compiled(step, unet.device) if compile else step
        # (inputs' structure, their shapes, DeepCache mode) -> (graph, its input tensors, its output)
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    @property
    def deepcache(self):
        return self.unet.deepcache

    def _deepcache_step(self, *inputs, store: dict | None = None):
        """One UNet call under DeepCache with its features as an argument and a result, so recorded and
        compiled graphs carry them: a full step (no `store`) returns (output, the features it kept), a cached
        step reads `store`."""
        cache = self.unet.deepcache
        cache.store = {} if store is None else store
        out = self.forward(*inputs)
        return (out, cache.store) if store is None else out

    def _run(self, args: tuple, kwargs: dict, mode):
        return self.fn(*args, variant=mode, **kwargs) if self.compile else self.fn(*args, **kwargs)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None,
                 cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        # Bad input gets the plain UNet's errors, not a tracing or capture failure.
        self.unet._check_inputs(sample, timestep, encoder_hidden_states, timestep_cond,
                                cross_attention_kwargs)
        if self.failed:
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs)
        timestep = torch.as_tensor(timestep, device=sample.device)
        inputs = [sample, timestep, encoder_hidden_states.to(sample.dtype)]
        if timestep_cond is not None:
            inputs.append(timestep_cond.to(sample.dtype))
        cache = self.unet.deepcache
        mode = cache.mode() if cache is not None else None  # (full step, slot): another graph each
        kwargs = {"store": cache.kept[mode[1]]} if mode is not None and not mode[0] else {}
        try:
            if not (self.cuda_graphs and sample.is_cuda):
                result = self._run(tuple(inputs), kwargs, mode)
            else:
                result = self._replay(inputs, kwargs, mode)
        except (*COMPILE_ERRORS, CaptureError) as e:
            _warn_fallback("fast UNet", e)
            self.failed = True
            self.graphs.clear()
            if mode is not None and mode[0]:  # the eager call fills the slot's store, not one a failed try made
                cache.store = cache.kept[mode[1]] = {}
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs)
        if mode is not None and mode[0]:
            result, cache.kept[mode[1]] = result
        return result

    def _replay(self, inputs: list[torch.Tensor], kwargs: dict, mode):
        """Replay the graph recorded for these shapes and mode (recording it first); its outputs cloned, never
        the graph's own buffers, which the next replay overwrites."""
        leaves, spec = tree_flatten((inputs, kwargs))
        key = (spec, tuple((tuple(x.shape), x.dtype) for x in leaves), mode)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                del self.graphs[next(iter(self.graphs))]  # the oldest; frees its memory pool
            self.graphs[key] = self._capture(leaves, spec, mode)
        graph, static_leaves, static_out = self.graphs[key]
        for static, x in zip(static_leaves, leaves):
            static.copy_(x)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _capture(self, leaves: list[torch.Tensor], spec, mode):
        """Warm up (compiling, choosing kernels) on a side stream as torch.cuda.graphs requires, then record
        one call."""
        static_leaves = [x.clone() for x in leaves]

        def call():
            args, kwargs = tree_unflatten(static_leaves, spec)
            return self._run(tuple(args), kwargs, mode)
        stream = torch.cuda.Stream(device=leaves[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: another thread's CUDA work (a second pipeline, a data loader) cannot break it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = call()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise CaptureError(str(e)) from e
        return graph, static_leaves, static_out


class CompiledForward:
    """Set as `module.forward` (on the instance: every caller gets it) by `set_compiled`. Rebuilt when what
    `state_key` covers changes; eager while hooks act inside the module (unfused LoRA, sequential offload),
    which compiled code would not run."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.eager = type(module).forward.__get__(module)
        self.key, self.fn, self.failed = None, None, False

    def __call__(self, *args, **kwargs):
        module = self.module
        if self.failed or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module):
            return self.eager(*args, **kwargs)
        key = state_key(module)
        if key != self.key:
            self.fn, self.key = compiled(self.eager, next(module.parameters()).device), key
        try:
            return self.fn(*args, **kwargs)
        except COMPILE_ERRORS as e:
            _warn_fallback(f"compiled {type(module).__name__}", e)
            self.failed = True
            return self.eager(*args, **kwargs)


def set_compiled(modules: list[nn.Module], on: bool) -> None:
    """Install (`on`) or remove the compiled forward of each module. A removed one is kept aside with its
    compiled code, so switching `compile` back on does not compile again."""
    for module in modules:
        installed = isinstance(module.__dict__.get("forward"), CompiledForward)
        if on and not installed:
            module.forward = module.__dict__.pop("_compiled_forward", None) or CompiledForward(module)
        elif not on and installed:
            module._compiled_forward = module.__dict__.pop("forward")
