"""DDPM and DDIM: one reverse step each, timestep selection, and the sampling loops.

Book chapters 6 (DDPM, Ho et al. 2020, Algorithm 2) and 7 (DDIM, Song et al. 2021, eq. 12).
A model is any callable ``model(x_t, t) -> prediction`` with t a LongTensor of shape (B,);
guidance and conditioning wrap the model, so the samplers stay unconditional.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_batch, check_choice, check_int, check_nonneg_float, check_same_shape, check_timesteps
from ..diffusion.broadcast import extract
from ..diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction
from .common import check_eps_at_zero_snr, check_model, check_trajectory, record, start
from .denoiser import predict_at
from .grids import schedule_grid

Model = Callable[[Tensor, Tensor], Tensor]
Variance = Literal["beta_tilde", "beta"]
VARIANCES: tuple[str, ...] = ("beta_tilde", "beta")
Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def _clip(x0: Tensor, clip_x0: bool | float) -> Tensor:
    if clip_x0 is False or clip_x0 is None:
        return x0
    bound = 1.0 if clip_x0 is True else float(clip_x0)
    return x0.clamp(-bound, bound)


def ddpm_variances(s: NoiseSchedule, variance: Variance = "beta_tilde") -> Tensor:
    """σ_t² for every step (length T+1): β̃_t or β_t, with σ_1² = 0 (no noise on the last step)."""
    check_choice("variance", variance, VARIANCES)
    var = (s.posterior_variance if variance == "beta_tilde" else s.betas).clone()
    var[:2] = 0.0
    return var


def ddpm_step_x0(
    s: NoiseSchedule, xt: Tensor, t: int | Tensor, x0: Tensor, noise: Tensor | None,
    variance: Variance = "beta_tilde",
) -> Tensor:
    """x_{t-1} ~ N(μ̃_t(x_t, x̂_0), σ_t² I) given an estimate x̂_0, eq. :eq:`eq-ddpm-step`.

    σ_t² is β̃_t (``"beta_tilde"``, the true posterior variance) or β_t (``"beta"``). No noise
    is added at t = 1, where x_0 is returned as the posterior mean (DDPM Algorithm 2, line 3).
    """
    check_choice("variance", variance, VARIANCES)
    check_same_shape(xt=xt, x0=x0)
    mean, _ = s.q_posterior(x0, xt, t)  # validates t in [1, T]
    if noise is None:
        return mean
    check_same_shape(xt=xt, noise=noise)
    t = check_timesteps(t, s.T, low=1)
    var = extract(ddpm_variances(s, variance), t, xt)
    return mean + var.sqrt() * noise


def ddpm_step(
    s: NoiseSchedule, xt: Tensor, t: int | Tensor, eps: Tensor, noise: Tensor | None,
    variance: Variance = "beta_tilde", clip_x0: bool | float = False,
) -> Tensor:
    """One ancestral step x_t -> x_{t-1} from a predicted ε, eq. :eq:`eq-ddpm-step`.

    Equivalent to Algorithm 2's  x_{t-1} = (x_t - β_t/√(1-ᾱ_t) ε) / √α_t + σ_t z  when x̂_0 is not
    clipped. ``noise=None`` returns the mean (no z); ``clip_x0`` clamps x̂_0 to [-1, 1] (or ±value).
    """
    x0 = _clip(s.x0_from_eps(xt, t, eps), clip_x0)
    return ddpm_step_x0(s, xt, t, x0, noise, variance)


def _on(a: Tensor, t: int | Tensor) -> Tensor:
    """The schedule array ``a`` on the device of the index ``t`` (a no-op for ints and CPU timesteps)."""
    return a if not isinstance(t, Tensor) or a.device == t.device else a.to(t.device)


def ddim_sigma(s: NoiseSchedule, t: int | Tensor, t_prev: int | Tensor, eta: float) -> Tensor:
    """σ_t(η) = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev), DDIM eq. 16 — :eq:`eq-ddim-sigma`."""
    a = _on(s.alpha_bars, t)
    ab, ab_prev = a[t], a[t_prev]
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()


def ddim_step_x0_eps(
    s: NoiseSchedule, xt: Tensor, t: int | Tensor, t_prev: int | Tensor, x0: Tensor, eps: Tensor,
    eta: float = 0.0, noise: Tensor | None = None,
) -> Tensor:
    """x_prev = √ᾱ_prev x̂_0 + √(1-ᾱ_prev-σ²) ε̂ + σ z, DDIM eq. 12 — :eq:`eq-ddim-step`.

    ``t_prev`` may be any step below ``t``; t_prev = 0 returns x̂_0 (ᾱ_0 = 1, σ = 0).
    """
    eta = check_nonneg_float("eta", eta)
    check_same_shape(xt=xt, x0=x0, eps=eps)
    t = check_timesteps(t, s.T, low=1)
    t_prev = check_timesteps(t_prev, s.T, low=0, name="t_prev")
    check_batch(t, xt)
    check_batch(t_prev, xt, name="t_prev")
    if t.ndim != t_prev.ndim:                                               # one scalar, one (B,)
        t, t_prev = torch.broadcast_tensors(t, t_prev)
    if (t_prev >= t).any():
        raise ValueError(f"t_prev must be smaller than t; got t={t.tolist()}, t_prev={t_prev.tolist()}")
    sigma = ddim_sigma(s, t, t_prev, eta)                                   # float64, per sample
    if eta > 0 and noise is None and bool((sigma > 0).any()):
        raise ValueError("ddim_step with eta > 0 needs a noise tensor (pass noise=torch.randn_like(x_t))")
    ab_prev = _on(s.alpha_bars, t)[t_prev]
    # 1. the x_0 direction, 2. the direction pointing to x_t, 3. fresh noise
    dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    if t.ndim:  # per-sample coefficients, shaped (B, 1, ..., 1), on x's device
        cast = lambda v: v.to(device=xt.device, dtype=xt.dtype).reshape((-1,) + (1,) * (xt.ndim - 1))  # noqa: E731
    else:       # one scalar: stays where t is (a CPU scalar multiplies a tensor on any device without a copy)
        cast = lambda v: v.to(dtype=xt.dtype)  # noqa: E731
    x_prev = cast(ab_prev.sqrt()) * x0 + cast(dir_coef) * eps
    if noise is not None and eta > 0:
        check_same_shape(xt=xt, noise=noise)
        x_prev = x_prev + cast(sigma) * noise
    return x_prev


def ddim_step(
    s: NoiseSchedule, xt: Tensor, t: int | Tensor, t_prev: int | Tensor, eps: Tensor,
    eta: float = 0.0, noise: Tensor | None = None, clip_x0: bool | float = False,
) -> Tensor:
    """One DDIM step from a predicted ε, eq. :eq:`eq-ddim-step`; η = 0 is deterministic, η = 1 is DDPM-like."""
    x0 = _clip(s.x0_from_eps(xt, t, eps), clip_x0)
    if clip_x0 is not False and clip_x0 is not None:
        eps = s.eps_from_x0(xt, t, x0)
    return ddim_step_x0_eps(s, xt, t, t_prev, x0, eps, eta, noise)


def ddim_timesteps(T: int, steps: int, spacing: Spacing = "trailing") -> list[int]:
    """The descending timesteps a ``steps``-step sampler visits, each in [1, T] (paper indexing).

    - ``"trailing"``: T, T - T/n, ..., T/n (rounded) — starts at the noisiest step (Lin et al. 2023).
    - ``"linspace"``: n values evenly spread over [1, T], both ends included.
    - ``"leading"``: 1, 1 + ⌊T/n⌋, ... (DDIM's original); it never reaches t = T.

    The sampler always steps from each selected t to the *next selected* one, then to 0.
    """
    T = check_int("T", T, low=1)
    steps = check_int("steps", steps, low=1, high=T)
    check_choice("spacing", spacing, SPACINGS)
    if spacing == "leading":
        ts = [1 + i * (T // steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [int(T - i * T / steps + 0.5) for i in range(steps)]
    else:
        ts = [T] if steps == 1 else [int(1 + i * (T - 1) / (steps - 1) + 0.5) for i in range(steps)]
    return sorted(set(ts), reverse=True)


def _predict(
    model: Model, s: NoiseSchedule, x: Tensor, t: int, prediction: Prediction, clip_x0,
) -> tuple[Tensor, Tensor]:
    """The model's (x̂_0, ε̂) at the integer step t (x̂_0 clipped, and ε̂ made consistent, with ``clip_x0``).

    Only the model sees a device tensor of timesteps; the schedule's coefficients are taken at the
    Python int t (CPU scalars), so a sampling loop never reads a value back from the GPU.
    """
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = model(x, tt)
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a torch.Tensor shaped like x_t; got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected the same shape")
    x0, eps = s.predict_x0_eps(x, t, out.to(x.dtype), prediction)
    if clip_x0 is not False and clip_x0 is not None:
        x0 = _clip(x0, clip_x0)
        eps = s.eps_from_x0(x, t, x0)
    return x0, eps


@torch.no_grad()
def ddpm_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
    variance: Variance = "beta_tilde", clip_x0: bool | float = False, prediction: Prediction = "eps",
    t_start: int | None = None,
    x_T: Tensor | None = None, device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2: x_T ~ N(0, I), then T steps of :eq:`eq-ddpm-step`.

    The common keywords (``x_T``, ``generator``, ``device``, ``trajectory``) are described in
    :mod:`tinyddpm.sampling.common`; ``trajectory=[]`` receives [x_T, x_{T-1}, ..., x_0] (on CPU).
    ``t_start`` (default T) starts at a lower step: ``x_T`` is then x at step t_start (SDEdit,
    :func:`tinyddpm.img2img`).
    """
    check_choice("variance", variance, VARIANCES)
    check_choice("prediction", prediction, PREDICTIONS)
    t_start = s.T if t_start is None else check_int("t_start", t_start, low=1, high=s.T)
    check_eps_at_zero_snr([float(s.alpha_bars[t_start])], prediction, "ddpm_sample")
    x, noise = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)
    for t in range(t_start, 0, -1):
        x0, _ = _predict(model, s, x, t, prediction, clip_x0)            # 1. predict ε, hence x̂_0
        z = noise() if t > 1 else None                                   # 2. z ~ N(0, I), none at t = 1
        x = ddpm_step_x0(s, x, t, x0, z, variance)                       # 3. x_{t-1}
        record(trajectory, x)
    return x


