"""The model seen at any noise level: one call, converted to the pair (x̂_0, ε̂).

The network is a VP model ``model(x_t, t)`` with x_t = √ᾱ x_0 + √(1-ᾱ) ε. Samplers on a continuous
grid visit noise levels between the schedule's steps: they pass a float tensor of fractional steps
t = ``s.t_from_sigma(σ)`` (k-diffusion's interpolation in log σ, see
:meth:`tinyddpm.NoiseSchedule.sigma_at`), and convert the output with ᾱ(σ) = 1 / (1 + σ²).
Karras et al. (2022)'s denoiser is D(x̄; σ) = x̂_0 evaluated at x_t = x̄ / √(1 + σ²).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor], Tensor]


def timesteps_like(x: Tensor, t: int | float) -> Tensor:
    """(B,) timesteps on x's device: a LongTensor for an integer step, x's float dtype for a fraction."""
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)


def call_model(model: Model, x: Tensor, t: int | float) -> Tensor:
    """``model(x, t)`` with t broadcast to (B,), its output checked to be a tensor shaped like x."""
    out = model(x, timesteps_like(x, t))
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a torch.Tensor shaped like x_t; got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected the same shape")
    return out.to(x.dtype)


def predict_at(
    model: Model, x: Tensor, t: int | float, alpha_bar: float, prediction: str, clip_x0: bool | float = False,
) -> tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) from one model call at step t whose ᾱ is ``alpha_bar`` (a Python float, no GPU read).

    eps: x̂_0 = (x - √(1-ᾱ) ε̂)/√ᾱ;  x0: ε̂ = (x - √ᾱ x̂_0)/√(1-ᾱ);  v: x̂_0 = √ᾱ x - √(1-ᾱ) v̂,
    ε̂ = √(1-ᾱ) x + √ᾱ v̂ (Salimans & Ho 2022), eq. :eq:`eq-v`. ``clip_x0`` clamps x̂_0 and recomputes ε̂.
    """
    out = call_model(model, x, t)
    a, sg = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction == "eps":
        x0, eps = (x - sg * out) / a, out
    elif prediction == "x0":
        x0, eps = out, (x - a * out) / sg
    else:
        x0, eps = a * x - sg * out, sg * x + a * out
    if clip_x0 is not False and clip_x0 is not None:
        bound = 1.0 if clip_x0 is True else float(clip_x0)
        x0 = x0.clamp(-bound, bound)
        eps = (x - a * x0) / sg
    return x0, eps


def alpha_bar_of_sigma(sigma: float) -> float:
    """ᾱ = 1 / (1 + σ²), the VP signal level of VE noise level σ."""
    return 1.0 / (1.0 + sigma * sigma)


__all__ = ["alpha_bar_of_sigma", "call_model", "predict_at", "timesteps_like"]
