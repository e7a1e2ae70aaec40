"""Multi-head attention on (batch, tokens, channels) tensors, shared by the UNet, VAE, text encoder and
safety checker."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Above this many query tokens, `attention` processes queries in slices to bound the (tokens x tokens)
# score memory of the math backend; None disables slicing. Set through `set_attention_slice`.
_slice_size: int | None = None


def set_attention_slice(query_chunk: int | None) -> None:
    """Process at most `query_chunk` query tokens at a time (None: all at once). Results are unchanged up to
    floating-point reassociation; peak memory drops for large images on backends without flash attention."""
    global _slice_size
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive int or None, got {query_chunk}")
    _slice_size = query_chunk


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """q: (B, Nq, C), k/v: (B, Nk, C) → (B, Nq, C). `mask` is additive or boolean, broadcastable to
    (B, heads, Nq, Nk). `upcast` computes in fp32 (diffusers' upcast_attention) and casts back."""
    b, nq, c = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if _slice_size is None or nq <= _slice_size:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        chunks = []
        for i in range(0, nq, _slice_size):
            m = mask if mask is None or mask.shape[-2] == 1 else mask[..., i:i + _slice_size, :]
            chunks.append(F.scaled_dot_product_attention(q[:, :, i:i + _slice_size], k, v, attn_mask=m))
        out = torch.cat(chunks, dim=2)
    return out.transpose(1, 2).reshape(b, nq, -1).to(dtype)
