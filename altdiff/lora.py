"""LoRA, LoHa and LoKr adapters on the UNet and the XLM-R text encoder, from the files people have: kohya /
webui / LyCORIS files and diffusers / PEFT files. Made to work on AltDiffusion's XLM-R text encoder, where
diffusers' own loaders fail.

Three module kinds, one small class each, as the webui's extensions-builtin/Lora/network_lora.py,
network_hada.py and network_lokr.py compute them:

- `Lora`: delta W = up @ down (`lora_up.weight` / `lora_down.weight`; a LoCon `lora_mid.weight` Tucker core is
  folded into `down` at load, which is exact);
- `Loha`: delta W = (w1_a @ w1_b) * (w2_a @ w2_b) (`hada_*`; each factor may be a Tucker core `hada_t1/t2`);
- `Lokr`: delta W = kron(w1, w2) (`lokr_w1` or `lokr_w1_a @ lokr_w1_b`, `lokr_w2` or its factors, optional
  Tucker core `lokr_t2`).

Each scales by alpha / dim when the file has both (dim: the rank of down / w1_b / w1_b or w2_b), else by 1,
as the webui's NetworkModule.calc_scale. The adapters act through forward hooks on the base `nn.Linear` /
`nn.Conv2d` layers, adding `weight * scale * (delta W applied to x)`, so the modules and their state_dict keys
stay as they are and strict loading keeps working. Layer names map to our module paths (diffusers' and
transformers' own names):

- kohya / webui / LyCORIS: `lora_unet_<path with . as _>` and `lora_te_<path with . as _>` (the webui's naming
  of the diffusers XLM-R encoder: `lora_te_roberta_encoder_layer_0_attention_self_query`), any kind. The
  LDM-style `lora_unet_input_blocks_*` spelling is not read.
- diffusers / PEFT (LoRA only): `unet.<path>.lora_A.weight` / `lora_B.weight` (also `.lora.down/up.weight`,
  `.lora_linear_layer.down/up.weight` and `attn1.processor.to_q_lora.down.weight`), `text_encoder.<path>...`
  with transformers' XLM-R names. alpha comes from a `<path>.alpha` key, else from the safetensors
  `lora_adapter_metadata` (PEFT `lora_alpha` / `alpha_pattern`), else alpha = rank, as in diffusers.

Layers on modules the model does not run (the XLM-R pooler) are skipped, as the checkpoint keys are. Other
LyCORIS kinds are refused with the reason (`REFUSED_PARTS`).

The webui's `<lora:NAME:w>` prompt tags are applied by altdiff.networks.
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
from .checks import all_finite, as_number, is_number, plain
from .text_encoder import IGNORED_KEYS
from .weights import WeightsError, read_state_dict

if TYPE_CHECKING:
    from .pipeline import Pipeline

logger = logging.getLogger("altdiff")

MODELS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry holding the PEFT LoraConfig
LORA_DIR_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what the webui lists in its Lora folder

# Key endings → the tensor's role, for diffusers files (LoRA only).
_DIFFUSERS_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                    "lora_linear_layer.down.weight": "lora_down.weight",
                    "lora_linear_layer.up.weight": "lora_up.weight", "alpha": "alpha"}
# diffusers' first LoRA format hung the layers on attention processors.
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")
# diffusers' UNet applies cross_attention_kwargs["scale"] only after the time embedding and conv_in have run:
# their LoRA layers always act at scale 1. Reproduced, so the same scale gives the same image.
_UNSCALED_UNET_LAYERS = ("conv_in", "time_embedding.")
# Parts of adapter kinds the webui or LyCORIS know and altdiff does not read, with the reason.
REFUSED_PARTS = {
    "dora_scale": "DoRA (weight-decomposed) adapters rescale the merged weight's norm per row; not supported",
    "diff": "full weight differences (LyCORIS 'full') are not supported",
    "diff_b": "full weight differences (LyCORIS 'full') are not supported",
    "on_input": "IA3 adapters are not supported",
    "oft_blocks": "OFT / BOFT (orthogonal) adapters are not supported",
    "oft_diag": "OFT / BOFT (orthogonal) adapters are not supported",
    "a1.weight": "GLoRA adapters are not supported",
    "w_norm": "norm-layer adapters are not supported",
    "b_norm": "norm-layer adapters are not supported",
    "lokr_t1": "LoKr with a Tucker core on w1 is not made by LyCORIS nor read by the webui",
    "bias": "adapters carrying a bias difference are not supported",
    "scale": "adapters carrying their own 'scale' tensor are not supported",
}


def _scale(alpha: torch.Tensor | None, dim: int | None) -> float:
    # The webui's NetworkModule.calc_scale: alpha / dim when both are known, else 1.
    return float(alpha) / dim if alpha is not None and dim else 1.0


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] from a Tucker core [r, r, k, k] and its mode factors a [r, out], b [r, in]
    (lyco_helpers.make_weight_cp)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, a, b)


def _apply(x: torch.Tensor, delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, delta)


class Lora:
    """delta W = up @ down; convs: down carries the base kernel (and stride), up is 1x1."""

    kind = "LoRA"
    parts = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")

    def __init__(self, tensors: dict[str, torch.Tensor], module: nn.Module):
        down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
        if mid is not None:
            # LoCon's Tucker form: 1x1 down, kxk mid (with the layer's stride), 1x1 up. mid∘down is one kxk conv.
            if not isinstance(module, nn.Conv2d) or down.ndim != 4 or mid.ndim != 4 or down.shape[2:] != (1, 1):
                raise ValueError(f"lora_mid {tuple(mid.shape)} needs a conv layer with a 1x1 down, got down "
                                 f"{tuple(down.shape)}")
            down = torch.einsum("ijkl,jm->imkl", mid.float(), down.flatten(1).float())
        rank = down.shape[0] if down.ndim else 0
        if rank < 1:
            raise ValueError(f"down {tuple(down.shape)} has no rank")
        if isinstance(module, nn.Conv2d):
            want_down = (rank, module.in_channels // module.groups, *module.kernel_size)
            want_up = (module.out_channels, rank, 1, 1)
        else:
            want_down, want_up = (rank, module.in_features), (module.out_features, rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)}, layer "
                             f"{tuple(module.weight.shape)} expects down {want_down} / up {want_up}")
        if "alpha" in tensors and tensors["alpha"].numel() != 1:
            raise ValueError(f"alpha must be one number, got shape {tuple(tensors['alpha'].shape)}")
        weight = module.weight
        # Kept where the base weight rests (the CPU under offload); `cached` holds a copy for another device or
        # dtype (the pipeline moved, or offload runs it on the GPU) until `release()`.
        self.down = down.to(weight.device, weight.dtype)
        self.up = up.to(weight.device, weight.dtype)
        self.cached: tuple[tuple[torch.device, torch.dtype], torch.Tensor, torch.Tensor] | None = None
        self.scale = _scale(tensors.get("alpha"), rank)

    def __call__(self, x: torch.Tensor, module: nn.Module, cache: bool = True) -> torch.Tensor:
        down, up = self.down, self.up
        if (down.device, down.dtype) != (x.device, x.dtype):
            if self.cached is not None and self.cached[0] == (x.device, x.dtype):
                down, up = self.cached[1:]
            else:
                down, up = down.to(x), up.to(x)
                self.cached = ((x.device, x.dtype), down, up) if cache else None
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
            return F.conv2d(h, up)
        return F.linear(F.linear(x, down), up)

    def release(self) -> None:
        self.cached = None

    def weight_delta(self) -> torch.Tensor:
        """scale * delta W in fp32, shaped like the base weight."""
        delta = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (self.scale * delta).reshape(self.up.shape[0], *self.down.shape[1:])


class _Rebuilt:
    """A kind whose delta W is rebuilt from its factors (in fp32) and applied as one weight, as LyCORIS and the
    webui do for LoHa and LoKr. The factors rest where the base weight rests; the rebuilt delta W is kept for
    the device and dtype of the last call (the factors never change after loading) until `release()`."""

    kind = ""
    parts: tuple[str, ...] = ()

    def __init__(self, tensors: dict[str, torch.Tensor], module: nn.Module):
        if "alpha" in tensors and tensors["alpha"].numel() != 1:
            raise ValueError(f"alpha must be one number, got shape {tuple(tensors['alpha'].shape)}")
        weight = module.weight
        self.factors = {k: v.to(weight.device, torch.float32) for k, v in tensors.items() if k != "alpha"}
        self.shape = tuple(weight.shape)
        self.cached: tuple[tuple[torch.device, torch.dtype], torch.Tensor] | None = None
        try:
            delta = self.rebuild()
        except RuntimeError as e:  # factors that do not multiply
            raise ValueError(self._shapes() + f" do not combine ({e})") from None
        if delta.shape[0] != self.shape[0] or delta.numel() != weight.numel():
            raise ValueError(self._shapes() + f" give {tuple(delta.shape)}, layer expects {self.shape}")
        self.scale = _scale(tensors.get("alpha"), self.dim())

    def _shapes(self) -> str:
        return f"{self.kind} factors " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.factors.items())

    def rebuild(self, device: torch.device | None = None) -> torch.Tensor:
        """delta W (unscaled, fp32) computed on `device` (default: where the factors rest)."""
        raise NotImplementedError

    def dim(self) -> int | None:
        raise NotImplementedError

    def _on(self, device: torch.device | None) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.factors.items()} if device is not None else self.factors

    def __call__(self, x: torch.Tensor, module: nn.Module, cache: bool = True) -> torch.Tensor:
        key = (x.device, x.dtype)
        if self.cached is not None and self.cached[0] == key:
            delta = self.cached[1]
        else:
            delta = self.rebuild(x.device).reshape(self.shape).to(x.dtype)
            self.cached = (key, delta) if cache else None
        return _apply(x, delta, module)

    def release(self) -> None:
        self.cached = None

    def weight_delta(self) -> torch.Tensor:
        return self.scale * self.rebuild().reshape(self.shape)


class Loha(_Rebuilt):
    """delta W = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; with Tucker cores t1/t2 each factor is
    make_weight_cp(t, a, b) (network_hada.py)."""

    kind = "LoHa"
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")

    def rebuild(self, device: torch.device | None = None) -> torch.Tensor:
        f = self._on(device)

        def factor(i: int) -> torch.Tensor:
            a, b, t = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"], f.get(f"hada_t{i}")
            return _tucker(t, a, b) if t is not None else (a @ b.flatten(1))
        return factor(1) * factor(2)

    def dim(self) -> int | None:
        return self.factors["hada_w1_b"].shape[0]


class Lokr(_Rebuilt):
    """delta W = kron(w1, w2); each of w1, w2 whole or as a product of two factors, w2 optionally through a
    Tucker core t2 (network_lokr.py)."""

    kind = "LoKr"
    parts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")

    def rebuild(self, device: torch.device | None = None) -> torch.Tensor:
        f = self._on(device)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous())

    def dim(self) -> int | None:
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in self.factors:
                return self.factors[name].shape[0]
        return None


def _kind(parts: set[str]) -> type[Lora] | type[Loha] | type[Lokr] | None:
    """The kind a layer's parts make (network_*.py's create_module tests, in the webui's order)."""
    if {"lora_down.weight", "lora_up.weight"} <= parts:
        return Lora
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return Loha
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    return Lokr if has_1 and has_2 else None


