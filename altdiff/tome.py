"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023) as the webui applies it through tomesd 0.1.3
(sd_models.apply_token_merging): before each self-attention of the highest-resolution transformer blocks,
merge `ratio` of the tokens into their most similar neighbours and unmerge the attention's output back.

tomesd's settings the webui uses: merge_attn only (not cross-attention, not the MLP), use_rand=False (the
destination token of each sx x sy cell is its top-left one), sx = sy = 2, max_downsample = 1 (only the
blocks at the latent's own resolution). The similarity metric is the block's input; a destination keeps the
mean of itself and the tokens merged into it. Unlike tomesd, the cell partition is computed once per size
and device, and tokens are selected by index rather than by sorting a mask on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class TokenMerging:
    """tomesd.apply_patch's arguments that change pixels."""

    ratio: float
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not 0 <= self.ratio < 1:
            raise ValueError(f"token_merging_ratio: expected a number in [0, 1), got {self.ratio!r}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample: expected 1, 2, 4 or 8, got {self.max_downsample!r}")
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")


@lru_cache(maxsize=32)
def _partition(h: int, w: int, sx: int, sy: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) token positions: the top-left token of every whole sy x sx cell is a destination; every
    other token (the partial cells at the right and bottom edges included) a source. Shapes follow from the
    sizes alone (no nonzero()), so torch.compile traces it with static shapes."""
    dst = (torch.arange(h // sy, device=device)[:, None] * (sy * w)
           + torch.arange(w // sx, device=device)[None, :] * sx).reshape(-1)
    is_dst = torch.zeros(h * w, dtype=torch.uint8, device=device).index_fill_(0, dst, 1)
    # a stable sort puts the sources (0) first, in position order
    return is_dst.argsort(stable=True)[:h * w - dst.numel()], dst


def bipartite_merge(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """tomesd's bipartite_soft_matching_random2d without randomness: the r source tokens most similar (cosine)
    to a destination merge into it. Returns (merge, unmerge) for tensors shaped like `metric` (B, N, C)."""
    b, n, _ = metric.shape
    # the cache is for eager calls; torch.compile traces the computation itself (its shapes are static)
    partition = _partition.__wrapped__ if torch.compiler.is_compiling() else _partition
    src_pos, dst_pos = partition(h, w, sx, sy, metric.device)
    r = min(r, len(src_pos))
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)
        unm_idx, src_idx = order[:, r:], order[:, :r]  # kept sources, merged sources (indices into src_pos)
        dst_idx = node_idx.gather(1, src_idx)  # where each merged source goes (index into dst_pos)
        unm_pos, merged_pos = src_pos[unm_idx], src_pos[src_idx]  # their token positions, (B, .)

    def expand(index: torch.Tensor, c: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        unm = x.gather(1, expand(unm_pos, c))
        dst = x[:, dst_pos].scatter_reduce(1, expand(dst_idx, c), x.gather(1, expand(merged_pos, c)), reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        unm, dst = x[:, :unm_pos.shape[1]], x[:, unm_pos.shape[1]:]
        out = x.new_empty(b, n, c)
        out[:, dst_pos] = dst
        out.scatter_(1, expand(unm_pos, c), unm)
        out.scatter_(1, expand(merged_pos, c), dst.gather(1, expand(dst_idx, c)))
        return out

    return merge, unmerge


def transformer_levels(unet) -> list[tuple[int, torch.nn.Module]]:
    """(resolution level, Transformer2D) for every transformer of the UNet: level k works at the latent's size
    divided by 2**k (down block k, the middle block at the last level, up block j at the last level - j)."""
    last = len(unet.down_blocks) - 1
    found = [(k, t) for k, block in enumerate(unet.down_blocks) for t in (block.attentions or [])]
    found += [(last, t) for t in unet.mid_block.attentions]
    found += [(last - j, t) for j, block in enumerate(unet.up_blocks) for t in (block.attentions or [])]
    return found


def apply(unet, merging: TokenMerging | None) -> None:
    """Set (or with None / ratio 0 clear) token merging on the blocks tomesd patches: those whose downsampling
    2**level is at most max_downsample (tomesd's rule; exact where the latent's sides are even)."""
    on = merging is not None and merging.ratio > 0
    for level, transformer in transformer_levels(unet):
        for block in transformer.transformer_blocks:
            block.token_merging = merging if on and 2 ** level <= merging.max_downsample else None
    unet.token_merging = merging if on else None


@contextmanager
def merging_for(unet, ratio: float | None) -> Iterator[TokenMerging | None]:
    """generate()'s token_merging_ratio for one call: None keeps the pipeline's setting, 0 turns merging off,
    another ratio merges with tomesd's other defaults; the setting is restored afterwards. Yields what runs."""
    saved = unet.token_merging
    if ratio is not None:
        apply(unet, TokenMerging(ratio) if ratio else None)
    try:
        yield unet.token_merging
    finally:
        apply(unet, saved)
