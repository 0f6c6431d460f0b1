"""Attention: scaled dot-product attention, the one multi-head layer, and the SpatialTransformer (ch. 9).

Cross-attention, eq. :eq:`eq-cross-attention`: queries come from the image features, keys and values
from the text context,

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,   Q = h W_Q,  K = c W_K,  V = c W_V,

so every pixel position takes a weighted average of word vectors. Padded words get weight zero.
The block layout follows Rombach et al. 2022 (LDM, Sec. 3.3) and Vaswani et al. 2017.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int


def _check_mask(mask: Tensor, k: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (k.shape[0], k.shape[2]):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape (B, M) = {(k.shape[0], k.shape[2])}; got {got}")
    if not bool(mask.any(-1).all()):
        raise ValueError("every row of mask needs at least one True (unpadded) key")


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ / √d) V with an optional key mask, eq. :eq:`eq-cross-attention`.

    Shapes: q (B, H, N, d), k and v (B, H, M, d); ``mask`` (B, M) bool, True = a real key, False =
    padding (its weight is exactly 0). Returns ``(out (B, H, N, d), weights (B, H, N, M))``; each
    row of ``weights`` sums to 1. Every row of ``mask`` needs at least one True.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])      # (B, H, N, M)
    if mask is not None:
        _check_mask(mask, k)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise.

    ``out = to_out(concat_h Attention(x W_Q^h, c W_K^h, c W_V^h))``. The one attention of the package:
    the text encoder and the SpatialTransformer use it without biases on Q, K, V (``bias=False``),
    the UNet's self-attention block with them (``bias=True``, as DDPM and diffusers).

    The forward pass runs ``F.scaled_dot_product_attention`` (a fused kernel, same result). Set
    ``store_attention = True`` and it runs the explicit :func:`attention` instead and keeps the
    last weights (B, heads, N, M), detached, in ``last_attention`` for plotting.
    """

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 4, bias: bool = False):
        super().__init__()
        dim = check_int("dim", dim, low=1)
        heads = check_int("heads", heads, low=1)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        context_dim = dim if context_dim is None else check_int("context_dim", context_dim, low=1)
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        self.store_attention = False
        self.last_attention: Tensor | None = None

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim) or None (= x), mask (B, M) bool -> (B, N, dim)."""
        context = x if context is None else context
        B, N, D = x.shape
        split = lambda t: t.reshape(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)  # (B, H, n, d)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        if self.store_attention:
            out, weights = attention(q, k, v, mask)
            self.last_attention = weights.detach()
        else:
            if mask is not None:
                _check_mask(mask, k)
                mask = mask[:, None, None, :]                                        # (B, 1, 1, M)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)           # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(LN x); x += CrossAttn(LN x, context); x += FF(LN x)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int = 4, ff_mult: int = 4):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), MultiHeadAttention(dim, None, heads)
        self.cross_attn = MultiHeadAttention(dim, context_dim, heads) if context_dim else None
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x), mask=None if self.cross_attn else mask)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block cross-attends: pass context (B, K, E) and its mask")
            x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features attend to themselves and to a text context; the residual keeps the input.

    GroupNorm → 1×1 conv in → TransformerBlock over the H·W positions (self-attention, then
    cross-attention with queries from pixels and keys/values from words, eq. :eq:`eq-cross-attention`,
    then a feed-forward) → 1×1 conv out (zero-initialised, so the block starts as the identity)
    → + input. ``forward(h (B, C, H, W), context (B, K, E), mask (B, K) bool)``.
    """

    def __init__(self, channels: int, context_dim: int, heads: int = 4, groups: int = 8):
        super().__init__()
        channels, context_dim = check_int("channels", channels, low=1), check_int("context_dim", context_dim, low=1)
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, context_dim, heads)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def store_attention(self) -> bool:
        return self.block.cross_attn.store_attention

    @store_attention.setter
    def store_attention(self, value: bool) -> None:
        self.block.cross_attn.store_attention = bool(value)

    @property
    def last_attention(self) -> Tensor | None:
        """The last cross-attention weights, (B, heads, H·W, K), when ``store_attention`` is on."""
        return self.block.cross_attn.last_attention

    def forward(self, h: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = h.shape
        if context.ndim != 3 or context.shape[0] != B:
            raise ValueError(f"context must have shape (B={B}, K, E); got {tuple(context.shape)}")
        x = self.proj_in(self.norm(h)).flatten(2).transpose(1, 2)          # (B, H·W, C)
        x = self.block(x, context, mask)
        return h + self.proj_out(x.transpose(1, 2).reshape(B, C, H, W))

