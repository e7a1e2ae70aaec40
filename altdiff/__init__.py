"""altdiff: AltDiffusion (multilingual Stable Diffusion with an XLM-R text encoder) in plain PyTorch."""

__version__ = "0.1.0"  # before the imports: modules that write it (infotext) import it from here

from .compat import AltDiffusionImg2ImgPipeline, AltDiffusionPipeline
from .generate import GenerationResult
from .pipeline import Pipeline, generate, load

__all__ = [
           "AltDiffusionImg2ImgPipeline",
           "AltDiffusionPipeline",
           "GenerationResult",
           "Pipeline",
           "generate",
           "load",
]
