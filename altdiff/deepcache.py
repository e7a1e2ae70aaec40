"""DeepCache (Ma et al. 2024): every `cache_interval` steps the UNet runs whole and keeps each block's output;
the steps between reuse the deep features and recompute only the shallow branch around the skip connection
chosen by `cache_branch_id`. The semantics of the deepcache 0.1.1 package's DeepCacheSDHelper:

- The branch is (block, layer) = (cache_branch_id // 3, cache_branch_id % 3).
- The cached modules are the down blocks' resnets, attentions and downsamplers, each whole down block, the
  middle block, and the same in the up blocks, numbered from the output end (up block 0 is the last one,
  its layer 0 the last resnet).
- On a cached step, a module reuses its last output when it lies deeper than the branch: down/up blocks
  after the branch's block, the middle block, and in the branch's block the down layers from the branch's
  layer on and the up layers after it. Everything else runs.
- A step is uniform-skip: a full step whenever (step - first step) % cache_interval == 0. The step is the
  timestep's position in the schedule (deepcache's `scheduler.timesteps.index(t)`, so PNDM's repeated
  timestep counts once) in the diffusers family, and the CFG denoiser's call count in the webui family
  (second-order samplers count both evaluations of a step).

In the webui family the cache is per UNet call within a denoiser call (`slot`), so its separate cond and
uncond calls keep their features apart.

What a UNet call does depends only on `mode()`, (full step?, slot), fixed before the call, and on `store`, the
features it keeps (a full step) or reads (a cached step). A recorded or compiled UNet (altdiff.fast_unet) gets
the store as an input and returns it as an output, so a full step and a cached step are two graphs, each
valid for every step of its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class DeepCache:
    cache_interval: int = 1
    cache_branch_id: int = 0
    step: int = 0  # set by the sampling loop before each UNet call (at())
    start: int | None = None
    slot: int = 0
    full: bool = True  # this call runs every module (and keeps the outermost deep ones' outputs)
    store: dict = field(default_factory=dict)  # this call's features: (kind, name, block, layer) -> output
    kept: dict = field(default_factory=dict)  # slot -> the store of its last full step
    _last_step: int | None = None

    def __post_init__(self):
        for name, low in (("cache_interval", 1), ("cache_branch_id", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")

    def reset(self) -> None:
        """A new generation: its first step is the start, nothing is cached."""
        self.start, self._last_step, self.slot, self.full, self.store = None, None, 0, True, {}
        self.kept.clear()

    def at(self, step: int, separate_calls: bool = False) -> None:
        """The UNet's next call belongs to `step`. With `separate_calls` a second call in the same step is
        another part of the batch (the webui's separate cond and uncond calls) and gets its own cache slot;
        without, it is the same batch again (PNDM's repeated timestep) and shares the step's features."""
        self.slot = self.slot + 1 if separate_calls and step == self._last_step else 0
        self.step = self._last_step = step
        if self.start is None:
            self.start = step
        # a slot with nothing kept yet (the first step, a new cond/uncond call) runs in full
        self.full = (step - self.start) % self.cache_interval == 0 or self.slot not in self.kept
        if self.full:  # filled by this call (a recorded or compiled UNet returns its own)
            self.store = self.kept[self.slot] = {}
        else:
            self.store = self.kept[self.slot]

    def mode(self) -> tuple[bool, int]:
        """What the next UNet call depends on: (full step, slot)."""
        return self.full, self.slot

    def deep(self, kind: str, block: int, layer: int) -> bool:
        """Whether a module lies deeper than the branch: it reuses its last output on a cached step."""
        cache_block, cache_layer = divmod(self.cache_branch_id, 3)
        if kind == "mid" or block > cache_block:
            return True
        if block < cache_block:
            return False
        return layer >= cache_layer if kind == "down" else layer > cache_layer

    def _call(self, key: tuple, deep: bool, keep: bool, forward: Callable, *args, **kwargs):
        if deep and not self.full:
            return self.store[key]  # only the outermost deep modules are reached on a cached step
        out = forward(*args, **kwargs)
        if keep and self.full:
            self.store[key] = out
        return out

    def attach(self, unet: nn.Module) -> None:
        """Route the cached modules' calls through the cache (deepcache's numbering), and mark the UNet. A
        deep module inside a deep block is never reached on a cached step: only the outermost are kept."""
        modules = _modules(unet)
        whole = ("block", "mid_block")
        deep_blocks = {(kind, b) for _, (kind, name, b, layer) in modules if name in whole and self.deep(kind, b, layer)}
        for module, (kind, name, b, layer) in modules:
            deep = self.deep(kind, b, layer)
            keep = deep and (name in whole or (kind, b) not in deep_blocks)
            module.forward = _Routed(self, (kind, name, b, layer), deep, keep, type(module).forward.__get__(module))
        unet.deepcache = self

    @staticmethod
    def detach(unet: nn.Module) -> None:
        for module, _ in _modules(unet):
            module.__dict__.pop("forward", None)
        unet.deepcache = None


class _Routed:
    """A module's forward through the cache (a class, not a closure, so the module can drop it by name)."""

    def __init__(self, cache: DeepCache, key: tuple, deep: bool, keep: bool, forward: Callable):
        self.cache, self.key, self.deep, self.keep, self.forward = cache, key, deep, keep, forward

    def __call__(self, *args, **kwargs):
        return self.cache._call(self.key, self.deep, self.keep, self.forward, *args, **kwargs)


def _modules(unet: nn.Module) -> list[tuple[nn.Module, tuple]]:
    """(module, (kind, name, block, layer)) for every module deepcache wraps."""
    found = []
    for b, block in enumerate(unet.down_blocks):
        for i, attention in enumerate(block.attentions or []):
            found.append((attention, ("down", "attentions", b, i)))
        for i, resnet in enumerate(block.resnets):
            found.append((resnet, ("down", "resnet", b, i)))
        for down in block.downsamplers or []:
            found.append((down, ("down", "downsampler", b, len(block.resnets))))
        found.append((block, ("down", "block", b, 0)))
    found.append((unet.mid_block, ("mid", "mid_block", 0, 0)))
    n = len(unet.up_blocks)
    for j, block in enumerate(unet.up_blocks):
        b, layers = n - j - 1, len(block.resnets)
        for i, attention in enumerate(block.attentions or []):
            found.append((attention, ("up", "attentions", b, layers - i - 1)))
        for i, resnet in enumerate(block.resnets):
            found.append((resnet, ("up", "resnet", b, layers - i - 1)))
        for up in block.upsamplers or []:
            found.append((up, ("up", "upsampler", b, 0)))
        found.append((block, ("up", "block", b, 0)))
    return found
