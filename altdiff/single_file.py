"""Original LDM single files (`.ckpt` / `.safetensors`, the layout of BAAI's releases and the AUTOMATIC1111
webui) ↔ diffusers-layout components: key tables, architecture detection, config inference, conversion.

The mapping is data: per component a list of `Block`s (an LDM prefix, a diffusers prefix, and the renames
of the layers inside), generated from the component's config the way the UNet/VAE lay their blocks out. One
table serves both directions, `altdiff.load("model.safetensors")` and `python -m weights_convert`.

Shapes fix almost every config field. Those they cannot fix take the released models' values:
UNet heads (8 for SD1-style m9; width/64 per block for SD2-style m18, i.e. [5, 10, 20, 20]), XLM-R heads
(hidden/64), sample sizes (512 px images), VAE scaling 0.18215 and the hub repos' PNDM scheduler. A model
that differs (e.g. the tiny test models) passes `overrides`. Files written by `weights_convert --to-original`
carry their full config in the safetensors `__metadata__` (`altdiff.config`), so they need none.

Files also carry tensors the original LDM / webui modules own but AltDiffusion never computes with; `UNUSED`
lists them by group. Anything else that no table claims is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ConfigError, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig, read_json
from .safety import SafetyChecker, load_safety_checker
from .schedules import resolve_config, sampler_for_config, train_alphas_cumprod
from .text_encoder import IGNORED_KEYS as TEXT_ENCODER_IGNORED_KEYS
from .text_encoder import TextEncoder
from .tokenizer import MODEL_FILE, Tokenizer
from .unet import UNet
from .vae import AutoencoderKL, rename_legacy_attention_keys
from .weights import (
    StateDict,
    WeightsError,
    cast_floating,
    check_state_dict,
    find_weights,
    load_module,
    read_state_dict,
)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
ARCHITECTURES = ("m9", "m18")
DEFAULT_REPOS = {"m9": "BAAI/AltDiffusion-m9", "m18": "BAAI/AltDiffusion-m18"}
COMPONENTS = ("text_encoder", "unet", "vae")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
METADATA_KEY = "altdiff.config"

log = logging.getLogger(__name__)

# LDM's DDPM.register_schedule() buffers (ldm/models/diffusion/ddpm.py), all derived from `betas`.
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")
# The ones the webui's samplers read (k-diffusion's CompVisDenoiser and LDM's DDIM/PLMS); checked against the
# scheduler config, so ignoring them cannot change the image.
CHECKED_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev")


@dataclass(frozen=True)
class Unused:
    """A group of tensors that original files carry and AltDiffusion's computation never reads. `keys` are
    full keys, or prefixes ending in '.'; `architectures` limits the group to m9 or m18."""

    name: str
    keys: tuple[str, ...]
    why: str
    architectures: tuple[str, ...] = ("m9", "m18")

    def claims(self, key: str, architecture: str) -> bool:
        return architecture in self.architectures and any(
            key == k or (k.endswith(".") and key.startswith(k)) for k in self.keys)


UNUSED = (
    Unused("DDPM schedule buffers", DDPM_BUFFERS,
           "LDM's noise schedule; the samplers compute theirs from the scheduler config, and betas / "
           "alphas_cumprod / alphas_cumprod_prev are checked to agree with it"),
    Unused("LatentDiffusion scale_factor", ("scale_factor",),
           "the latent scale as a buffer (scale_by_std); checked to equal the VAE's scaling_factor"),
    Unused("learned log-variance", ("logvar",), "LDM's learn_logvar loss weights, training only"),
    Unused("EMA counters", (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"), "LitEma's bookkeeping"),
    Unused("VAE training loss", (VAE_PREFIX + "loss.",), "the autoencoder's LPIPS/discriminator, training only"),
    Unused("XLM-R position_ids", (TEXT_PREFIX + "roberta.embeddings.position_ids",),
           "a buffer older transformers saved; positions are computed from the token ids (fairseq rule)"),
    Unused("m9 pre_LN", (TEXT_PREFIX + "pre_LN.",),
           "the webui's XLM-R module (modules/xlmr.py) always owns a pre_LN, but m9 projects the last hidden "
           "state with `transformation` alone", ("m9",)),
)
# Unused by choice (`Options.ema`), in files with LitEma copies.
EMA_COPIES = Unused("EMA copies of the UNet", (EMA_PREFIX,), "ema=False takes the live weights")
LIVE_UNET = Unused("live UNet weights", (UNET_PREFIX,), "their EMA copies are used")
# Not listed: XLM-R's pooler. diffusers' text encoder holds one, so conversion keeps it; altdiff's TextEncoder
# skips it on loading (text_encoder.IGNORED_KEYS).

# The hub repos' scheduler (BAAI/AltDiffusion-m9 and -m18 ship the same one).
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
             "trained_betas": None}
CLASS_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}

# Layer renames inside one block, LDM name → diffusers name (parameter suffixes .weight/.bias carry over).
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


@dataclass(frozen=True)
class Block:
    """`ldm` and `diffusers` are key prefixes ending in '.'; `names` renames the layers inside (None: the
    names are the same on both sides, as in the UNet's transformer blocks and XLM-R)."""

    ldm: str
    diffusers: str
    names: dict | None = None
    # LDM's VAE attention uses 1x1 convs ([C, C, 1, 1]) where diffusers has linear layers ([C, C]).
    conv_as_linear: bool = False


def unet_blocks(cfg: UNetConfig) -> list[Block]:
    """LDM `input_blocks` / `middle_block` / `output_blocks` numbering, following `cfg`'s block layout."""
    p = UNET_PREFIX
    blocks = [Block(p + "time_embed.0.", "time_embedding.linear_1."),
              Block(p + "time_embed.2.", "time_embedding.linear_2."),
              Block(p + "input_blocks.0.0.", "conv_in."),
              Block(p + "out.0.", "conv_norm_out."),
              Block(p + "out.2.", "conv_out.")]
    layers = cfg.per_block("layers_per_block")
    last = len(cfg.down_block_types) - 1
    n = 1
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(layers[i]):
            blocks.append(Block(f"{p}input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if kind.startswith("CrossAttn"):
                blocks.append(Block(f"{p}input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}."))
            n += 1
        if i < last:
            blocks.append(Block(f"{p}input_blocks.{n}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            n += 1
    blocks += [Block(p + "middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
               Block(p + "middle_block.1.", "mid_block.attentions.0."),
               Block(p + "middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)]
    n = 0
    for i, (kind, count) in enumerate(zip(cfg.up_block_types, layers[::-1])):
        attention = kind.startswith("CrossAttn")
        for j in range(count + 1):
            blocks.append(Block(f"{p}output_blocks.{n}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if attention:
                blocks.append(Block(f"{p}output_blocks.{n}.1.", f"up_blocks.{i}.attentions.{j}."))
            if j == count and i < last:
                blocks.append(Block(f"{p}output_blocks.{n}.{2 if attention else 1}.conv.",
                                    f"up_blocks.{i}.upsamplers.0.conv."))
            n += 1
    return blocks


def vae_blocks(cfg: VAEConfig) -> list[Block]:
    """LDM `encoder.down.i.block.j` / `decoder.up.i` (numbered from the lowest resolution) / `mid.*`."""
    p = VAE_PREFIX
    blocks = [Block(p + f"{a}.", f"{b}.") for a, b in (
        ("encoder.conv_in", "encoder.conv_in"), ("encoder.norm_out", "encoder.conv_norm_out"),
        ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
        ("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out"))]
    if cfg.use_quant_conv:
        blocks.append(Block(p + "quant_conv.", "quant_conv."))
    if cfg.use_post_quant_conv:
        blocks.append(Block(p + "post_quant_conv.", "post_quant_conv."))
    for coder in ("encoder", "decoder"):
        blocks += [Block(f"{p}{coder}.mid.block_1.", f"{coder}.mid_block.resnets.0.", VAE_RESNET),
                   Block(f"{p}{coder}.mid.block_2.", f"{coder}.mid_block.resnets.1.", VAE_RESNET)]
        if cfg.mid_block_add_attention:
            blocks.append(Block(f"{p}{coder}.mid.attn_1.", f"{coder}.mid_block.attentions.0.", VAE_ATTENTION,
                                conv_as_linear=True))
    levels = len(cfg.block_out_channels)
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            blocks.append(Block(f"{p}encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                                VAE_RESNET))
        if i < levels - 1:
            blocks.append(Block(f"{p}encoder.down.{i}.downsample.conv.",
                                f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        level = levels - 1 - i
        for j in range(cfg.layers_per_block + 1):
            blocks.append(Block(f"{p}decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                                VAE_RESNET))
        if i < levels - 1:
            blocks.append(Block(f"{p}decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return blocks


def text_encoder_blocks(cfg: TextEncoderConfig) -> list[Block]:
    """XLM-R keeps its transformers names; the projection layers sit next to it."""
    names = ["roberta", "transformation"] + (["pre_LN", "transformation_pre"] if cfg.has_pre_transformation else [])
    return [Block(f"{TEXT_PREFIX}{name}.", f"{name}.") for name in names]


def component_blocks(configs: dict[str, dict]) -> dict[str, list[Block]]:
    return {"text_encoder": text_encoder_blocks(TextEncoderConfig.from_dict(configs["text_encoder"])),
            "unet": unet_blocks(UNetConfig.from_dict(configs["unet"])),
            "vae": vae_blocks(VAEConfig.from_dict(configs["vae"]))}


def _rename(key: str, index: dict[str, Block], to_diffusers: bool) -> tuple[str, Block] | None:
    """`key` under the longest block prefix it starts with, renamed to the other side; None if no block
    claims it."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        block = index.get(".".join(parts[:cut]) + ".")
        if block is None:
            continue
        rest = parts[cut:]
        target = block.diffusers if to_diffusers else block.ldm
        if block.names is None:
            return target + ".".join(rest), block
        names = block.names if to_diffusers else {v: k for k, v in block.names.items()}
        layer = ".".join(rest[:-1])
        return (f"{target}{names[layer]}.{rest[-1]}", block) if layer in names else None
    return None


def ema_key(ldm_key: str) -> str:
    """LDM's LitEma stores `model.diffusion_model.a.b.weight` as `model_ema.diffusion_modelabweight`."""
    return EMA_PREFIX + ldm_key[len("model."):].replace(".", "")


# --- reading, detection and config inference ---------------------------------------------------------------

class CheckpointFile:
    """An original single file: keys and shapes up front, tensors read one component at a time.

    Validation and pickles go through `read_state_dict` (weights_only, truncation checks); safetensors are
    then re-opened with `safe_open` per component so only one component's pages are mapped at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        state_dict = read_state_dict(self.path)
        self.shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        self._tensors = None if self.path.suffix == ".safetensors" else state_dict
        self.metadata = {}
        if self._tensors is None:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self._tensors is not None:
            for key in keys:
                yield key, self._tensors[key]
            return
        with safe_open(str(self.path), framework="pt") as f:
            for key in keys:
                yield key, f.get_tensor(key)


def detect_architecture(shapes: dict[str, tuple], source: str) -> str:
    """'m9' or 'm18' from the text encoder's tensors; a clear error for anything that is not AltDiffusion."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has(TEXT_PREFIX + "transformer.") or has(TEXT_PREFIX + "model.") or has("conditioner."):
        raise WeightsError(f"{source}: this is a Stable Diffusion checkpoint with a CLIP/OpenCLIP text encoder "
                           f"({TEXT_PREFIX}transformer.* / {TEXT_PREFIX}model.* / conditioner.*), not "
                           f"AltDiffusion (expected an XLM-R text encoder under {TEXT_PREFIX}roberta.*)")
    for prefix, part in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX + "roberta.", "XLM-R text encoder"),
                         (TEXT_PREFIX + "transformation.", "text projection")):
        if not has(prefix):
            raise WeightsError(f"{source}: no {part} in this file (no {prefix}* tensors); expected an original "
                               "AltDiffusion single file")
    return "m18" if TEXT_PREFIX + "transformation_pre.weight" in shapes else "m9"


def _shape(shapes: dict[str, tuple], key: str, source: str) -> tuple:
    if key not in shapes:
        raise WeightsError(f"{source}: unrecognised layout, {key} is missing")
    return shapes[key]


def _indices(shapes: dict[str, tuple], prefix: str) -> list[int]:
    """The distinct numbers right after `prefix` (e.g. the N of input_blocks.N.*), sorted."""
    return sorted({int(k[len(prefix):].split(".")[0]) for k in shapes
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()})


def _one_or_list(values: list):
    return values[0] if len(set(values)) == 1 else values


def infer_unet_config(shapes: dict[str, tuple], image_size: int, vae_scale_factor: int, source: str) -> dict:
    p = UNET_PREFIX
    levels, current = [], []
    for n in _indices(shapes, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{n}.0.op.weight" in shapes:
            levels.append(current)
            current = []
        else:
            current.append(n)
    levels.append(current)
    if not all(levels):
        raise WeightsError(f"{source}: unrecognised UNet layout (a level of input_blocks has no resnet)")
    widths = [_shape(shapes, f"{p}input_blocks.{level[0]}.0.out_layers.3.weight", source)[0] for level in levels]
    attention = [p + f"input_blocks.{level[0]}.1.proj_in.weight" in shapes for level in levels]
    depths = [len(_indices(shapes, f"{p}input_blocks.{level[0]}.1.transformer_blocks.")) or 1 for level in levels]
    linear = len(_shape(shapes, p + "middle_block.1.proj_in.weight", source)) == 2
    return {
        "_class_name": CLASS_NAMES["unet"],
        "sample_size": image_size // vae_scale_factor,
        "in_channels": _shape(shapes, p + "input_blocks.0.0.weight", source)[1],
        "out_channels": _shape(shapes, p + "out.2.weight", source)[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        "block_out_channels": widths,
        "layers_per_block": _one_or_list([len(level) for level in levels]),
        "transformer_layers_per_block": _one_or_list(depths),
        "cross_attention_dim": _shape(shapes, p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", source)[1],
        # SD2-style (m18) heads are 64 wide; SD1-style (m9) configs use 8 heads everywhere.
        "attention_head_dim": [w // 64 for w in widths] if linear else 8,
        "use_linear_projection": linear,
    }


def infer_vae_config(shapes: dict[str, tuple], image_size: int, source: str) -> dict:
    p = VAE_PREFIX
    levels = _indices(shapes, p + "encoder.down.")
    if not levels:
        raise WeightsError(f"{source}: unrecognised VAE layout ({p}encoder.down.* is missing)")
    return {
        "_class_name": CLASS_NAMES["vae"],
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight", source)[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight", source)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [_shape(shapes, f"{p}encoder.down.{i}.block.0.conv2.weight", source)[0]
                               for i in levels],
        "layers_per_block": len(_indices(shapes, p + "encoder.down.0.block.")),
        "latent_channels": _shape(shapes, p + "decoder.conv_in.weight", source)[1],
        "sample_size": image_size,
        "scaling_factor": 0.18215,
        "use_quant_conv": p + "quant_conv.weight" in shapes,
        "use_post_quant_conv": p + "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": p + "encoder.mid.attn_1.q.weight" in shapes,
    }


def infer_text_encoder_config(shapes: dict[str, tuple], source: str) -> dict:
    p = TEXT_PREFIX + "roberta."
    vocab_size, hidden = _shape(shapes, p + "embeddings.word_embeddings.weight", source)
    return {
        "architectures": ["RobertaSeriesModelWithTransformation"],
        "model_type": "xlm-roberta",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": len(_indices(shapes, p + "encoder.layer.")),
        "num_attention_heads": hidden // 64,  # XLM-R's head width; shapes cannot tell
        "intermediate_size": _shape(shapes, p + "encoder.layer.0.intermediate.dense.weight", source)[0],
        "max_position_embeddings": _shape(shapes, p + "embeddings.position_embeddings.weight", source)[0],
        "type_vocab_size": _shape(shapes, p + "embeddings.token_type_embeddings.weight", source)[0],
        "project_dim": _shape(shapes, TEXT_PREFIX + "transformation.weight", source)[0],
        "has_pre_transformation": TEXT_PREFIX + "transformation_pre.weight" in shapes,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "position_embedding_type": "absolute", "use_attention_mask": True,
    }


@dataclass
class Options:
    """What a single file cannot tell. `architecture`: 'auto' | 'm9' | 'm18' (an explicit one must match the
    file); `image_size`: the training resolution (sets UNet and VAE sample_size; None: the file's metadata,
    else 512); `ema`: None uses EMA weights when the file has them, True requires them, False ignores them;
    the per-component dicts override inferred and metadata config fields (e.g.
    {"text_encoder": {"num_attention_heads": 4}})."""

    architecture: str = "auto"
    image_size: int | None = None
    ema: bool | None = None
    unet: dict = dataclasses.field(default_factory=dict)
    vae: dict = dataclasses.field(default_factory=dict)
    text_encoder: dict = dataclasses.field(default_factory=dict)
    scheduler: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict | None, what: str = "config") -> Options:
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{what}: unknown keys {unknown} (expected some of {names})")
        options = cls(**data)
        if options.architecture not in ("auto",) + ARCHITECTURES:
            raise ValueError(f"{what}: architecture={options.architecture!r} (expected 'auto', 'm9' or 'm18')")
        size = options.image_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 8):
            raise ValueError(f"{what}: image_size={options.image_size!r} (expected a positive multiple of 8)")
        if options.ema not in (None, True, False):
            raise ValueError(f"{what}: ema={options.ema!r} (expected None, True or False)")
        for name in ("unet", "vae", "text_encoder", "scheduler"):
            if not isinstance(getattr(options, name), dict):
                raise ValueError(f"{what}: {name} must be a dict of config fields, got "
                                 f"{type(getattr(options, name)).__name__}")
        return options


@dataclass
class Conversion:
    """A checked plan for one original file: the inferred configs and, per component, (source key,
    diffusers key, block) for every tensor."""

    file: CheckpointFile
    architecture: str
    uses_ema: bool
    configs: dict[str, dict]
    plan: dict[str, list[tuple[str, str, Block]]]

    def state_dicts(self, dtype: torch.dtype | None = None, progress: bool = False) -> Iterator[tuple[str, StateDict]]:
        """(component, diffusers state dict) for text_encoder, unet, vae, one at a time."""
        for component in COMPONENTS:
            entries = self.plan[component]
            out = {}
            tensors = self.file.read([source for source, _, _ in entries])
            bar = tqdm(zip(entries, tensors), total=len(entries), desc=component, unit="tensor", disable=not progress)
            for (_, key, block), (_, tensor) in bar:
                if block.conv_as_linear and tensor.ndim > 2:
                    tensor = tensor.flatten(1)
                out[key] = cast_floating(tensor, dtype)
            yield component, out


CONFIG_CLASSES = {"text_encoder": TextEncoderConfig, "unet": UNetConfig, "vae": VAEConfig,
                  "scheduler": SchedulerConfig}
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}


def _apply_overrides(config: dict, overrides: dict, component: str) -> dict:
    allowed = {f.name for f in dataclasses.fields(CONFIG_CLASSES[component])} | set(config)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"config: unknown {component} fields {unknown}")
    return {**config, **overrides}


def stored_config(configs: dict[str, dict]) -> dict[str, str]:
    """The safetensors `__metadata__` entry that `--to-original` writes: the variant and each component's
    diffusers config (less its private `_*` keys but the scheduler's `_class_name`), so that reading the file
    back needs no overrides and converting it back gives the folder's configs."""
    data = {"architecture": "m18" if configs["text_encoder"].get("has_pre_transformation") else "m9"}
    for component in CONFIG_CLASSES:
        if component in configs:
            data[component] = {k: v for k, v in configs[component].items()
                               if not k.startswith("_") or k == "_class_name"}
    return {METADATA_KEY: json.dumps(data, sort_keys=True)}


def _read_stored_config(file: CheckpointFile, architecture: str, source: str) -> dict:
    """`stored_config`'s entry of the file, checked; {} when it has none (every file but ours)."""
    text = file.metadata.get(METADATA_KEY)
    if text is None:
        return {}
    where = f"{source}: __metadata__[{METADATA_KEY!r}]"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise WeightsError(f"{where} is not JSON") from None
    fields = {"architecture", *CONFIG_CLASSES}
    if not isinstance(data, dict) or set(data) - fields or not all(
            isinstance(data.get(c, {}), dict) for c in CONFIG_CLASSES):
        raise WeightsError(f"{where}: expected a JSON object with some of {sorted(fields)}, one config object "
                           "per component")
    if data.get("architecture", architecture) != architecture:
        raise WeightsError(f"{where} says {data['architecture']!r}, but the tensors are {architecture}")
    return data


def plan_conversion(path: str | Path, options: Options | dict | None = None) -> Conversion:
    """Open an original file, detect m9/m18, infer the configs and map every tensor; all checks happen here,
    before any weight is read. Config precedence: inferred from shapes < the file's stored config < `options`."""
    options = options if isinstance(options, Options) else Options.from_dict(options)
    file = CheckpointFile(path)
    source = str(file.path)
    shapes = file.shapes
    architecture = detect_architecture(shapes, source)
    if options.architecture not in ("auto", architecture):
        raise WeightsError(f"{source}: config {options.architecture} was asked for, but the file is "
                           f"{architecture} (text encoder {'with' if architecture == 'm18' else 'without'} "
                           "transformation_pre)")
    stored = _read_stored_config(file, architecture, source)
    if options.image_size is not None:  # an explicit training resolution wins over the stored sample sizes
        stored = {c: {k: v for k, v in d.items() if k != "sample_size"}
                  for c, d in stored.items() if c != "architecture"}

    def merge(component: str, inferred: dict) -> dict:
        # Like a folder's config.json, a stored config may hold fields altdiff does not read.
        return _apply_overrides({**inferred, **stored.get(component, {})}, getattr(options, component), component)

    image_size = options.image_size or 512
    vae = merge("vae", infer_vae_config(shapes, image_size, source))
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    configs = {
        "vae": vae,
        "unet": merge("unet", infer_unet_config(shapes, image_size, scale, source)),
        "text_encoder": merge("text_encoder", infer_text_encoder_config(shapes, source)),
        # A stored scheduler config replaces the hub repos' whole: it may be of another class.
        "scheduler": merge("scheduler", {} if "scheduler" in stored else dict(SCHEDULER)),
    }
    has_ema = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in shapes)
    if options.ema and not has_ema:
        raise WeightsError(f"{source}: EMA weights were asked for, but the file has no {EMA_PREFIX}* UNet tensors")
    uses_ema = has_ema and options.ema is not False
    try:
        blocks = component_blocks(configs)
    except ConfigError as e:
        raise WeightsError(f"{source}: the inferred config is not usable ({e})") from None
    indexes = {component: {b.ldm: b for b in table} for component, table in blocks.items()}
    ema_copies = {ema_key(k) for k in shapes if k.startswith(UNET_PREFIX)}
    plan = {component: [] for component in COMPONENTS}
    ignored, unexpected = {}, []
    for key in shapes:
        group = next((g for g in UNUSED if g.claims(key, architecture)), None)
        if group is None and key in ema_copies:
            if uses_ema:
                continue  # read in place of its live weight, below
            group = EMA_COPIES
        if group is not None:
            ignored.setdefault(group, []).append(key)
            continue
        component = next((c for c, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        renamed = _rename(key, indexes[component], to_diffusers=True) if component else None
        if renamed is None:
            unexpected.append(key)
            continue
        if component == "unet" and uses_ema:
            ignored.setdefault(LIVE_UNET, []).append(key)
            key = ema_key(key)
        plan[component].append((key, *renamed))
    for group, keys in ignored.items():
        log.debug("%s: ignored %d tensors, %s (%s): %s%s", source, len(keys), group.name, group.why,
                  ", ".join(keys[:16]), ", ..." if len(keys) > 16 else "")
    if unexpected:
        raise WeightsError(f"{source}: {len(unexpected)} tensors do not fit the AltDiffusion layout inferred "
                           f"from the file (first: {unexpected[:5]}); only the groups in "
                           "altdiff.single_file.UNUSED are known to be unused")
    if uses_ema:
        missing = [s for s, _, _ in plan["unet"] if s not in shapes]
        if missing:
            raise WeightsError(f"{source}: the EMA weights are incomplete ({len(missing)} UNet tensors have no "
                               f"EMA copy, first: {missing[:3]}); pass ema=False to use the non-EMA weights")
    _check_ignored_values(file, configs, source)
    conversion = Conversion(file, architecture, uses_ema, configs, plan)
    _check_against_models(conversion, source)
    return conversion


def _agrees(tensor: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the rounding of the file's storage dtype (webui "save as half" files hold fp16 buffers)."""
    if tuple(tensor.shape) != tuple(expected.shape) or not tensor.is_floating_point():
        return False
    rtol = max(torch.finfo(tensor.dtype).eps, 1e-5)
    return torch.allclose(tensor.double(), expected.double(), rtol=rtol, atol=1e-6)


def _check_ignored_values(file: CheckpointFile, configs: dict[str, dict], source: str) -> None:
    """The ignored tensors that the webui computes with must agree with the configs altdiff computes with:
    otherwise the file would give another image here than there."""
    keys = [k for k in (*CHECKED_SCHEDULE, "scale_factor") if k in file.shapes]
    if not keys:
        return
    tensors = dict(file.read(keys))
    if "scale_factor" in tensors:
        expected = torch.tensor(float(configs["vae"]["scaling_factor"]))
        if not _agrees(tensors["scale_factor"], expected):
            raise WeightsError(f"{source}: scale_factor={tensors['scale_factor'].tolist()} differs from the VAE's "
                               f"scaling_factor={expected.item()}; pass config={{'vae': {{'scaling_factor': ...}}}}")
    schedule = [k for k in CHECKED_SCHEDULE if k in tensors]
    if not schedule:
        return
    scheduler = SchedulerConfig.from_dict(configs["scheduler"], f"{source} (scheduler)")
    sampler = sampler_for_config(scheduler)
    cfg = resolve_config(sampler, scheduler)
    alphas_cumprod = train_alphas_cumprod(sampler, cfg).double()
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    expected = {"betas": 1 - alphas_cumprod / previous, "alphas_cumprod": alphas_cumprod,
                "alphas_cumprod_prev": previous}
    for key in schedule:
        if not _agrees(tensors[key], expected[key]):
            described = (f"trained_betas ({len(cfg['trained_betas'])} values)" if cfg["trained_betas"] is not None
                         else f"{cfg['beta_schedule']} {cfg['beta_start']}..{cfg['beta_end']}")
            raise WeightsError(
                f"{source}: the file's noise schedule ({key}, {tensors[key].numel()} steps) differs from the "
                f"scheduler config's ({described}, {cfg['num_train_timesteps']} steps), which the samplers use; "
                "pass config={'scheduler': {...}} matching the file (e.g. beta_start/beta_end/beta_schedule or "
                "trained_betas)")


def _expected_shape(shape: tuple, block: Block) -> tuple:
    return shape[:2] if block.conv_as_linear and len(shape) > 2 else shape


def _check_against_models(conversion: Conversion, source: str) -> None:
    """Every converted key and shape must fit altdiff's own modules built from the inferred configs (on the
    meta device: no memory, no init)."""
    builders = {"text_encoder": lambda c: TextEncoder(TextEncoderConfig.from_dict(c)),
                "unet": lambda c: UNet(UNetConfig.from_dict(c)),
                "vae": lambda c: AutoencoderKL(VAEConfig.from_dict(c))}
    for component, entries in conversion.plan.items():
        with torch.device("meta"):
            model = builders[component](conversion.configs[component])
            # For EMA the source key is the EMA copy, whose shape is that of the weight it averages.
            tensors = {key: torch.empty(_expected_shape(conversion.file.shapes[source_key], block))
                       for source_key, key, block in entries}
        if component == "text_encoder":
            tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_IGNORED_KEYS)}
        check_state_dict(model, tensors, f"{source} ({component})")


# --- diffusers folder → original file ----------------------------------------------------------------------

def read_component(folder: Path, component: str) -> StateDict:
    """One component's weights from a diffusers folder, with old VAE attention names brought up to date."""
    state_dict = read_state_dict(find_weights(folder / component))
    return rename_legacy_attention_keys(state_dict) if component == "vae" else state_dict


def folder_configs(folder: Path) -> dict[str, dict]:
    """The component configs of a diffusers-layout folder, and its scheduler config when it has one."""
    configs = {c: read_json(folder / c / "config.json") for c in COMPONENTS}
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        configs["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")
    return configs


def to_original_state_dict(folder: str | Path, dtype: torch.dtype | None = None,
                           progress: bool = False) -> StateDict:
    """A diffusers-layout AltDiffusion folder as one LDM-layout state dict (what the webui loads)."""
    folder = Path(folder)
    configs = folder_configs(folder)
    out = {}
    for component, blocks in component_blocks(configs).items():
        index = {b.diffusers: b for b in blocks}
        state_dict = read_component(folder, component)
        unmapped = []
        for key, tensor in tqdm(state_dict.items(), desc=component, unit="tensor", disable=not progress):
            if component == "text_encoder" and key == "roberta.embeddings.position_ids":
                continue
            renamed = _rename(key, index, to_diffusers=False)
            if renamed is None:
                unmapped.append(key)
                continue
            ldm_key, block = renamed
            if block.conv_as_linear and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            out[ldm_key] = cast_floating(tensor, dtype)
        if unmapped:
            raise WeightsError(f"{folder / component}: {len(unmapped)} tensors have no place in the original "
                               f"layout (first: {unmapped[:5]})")
    return out


# --- loading a single file as a pipeline -------------------------------------------------------------------

def is_single_file(source: str | Path) -> bool:
    path = Path(source).expanduser()
    return path.suffix in SINGLE_FILE_SUFFIXES and not path.is_dir()


def _resolve(source: str | Path, components: tuple[str, ...], what: str) -> Path:
    from .hub import resolve

    try:
        return resolve(source, components=components)
    except ValueError as e:
        raise ValueError(f"{what}: {str(e).removeprefix('model: ')}") from None


def tokenizer_folder(source: str | Path) -> Path:
    """The folder holding `sentencepiece.bpe.model`: a tokenizer folder, a pipeline folder or a hub repo."""
    folder = _resolve(source, (), "tokenizer")
    folder = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    if not (folder / MODEL_FILE).is_file():
        raise ValueError(f"tokenizer: {source} has no {MODEL_FILE} (expected a tokenizer folder, a pipeline "
                         "folder or a hub repo id)")
    return folder


def safety_checker_folders(source: str | Path) -> tuple[Path, Path]:
    """(safety_checker/, feature_extractor/) of a pipeline folder or hub repo."""
    folder = _resolve(source, ("safety_checker",), "safety_checker")
    parts = folder / "safety_checker", folder / "feature_extractor"
    if not all(p.is_dir() for p in parts):
        raise ValueError(f"safety_checker: {source} has no safety_checker/ and feature_extractor/ folders "
                         "(expected a pipeline folder or hub repo id)")
    return parts


def check_tokenizer(tokenizer: Tokenizer, configs: dict[str, dict], source: str) -> None:
    vocab = configs["text_encoder"]["vocab_size"]
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer: {source} has {len(tokenizer)} tokens, more than the text encoder's "
                         f"{vocab} embeddings; it belongs to another model")


def load_single_file(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     tokenizer: str | Path | None = None, safety_checker: bool | str | Path | None = True,
                     config: Options | dict | None = None) -> dict:
    """The `Pipeline` fields for one original file. `tokenizer` / `safety_checker` (a folder or hub repo) fill
    what the file lacks; both default to the BAAI hub repo of the detected architecture; a false
    `safety_checker` skips the checker."""
    conversion = plan_conversion(path, config)
    default_repo = DEFAULT_REPOS[conversion.architecture]
    tokenizer_source = tokenizer if tokenizer is not None else default_repo
    tok = Tokenizer.from_folder(tokenizer_folder(tokenizer_source))
    check_tokenizer(tok, conversion.configs, str(tokenizer_source))
    checker: SafetyChecker | None = None
    if safety_checker:
        checker_source = default_repo if safety_checker is True else safety_checker
        checker = load_safety_checker(*safety_checker_folders(checker_source), dtype=dtype, device=device)
    builders = {"text_encoder": (TextEncoder, TextEncoderConfig), "unet": (UNet, UNetConfig),
                "vae": (AutoencoderKL, VAEConfig)}
    parts = {}
    for component, state_dict in conversion.state_dicts():
        cls, cfg_cls = builders[component]
        cfg = cfg_cls.from_dict(conversion.configs[component], f"{path} ({component}, inferred)")
        parts[component] = load_module(lambda cls=cls, cfg=cfg: cls(cfg), state_dict, f"{path} ({component})",
                                       dtype=dtype, device=device,
                                       ignore=TEXT_ENCODER_IGNORED_KEYS if component == "text_encoder" else ())
    scheduler = SchedulerConfig.from_dict(conversion.configs["scheduler"], f"{path} (scheduler, inferred)")
    return dict(tokenizer=tok, scheduler_config=scheduler, safety_checker=checker, **parts)
