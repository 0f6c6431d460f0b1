"""Faster samplers as ODE/SDE solvers (book chapter 10); the registry is :mod:`tinyddpm.sampling.registry`.

Notation as in the book: α_t = 1 - β_t and ᾱ_t = ∏_{s≤t} α_s (chapters 2-7), so
x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε. :cite:t:`karras2022edm` divide by √ᾱ_t: with
x̄ := x_t / √ᾱ_t and σ̃_t := √((1-ᾱ_t)/ᾱ_t) the forward process is x̄ = x_0 + σ̃ ε (a pure
"variance exploding" noise level), and the probability-flow ODE of :cite:t:`song2021sde`
becomes, eq. :eq:`eq-prob-flow-ode`,

    dx̄/dσ̃ = ε̂(√ᾱ_t x̄, t(σ̃)) = (x̄ - x̂_0) / σ̃        (Karras et al. 2022, eq. 4 with s = 1).

DDIM with η = 0 is exactly Euler's method on this ODE: x̄_prev = x̄_t + (σ̃_prev - σ̃_t) ε̂ is
DDIM's eq. 12 divided by √ᾱ_prev (eqs. 13-15 of :cite:t:`song2021ddim`). The
samplers here use the same timestep grids as DDIM (:func:`tinyddpm.ddim_timesteps`): each step lands
on the next selected t, and the last goes to t = 0 (ᾱ = 1, σ̃ = 0), returning the denoised x̂_0.
Every sampler takes ``model(x_t, t) -> prediction`` with t a (B,) LongTensor, like
:func:`tinyddpm.ddim_sample`; DPM-Solver++(2M) also runs on any grid of noise levels (``sigmas=``,
:mod:`tinyddpm.sampling.grids`), calling the model at fractional t (a float tensor), like EDM's Heun
(:mod:`tinyddpm.sampling.heun`). The common keywords (x_T, generator, device, trajectory) are
:mod:`tinyddpm.sampling.common`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import check_choice, check_nonneg_float
from ..diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction
from .common import check_eps_at_zero_snr, record, start
from .ddpm_ddim import Model, Spacing, _predict, ddim_step, ddim_timesteps
from .denoiser import predict_at
from .grids import schedule_grid


def _check_finite_snr(alpha_bars: list[float], sampler: str) -> None:
    if any(ab <= 0.0 for ab in alpha_bars):
        raise ValueError(
            f"{sampler} needs ᾱ_t > 0 at every visited step (σ̃ = ∞ at zero terminal SNR); "
            "use 'ddim', 'dpmpp_2m' or 'heun' with prediction='v' for such a schedule"
        )


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ̃ -> σ̃_next into a deterministic part σ_down and fresh noise σ_up :eq:`eq-euler-ancestral`.

    σ_up = η √(σ̃_next² (σ̃² - σ̃_next²) / σ̃²)  (clipped at σ̃_next),  σ_down = √(σ̃_next² - σ_up²),
    so that σ_down² + σ_up² = σ̃_next²: the sample lands on the right noise level. With η = 1, σ_up
    is DDIM's σ_t(η = 1) of eq. 16 divided by √ᾱ_prev, i.e. the DDPM posterior's noise.
    """
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def dpmpp_2m_weights(h: float, h_prev: float | None) -> tuple[float, float]:
    """Weights (a, b) of D = a x̂_0(t_i) + b x̂_0(t_{i-1}) in DPM-Solver++(2M) :eq:`eq-dpmpp-2m`.

    r = h_prev / h; a = 1 + 1/(2r), b = -1/(2r) (Algorithm 2 of :cite:t:`lu2022dpmsolverpp`).
    Without a previous evaluation (first step) D = x̂_0: the first-order update, which is DDIM.
    """
    if h_prev is None:
        return 1.0, 0.0
    r = h_prev / h
    return 1.0 + 1.0 / (2.0 * r), -1.0 / (2.0 * r)


