"""Sample-based distances between point clouds (book chapters 4, 6, 7, 10).

Used with the Gaussian-mixture oracle: a sampler is right when its samples are as close to the
data as fresh data is (the "real-vs-real floor").
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"{name} must be a tensor of shape (N, ...) with N samples")
    return x.detach().reshape(x.shape[0], -1).to(F64)


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Székely & Rizzo 2013); 0 iff same law.

    The within-sample terms exclude the zero diagonal (the U-statistic), so the value is unbiased
    and can come out slightly negative when x and y share a law.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("energy_distance needs at least 2 samples on each side")
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance: W_2 of 1-D projections on random directions, averaged (RMS).

    x and y must have the same number of samples (sorted projections are matched one to one).
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (N, D); got {tuple(x.shape)} and {tuple(y.shape)}")
    dirs = torch.randn(x.shape[1], n_projections, generator=generator, dtype=F64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x @ dirs).sort(0)
    py, _ = (y @ dirs).sort(0)
    return float(((px - py) ** 2).mean().sqrt())
