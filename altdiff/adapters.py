"""LoRA (kohya/A1111 and diffusers/PEFT files) and textual inversion (A1111 and diffusers files), made to work
on AltDiffusion's XLM-R text encoder, where diffusers' own loaders fail.

LoRA is applied with forward hooks on the base `nn.Linear` / `nn.Conv2d` layers, adding
`scale * weight * alpha / rank * up(down(x))`, so the modules and their state_dict keys stay as they are and
strict loading keeps working. Layer names in LoRA files map to our module paths (which are diffusers' and
transformers' own names):

- diffusers / PEFT: `unet.<path>.lora_A.weight` / `lora_B.weight` (also the older `.lora.down/up.weight`,
  `.lora_linear_layer.down/up.weight` and `attn1.processor.to_q_lora.down.weight` spellings), and
  `text_encoder.<path>...` with transformers' XLM-R names (`roberta.encoder.layer.0.attention.self.query`,
  `transformation`, `transformation_pre`). alpha comes from a `<path>.alpha` key, else from the safetensors
  `lora_adapter_metadata` (PEFT `lora_alpha` / `alpha_pattern`), else alpha = rank (scale 1), as in diffusers.
- kohya / A1111: `lora_unet_<path with . as _>` and `lora_te_<path with . as _>` with
  `.lora_down.weight`, `.lora_up.weight` and `.alpha` (scale = alpha / rank; no alpha means scale 1). This
  is kohya's naming of the diffusers UNet (conv LoRA on resnets included) and the webui's naming of the
  diffusers XLM-R text encoder (`lora_te_roberta_encoder_layer_0_attention_self_query`). The LDM-style
  `lora_unet_input_blocks_*` spelling is not read.

LoRA layers on modules the model does not run (the XLM-R pooler) are skipped, as the checkpoint keys are.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path
from .checks import is_number
from .text_encoder import IGNORED_KEYS
from .weights import WeightsError, read_state_dict

if TYPE_CHECKING:
    from .pipeline import Pipeline

logger = logging.getLogger("altdiff")

MODELS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry holding the PEFT LoraConfig

# Key endings → the tensor's role, per file family.
_DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                    "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
                    "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers' first LoRA format hung the layers on attention processors.
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")
# diffusers' UNet applies cross_attention_kwargs["scale"] only after the time embedding and conv_in have run:
# their LoRA layers always act at scale 1. Reproduced, so the same scale gives the same image.
_UNSCALED_UNET_LAYERS = ("conv_in", "time_embedding.")


@dataclass
class LoraDelta:
    """One adapter on one layer: delta W = scale * up @ down (convs: down carries the base kernel)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def __call__(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if self.down.dtype != x.dtype or self.down.device != x.device:  # the pipeline moved since loading
            self.down, self.up = self.down.to(x), self.up.to(x)
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
            return F.conv2d(h, self.up)
        return F.linear(F.linear(x, self.down), self.up)

    def weight_delta(self) -> torch.Tensor:
        """delta W in fp32, shaped like the base weight."""
        delta = self.up.flatten(1).float() @ self.down.flatten(1).float()
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.scale * delta).reshape(shape)


@dataclass
class LoraLayer:
    module: nn.Module
    model: str  # "unet" or "text_encoder": which run-time scale applies
    runtime_scaled: bool = True
    adapters: dict[str, LoraDelta] = field(default_factory=dict)
    handle: torch.utils.hooks.RemovableHandle | None = None