@torch.no_grad()
def euler_ancestral_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int | None = None, eta: float = 1.0,
    spacing: Spacing = "trailing", sigmas: Tensor | Sequence[float] | None = None,
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    x_T: Tensor | None = None, device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """Euler-ancestral sampling in Karras' σ̃ parametrisation, eq. :eq:`eq-euler-ancestral`.

    Per step t -> t_prev, with x̄ = x_t / √ᾱ_t, d = (x̄ - x̂_0)/σ̃_t = ε̂ (the ODE's slope) and
    (σ_down, σ_up) from :func:`ancestral_sigmas`:

        x̄_prev = x̄ + (σ_down - σ̃_t) d + σ_up z,    z ~ N(0, I)

    (Karras et al. 2022, Sec. 3 and Algorithm 2's ancestral variant; k-diffusion's "Euler a").
    Since x̄ + (σ_down - σ̃_t) ε̂ = x̂_0 + σ_down ε̂ and σ_down² = σ̃_prev² - σ_up², multiplying by
    √ᾱ_prev gives DDIM's eq. 12 with σ = √ᾱ_prev σ_up: Euler-ancestral with η is DDIM with the same η,
    written in other variables (the book checks this numerically). NFE = number of steps.
    Grid: the schedule's ``steps`` (default 50) or any descending ``sigmas=``, then σ̃ = 0.
    Common keywords: :mod:`tinyddpm.sampling.common` (the trajectory holds x_t at VP scale).
    """
    eta = check_nonneg_float("eta", eta)
    check_choice("prediction", prediction, PREDICTIONS)
    grid = schedule_grid(s, steps, spacing, sigmas, default_steps=50)
    _check_finite_snr([ab for _, ab in grid], "euler_ancestral_sample")
    x, noise = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)
    xbar = x / math.sqrt(grid[0][1])                                         # x̄_T = x_T / √ᾱ_T
    for (t, ab), (_, ab_prev) in zip(grid, grid[1:] + [(0, 1.0)], strict=True):
        _, eps = predict_at(model, math.sqrt(ab) * xbar, t, ab, prediction, clip_x0)  # 1. model sees √ᾱ x̄
        sig, sig_next = math.sqrt((1 - ab) / ab), math.sqrt((1 - ab_prev) / ab_prev)
        down, up = ancestral_sigmas(sig, sig_next, eta)                       # 2. split the step
        xbar = xbar + (down - sig) * eps                                      # 3. Euler to σ_down
        if up > 0:
            xbar = xbar + up * noise()                                        # 4. re-noise
        record(trajectory, math.sqrt(ab_prev) * xbar)
    return xbar                                                               # σ̃_0 = 0: x̄ = x_0


def _log_snr_half(alpha_bar: float) -> float:
    """λ = log(√ᾱ/√(1-ᾱ)) = ½ (log ᾱ - log(1-ᾱ)); -∞ at ᾱ = 0 (zero terminal SNR), +∞ at ᾱ = 1."""
    if alpha_bar <= 0.0:
        return -math.inf
    if alpha_bar >= 1.0:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


