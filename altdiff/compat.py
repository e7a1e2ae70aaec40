"""Drop-in stand-ins for diffusers' AltDiffusion pipelines: change the import, keep the calls."""

from __future__ import annotations

from pathlib import Path

import torch

from .pipeline import Pipeline, load


class AltDiffusionPipeline:
    """`AltDiffusionPipeline.from_pretrained(src, torch_dtype=...)` then `pipe(prompt, ...)`, returning an
    object with `.images` and `.nsfw_content_detected`. Other attributes (enable_freeu, encode_prompt, ...)
    come from the wrapped altdiff.Pipeline."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    @classmethod
    def from_pretrained(cls, source: str | Path, torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        safety_checker=True, device: str | torch.device = "cpu", **_ignored):
        # diffusers loads on the CPU in fp32 unless told otherwise; users then call .to("cuda").
        return cls(load(source, device=device, dtype=torch_dtype or torch.float32, variant=variant,
                        safety_checker=safety_checker is not None and safety_checker is not False))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.pipeline.to(device, dtype)
        return self

    def __call__(self, prompt=None, **kwargs):
        return self.pipeline.generate(prompt, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.pipeline, name)


class AltDiffusionImg2ImgPipeline(AltDiffusionPipeline):
    """`pipe(prompt, image=init_image, strength=0.8, ...)`: img2img needs an image."""

    def __call__(self, prompt=None, image=None, strength: float = 0.8, **kwargs):
        if image is None:
            raise ValueError("image: AltDiffusionImg2ImgPipeline needs an init image")
        return self.pipeline.generate(prompt, image=image, strength=strength, **kwargs)
