"""The opt-in fast UNet (`load(..., compile=True)`): `torch.compile` with inductor freezing, and on CUDA one
CUDA graph per input shape, replayed each step.

Freezing folds the weights into the compiled code as constants, and a CUDA graph bakes in every pointer and
Python-side switch it saw at capture. So a `CompiledUNet` is only valid for the weights, device, dtype and
FreeU settings it was built with: `Pipeline.unet_runner()` compares `state_key(unet)` before each generation
and rebuilds when anything moved (a `.to()`, `fuse_lora`, `enable_freeu`). Unfused LoRA adapters act through
forward hooks that read run-time scales, so while any is active the plain UNet runs instead.
"""

from __future__ import annotations

import warnings

import torch

from .unet import UNet


class CaptureError(RuntimeError):
    """The compiled UNet could not be recorded as a CUDA graph."""


def state_key(unet: UNet) -> tuple:
    """What a compiled UNet depends on: each parameter's storage and in-place version, and FreeU."""
    params = tuple((p.data_ptr(), p._version, p.dtype) for p in unet.parameters())
    freeu = tuple(sorted(unet.freeu.items())) if unet.freeu else None
    return params, freeu


class CompiledUNet:
    """Call like `UNet.forward(sample, timestep, encoder_hidden_states, timestep_cond)`; returns a fresh
    tensor each call (never a graph's reused output buffer, which the next replay would overwrite)."""

    def __init__(self, unet: UNet):
        self.unet = unet
        self.key = state_key(unet)
        # dynamic=False: every latent size gets its own specialised graph, as CUDA graphs need anyway.
        self.fn = torch.compile(unet, dynamic=False, options={"freezing": True})
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.failed = False

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        # Bad input gets the plain UNet's errors, not a tracing failure.
        self.unet._check_inputs(sample, timestep, encoder_hidden_states, timestep_cond, None)
        if self.failed:
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond)
        timestep = torch.as_tensor(timestep, device=sample.device)
        inputs = [sample, timestep, encoder_hidden_states.to(sample.dtype)]
        if timestep_cond is not None:
            inputs.append(timestep_cond.to(sample.dtype))
        try:
            if sample.device.type != "cuda":
                return self.fn(*inputs)
            key = tuple((tuple(x.shape), x.dtype) for x in inputs)
            if key not in self.graphs:
                self.graphs[key] = self._capture(inputs)
        except (torch._dynamo.exc.TorchDynamoException, CaptureError) as e:
            # A missing C++/CUDA toolchain or an op that cannot be captured must not cost the user the image.
            warnings.warn(f"compile=True: compiling the UNet failed ({type(e).__name__}: {str(e)[:500]}); "
                          "running it uncompiled", RuntimeWarning, stacklevel=2)
            self.failed = True
            self.graphs.clear()
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond)
        graph, static_inputs, static_out = self.graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, inputs: list[torch.Tensor]):
        """Compile and warm up on a side stream (as torch.cuda.graphs requires), then capture one call."""
        static_inputs = [x.clone() for x in inputs]
        stream = torch.cuda.Stream(device=inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_inputs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise CaptureError(str(e)) from e
        return graph, static_inputs, static_out
