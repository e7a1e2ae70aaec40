"""`python -m weights_convert SRC OUT`: AltDiffusion weights between original LDM single files and
diffusers-layout safetensors folders. The key tables and inference live in `altdiff.single_file`."""

from .convert import convert, to_original

__all__ = ["convert", "to_original"]
