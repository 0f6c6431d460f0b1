"""EDM's Heun sampler (Karras et al. 2022, Algorithms 1 and 2) for a VP model, on any σ-grid.

In the VE variable x̄ = x_t / √ᾱ (see :mod:`tinyddpm.sampling.solvers`) the probability-flow ODE is
dx̄/dσ = (x̄ - D(x̄; σ)) / σ = ε̂, with D the denoiser x̂_0 (:mod:`tinyddpm.sampling.denoiser`: the
VP model is called at x_t = x̄ / √(1 + σ²) and fractional t = ``s.t_from_sigma(σ)``). Heun's method
takes an Euler step, evaluates the slope at its end and averages the two slopes: second order,
two model calls per step, except the last step to σ = 0 where the slope (x̄ - D)/σ is undefined
and the Euler step (x̄ → D(x̄; σ_{n-1})) is kept: NFE = 2n - 1 (EDM: 18 steps, 35 NFE). Book eqs.
:eq:`eq-heun` and :eq:`eq-heun-ratio`, chapter 13: the correction is the Euler step minus
½(σ_i/σ_{i+1} - 1)·ΔD, so a coarse grid whose last steps have a large σ ratio amplifies the
denoiser's change — why Heun loses to DDIM below ~20 NFE on the linear schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_nonneg_float
from ..diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction
from .common import check_eps_at_zero_snr, record, start
from .denoiser import Model, alpha_bar_of_sigma, predict_at
from .grids import check_sigmas, karras_sigmas, sigma_range


def churn_gamma(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """γ_i = min(S_churn / n, √2 - 1) if σ_i ∈ [S_tmin, S_tmax], else 0, eq. :eq:`eq-churn`
    (Karras et al. 2022, Algorithm 2)."""
    return min(s_churn / n, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0


@torch.no_grad()
def heun_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int | None = None,
    sigmas: Tensor | Sequence[float] | None = None, rho: float = 7.0, s_churn: float = 0.0,
    s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    x_T: Tensor | None = None, device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """EDM Heun: Algorithm 1 (deterministic, ``s_churn = 0``) or Algorithm 2 (stochastic churn).

    Grid: ``karras_sigmas(steps, σ_1, σ_max, rho)`` of the schedule (``steps`` defaults to 18;
    σ_max = σ_T, or σ_{T-1} at zero terminal SNR), or any descending ``sigmas=``; then σ = 0.
    Per step i (σ_i → σ_{i+1}), following the algorithm's lines::

        γ = min(S_churn/n, √2 - 1) on [S_tmin, S_tmax];  σ̂ = (1 + γ) σ_i
        x̂ = x̄_i + √(σ̂² - σ_i²) S_noise z                      (churn: raise the noise level)
        d = (x̂ - D(x̂; σ̂)) / σ̂;   x̄_{i+1} = x̂ + (σ_{i+1} - σ̂) d      (Euler)
        if σ_{i+1} > 0:  d' = (x̄_{i+1} - D(x̄_{i+1}; σ_{i+1})) / σ_{i+1},
                         x̄_{i+1} = x̂ + (σ_{i+1} - σ̂) (d + d')/2        (Heun's correction)

    σ̂ is capped at the schedule's largest finite σ (a discrete-time network knows no higher level).
    x_T (VP scale, ~N(0, I)) enters as x̄ = x_T √(1 + σ_0²). NFE = 2n - 1; the trajectory holds x_t
    at VP scale. Common keywords: :mod:`tinyddpm.sampling.common`.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    s_churn, s_noise = check_nonneg_float("s_churn", s_churn), check_nonneg_float("s_noise", s_noise)
    for name, v in (("s_tmin", s_tmin), ("s_tmax", s_tmax)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ValueError(f"{name} must be a number >= 0 (math.inf allowed); got {v!r}")
    if sigmas is not None:
        if steps is not None and steps != len(sigmas) - (float(sigmas[-1]) == 0.0):
            raise ValueError("pass either steps= or sigmas= (the grid fixes the number of steps), not both")
        grid = check_sigmas(s, sigmas)
    else:
        steps = check_int("steps", 18 if steps is None else steps, low=1, high=s.T)
        grid = karras_sigmas(steps, *sigma_range(s), rho=rho).tolist()
    n, top = len(grid), sigma_range(s)[1]
    hats = [min(v * (1.0 + churn_gamma(v, n, s_churn, s_tmin, s_tmax)), max(top, v)) for v in grid]
    # every fractional t the model will see, computed once on the CPU (no device read-back in the loop)
    t_of = dict(zip(grid + hats, s.t_from_sigma(torch.tensor(grid + hats, dtype=torch.float64)).tolist(),
                    strict=True))
    check_eps_at_zero_snr([alpha_bar_of_sigma(v) for v in grid], prediction, "heun_sample")
    x, noise = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)

    def slope(xbar: Tensor, sigma: float) -> Tensor:
        """d = (x̄ - D(x̄; σ)) / σ = ε̂ at x_t = √ᾱ(σ) x̄."""
        ab = alpha_bar_of_sigma(sigma)
        _, eps = predict_at(model, math.sqrt(ab) * xbar, t_of[sigma], ab, prediction, clip_x0)
        return eps

    xbar = x * math.sqrt(1.0 + grid[0] ** 2)                                 # x̄ = x_T / α(σ_0)
    for sigma, sigma_hat, sigma_next in zip(grid, hats, grid[1:] + [0.0], strict=True):
        if sigma_hat > sigma:                                                # 1. churn
            xbar = xbar + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise()
        d = slope(xbar, sigma_hat)                                           # 2. Euler step
        x_next = xbar + (sigma_next - sigma_hat) * d
        if sigma_next > 0:                                                   # 3. Heun's correction
            x_next = xbar + (sigma_next - sigma_hat) * 0.5 * (d + slope(x_next, sigma_next))
        xbar = x_next
        record(trajectory, xbar / math.sqrt(1.0 + sigma_next**2))
    return xbar                                                              # σ = 0: x̄ = x_0


__all__ = ["churn_gamma", "heun_sample"]