KINDS = (Lora, Loha, Lokr)
_KOHYA_PARTS = frozenset(p for kind in KINDS for p in kind.parts) | REFUSED_PARTS.keys()
AdapterModule = Lora | Loha | Lokr


@dataclass
class LoraLayer:
    module: nn.Module
    model: str  # "unet" or "text_encoder": which run-time scale applies
    runtime_scaled: bool = True
    adapters: dict[str, AdapterModule] = field(default_factory=dict)
    handle: torch.utils.hooks.RemovableHandle | None = None


@dataclass
class LoraState:
    """All adapters of one pipeline: hooked layers, active adapters with their weights per model, run-time
    scales (`cross_attention_kwargs["scale"]`), the original weights of fused layers, and the adapters that
    prompt tags loaded (kept for the next call that names the same unchanged file)."""

    layers: dict[tuple[str, str], LoraLayer] = field(default_factory=dict)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # active adapter → model → weight
    loaded: list[str] = field(default_factory=list)
    enabled: bool = True
    scale: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in MODELS})
    fused: set[str] = field(default_factory=set)
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    tagged: dict[Path, tuple[tuple[int, int], str]] = field(default_factory=dict)  # file → (stamp, adapter)
    unet_hook: torch.utils.hooks.RemovableHandle | None = None

    def hook(self, layer: LoraLayer, pipe: Pipeline):
        def add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return output
            runtime = self.scale[layer.model] if layer.runtime_scaled else 1.0
            # Sequential offload brings each weight over for one call only; so do the adapters.
            cache = pipe.offload is None or pipe.offload.mode != "sequential"
            for name, weights in self.weights.items():
                adapter = layer.adapters.get(name)
                if adapter is not None and name not in self.fused:
                    output = output + adapter(inputs[0], module, cache) * (
                        weights[layer.model] * adapter.scale * runtime)
            return output
        return add_lora

    def release(self) -> None:
        """Drop the adapters' copies made for another device or dtype (offload's end of a generation)."""
        for layer in self.layers.values():
            for adapter in layer.adapters.values():
                adapter.release()

    def read_unet_scale(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # UNet.forward(sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs); the
        # UNet validates the value itself.
        cross_attention_kwargs = kwargs.get("cross_attention_kwargs", args[4] if len(args) > 4 else None)
        if isinstance(cross_attention_kwargs, dict):
            self.scale["unet"] = plain(cross_attention_kwargs.get("scale", 1.0))
        else:
            self.scale["unet"] = 1.0


def _modules(pipe: Pipeline, model: str) -> dict[str, nn.Module]:
    """The layers adapters can target: every Linear and Conv2d, by path."""
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


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def _peft_metadata(path: Path) -> dict:
    text = _metadata(path).get(METADATA_KEY)
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise WeightsError(f"{path}: corrupt {METADATA_KEY} metadata (not JSON)") from None


def _split_key(key: str, kohya_names: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """(model, module path, part) of one adapter file key, or None when it names no known layer."""
    if key.startswith(tuple(KOHYA_PREFIXES.values())):
        name, _, part = key.partition(".")
        if name not in kohya_names or part not in _KOHYA_PARTS:
            return None
        return (*kohya_names[name], part)
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


def read_lora(pipe: Pipeline, path: Path, strict: bool = True) -> dict[tuple[str, str], AdapterModule]:
    """Parse and check an adapter file (LoRA, LoHa or LoKr layers) against the pipeline; raises WeightsError
    listing every problem (unknown keys only warn with strict=False). Changes nothing."""
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
    refused = sorted({f"{part}: {REFUSED_PARTS[part]}" for tensors in parts.values() for part in tensors
                      if part in REFUSED_PARTS})
    if refused:
        raise WeightsError(f"{path}: {'; '.join(refused)}")
    if unknown:
        message = f"{path}: {len(unknown)} LoRA keys name no layer of this model: {_listing(unknown)}"
        if strict:
            raise WeightsError(message + " (strict=False skips them)")
        logger.warning("%s; skipped", message)

    # One NaN in an adapter would turn every later image of the pipeline into NaN.
    broken = [f"{m}.{p}" for (m, p), tensors in parts.items() if not all(all_finite(t) for t in tensors.values())]
    if broken:
        raise WeightsError(f"{path}: NaN or inf in the LoRA weights of {_listing(broken)}")
    configs = {m: {k[len(m) + 1:]: v for k, v in metadata.items() if k.startswith(m + ".")} for m in MODELS}
    if any(c.get("use_dora") for c in configs.values()):
        raise WeightsError(f"{path}: DoRA adapters (use_dora) are not supported")
    adapters, problems = {}, []
    for (model, module_path), tensors in parts.items():
        name, module = f"{model}.{module_path}", modules[model][module_path]
        kind = _kind(set(tensors))
        if kind is None and {"lora_down.weight", "lora_up.weight"} & set(tensors):
            problems.append(f"{name} lacks its {'up' if 'lora_down.weight' in tensors else 'down'} weight")
            continue
        if kind is None:
            problems.append(f"{name} has an incomplete set of adapter weights {sorted(tensors)}")
            continue
        extra = sorted(set(tensors) - set(kind.parts))
        if extra:
            problems.append(f"{name}: {kind.kind} layer with weights of another kind {extra}")
            continue
        try:
            adapter = kind(tensors, module)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if configs[model] and isinstance(adapter, Lora) and "alpha" not in tensors:
            adapter.scale = _peft_scale(configs[model], module_path, adapter.down.shape[0])
        adapters[(model, module_path)] = adapter
    if problems:
        raise WeightsError(f"{path}: LoRA does not fit this model: {_listing(problems)}")
    if not adapters:
        raise WeightsError(f"{path}: no LoRA layers for this model")
    return adapters


def _peft_scale(config: dict, module_path: str, rank: int) -> float:
    """A diffusers-file LoRA layer's scale from its PEFT LoraConfig."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module_path, config.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _listing(items: list[str], limit: int = 8) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _state(pipe: Pipeline) -> LoraState:
    if pipe.lora is None:
        state = LoraState()
        state.unet_hook = pipe.unet.register_forward_pre_hook(state.read_unet_scale, with_kwargs=True)
        pipe.set_lora_state(state)
    return pipe.lora


def _model_weights(weight, name: str = "weight") -> dict[str, float]:
    """One number for both models, or diffusers' per-component dict ({"unet": w, "text_encoder": w}; a
    component left out gets 1.0)."""
    if isinstance(weight, dict):
        unknown = sorted(set(weight) - set(MODELS))
        values = {m: as_number(weight.get(m, 1.0)) for m in MODELS}
        if unknown or None in values.values():
            raise ValueError(f"{name}: a dict must map 'unet' / 'text_encoder' to finite numbers, got {weight!r}")
        return {m: float(v) for m, v in values.items()}
    if not is_number(weight):
        raise ValueError(f"{name}: must be a finite number (or a dict per model), got {weight!r}")
    return {m: float(as_number(weight)) for m in MODELS}


def _attach(pipe: Pipeline, name: str, adapters: dict[tuple[str, str], AdapterModule]) -> None:
    """Hook each adapter onto its layer as `name` (the caller holds the pipeline's lock)."""
    state = _state(pipe)
    for (model, module_path), adapter in adapters.items():
        layer = state.layers.get((model, module_path))
        if layer is None:
            module = getattr(pipe, model).get_submodule(module_path)
            scaled = not (model == "unet" and module_path.startswith(_UNSCALED_UNET_LAYERS))
            layer = state.layers[(model, module_path)] = LoraLayer(module, model, scaled)
            layer.handle = module.register_forward_hook(state.hook(layer, pipe))
        layer.adapters[name] = adapter


def _detach(state: LoraState, name: str) -> None:
    """Take adapter `name` off every layer; layers left without adapters lose their hook."""
    state.weights.pop(name, None)
    for key, layer in list(state.layers.items()):
        layer.adapters.pop(name, None)
        if not layer.adapters and key not in state.originals:
            layer.handle.remove()
            del state.layers[key]


def load_lora_weights(pipe: Pipeline, source: str | Path, adapter_name: str | None = None,
                      weight: float | dict = 1.0, strict: bool = True, weight_name: str | None = None) -> str:
    """Load an adapter file (LoRA, LoHa or LoKr layers) onto the UNet and text encoder as a new active
    adapter with `weight` (a number, or {"unet": w, "text_encoder": w}); returns the adapter's name (default
    `default_<n>`, as diffusers). A file that does not fit raises WeightsError and leaves the pipeline as it
    was."""
    weights = _model_weights(weight)
    path = _lora_file(source, weight_name)
    with pipe.lock:
        state = pipe.lora
        name = adapter_name if adapter_name is not None else f"default_{len(state.loaded) if state else 0}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name: must be a non-empty str, got {adapter_name!r}")
        if state is not None and name in state.loaded:
            raise ValueError(f"adapter_name: an adapter named {name!r} is already loaded")
        adapters = read_lora(pipe, path, strict)
        _attach(pipe, name, adapters)
        pipe.lora.loaded.append(name)
        pipe.lora.weights[name] = weights
    return name


def set_adapters(pipe: Pipeline, adapter_names: str | Sequence[str],
                 adapter_weights: float | dict | Sequence[float | dict] | None = None) -> None:
    """Make exactly `adapter_names` active, with `adapter_weights` (one number or per-model dict for all, or
    one each; default 1.0)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if adapter_weights is None or isinstance(adapter_weights, dict) or is_number(adapter_weights):
        weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
    else:
        weights = list(adapter_weights) if isinstance(adapter_weights, (list, tuple)) else [adapter_weights]
    with pipe.lock:
        state = pipe.lora
        loaded = state.loaded if state else []
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ValueError(f"adapter_names: {missing} not loaded (loaded: {loaded})")
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights: expected one finite number per adapter ({len(names)}), "
                             f"got {adapter_weights!r}")
        per_model = [_model_weights(w, "adapter_weights") for w in weights]
        if state.fused:
            raise ValueError("set_adapters: LoRA is fused; call unfuse_lora() first")
        state.weights = dict(zip(names, per_model))


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
    lora_scale = float(lora_scale)
    unfuse_lora(pipe)
    with pipe.lock, torch.no_grad():
        state = pipe.lora
        if state is None or not state.enabled or not state.weights:
            return
        for key, layer in state.layers.items():
            active = [(layer.adapters[n], w[layer.model]) for n, w in state.weights.items() if n in layer.adapters]
            if not active:
                continue
            weight = layer.module.weight
            state.originals[key] = weight.detach().clone()
            fused = weight.float() + sum(lora_scale * w * adapter.weight_delta().to(weight.device)
                                         for adapter, w in active)
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
        pipe.set_lora_state(None)


@contextmanager
def text_encoder_scale(pipe: Pipeline, scale: float | None) -> Iterator[None]:
    """The LoRA scale for text-encoder calls in this block (diffusers' encode_prompt `lora_scale`)."""
    state = pipe.lora
    if state is None or scale is None:
        yield
        return
    if not is_number(scale):
        raise TypeError(f"lora_scale: must be a finite number, got {scale!r}")
    previous, state.scale["text_encoder"] = state.scale["text_encoder"], float(scale)
    try:
        yield
    finally:
        state.scale["text_encoder"] = previous


def save_lora_weights(pipe: Pipeline, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write one LoRA adapter as diffusers does (`unet.<path>.lora_A.weight`, ..., PEFT LoraConfig in the
    `lora_adapter_metadata`), so diffusers and altdiff read it back with the same scales. `path` is a
    .safetensors file or a folder (then `pytorch_lora_weights.safetensors` inside). Written atomically.
    LoHa / LoKr adapters have no diffusers form and are refused."""
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
            kinds = sorted({a.kind for a in layers.values() if not isinstance(a, Lora)})
            if kinds:
                raise ValueError(f"adapter_name: {name!r} holds {'/'.join(kinds)} layers, which have no diffusers "
                                 "file format; only LoRA adapters can be saved")
            for module_path, adapter in layers.items():
                tensors[f"{model}.{module_path}.lora_A.weight"] = adapter.down.detach().cpu().contiguous()
                tensors[f"{model}.{module_path}.lora_B.weight"] = adapter.up.detach().cpu().contiguous()
            if layers:
                metadata.update({f"{model}.{k}": v for k, v in _peft_config(layers).items()})
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_FILE_NAMES[0]
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def _peft_config(layers: dict[str, Lora]) -> dict:
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
