"""XLM-R text encoder with AltDiffusion's projection: diffusers' `RobertaSeriesModelWithTransformation`.

m9 projects the last hidden state with `transformation`; m18 (`has_pre_transformation`) projects the
second-to-last one with `pre_LN` then `transformation_pre` (its checkpoint still carries an unused
`transformation`). Attribute names are the checkpoint keys; the `nn.ModuleDict`s below only reproduce
transformers' key nesting (`attention.self.query`, `intermediate.dense`, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .checks import is_int
from .config import TextEncoderConfig
from .linear import Linear
from .weights import find_weights, load_module, open_weights

# Checkpoint keys the model does not use: the pooler, the position-id buffer that older transformers saved,
# and CLIP-style `logit_scale` from AltCLIP training.
IGNORED_KEYS = ("roberta.pooler.", "roberta.embeddings.position_ids", "logit_scale")


class Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.padding_idx = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # fairseq positions: count non-pad tokens from padding_idx + 1; pad tokens sit at padding_idx.
        not_pad = input_ids.ne(self.padding_idx).long()
        position_ids = torch.cumsum(not_pad, dim=1) * not_pad + self.padding_idx
        # Every weight through its module's call (not `.weight[0]`), so offload hooks see each use.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.LayerNorm(x + self.position_embeddings(position_ids))


class Layer(nn.Module):
    """Post-LN transformer block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: Linear(d, d) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": Linear(d, d),
                                     "LayerNorm": nn.LayerNorm(d, eps=cfg.layer_norm_eps)}),
        })
        self.intermediate = nn.ModuleDict({"dense": Linear(d, cfg.intermediate_size)})
        self.output = nn.ModuleDict({"dense": Linear(cfg.intermediate_size, d),
                                     "LayerNorm": nn.LayerNorm(d, eps=cfg.layer_norm_eps)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qkv, out = self.attention["self"], self.attention["output"]
        h = attention(qkv["query"](x), qkv["key"](x), qkv["value"](x), self.heads, mask=mask)
        x = out["LayerNorm"](x + out["dense"](h))
        h = self.output["dense"](F.gelu(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](x + h)


class Encoder(nn.Module):
    """The layer stack (`encoder.layer.N` in checkpoints). compile=True compiles this, not the embeddings: a
    per-call textual-inversion embedding replaces the word-embedding table, which must not force a recompile."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, num_layers: int) -> torch.Tensor:
        for layer in self.layer[:num_layers]:
            x = layer(x, mask)
        return x


class Roberta(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_layers: int) -> torch.Tensor:
        """The hidden state after the embeddings and the first `num_layers` layers."""
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            # transformers' extended mask: 0 where attended, the dtype's most negative value where padded.
            keep = attention_mask.to(device=x.device, dtype=x.dtype)[:, None, None, :]
            mask = (1.0 - keep) * torch.finfo(x.dtype).min
        return self.encoder(x, mask, num_layers)


class TextEncoder(nn.Module):
    """`forward(input_ids, attention_mask)` gives the `projection_state` that diffusers' AltDiffusion feeds
    the UNet."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.roberta = Roberta(cfg)
        self.transformation = Linear(cfg.hidden_size, cfg.project_dim)
        if cfg.has_pre_transformation:
            self.transformation_pre = Linear(cfg.hidden_size, cfg.project_dim)
            self.pre_LN = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformation.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformation.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                clip_skip: int | None = None) -> torch.Tensor:
        """input_ids: LongTensor[B, L] (L <= max_position_embeddings - 2); attention_mask: [B, L] of 1 (token)
        and 0 (padding), None for all tokens. Returns Tensor[B, L, project_dim].

        clip_skip (altdiff's definition; diffusers' is broken for XLM-R): project
        hidden_states[-(clip_skip + 1)] (hidden_states[0] is the embedding output) through the model's own
        projection path instead of the default state. On m18 clip_skip=1 is the default; on m9 clip_skip=0.
        """
        cfg = self.config
        self._check_inputs(input_ids, attention_mask)
        n_states = cfg.num_hidden_layers + 1
        if clip_skip is None:
            clip_skip = 1 if cfg.has_pre_transformation else 0
        elif not is_int(clip_skip, 0, n_states - 1):
            raise ValueError(f"clip_skip must be None or an int in [0, {n_states - 1}] (this encoder has "
                             f"{n_states} hidden states), got {clip_skip!r}")
        clip_skip = int(clip_skip)
        # Only the layers up to the requested hidden state run.
        x = self.roberta(input_ids, attention_mask, n_states - 1 - clip_skip)
        if cfg.has_pre_transformation:
            return self.transformation_pre(self.pre_LN(x))
        return self.transformation(x)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        limit = self.config.max_position_embeddings - 2
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point()
                or input_ids.is_complex() or input_ids.dtype == torch.bool):
            raise ValueError(f"input_ids must be a 2-D integer tensor [batch, tokens], got "
                             f"{_describe(input_ids)}")
        if not 1 <= input_ids.shape[1] <= limit:
            raise ValueError(f"input_ids must have 1 to {limit} tokens (max_position_embeddings - 2), "
                             f"got {input_ids.shape[1]}")
        low, high = (int(input_ids.min()), int(input_ids.max())) if input_ids.numel() else (0, 0)
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), got values in "
                             f"[{low}, {high}]")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or attention_mask.shape != input_ids.shape):
            raise ValueError(f"attention_mask must be a tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {_describe(attention_mask)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def load_text_encoder(folder: str | Path, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None, variant: str | None = None) -> TextEncoder:
    """The `text_encoder/` folder of a diffusers AltDiffusion pipeline: `config.json` and
    `model[.variant].safetensors` (or `.bin`)."""
    folder = Path(folder)
    cfg = TextEncoderConfig.from_json(folder / "config.json")
    path = find_weights(folder, variant)
    return load_module(lambda: TextEncoder(cfg), open_weights(path, device), str(path), dtype=dtype, device=device,
                       ignore=IGNORED_KEYS)
