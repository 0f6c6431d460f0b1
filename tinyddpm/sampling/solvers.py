"""Faster samplers as ODE/SDE solvers, (book chapter 10); the registry is :mod:`tinyddpm.sampling.registry`.

Notation. α_t := √ᾱ_t and σ_t := √(1-ᾱ_t), so x_t = α_t x_0 + σ_t ε. Karras et al. (2022) divide
by α_t: with  x̄ := x_t / α_t  and  σ̃_t := σ_t / α_t = √((1-ᾱ_t)/ᾱ_t)  the forward process is
x̄ = x_0 + σ̃ ε (a pure "variance exploding" noise level), and the probability-flow ODE of
Song et al. (2021b) becomes, eq. (eq-prob-flow-ode),

    dx̄/dσ̃ = ε̂(α x̄, t(σ̃)) = (x̄ - x̂_0) / σ̃        (Karras et al. 2022, eq. 4 with s = 1).

DDIM with η = 0 is exactly Euler's method on this ODE: x̄_prev = x̄_t + (σ̃_prev - σ̃_t) ε̂ is
DDIM's eq. 12 divided by α_prev (Song et al. 2021a, eq. 13-15). The samplers here use the same
timestep grids as DDIM (:func:`tinyddpm.ddim_timesteps`): each step lands on the next selected t,
and the last goes to t = 0 (ᾱ = 1, σ̃ = 0), returning the denoised x̂_0. Every sampler takes
``model(x_t, t) -> prediction`` with t a (B,) LongTensor, like :func:`tinyddpm.ddim_sample`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_nonneg_float
from ..diffusion.schedule import NoiseSchedule, Prediction
from .ddpm_ddim import Model, Spacing, _predict, _prepare, ddim_step, ddim_timesteps


def _sigma_tilde(s: NoiseSchedule, t: int) -> float:
    """σ̃_t = √((1-ᾱ_t)/ᾱ_t); σ̃_0 = 0."""
    ab = float(s.alpha_bars[t])
    return math.sqrt((1.0 - ab) / ab)


def _check_finite_snr(s: NoiseSchedule, ts: list[int], sampler: str) -> None:
    if any(float(s.alpha_bars[t]) <= 0 for t in ts):
        raise ValueError(
            f"{sampler} needs ᾱ_t > 0 at every visited step (σ̃ = ∞ at zero terminal SNR); "
            "use 'ddim' or 'dpmpp_2m' with prediction='v' for such a schedule"
        )


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ̃ -> σ̃_next into a deterministic part σ_down and fresh noise σ_up (eq-euler-ancestral).

    σ_up = η √(σ̃_next² (σ̃² - σ̃_next²) / σ̃²)  (clipped at σ̃_next),  σ_down = √(σ̃_next² - σ_up²),
    so that σ_down² + σ_up² = σ̃_next²: the sample lands on the right noise level. With η = 1, σ_up
    is DDIM's σ_t(η = 1) of eq. 16 divided by α_prev, i.e. the DDPM posterior's noise.
    """
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def dpmpp_2m_weights(h: float, h_prev: float | None) -> tuple[float, float]:
    """Weights (a, b) of D = a x̂_0(t_i) + b x̂_0(t_{i-1}) in DPM-Solver++(2M) (eq-dpmpp-2m).

    r = h_prev / h; a = 1 + 1/(2r), b = -1/(2r) (Lu et al. 2022b, Algorithm 2). Without a previous
    evaluation (first step) D = x̂_0: the first-order update, which is DDIM.
    """
    if h_prev is None:
        return 1.0, 0.0
    r = h_prev / h
    return 1.0 + 1.0 / (2.0 * r), -1.0 / (2.0 * r)


