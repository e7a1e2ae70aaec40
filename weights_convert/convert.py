"""Writing converted models. Every output is built in a temp folder next to OUT and renamed into place at
the end, so a failure (a bad input, a full disk, Ctrl-C) leaves OUT as it was: absent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from altdiff.single_file import (
    DEFAULT_REPOS,
    Options,
    check_tokenizer,
    folder_configs,
    is_single_file,
    plan_conversion,
    read_component,
    safety_checker_folders,
    stored_config,
    to_original_state_dict,
    tokenizer_folder,
)
from altdiff.tokenizer import MODEL_FILE, Tokenizer
from altdiff.weights import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    StateDict,
    WeightsError,
    cast_floating,
    find_weights,
)

WEIGHT_FILES = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
TOKENIZER_FILES = (MODEL_FILE, "tokenizer_config.json", "special_tokens_map.json")
# model_index.json of the hub repos; absent components are [null, null] as diffusers writes them.
MODEL_INDEX = {"_class_name": "AltDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
               "requires_safety_checker": True, "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
               "scheduler": ["diffusers", "PNDMScheduler"],
               "text_encoder": ["diffusers", "RobertaSeriesModelWithTransformation"],
               "tokenizer": ["transformers", "XLMRobertaTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yields the path to write the result to (file or folder); on success it becomes `out` in one rename."""
    if out.exists():
        raise ValueError(f"OUT: {out} already exists; choose a new path (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp / out.name
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(state_dict: StateDict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors refuses tensors that share memory (tied weights, views of one pickled storage): copy
    those; everything else is written as it is. `metadata` joins the header's `__metadata__`."""
    seen, owned = set(), {}
    for key, tensor in state_dict.items():
        ptr = tensor.untyped_storage().data_ptr()
        owned[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor.contiguous()
        seen.add(ptr)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(owned, str(path), metadata={"format": "pt", **(metadata or {})})


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def convert(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
            tokenizer: str | Path | None = None, safety_checker: bool | str | Path | None = True,
            config: Options | dict | None = None, progress: bool = True) -> Path:
    """SRC (an original single file, or a diffusers folder with .bin or safetensors weights) → OUT, a new
    diffusers-layout folder of safetensors. `dtype` casts floating tensors (None keeps them). For a single
    file, `tokenizer` / `safety_checker` are folders or hub repo ids (default: the BAAI repo of the detected
    m9/m18; a false `safety_checker` writes none) and `config` is `altdiff.single_file.Options`."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if src.is_dir():
        if tokenizer is not None or config is not None:
            raise ValueError("tokenizer/config: a diffusers folder carries its own; only single files take them")
        return _rewrite_folder(src, out, dtype, progress)
    if not is_single_file(src):
        raise ValueError(f"SRC: {src} is neither a diffusers folder nor an original single file "
                         f"(.safetensors/.ckpt)")
    conversion = plan_conversion(src, config)
    repo = DEFAULT_REPOS[conversion.architecture]
    tokenizer_dir = tokenizer_folder(tokenizer if tokenizer is not None else repo)
    check_tokenizer(Tokenizer.from_folder(tokenizer_dir), conversion.configs, str(tokenizer_dir))
    checker = safety_checker_folders(repo if safety_checker is True else safety_checker) if safety_checker \
        else None
    with staged(out) as tmp:
        for component, state_dict in conversion.state_dicts(dtype, progress):
            _save(state_dict, tmp / component / WEIGHT_FILES[component])
            _write_json(conversion.configs[component], tmp / component / "config.json")
            del state_dict
        _write_json(conversion.configs["scheduler"], tmp / "scheduler" / "scheduler_config.json")
        _copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
        index = dict(MODEL_INDEX)
        if checker is None:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        else:
            checker_dir, extractor_dir = checker
            _rewrite_component(checker_dir, tmp / "safety_checker", dtype)
            shutil.copytree(extractor_dir, tmp / "feature_extractor")
        _write_json(index, tmp / "model_index.json")
    return out


def _copy_tokenizer(folder: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, dest / name)
    if not (dest / "tokenizer_config.json").is_file():
        _write_json({"model_max_length": 77, "tokenizer_class": "XLMRobertaTokenizer"}, dest / "tokenizer_config.json")


def _rewrite_component(folder: Path, dest: Path, dtype: torch.dtype | None) -> None:
    """A component folder with its weights (pickled or safetensors) rewritten as safetensors."""
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / path.name)
    name = "model.safetensors" if find_weights(folder).name.startswith(("model.", "pytorch_model.")) \
        else "diffusion_pytorch_model.safetensors"
    state_dict = read_component(folder.parent, folder.name)
    _save({k: cast_floating(v, dtype) for k, v in state_dict.items()}, dest / name)


def _rewrite_folder(src: Path, out: Path, dtype: torch.dtype | None, progress: bool) -> Path:
    if not (src / "model_index.json").is_file():
        raise ValueError(f"SRC: {src} has no model_index.json; expected a diffusers-layout pipeline folder")
    components = [d for d in sorted(src.iterdir()) if d.is_dir() and _has_weights(d)]
    with staged(out) as tmp:
        shutil.copytree(src, tmp, ignore=lambda _, names: [n for n in names if n.endswith(
            SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES) or n.startswith(".")])
        for folder in tqdm(components, desc="components", unit="component", disable=not progress):
            _rewrite_component(folder, tmp / folder.name, dtype)
    return out


def _has_weights(folder: Path) -> bool:
    try:
        find_weights(folder)
    except WeightsError:
        return False
    return True


def to_original(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                progress: bool = True) -> Path:
    """A diffusers AltDiffusion folder → one original LDM-layout file (.safetensors, or .ckpt with a
    `state_dict` wrapper), as the AUTOMATIC1111 webui loads it. Tokenizer and safety checker are not part of
    that format and are left out. A .safetensors OUT carries the configs shapes cannot tell (heads, sample
    sizes, scheduler, m9/m18) in its `__metadata__`, so `altdiff.load(OUT)` needs no `config=`; a .ckpt
    cannot."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise ValueError(f"SRC: {src} is not a diffusers-layout folder (--to-original converts folders)")
    if out.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"OUT: {out} must end in .safetensors or .ckpt")
    state_dict = to_original_state_dict(src, dtype, progress)
    with staged(out) as tmp:
        if out.suffix == ".ckpt":
            torch.save({"state_dict": state_dict}, tmp)
        else:
            _save(state_dict, tmp, stored_config(folder_configs(src)))
    return out
