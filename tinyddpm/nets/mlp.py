"""A small residual MLP denoiser for 2-D (or any (B, D)) toy data — book chapters 4-7.

The same contract as the UNet: ``model(x_t, t, y=None) -> (B, D)``, t a (B,) LongTensor (or a float
tensor of fractional steps). The time embedding (plus the label embedding, if any) is added before
every hidden layer.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from .embeddings import ConditionEmbedding, TimeEmbedding, check_t


class MLPDenoiser(nn.Module):
    """x -> Linear -> [h + Linear(SiLU(h + e))] × depth -> Linear(SiLU(h)), with e = emb(t) (+ emb(y)).

    ``num_classes`` adds class labels with the null label ``num_classes`` (``y=None`` means it).
    ``self.config`` holds the constructor's arguments (JSON-able).
    """

    def __init__(
        self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 64, num_classes: int | None = None
    ):
        super().__init__()
        dim = check_int("dim", dim, low=1)
        hidden = check_int("hidden", hidden, low=1)
        depth = check_int("depth", depth, low=1)
        time_dim = check_int("time_dim", time_dim, low=2)
        self.config = dict(dim=dim, hidden=hidden, depth=depth, time_dim=time_dim, num_classes=num_classes)
        self.time_emb = TimeEmbedding(time_dim, hidden)
        self.cond_emb = ConditionEmbedding(hidden, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    @property
    def null_label(self) -> int | None:
        """The label index meaning "no label" (= num_classes), or None for an unconditional model."""
        return self.cond_emb.null_label

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        D = self.config["dim"]
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != D:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, D) = (B, {D}); got {got}")
        t = check_t(t, x)
        e = self.time_emb(t)                                                # (B, hidden)
        cond = self.cond_emb(x.shape[0], x.device, y, None)
        if cond is not None:
            e = e + cond
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(F.silu(h + e))
        return self.out(F.silu(h))
