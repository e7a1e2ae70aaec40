"""k-diffusion 0.1.1.post1 (the version the webui 1.10 pins) as a test oracle, loaded without its package
__init__ (which imports training-only modules: clean-fid, CLIP, wandb, ...).

`pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq` is enough: this module registers an
empty `k_diffusion` package, a stand-in for the torchvision import of `utils.py` (used only by image helpers
the samplers never call), and loads `utils`, `sampling` and `external` from their files. The one place
every test loads the oracle from: `from kdiffusion_oracle import sampling, external`.
"""

import importlib.util
import sys
import types
from pathlib import Path


def _package_dir() -> Path:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    return Path(next(iter(spec.submodule_search_locations)))


def _load(name: str, path: Path) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _stand_ins() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = types.ModuleType("torchvision.transforms.functional")
    torchvision.transforms = transforms
    sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": transforms.functional})


# diffusers and transformers look up which packages exist when first imported; they must see the real ones,
# not the stand-ins below (a module without __spec__ makes importlib.util.find_spec raise).
import diffusers  # noqa: E402, F401
import transformers  # noqa: E402, F401

_root = _package_dir()
if not isinstance(sys.modules.get("k_diffusion"), types.ModuleType) or not hasattr(sys.modules["k_diffusion"],
                                                                                   "sampling"):
    _stand_ins()
    package = sys.modules.setdefault("k_diffusion", types.ModuleType("k_diffusion"))
    package.__path__ = [str(_root)]
    utils = _load("k_diffusion.utils", _root / "utils.py")
    sampling = _load("k_diffusion.sampling", _root / "sampling.py")
    external = _load("k_diffusion.external", _root / "external.py")
    package.utils, package.sampling, package.external = utils, sampling, external
else:
    utils = sys.modules["k_diffusion"].utils
    sampling = sys.modules["k_diffusion"].sampling
    external = sys.modules["k_diffusion"].external
