"""Weights kept in CPU memory and brought to the GPU only while they compute: diffusers'
`enable_model_cpu_offload` (one component at a time: text encoder, UNet, VAE, safety checker) and
`enable_sequential_cpu_offload` (one module's weights at a time), the webui's --medvram and --lowvram.

How: forward pre-hooks point each parameter's `.data` at a copy on the execution device, read from its CPU
tensor (pinned, so the copy does not hold up the host); offloading points `.data` back at the CPU tensor and
drops the copy. Nothing is copied back: inference does not change weights. The Parameter objects stay the
same, so LoRA hooks, the compiled-UNet state key and weight edits between generations (`fuse_lora`,
`load_textual_inversion`, `to(dtype=...)`) all act on the CPU tensor, which *is* the weight. Copies are
exact, so images are bit-identical to a pipeline without offload on the same device.

The hooks see every use of a weight because each module's forward touches only its own parameters and
reaches its children's by calling them (tests/test_offload.py checks this for the whole pipeline).
altdiff's modules hold no buffers, so only parameters move.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._pytree import tree_map

if TYPE_CHECKING:
    from .pipeline import Pipeline

MODES = ("model", "sequential")
COMPONENTS = ("text_encoder", "unet", "vae", "safety_checker")  # diffusers' model_cpu_offload_seq


def execution_device(device: str | torch.device | None, gpu_id: int | None, what: str) -> torch.device:
    """diffusers' rule: `device` (default cuda) with `gpu_id` as its index, which must not be given twice."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cpu":
        raise ValueError(f"{what}: device must be a GPU ('cuda' or 'cuda:N'): weights are offloaded to the "
                         "CPU, so a CPU pipeline has nothing to offload")
    if gpu_id is not None:
        if device.index is not None:
            raise ValueError(f"{what}: gpu_id={gpu_id} and device={str(device)!r} both give a GPU index; "
                             "pass one of them")
        if isinstance(gpu_id, bool) or not isinstance(gpu_id, int) or gpu_id < 0:
            raise ValueError(f"{what}: gpu_id must be an int >= 0, got {gpu_id!r}")
        device = torch.device(device.type, gpu_id)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}: CUDA is not available (no GPU to run on)")
    return torch.device(device.type, torch.cuda.current_device()) if (
        device.type == "cuda" and device.index is None) else device


class Offload:
    """The hooks of one pipeline. `stored` maps (module, parameter name) to the CPU tensor of each parameter
    currently on the execution device."""

    def __init__(self, pipe: Pipeline, mode: str, device: torch.device):
        self.pipe, self.mode, self.device = pipe, mode, device
        self.pin = device.type == "cuda"
        self.stored: dict[tuple[nn.Module, str], torch.Tensor] = {}
        self.current: nn.Module | None = None  # model mode: the component on the execution device
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name in COMPONENTS:
            component = getattr(pipe, name)
            if component is None:
                continue
            if mode == "model":
                # The component's entry points: its forward, or (the VAE, whose encode() and decode() are not a
                # forward) its children. The first call loads the whole component. Nothing inside is hooked,
                # so compiled code never contains these hooks.
                entries = [component] if type(component).forward is not nn.Module.forward else component.children()
                for module in entries:
                    self._hook(module, lambda m, args, kwargs, c=component: self._enter(c, args, kwargs))
            else:
                for module in component.modules():
                    if isinstance(module, nn.Embedding):
                        self._hook_embedding(module)
                    elif module._parameters:
                        self._hook(module, self._load_own)
                        self.handles.append(module.register_forward_hook(lambda m, args, out: self._offload([m])))

    def _hook(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _hook_embedding(self, module: nn.Embedding) -> None:
        """Sequential mode: a lookup gathers a few rows, so it runs on the CPU table (the real XLM-R vocabulary
        is 250,002 x 1024, 0.5 GB in fp16) and only the looked-up rows travel."""
        def to_storage(m, args, kwargs):
            return tree_map(lambda x: x.to(m.weight.device) if isinstance(x, torch.Tensor) else x, (args, kwargs))
        self._hook(module, to_storage)
        self.handles.append(module.register_forward_hook(lambda m, args, out: self._to_device(out)))

    def _to_device(self, tree):
        return tree_map(lambda x: x.to(self.device, non_blocking=self.pin)
                        if isinstance(x, torch.Tensor) and x.device != self.device else x, tree)

    def _enter(self, component: nn.Module, args, kwargs):
        if self.current is not component:
            self.release()
            self._load(component.modules())
            self.current = component
        return self._to_device((args, kwargs))

    def _load_own(self, module: nn.Module, args, kwargs):
        self._load([module])
        return self._to_device((args, kwargs))

    def load_unet(self) -> None:
        """Model mode: bring the UNet over before generate() records or compiles it, so what it records
        points at the weights it will run with."""
        if self.mode == "model":
            self._enter(self.pipe.unet, (), {})

    def _load(self, modules) -> None:
        with torch.inference_mode(False):  # normal tensors, whatever the caller's mode: they become .data
            for module in modules:
                for name, param in module._parameters.items():
                    if param is None or (module, name) in self.stored:
                        continue
                    cpu = param.data
                    if self.pin and not cpu.is_pinned():
                        cpu = cpu.pin_memory()  # once: the pinned tensor is the weight from now on
                    self.stored[(module, name)] = cpu
                    param.data = cpu.to(self.device, non_blocking=self.pin, copy=True)

    def _offload(self, modules) -> None:
        for module in modules:
            for name, param in module._parameters.items():
                cpu = self.stored.pop((module, name), None)
                if cpu is not None:
                    param.data = cpu

    def release(self) -> None:
        """Every weight back to its CPU tensor (end of a generation; before another component loads)."""
        if self.stored:
            self._offload(dict.fromkeys(module for module, _ in self.stored))
        if self.pipe.lora is not None:
            self.pipe.lora.release()  # their copies on the execution device go with the weights
        if self.current is self.pipe.unet:
            self.pipe.invalidate_runner()  # its recording points at the copies just dropped
        self.current = None

    def remove(self) -> None:
        self.release()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def enable(pipe: Pipeline, mode: str, device: torch.device) -> Offload:
    """Put `pipe` under `mode` offload to `device` (tests pass the CPU: the moves then copy CPU tensors)."""
    pipe.remove_all_hooks()
    for name in COMPONENTS:
        component = getattr(pipe, name)
        if component is not None:
            component.to("cpu")
    if pipe.lora is not None:
        pipe.lora.release()
    pipe.invalidate_runner()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe.set_offload(Offload(pipe, mode, device))
    return pipe.offload


@contextmanager
def released(pipe: Pipeline) -> Iterator[None]:
    """Around one generation: every component goes back to the CPU afterwards, as diffusers'
    maybe_free_model_hooks() does (also when the generation fails)."""
    try:
        yield
    finally:
        if pipe.offload is not None:
            pipe.offload.release()