@dataclass
class LoraState:
    """All LoRA adapters of one pipeline: hooked layers, active adapters with their weights, run-time scales
    (`cross_attention_kwargs["scale"]`), and the original weights of fused layers."""

    layers: dict[tuple[str, str], LoraLayer] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # active adapter → weight
    loaded: list[str] = field(default_factory=list)
    enabled: bool = True
    scale: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in MODELS})
    fused: set[str] = field(default_factory=set)
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    unet_hook: torch.utils.hooks.RemovableHandle | None = None

    def hook(self, layer: LoraLayer):
        def add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return output
            runtime = self.scale[layer.model] if layer.runtime_scaled else 1.0
            for name, weight in self.weights.items():
                delta = layer.adapters.get(name)
                if delta is not None and name not in self.fused:
                    output = output + delta(inputs[0], module) * (weight * delta.scale * runtime)
            return output
        return add_lora

    def read_unet_scale(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # UNet.forward(sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs); the
        # UNet validates the value itself.
        cross_attention_kwargs = kwargs.get("cross_attention_kwargs", args[4] if len(args) > 4 else None)
        if isinstance(cross_attention_kwargs, dict):
            self.scale["unet"] = cross_attention_kwargs.get("scale", 1.0)
        else:
            self.scale["unet"] = 1.0


def _modules(pipe: Pipeline, model: str) -> dict[str, nn.Module]:
    """The layers LoRA can target: every Linear and Conv2d, by path."""
    root = getattr(pipe, model)
    return {name: m for name, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _ignored(model: str, path: str) -> bool:
    return model == "text_encoder" and (path + ".").startswith(IGNORED_KEYS)


def _lora_file(source: str | Path, weight_name: str | None) -> Path:
    """A LoRA file: the path itself, a file in a folder (diffusers' pytorch_lora_weights.* first, else the
    folder's only .safetensors), or a file of a hub repo."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        names = [weight_name] if weight_name else list(LORA_FILE_NAMES)
        for name in names:
            if (path / name).is_file():
                return path / name
        candidates = sorted(path.glob("*.safetensors"))
        if not weight_name and len(candidates) == 1:
            return candidates[0]
        raise WeightsError(f"{path}: no LoRA file found (looked for {', '.join(names)}; pass weight_name)")
    if str(source).count("/") != 1 or path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        raise WeightsError(f"{source}: LoRA file not found (expected a file, a folder or a hub repo id)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), weight_name or LORA_FILE_NAMES[0]))
    except Exception as e:
        raise WeightsError(f"{source}: could not get the LoRA from the hub or its cache "
                           f"({type(e).__name__}: {e})") from None


def _peft_metadata(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get(METADATA_KEY)
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise WeightsError(f"{path}: corrupt {METADATA_KEY} metadata (not JSON)") from None


def _split_key(key: str, kohya_names: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """(model, module path, role) of one LoRA file key, or None when it names no known layer."""
    if key.startswith(tuple(KOHYA_PREFIXES.values())):
        name, _, part = key.partition(".")
        if name not in kohya_names or part not in _KOHYA_PARTS:
            return None
        return (*kohya_names[name], _KOHYA_PARTS[part])
    key = _PROCESSOR_KEY.sub(lambda m: "." + m.group(1).replace("to_out", "to_out.0") + ".lora.", key)
    model, _, rest = key.partition(".")
    for part, role in _DIFFUSERS_PARTS.items():
        if model in MODELS and rest.endswith("." + part):
            return model, rest[:-len(part) - 1], role
    return None


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a pattern names the path or a dotted suffix of it.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def read_lora(pipe: Pipeline, path: Path, strict: bool = True) -> dict[tuple[str, str], LoraDelta]:
    """Parse and check a LoRA file against the pipeline; raises WeightsError listing every problem (unknown
    keys only warn with strict=False). Changes nothing."""
    state_dict = read_state_dict(path)
    metadata = _peft_metadata(path)
    modules = {m: _modules(pipe, m) for m in MODELS}
    kohya_names = {KOHYA_PREFIXES[m] + p.replace(".", "_"): (m, p) for m in MODELS for p in modules[m]}
    # Files without a unet./text_encoder. prefix are UNet attention-processor files (`save_attn_procs`).
    if not any(k.startswith((*KOHYA_PREFIXES.values(), "unet.", "text_encoder.")) for k in state_dict):
        state_dict = {f"unet.{k}": v for k, v in state_dict.items()}

    ignored_kohya = tuple(KOHYA_PREFIXES["text_encoder"] + p.replace(".", "_") for p in IGNORED_KEYS)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        split = _split_key(key, kohya_names)
        if key.startswith(ignored_kohya) or (split is not None and _ignored(split[0], split[1])):
            continue
        if split is None or split[1] not in modules[split[0]]:
            unknown.append(key)
            continue
        parts.setdefault(split[:2], {})[split[2]] = tensor
    if unknown:
        message = f"{path}: {len(unknown)} LoRA keys name no layer of this model: {_listing(unknown)}"
        if strict:
            raise WeightsError(message + " (strict=False skips them)")
        logger.warning("%s; skipped", message)

    configs = {m: {k[len(m) + 1:]: v for k, v in metadata.items() if k.startswith(m + ".")} for m in MODELS}
    if any(c.get("use_dora") for c in configs.values()):
        raise WeightsError(f"{path}: DoRA adapters (use_dora) are not supported")
    deltas, problems = {}, []
    for (model, module_path), tensors in parts.items():
        name = f"{model}.{module_path}"
        if "down" not in tensors or "up" not in tensors:
            problems.append(f"{name} lacks its {'up' if 'down' in tensors else 'down'} weight")
            continue
        down, up, module = tensors["down"], tensors["up"], modules[model][module_path]
        problem = _shape_problem(module, down, up)
        if "alpha" in tensors and tensors["alpha"].numel() != 1:
            problem = f"alpha must be one number, got shape {tuple(tensors['alpha'].shape)}"
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        rank, config = down.shape[0], configs[model]
        if "alpha" in tensors:
            alpha = float(tensors["alpha"])
        else:
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module_path,
                                         config.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weight = module.weight
        deltas[(model, module_path)] = LoraDelta(down.to(weight.device, weight.dtype),
                                                 up.to(weight.device, weight.dtype), scale)
    if problems:
        raise WeightsError(f"{path}: LoRA does not fit this model: {_listing(problems)}")
    if not deltas:
        raise WeightsError(f"{path}: no LoRA layers for this model")
    return deltas


def _shape_problem(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    rank = down.shape[0] if down.ndim else 0
    if rank < 1:
        return f"down {tuple(down.shape)} has no rank"
    if isinstance(module, nn.Conv2d):
        want_down = (rank, module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, rank, 1, 1)
    else:
        want_down, want_up = (rank, module.in_features), (module.out_features, rank)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        return (f"down {tuple(down.shape)} / up {tuple(up.shape)}, layer "
                f"{tuple(module.weight.shape)} expects down {want_down} / up {want_up}")
    return None


def _listing(items: list[str], limit: int = 8) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _state(pipe: Pipeline) -> LoraState:
    if pipe.lora is None:
        pipe.lora = LoraState()
        pipe.lora.unet_hook = pipe.unet.register_forward_pre_hook(pipe.lora.read_unet_scale, with_kwargs=True)
    return pipe.lora


def load_lora_weights(pipe: Pipeline, source: str | Path, adapter_name: str | None = None,
                      weight: float = 1.0, strict: bool = True, weight_name: str | None = None) -> str:
    """Load a LoRA file onto the UNet and text encoder as a new active adapter with `weight`; returns the
    adapter's name (default `default_<n>`, as diffusers). A file that does not fit raises WeightsError and
    leaves the pipeline as it was."""
    if not is_number(weight):
        raise ValueError(f"weight: must be a finite number, got {weight!r}")
    path = _lora_file(source, weight_name)
    with pipe.lock:
        state = pipe.lora
        name = adapter_name if adapter_name is not None else f"default_{len(state.loaded) if state else 0}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name: must be a non-empty str, got {adapter_name!r}")
        if state is not None and name in state.loaded:
            raise ValueError(f"adapter_name: an adapter named {name!r} is already loaded")
        deltas = read_lora(pipe, path, strict)
        state = _state(pipe)
        for (model, module_path), delta in deltas.items():
            layer = state.layers.get((model, module_path))
            if layer is None:
                module = getattr(pipe, model).get_submodule(module_path)
                scaled = not (model == "unet" and module_path.startswith(_UNSCALED_UNET_LAYERS))
                layer = state.layers[(model, module_path)] = LoraLayer(module, model, scaled)
                layer.handle = module.register_forward_hook(state.hook(layer))
            layer.adapters[name] = delta
        state.loaded.append(name)
        state.weights[name] = float(weight)
    return name


def set_adapters(pipe: Pipeline, adapter_names: str | Sequence[str],
                 adapter_weights: float | Sequence[float] | None = None) -> None:
    """Make exactly `adapter_names` active, with `adapter_weights` (one number for all, or one each;
    default 1.0)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if adapter_weights is None or isinstance(adapter_weights, (int, float)):
        weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
    else:
        weights = list(adapter_weights)
    with pipe.lock:
        state = pipe.lora
        loaded = state.loaded if state else []
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ValueError(f"adapter_names: {missing} not loaded (loaded: {loaded})")
        if len(weights) != len(names) or not all(is_number(w) for w in weights):
            raise ValueError(f"adapter_weights: expected one finite number per adapter ({len(names)}), "
                             f"got {adapter_weights!r}")
        if state.fused:
            raise ValueError("set_adapters: LoRA is fused; call unfuse_lora() first")
        state.weights = {n: float(w) for n, w in zip(names, weights)}


def enable_lora(pipe: Pipeline, enabled: bool = True) -> None:
    """Switch the (unfused) adapters on or off without unloading them."""
    with pipe.lock:
        if pipe.lora is not None:
            pipe.lora.enabled = enabled


def fuse_lora(pipe: Pipeline, lora_scale: float = 1.0) -> None:
    """Add the active adapters' deltas (times their weights and `lora_scale`) into the base weights, so
    inference runs at the speed of the plain model. The original weights are kept: `unfuse_lora` restores
    them bit for bit. Fusing again first unfuses."""
    if not is_number(lora_scale):
        raise ValueError(f"lora_scale: must be a finite number, got {lora_scale!r}")
    unfuse_lora(pipe)
    with pipe.lock, torch.no_grad():
        state = pipe.lora
        if state is None or not state.enabled or not state.weights:
            return
        for key, layer in state.layers.items():
            active = [(layer.adapters[n], w) for n, w in state.weights.items() if n in layer.adapters]
            if not active:
                continue
            weight = layer.module.weight
            state.originals[key] = weight.detach().clone()
            fused = weight.float() + sum(lora_scale * w * delta.weight_delta().to(weight.device)
                                         for delta, w in active)
            weight.copy_(fused)
        state.fused = set(state.weights)


def unfuse_lora(pipe: Pipeline) -> None:
    """Put back the weights saved by `fuse_lora` (exactly); the adapters act through their hooks again."""
    with pipe.lock, torch.no_grad():
        state = pipe.lora
        if state is None:
            return
        for key, original in state.originals.items():
            state.layers[key].module.weight.copy_(original)
        state.originals.clear()
        state.fused.clear()


def unload_lora_weights(pipe: Pipeline) -> None:
    """Remove every adapter (unfusing first): the pipeline is the plain model again."""
    unfuse_lora(pipe)
    with pipe.lock:
        state = pipe.lora
        if state is None:
            return
        for layer in state.layers.values():
            layer.handle.remove()
        state.unet_hook.remove()
        pipe.lora = None


@contextmanager
def text_encoder_scale(pipe: Pipeline, scale: float | None) -> Iterator[None]:
    """The LoRA scale for text-encoder calls in this block (diffusers' encode_prompt `lora_scale`)."""
    state = pipe.lora
    if state is None or scale is None:
        yield
        return
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"lora_scale (cross_attention_kwargs['scale']): must be a number, got {scale!r}")
    previous, state.scale["text_encoder"] = state.scale["text_encoder"], scale
    try:
        yield
    finally:
        state.scale["text_encoder"] = previous


def save_lora_weights(pipe: Pipeline, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write one adapter as diffusers does (`unet.<path>.lora_A.weight`, ..., PEFT LoraConfig in the
    `lora_adapter_metadata`), so diffusers and altdiff read it back with the same scales. `path` is a
    .safetensors file or a folder (then `pytorch_lora_weights.safetensors` inside). Written atomically."""
    with pipe.lock:
        state = pipe.lora
        loaded = state.loaded if state else []
        if adapter_name is None and len(loaded) != 1:
            raise ValueError(f"adapter_name: name the adapter to save (loaded: {loaded})")
        name = adapter_name if adapter_name is not None else loaded[0]
        if name not in loaded:
            raise ValueError(f"adapter_name: {name!r} is not loaded (loaded: {loaded})")
        tensors, metadata = {}, {}
        for model in MODELS:
            layers = {p: layer.adapters[name] for (m, p), layer in state.layers.items()
                      if m == model and name in layer.adapters}
            for module_path, delta in layers.items():
                tensors[f"{model}.{module_path}.lora_A.weight"] = delta.down.detach().cpu().contiguous()
                tensors[f"{model}.{module_path}.lora_B.weight"] = delta.up.detach().cpu().contiguous()
            if layers:
                metadata.update({f"{model}.{k}": v for k, v in _peft_config(layers).items()})
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_FILE_NAMES[0]
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def _peft_config(layers: dict[str, LoraDelta]) -> dict:
    """A PEFT LoraConfig giving each layer its rank and alpha: the commonest as r / lora_alpha, the rest as
    patterns (full paths)."""
    ranks = {p: d.down.shape[0] for p, d in layers.items()}
    alphas = {p: d.scale * ranks[p] for p, d in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
            "use_dora": False, "lora_bias": False}


# Textual inversion ------------------------------------------------------------------------------------------

TI_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def _read_embedding_file(path: Path):
    """The raw content of an embedding file: a dict (safetensors, or a weights_only pickle) or a tensor."""
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(f"{path}: unreadable embedding file; only weights_only loading is allowed "
                           f"({type(e).__name__}: {first_line})") from None


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, vectors [n, width]) of a textual-inversion file: A1111 `.pt` (`string_to_param["*"]`, token
    from `name`), A1111 `.safetensors` (`emb_params`, token from the file name), diffusers
    `learned_embeds.*` (`{token: vector(s)}`), or a bare tensor (token required). `token` overrides."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / n for n in TI_FILE_NAMES if (path / n).is_file()]
        if not found:
            raise WeightsError(f"{path}: no embedding file (looked for {', '.join(TI_FILE_NAMES)})")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: embedding file not found")
    data = _read_embedding_file(path)
    if isinstance(data, torch.Tensor):
        name, vectors = None, data
    elif isinstance(data, dict) and isinstance(data.get("string_to_param"), dict) and \
            isinstance(data["string_to_param"].get("*"), torch.Tensor):
        name, vectors = data.get("name"), data["string_to_param"]["*"]
    elif isinstance(data, dict) and isinstance(data.get("emb_params"), torch.Tensor):
        name, vectors = path.stem, data["emb_params"]
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        name, vectors = next(iter(data.items()))
    else:
        raise WeightsError(f"{path}: not a textual-inversion embedding (expected A1111 string_to_param or "
                           f"emb_params, or diffusers' {{token: tensor}})")
    token = token if token is not None else name
    if not isinstance(token, str) or not token:
        raise ValueError(f"token: {path} names no token; pass token=...")
    if not vectors.is_floating_point() or vectors.ndim not in (1, 2) or not vectors.numel():
        raise WeightsError(f"{path}: embedding must be a float tensor [width] or [vectors, width], "
                           f"got {vectors.dtype} {tuple(vectors.shape)}")
    return token, vectors.reshape(-1, vectors.shape[-1])


def load_textual_inversion(pipe: Pipeline, path: str | Path, token: str | None = None) -> list[str]:
    """Add an embedding's vectors as new tokens: rows appended to the XLM-R word embeddings and unsplittable
    tokens in the tokenizer. A multi-vector embedding becomes `token`, `token_1`, ... (diffusers' naming), and
    `token` in a prompt stands for all of them. Returns the added tokens; on error nothing changes."""
    token, vectors = read_embedding(path, token)
    tokenizer, embeddings = pipe.tokenizer, pipe.text_encoder.roberta.embeddings.word_embeddings
    width = embeddings.weight.shape[1]
    if vectors.shape[1] != width:
        raise WeightsError(f"{path}: embedding width {vectors.shape[1]} does not fit this text encoder "
                           f"(hidden size {width}); it was made for another model")
    tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
    taken = [t for t in tokens if t in tokenizer.added_tokens or tokenizer.sp.PieceToId(t)]
    if taken:
        raise ValueError(f"token: {taken} already in the tokenizer's vocabulary; choose another token")
    with pipe.lock, torch.no_grad():
        ids = tokenizer.add_tokens(tokens)
        if len(ids) > 1:
            tokenizer.expansions[ids[0]] = ids
        weight = embeddings.weight
        rows = max(weight.shape[0], max(ids) + 1)
        grown = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], width)])
        grown[ids] = vectors.to(grown)
        embeddings.weight = nn.Parameter(grown, requires_grad=False)
        embeddings.num_embeddings = rows
        pipe.text_encoder.config.vocab_size = rows
    return tokens
