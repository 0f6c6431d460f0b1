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


def _freqs(half: int, max_period: float, freq_shift: int, device=None) -> Tensor:
    # ω_i = P^(-i / (h - freq_shift)), i = 0..h-1; freq_shift = 1 runs from 1 down to exactly 1/P.
    # Same float32 operations in the same order as diffusers' get_timestep_embedding.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(exponent / max(half - freq_shift, 1))


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = False, freq_shift: int = 1,
) -> Tensor:
    """Sinusoidal embedding [sin(t ω_0), ..., sin(t ω_{h-1}), cos(t ω_0), ..., cos(t ω_{h-1})].

    ω_i = max_period^(-i/(h - freq_shift)) with h = dim // 2. The default ``freq_shift=1`` is the
    DDPM layout (Ho et al. 2020, App. B: ω runs from 1 to exactly 1/max_period); ``freq_shift=0``
    and ``flip_sin_to_cos=True`` ([cos, sin]) are the other layouts diffusers uses. ``t`` is a (B,)
    integer or float tensor (fractional steps are fine); the result is (B, dim) **float32** whatever
    t's dtype, zero-padded by one column when ``dim`` is odd.
    """
    dim = check_int("dim", dim, low=2)
    freq_shift = check_int("freq_shift", freq_shift, low=0, high=1)
    if not isinstance(flip_sin_to_cos, bool):
        raise TypeError(f"flip_sin_to_cos must be a bool; got {type(flip_sin_to_cos).__name__}")
    if not isinstance(t, Tensor) or t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of shape (B,); got {getattr(t, 'shape', type(t).__name__)}")
    args = t.float()[:, None] * _freqs(dim // 2, max_period, freq_shift, t.device)[None]   # (B, h)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=1)                 # (B, 2h)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    """t -> sinusoids(dim) -> Linear -> SiLU -> Linear: a (B, out_dim) vector (DDPM's ``temb``).

    The sinusoids are always computed in float32 (a bf16 t would round 999 to 1000) and cast to the
    MLP's dtype afterwards. ``time_shift`` embeds t + time_shift instead of t: models converted from
    diffusers, whose step index is i = t - 1, use ``time_shift=-1`` (see ``tinyddpm.interop``).
    """

    def __init__(
        self, dim: int, out_dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = False,
        freq_shift: int = 1, time_shift: int = 0,
    ):
        super().__init__()
        self.dim = check_int("dim", dim, low=2)
        self.max_period = float(max_period)
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = check_int("freq_shift", freq_shift, low=0, high=1)
        self.time_shift = check_int("time_shift", time_shift)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def sinusoid(self, t: Tensor) -> Tensor:
        """The float32 sinusoids of t + time_shift, (B, dim): the MLP's input."""
        t = t.float()
        if self.time_shift:
            t = t + self.time_shift
        return timestep_embedding(t, self.dim, self.max_period, flip_sin_to_cos=self.flip_sin_to_cos,
                                  freq_shift=self.freq_shift)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


def check_t(t: Tensor, x: Tensor) -> Tensor:
    """A denoiser's t, returned as (B,) with B = x.shape[0]: a tensor of shape () or (B,).

    Integer tensors hold paper-indexed steps; float tensors hold fractional steps on the same scale
    (continuous-time samplers evaluate the network between integer steps). Bool/complex are refused.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a tensor of shape (B,) (LongTensor, or float for fractional steps); "
                        f"got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor of paper-indexed steps (or a float tensor of fractional "
                        f"steps); got dtype {t.dtype}")
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},) to match x; got {tuple(t.shape)}")
    return t


class ConditionEmbedding(nn.Module):
    """Class labels and/or a context, mapped to an embedding added to the time embedding.

    - Labels: ``nn.Embedding(num_classes + 1, dim)``; index ``num_classes`` is the learned **null
      label** (unconditional), which is also what ``y=None`` means. Classifier-free guidance
      :eq:`eq-cfg` trains with some labels replaced by the null label and contrasts the two outputs.
    - Context: (B, K, context_dim), K vectors (a one-hot or multi-hot vector is K = 1; a sequence of
      token embeddings is K > 1, as for ``CrossAttnUNet``), averaged over K — over the True entries
      of ``context_mask`` (B, K) when given — then a bias-free linear map. So an all-zeros context,
      or a row whose mask is all False, adds exactly nothing (unconditional), like the DeepLearning.AI
      ContextUnet.
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

    def forward(
        self, batch: int, device: torch.device, y: Tensor | None, context: Tensor | None,
        context_mask: Tensor | None = None,
    ) -> Tensor | None:
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
                c = self.context_proj(self._pool(context, context_mask, batch))
                out = c if out is None else out + c
            elif context_mask is not None:
                raise ValueError("got context_mask without context")
        elif context is not None or context_mask is not None:
            raise ValueError("this model takes no context (context_dim=None) but got context")
        return out

    def _pool(self, context: Tensor, mask: Tensor | None, batch: int) -> Tensor:
        """Masked mean over the K context vectors: (B, K, D) -> (B, D)."""
        D = self.context_dim
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[0] != batch or context.shape[2] != D:
            got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (B, K, context_dim) = ({batch}, K, {D}) — a single vector "
                             f"per sample is (B, 1, {D}); got {got}")
        context = context.to(self.context_proj.weight.dtype)
        if mask is None:
            return context.mean(dim=1)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != context.shape[:2]:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"context_mask must be a bool tensor of shape (B, K) = {tuple(context.shape[:2])}; "
                             f"got {got}")
        total = context.masked_fill(~mask[:, :, None], 0.0).sum(dim=1)       # (B, D): sum of the real entries
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(context.dtype)   # (B, 1); all-False row -> zeros
        return total / count

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
