"""The training objective: draw t and ε, noise x_0 into x_t, regress the network on its target.

L_simple = E_{t, x_0, ε} ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖², eq. :eq:`eq-loss-simple` (Ho et al. 2020),
with t uniform on {1..T}. The network may instead predict x_0 or v :eq:`eq-v`; the optional min-SNR-γ
weighting (Hang et al. 2023), eq. :eq:`eq-min-snr`, makes every prediction type minimise the same
weighted x_0-error  min(SNR_t, γ) ‖x̂_0 - x_0‖².
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_timesteps
from ..diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction

Weighting = Literal["none", "min_snr"]
WEIGHTINGS: tuple[str, ...] = ("none", "min_snr")
Reduction = Literal["mean", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "none")


def sample_timesteps(batch: int, T: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """``batch`` steps drawn uniformly from {1, ..., T} (paper indexing; never 0), a LongTensor."""
    batch = check_int("batch", batch, low=1)
    T = check_int("T", T, low=1)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(1, T + 1, (batch,), generator=generator, device=device)


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, prediction: Prediction = "eps", gamma: float = 5.0) -> Tensor:
    """Per-sample min-SNR-γ weight for a loss on ``prediction``, eq. :eq:`eq-min-snr`; float64, shape of t.

    Since ‖ε̂-ε‖² = SNR ‖x̂_0-x_0‖² and ‖v̂-v‖² = (SNR+1) ‖x̂_0-x_0‖², the weights
    min(SNR, γ)/SNR (ε), min(SNR, γ) (x_0) and min(SNR, γ)/(SNR+1) (v) all give min(SNR, γ) ‖x̂_0-x_0‖².
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"min_snr_gamma must be a number > 0; got {gamma!r}")
    t = check_timesteps(t, schedule.T, low=1)
    snr = schedule.snr.to(t.device)[t]                                    # ᾱ_t / (1 - ᾱ_t), t >= 1
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)                               # = min(SNR, γ)/SNR, also at SNR = 0
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def diffusion_loss_at(
    model: Callable[..., Tensor], schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor, *,
    prediction: Prediction = "eps", weighting: Weighting = "none", min_snr_gamma: float = 5.0,
    model_kwargs: Mapping | None = None, reduction: Reduction = "mean",
) -> Tensor:
    """The loss at given t (B,) and ε: weight_t · mean over pixels of (model(x_t, t) - target)².

    ``diffusion_loss`` draws t and ε and calls this; use it directly to study the loss per step.
    ``t`` may stay on the CPU while x0 is on a GPU (what the Trainer does): the schedule is then
    indexed and t validated on the CPU, with no device-to-host synchronisation, and the model
    gets a copy of t on x0's device.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, REDUCTIONS)
    xt = schedule.q_sample(x0, t, eps)                                    # eq. (eq-forward-closed)
    target = schedule.target(x0, t, eps, prediction)
    out = model(xt, t.to(x0.device, non_blocking=True), **(model_kwargs or {}))
    if not isinstance(out, Tensor) or out.shape != x0.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model returned {got} for x_t of shape {tuple(x0.shape)}; expected the same shape")
    dtype = torch.promote_types(out.dtype, torch.float32)                # bf16 outputs: the loss in fp32
    per_sample = (out.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)  # (B,)
    if weighting == "min_snr":
        per_sample = per_sample * min_snr_weight(schedule, t, prediction, min_snr_gamma).to(per_sample)
    return per_sample.mean() if reduction == "mean" else per_sample


def diffusion_loss(
    model: Callable[..., Tensor], schedule: NoiseSchedule, x0: Tensor, *, prediction: Prediction = "eps",
    weighting: Weighting = "none", min_snr_gamma: float = 5.0, generator: torch.Generator | None = None,
    model_kwargs: Mapping | None = None, reduction: Reduction = "mean",
) -> Tensor:
    """L_simple :eq:`eq-loss-simple` on a batch x0: t ~ U{1..T}, ε ~ N(0, I), regress on the target.

    Draw order (for replaying a generator): first t = ``sample_timesteps(B, T, generator)``, then
    ε = ``torch.randn(x0.shape, generator=generator)``, both on x0's device. ``model_kwargs`` (e.g.
    ``{"y": labels}``) are passed to the model. ``reduction="none"`` returns the (B,) per-sample losses.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a float tensor of shape (B, ...); got {getattr(x0, 'shape', type(x0).__name__)}")
    t = sample_timesteps(x0.shape[0], schedule.T, generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return diffusion_loss_at(
        model, schedule, x0, t, eps, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma,
        model_kwargs=model_kwargs, reduction=reduction,
    )