@torch.no_grad()
def dpmpp_2m_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int | None = None,
    spacing: Spacing = "trailing", sigmas: Tensor | Sequence[float] | None = None,
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    x_T: Tensor | None = None, device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep in λ = ½ log(ᾱ/(1-ᾱ)), data-prediction form, eq. :eq:`eq-dpmpp-2m`.

    The probability-flow ODE in x̂_0 form has the exact solution :eq:`eq-exp-integrator` (eq. 9 of
    :cite:t:`lu2022dpmsolverpp`), writing a_t := √ᾱ_t and s_t := √(1-ᾱ_t) for the signal and noise
    scales only here,
    x_{t'} = (s_{t'}/s_t) x_t + s_{t'} ∫_{λ_t}^{λ_{t'}} e^λ x̂_0(λ) dλ. Taking x̂_0 constant over the
    step gives the first-order update (DDIM); taking it linear in λ through the current and the
    previous evaluations gives, with h = λ_prev - λ_t and r = h_last / h (Algorithm 2),

        D = (1 + 1/(2r)) x̂_0(t) - 1/(2r) x̂_0(t_last),
        x_prev = (s_prev/s_t) x_t - a_prev (e^{-h} - 1) D.

    The first step has no history (first order) and the last one goes to σ = 0 (λ = ∞), where
    the update is x_0 = x̂_0. NFE = number of steps; the second-order term costs no extra call.

    Grid: the schedule's steps ``ddim_timesteps(T, steps, spacing)`` (``steps`` defaults to 20), or
    any descending VE noise levels ``sigmas=`` (e.g. :func:`tinyddpm.karras_sigmas`; the model is then
    called at fractional t = ``s.t_from_sigma(σ)``), the last step going to σ = 0. At zero terminal
    SNR (ᾱ_T = 0, λ_T = -∞) the first step is exact: e^{-h} = 0, x_prev = s_prev x_T + a_prev x̂_0
    (diffusers instead clamps ᾱ_T to 2^-24 inside the log); an ε-model is refused there.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    grid = schedule_grid(s, steps, spacing, sigmas, default_steps=20)
    check_eps_at_zero_snr([ab for _, ab in grid], prediction, "dpmpp_2m_sample")
    x, _ = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)
    x0_last, h_last = None, None
    for (t, ab), (_, ab_prev) in zip(grid, grid[1:] + [(0, 1.0)], strict=True):
        x0, _ = predict_at(model, x, t, ab, prediction, clip_x0)       # 1. data prediction x̂_0(t)
        if ab_prev >= 1.0:
            x = x0                                                       # 2a. λ = ∞: x_0 = D = x̂_0
        else:
            h = _log_snr_half(ab_prev) - _log_snr_half(ab)               # 2b. step size in λ (∞ from ᾱ = 0)
            a, b = dpmpp_2m_weights(h, h_last)                           # 3. linear-in-λ x̂_0
            D = a * x0 + b * x0_last if b != 0.0 else x0
            sig_ratio = math.sqrt((1 - ab_prev) / (1 - ab))
            x = sig_ratio * x - math.sqrt(ab_prev) * math.expm1(-h) * D  # 4. exact linear part
            h_last = h
        x0_last = x0
        record(trajectory, x)
    return x


# Adams–Bashforth weights (oldest last) for PLMS with 1, 2, 3 and 4 past ε evaluations.
_AB_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def plms_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int = 50, spacing: Spacing = "trailing",
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    x_T: Tensor | None = None, device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """PNDM's pseudo linear multistep (Liu et al. 2022, eq. 12): DDIM's transfer with an AB4 ε.

    Each step applies the η = 0 DDIM update :eq:`eq-ddim-step` with the combined noise
    ε' = (55 ε_t - 59 ε_{t+1} + 37 ε_{t+2} - 9 ε_{t+3}) / 24 of the last four evaluations (the
    fourth-order Adams–Bashforth formula on an equally spaced grid). Warm-up as in Stable Diffusion's
    PLMS: the first step is improved Euler (ε' = (ε_t + ε(x_prev, t_prev))/2, one extra model call),
    then the 2- and 3-step Adams–Bashforth formulas. NFE = steps + 1 (the extra call of step one).
    """
    ts = ddim_timesteps(s.T, steps, spacing)
    check_choice("prediction", prediction, PREDICTIONS)
    _check_finite_snr([float(s.alpha_bars[t]) for t in ts], "plms_sample")
    x, _ = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)

    def transfer(x: Tensor, t: int, t_prev: int, eps: Tensor) -> Tensor:   # the DDIM step, η = 0
        return ddim_step(s, x, t, t_prev, eps, clip_x0=clip_x0)

    history: list[Tensor] = []                                          # newest first
    for t, t_prev in zip(ts, ts[1:] + [0], strict=True):
        _, eps = _predict(model, s, x, t, prediction, clip_x0)
        if not history and t_prev > 0:                                  # improved-Euler warm-up
            _, eps_next = _predict(model, s, transfer(x, t, t_prev, eps), t_prev, prediction, clip_x0)
            eps_prime = 0.5 * (eps + eps_next)
        else:
            w = _AB_WEIGHTS[min(len(history), 3)]
            eps_prime = sum(wi * e for wi, e in zip(w, [eps] + history, strict=True))
        history = [eps] + history[:2]
        x = transfer(x, t, t_prev, eps_prime)
        record(trajectory, x)
    return x


__all__ = ["ancestral_sigmas", "dpmpp_2m_sample", "dpmpp_2m_weights", "euler_ancestral_sample", "plms_sample"]
