"""Small layers shared by the denoisers: the timestep embedding and the conditioning embedding.

A denoiser sees t only through ``timestep_embedding`` (sinusoids, Vaswani et al. 2017, as used by
Ho et al. 2020) followed by a two-layer MLP; class labels and context vectors are mapped into the
same space and *added* to it, so every block that reads the time embedding also reads the condition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int


def _freqs(dim: int, max_period: float, device=None) -> Tensor:
    half = dim // 2
    # ω_i = max_period^(-i / (half - 1)), i = 0..half-1: from 1 down to exactly 1/max_period
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / max(half - 1, 1))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [sin(t ω_0), ..., sin(t ω_{h-1}), cos(t ω_0), ..., cos(t ω_{h-1})].

    ω_i = max_period^(-i/(h-1)) with h = dim // 2 (the DDPM layout, Ho et al. 2020, App. B; the
    frequencies of Vaswani et al. 2017). ``t`` is a (B,) integer (or float) tensor; returns (B, dim)
    float32, zero-padded by one column when ``dim`` is odd.
    """
    dim = check_int("dim", dim, low=2)
    if not isinstance(t, Tensor) or t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of shape (B,); got {getattr(t, 'shape', type(t).__name__)}")
    args = t.float()[:, None] * _freqs(dim, max_period, t.device)[None]    # (B, h)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)              # (B, 2h)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    """t -> sinusoids(dim) -> Linear -> SiLU -> Linear: a (B, out_dim) vector (DDPM's ``temb``)."""

    def __init__(self, dim: int, out_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = check_int("dim", dim, low=2)
        self.register_buffer("freqs", _freqs(dim, max_period), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb)


def check_t(t: Tensor, x: Tensor) -> Tensor:
    """A denoiser's t: an integer tensor of shape () or (B,) with B = x.shape[0]; returned as (B,)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a LongTensor of shape (B,); got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (torch.long) of paper-indexed steps; got dtype {t.dtype}")
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},) to match x; got {tuple(t.shape)}")
    return t


class ConditionEmbedding(nn.Module):
    """Class labels and/or a context vector, mapped to an embedding added to the time embedding.

    - Labels: ``nn.Embedding(num_classes + 1, dim)``; index ``num_classes`` is the learned **null
      label** (unconditional), which is also what ``y=None`` means. Classifier-free guidance
      (eq-cfg) trains with some labels replaced by the null label and contrasts the two outputs.
    - Context: a (B, context_dim) multi-hot or continuous vector through a bias-free linear map, so
      an all-zeros context adds exactly nothing (unconditional), like the DeepLearning.AI ContextUnet.
    """

    def __init__(self, dim: int, num_classes: int | None = None, context_dim: int | None = None):
        super().__init__()
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, low=1)
        self.context_dim = None if context_dim is None else check_int("context_dim", context_dim, low=1)
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes + 1, dim)
        self.context_proj = None if context_dim is None else nn.Linear(context_dim, dim, bias=False)

    @property
    def null_label(self) -> int | None:
        return self.num_classes

    def forward(self, batch: int, device: torch.device, y: Tensor | None, context: Tensor | None) -> Tensor | None:
        """The summed condition embedding (B, dim), or None when the model has no conditioning."""
        out = None
        if self.label_emb is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            self._check_y(y, batch)
            out = self.label_emb(y)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=None) but got labels y; build it with "
                             "num_classes")
        if self.context_proj is not None:
            if context is not None:
                if not isinstance(context, Tensor) or context.shape != (batch, self.context_dim):
                    got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
                    raise ValueError(
                        f"context must have shape (B, context_dim) = ({batch}, {self.context_dim}); got {got}"
                    )
                c = self.context_proj(context.to(self.context_proj.weight.dtype))
                out = c if out is None else out + c
        elif context is not None:
            raise ValueError("this model takes no context vector (context_dim=None) but got context")
        return out

    def _check_y(self, y: Tensor, batch: int) -> None:
        if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must be a LongTensor of class labels; got {getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (batch,):
            raise ValueError(f"y must have shape (B,) = ({batch},); got {tuple(y.shape)}")
        if y.numel() and not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(
                    f"labels y must lie in [0, {self.num_classes}] ({self.num_classes} classes, "
                    f"{self.num_classes} = the null label); got values in [{lo}, {hi}]"
                )
