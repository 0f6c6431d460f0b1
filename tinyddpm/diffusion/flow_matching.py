"""Rectified flow / flow matching: the straight path between data and noise (Liu et al. 2023; Lipman et al. 2023).

Convention (Stable Diffusion 3, Esser et al. 2024): t ∈ [0, 1], t = 0 is data and t = 1 is noise,

    x_t = (1 - t) x_0 + t ε,      ε ~ N(0, I),                                      :eq:`eq-flow-path`

and a velocity model v_θ(x_t, t) regresses the path's derivative dx_t/dt = ε - x_0 :eq:`eq-flow-target`.
The minimiser is the marginal velocity E[ε - x_0 | x_t], and dx/dt = v(x, t) integrated from t = 1
to t = 0 turns noise into data (:func:`tinyddpm.flow_sample`).

The same family as DDPM/DDIM under a change of variables: dividing by √((1-t)² + t²) gives
x_t / c_t = α x_0 + σ ε with α² + σ² = 1, i.e. the variance-preserving x of ᾱ = (1-t)²/((1-t)² + t²),
and x̄ = x_t/(1-t) = x_0 + σ̃ ε with σ̃ = t/(1-t) (:func:`flow_to_vp`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_same_shape

TimeDistribution = Literal["uniform", "logit_normal"]
TIME_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "logit_normal")


def _t_like(t: Tensor | float, x: Tensor) -> Tensor:
    """t as a float tensor broadcastable against x: () stays a scalar, (B,) becomes (B, 1, ..., 1)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a float or a (B,) tensor with B = {x.shape[0]}; got shape {tuple(t.shape)}")
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def flow_interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x_0 + t ε, eq. :eq:`eq-flow-path`; t = 0 is data, t = 1 noise."""
    check_same_shape(x0=x0, eps=eps)
    tt = _t_like(t, x0)
    return (1 - tt) * x0 + tt * eps


def flow_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target dx_t/dt = ε - x_0 of the straight path, eq. :eq:`eq-flow-target`."""
    check_same_shape(x0=x0, eps=eps)
    return eps - x0


def x0_eps_from_velocity(xt: Tensor, t: Tensor | float, v: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) from a velocity: x_0 = x_t - t v and ε = x_t + (1 - t) v (solve x_t = (1-t)x_0 + tε, v = ε - x_0),
    eq. :eq:`eq-flow-x0-eps`."""
    check_same_shape(xt=xt, v=v)
    tt = _t_like(t, xt)
    return xt - tt * v, xt + (1 - tt) * v


def velocity_from_eps(xt: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
    """v = ε - x_0 with x_0 = (x_t - t ε)/(1 - t): an ε-prediction as a velocity (t < 1), eq. :eq:`eq-flow-x0-eps`."""
    check_same_shape(xt=xt, eps=eps)
    tt = _t_like(t, xt)
    return eps - (xt - tt * eps) / (1 - tt)


def flow_to_vp(t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(ᾱ, c) with x_t^flow = c · x^VP_ᾱ: ᾱ = (1-t)²/((1-t)² + t²), c = √((1-t)² + t²), eq. :eq:`eq-flow-vp`."""
    t = torch.as_tensor(t, dtype=torch.float64)
    c2 = (1 - t) ** 2 + t**2
    return (1 - t) ** 2 / c2, c2.sqrt()


def sample_flow_times(
    n: int, distribution: TimeDistribution = "logit_normal", *, mean: float = 0.0, std: float = 1.0,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """n training times in (0, 1): uniform, or logit-normal t = sigmoid(m + s z) (SD3's default, m = 0, s = 1).

    The logit-normal puts more weight on the middle of the path, where the velocity is hardest to
    predict (Esser et al. 2024, Sec. 3.1). Draws are made on the generator's device, then moved.
    """
    n = check_int("n", n, low=1)
    check_choice("distribution", distribution, TIME_DISTRIBUTIONS)
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"mean must be finite and std > 0; got {mean}, {std}")
    where = generator.device if generator is not None else device
    if distribution == "uniform":
        t = torch.rand(n, generator=generator, device=where)
    else:
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=where))
    return t.to(device if device is not None else t.device)


__all__ = [
    "TIME_DISTRIBUTIONS", "flow_interpolate", "flow_target", "flow_to_vp", "sample_flow_times", "velocity_from_eps",
    "x0_eps_from_velocity",
]
