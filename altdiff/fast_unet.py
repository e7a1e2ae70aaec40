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
"""

from __future__ import annotations

import warnings

import torch

from . import attention
from .unet import UNet

MAX_GRAPHS = 4  # input shapes kept recorded; each holds its activations (~130 MB at 512² fp16, batch 2)


def _frozen(compiled):
    """Compile (and recompile) with inductor freezing: weights become constants, prepacked for oneDNN (CPU
    UNet step 1.4x; without it the compiled UNet is slower than eager). It is an inductor config read at
    compile time, so it must be set around the calls; `torch.compile(options=...)` did not apply it."""
    def run(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)
    return run


class CaptureError(RuntimeError):
    """The UNet could not be recorded as a CUDA graph."""


def state_key(unet: UNet) -> tuple:
    """What a recorded or compiled UNet depends on: each parameter's storage and in-place version, FreeU
    and attention slicing."""
    params = tuple((p.data_ptr(), p._version, p.dtype) for p in unet.parameters())
    freeu = tuple(sorted(unet.freeu.items())) if unet.freeu else None
    return params, freeu, attention._slice_size


class FastUNet:
    """Call like `UNet.forward`; returns a fresh tensor each call (never a graph's reused output buffer,
    which the next replay would overwrite). `cross_attention_kwargs` is checked, and has nothing to act on:
    the LoRA scale it carries matters only while LoRA hooks run, and then the plain UNet runs instead."""

    def __init__(self, unet: UNet, compile: bool, cuda_graphs: bool):
        self.unet, self.compile, self.cuda_graphs = unet, compile, cuda_graphs
        self.key = state_key(unet)
        self.fn = unet
        if compile:
            # dynamic=False: every latent size gets its own specialised code, as CUDA graphs need anyway.
            self.fn = torch.compile(unet, dynamic=False)
            if unet.device.type == "cpu":
                self.fn = _frozen(self.fn)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.failed = False

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
        try:
            if not (self.cuda_graphs and sample.is_cuda):
                return self.fn(*inputs)
            key = tuple((tuple(x.shape), x.dtype) for x in inputs)
            if key not in self.graphs:
                if len(self.graphs) >= MAX_GRAPHS:
                    del self.graphs[next(iter(self.graphs))]  # the oldest shape; frees its memory pool
                self.graphs[key] = self._capture(inputs)
        except (torch._dynamo.exc.TorchDynamoException, CaptureError) as e:
            # A missing C++/CUDA toolchain or an op that cannot be captured must not cost the user the image.
            warnings.warn(f"fast UNet: {type(e).__name__}: {str(e)[:500]}; running the plain UNet",
                          RuntimeWarning, stacklevel=2)
            self.failed = True
            self.graphs.clear()
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs)
        graph, static_inputs, static_out = self.graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, inputs: list[torch.Tensor]):
        """Warm up (compiling, choosing kernels) on a side stream as torch.cuda.graphs requires, then record
        one call."""
        static_inputs = [x.clone() for x in inputs]
        stream = torch.cuda.Stream(device=inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: another thread's CUDA work (a second pipeline, a data loader) cannot break it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.fn(*static_inputs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise CaptureError(str(e)) from e
        return graph, static_inputs, static_out