@torch.no_grad()
def ddim_sample(
    model: Model, s: NoiseSchedule, shape: tuple[int, ...], *, steps: int | None = None, eta: float = 0.0,
    spacing: Spacing = "trailing", sigmas: Tensor | Sequence[float] | None = None,
    generator: torch.Generator | None = None, clip_x0: bool | float = False, prediction: Prediction = "eps",
    t_start: int | None = None,
    x_T: Tensor | None = None, device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """DDIM sampling over ``ddim_timesteps(T, steps, spacing)`` (steps default 50), eq. :eq:`eq-ddim-step` at each step.

    ``t_start`` (default T) runs the same grid on [1, t_start] instead, ``ddim_timesteps(t_start,
    steps, spacing)``, with ``x_T`` the point at step t_start (SDEdit, :func:`tinyddpm.img2img`).

    ``sigmas=`` runs the same update on any descending VE noise levels instead (e.g.
    :func:`tinyddpm.karras_sigmas`), with ᾱ = 1/(1 + σ²) and the model called at fractional
    t = ``s.t_from_sigma(σ)``; the last step goes to σ = 0 either way. ``x_T`` starts from a given
    latent (deterministic decoding when η = 0) instead of fresh noise; ``trajectory=[]`` receives
    [x_T, x_{t_1}, ..., x_0]. See :mod:`tinyddpm.sampling.common`.
    """
    eta = check_nonneg_float("eta", eta)
    check_choice("prediction", prediction, PREDICTIONS)
    if t_start is None:
        grid = schedule_grid(s, steps, spacing, sigmas, default_steps=50)
    elif sigmas is not None:
        raise ValueError("pass either t_start= (the schedule's steps below it) or sigmas= (any grid), not both")
    else:
        t_start = check_int("t_start", t_start, low=1, high=s.T)
        ts = ddim_timesteps(t_start, 50 if steps is None else steps, spacing)
        grid = [(t, float(s.alpha_bars[t])) for t in ts]
    check_eps_at_zero_snr([ab for _, ab in grid], prediction, "ddim_sample")
    x, noise = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)
    for (t, ab), (t_prev, ab_prev) in zip(grid, grid[1:] + [(0, 1.0)], strict=True):
        if sigmas is None:   # the schedule's own steps: eq. 12 exactly as ddim_step computes it
            x0, eps = _predict(model, s, x, t, prediction, clip_x0)
            z = noise() if eta > 0 and t_prev > 0 else None
            x = ddim_step_x0_eps(s, x, t, t_prev, x0, eps, eta, z)
        else:                # any noise level: the same eq. 12 and eq. 16 with ᾱ(σ)
            x0, eps = predict_at(model, x, t, ab, prediction, clip_x0)
            sigma = eta * math.sqrt(max((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), 0.0))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * noise()
        record(trajectory, x)
    return x