@torch.no_grad()
def euler_ancestral_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int = 50, eta: float = 1.0,
    spacing: Spacing = "trailing", generator: torch.Generator | None = None, clip_x0: bool | float = False,
    prediction: Prediction = "eps", return_trajectory: bool = False, device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Euler-ancestral sampling in Karras' σ̃ parametrisation, eq. (eq-euler-ancestral).

    Per step t -> t_prev, with x̄ = x_t / α_t, d = (x̄ - x̂_0)/σ̃_t = ε̂ (the ODE's slope) and
    (σ_down, σ_up) from :func:`ancestral_sigmas`:

        x̄_prev = x̄ + (σ_down - σ̃_t) d + σ_up z,    z ~ N(0, I)

    (Karras et al. 2022, Sec. 3 and Algorithm 2's ancestral variant; k-diffusion's "Euler a").
    Since x̄ + (σ_down - σ̃_t) ε̂ = x̂_0 + σ_down ε̂ and σ_down² = σ̃_prev² - σ_up², multiplying by
    α_prev gives DDIM's eq. 12 with σ = α_prev σ_up: Euler-ancestral with η is DDIM with the same η,
    written in other variables (the book checks this numerically). NFE = number of steps.
    """
    eta = check_nonneg_float("eta", eta)
    ts = ddim_timesteps(s.T, steps, spacing)
    _check_finite_snr(s, ts, "euler_ancestral_sample")
    x, _ = _prepare(model, shape, generator, device)
    traj = [x.cpu()] if return_trajectory else None
    xbar = x / math.sqrt(float(s.alpha_bars[ts[0]]))                    # x̄_T = x_T / α_T
    for t, t_prev in zip(ts, ts[1:] + [0], strict=True):
        a_t = math.sqrt(float(s.alpha_bars[t]))
        x0, eps = _predict(model, s, a_t * xbar, t, prediction, clip_x0)   # 1. model sees x_t = α x̄
        sig, sig_next = _sigma_tilde(s, t), _sigma_tilde(s, t_prev)
        down, up = ancestral_sigmas(sig, sig_next, eta)                       # 2. split the step
        xbar = xbar + (down - sig) * eps                                      # 3. Euler to σ_down
        if up > 0:
            xbar = xbar + up * torch.randn(x.shape, generator=generator, device=x.device)  # 4. re-noise
        if traj is not None:
            traj.append((math.sqrt(float(s.alpha_bars[t_prev])) * xbar).cpu())
    return (xbar, traj) if traj is not None else xbar                         # σ̃_0 = 0: x̄ = x_0


@torch.no_grad()
def dpmpp_2m_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int = 20, spacing: Spacing = "trailing",
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    return_trajectory: bool = False, device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """DPM-Solver++(2M): second-order multistep in λ = log(α/σ), data-prediction form, eq. (eq-dpmpp-2m).

    The probability-flow ODE in x̂_0 form has the exact solution (Lu et al. 2022b, eq. 9)
    x_{t'} = (σ_{t'}/σ_t) x_t + σ_{t'} ∫_{λ_t}^{λ_{t'}} e^λ x̂_0(λ) dλ. Taking x̂_0 constant over the
    step gives the first-order update (DDIM); taking it linear in λ through the current and the
    previous evaluations gives, with h = λ_prev - λ_t and r = h_last / h (Algorithm 2),

        D = (1 + 1/(2r)) x̂_0(t) - 1/(2r) x̂_0(t_last),
        x_prev = (σ_prev/σ_t) x_t - α_prev (e^{-h} - 1) D.

    The first step has no history (first order) and the last one goes to σ = 0 (λ = ∞), where
    the update is x_0 = x̂_0. NFE = number of steps; the second-order term costs no extra call.
    """
    ts = ddim_timesteps(s.T, steps, spacing)
    x, _ = _prepare(model, shape, generator, device)
    traj = [x.cpu()] if return_trajectory else None
    ab = s.alpha_bars
    lam = lambda t: 0.5 * (math.log(float(ab[t])) - math.log1p(-float(ab[t]))) if 0 < t else math.inf  # noqa: E731
    x0_last, h_last = None, None
    for t, t_prev in zip(ts, ts[1:] + [0], strict=True):
        x0, _ = _predict(model, s, x, t, prediction, clip_x0)        # 1. data prediction x̂_0(t)
        if t_prev == 0:
            x = x0                                                       # 2a. λ = ∞: x_0 = D = x̂_0
        else:
            h = lam(t_prev) - lam(t)                                     # 2b. step size in λ
            a, b = dpmpp_2m_weights(h, h_last)                           # 3. linear-in-λ x̂_0
            D = a * x0 + b * x0_last if b != 0.0 else x0
            sig_ratio = math.sqrt((1 - float(ab[t_prev])) / (1 - float(ab[t]))) if float(ab[t]) < 1 else 0.0
            x = sig_ratio * x - math.sqrt(float(ab[t_prev])) * math.expm1(-h) * D   # 4. exact linear part
            h_last = h
        x0_last = x0
        if traj is not None:
            traj.append(x.cpu())
    return (x, traj) if traj is not None else x


# Adams–Bashforth weights (oldest last) for PLMS with 1, 2, 3 and 4 past ε evaluations.
_AB_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def plms_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int = 50, spacing: Spacing = "trailing",
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    return_trajectory: bool = False, device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """PNDM's pseudo linear multistep (Liu et al. 2022, eq. 12): DDIM's transfer with an AB4 ε.

    Each step applies the η = 0 DDIM update (eq-ddim-step) with the combined noise
    ε' = (55 ε_t - 59 ε_{t+1} + 37 ε_{t+2} - 9 ε_{t+3}) / 24 of the last four evaluations (the
    fourth-order Adams–Bashforth formula on an equally spaced grid). Warm-up as in Stable Diffusion's
    PLMS: the first step is improved Euler (ε' = (ε_t + ε(x_prev, t_prev))/2, one extra model call),
    then the 2- and 3-step Adams–Bashforth formulas. NFE = steps + 1 (the extra call of step one).
    """
    ts = ddim_timesteps(s.T, steps, spacing)
    _check_finite_snr(s, ts, "plms_sample")
    x, _ = _prepare(model, shape, generator, device)
    traj = [x.cpu()] if return_trajectory else None

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
        if traj is not None:
            traj.append(x.cpu())
    return (x, traj) if traj is not None else x


__all__ = ["ancestral_sigmas", "dpmpp_2m_sample", "dpmpp_2m_weights", "euler_ancestral_sample", "plms_sample"]