@torch.no_grad()
def ddim_invert(
    model: Model, s: NoiseSchedule, x0: Tensor, *, steps: int = 50, spacing: Spacing = "trailing",
    prediction: Prediction = "eps", trajectory: list[Tensor] | None = None,
) -> Tensor:
    """Deterministic encoding x_0 -> x_T by running the η = 0 update :eq:`eq-ddim-step` upwards.

    ``ddim_sample(..., x_T=ddim_invert(...), eta=0)`` decodes back to x_0 up to discretisation error.
    Runs on x0's device; ``trajectory=[]`` receives [x_0, x_{t_1}, ..., x_T] (on CPU).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_model(model)
    check_trajectory(trajectory)
    if not isinstance(x0, Tensor) or x0.ndim < 1:
        raise TypeError("x0 must be a torch.Tensor of shape (B, ...)")
    ts = ddim_timesteps(s.T, steps, spacing)[::-1]
    x = x0
    record(trajectory, x)
    for t_prev, t in zip([0] + ts[:-1], ts, strict=True):
        # ε̂ is evaluated at the current, less noisy point (Song et al. 2021, Sec. 4.3); from the
        # clean x_0 (t_prev = 0) it is evaluated at the first selected step instead.
        tt = torch.full((x.shape[0],), t if t_prev == 0 else t_prev, dtype=torch.long, device=x.device)
        out = model(x, tt)
        if t_prev == 0:
            x0_hat, eps = x, (out if prediction == "eps" else s.predict_x0_eps(x, tt, out, prediction)[1])
        else:
            x0_hat, eps = s.predict_x0_eps(x, tt, out, prediction)
        ab = s.alpha_bars[t]
        x = float(ab.sqrt()) * x0_hat + float((1 - ab).sqrt()) * eps
        record(trajectory, x)
    return x
