"""Noise-level grids: which σ's a sampler visits, kept apart from the solvers (k-diffusion's design).

A grid is a descending sequence of VE noise levels σ = √((1-ᾱ)/ᾱ) (see
:attr:`tinyddpm.NoiseSchedule.sigmas`). The functions here return the n positive levels
**without** the final σ = 0: every sampler that takes ``sigmas=`` appends the last step to σ = 0
itself (where it returns the denoised x̂_0), so ``steps = len(sigmas)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import check_int
from ..diffusion.schedule import NoiseSchedule

F64 = torch.float64


def _check_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max; got {sigma_min} >= {sigma_max}")
    return float(sigma_min), float(sigma_max)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's grid, Karras et al. (2022) eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ.

    Book eq. :eq:`eq-karras-grid`, chapter 13. i = 0..n-1, so σ_0 = σ_max and σ_{n-1} = σ_min; ρ = 7 spends
    most steps at low noise (the last step's ratio in ln σ is (σ_max/σ_min)^{1/ρ} times the first's). Returns a
    descending float64 tensor of length n **without** the final 0 (the sampler appends it). n = 1
    gives [σ_max].
    """
    n = check_int("n", n, low=1)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number > 0; got {rho!r}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=F64)
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    out = (hi + ramp * (lo - hi)) ** rho
    out[0], out[-1] = sigma_max, sigma_min        # exact end points: (σ^{1/ρ})^ρ may round off σ's range
    return out


def log_snr_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n levels uniform in log-SNR λ = -log σ (equivalently in log σ), from σ_max down to σ_min.

    The grid DPM-Solver recommends for its λ-steps (Lu et al. 2022, Sec. 3.3: "uniform logSNR").
    Descending float64 tensor of length n without the final 0.
    """
    n = check_int("n", n, low=1)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    if n == 1:
        return torch.tensor([sigma_max], dtype=F64)
    out = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=F64).exp()
    out[0], out[-1] = sigma_max, sigma_min        # exact end points, as above
    return out


def sigma_range(s: NoiseSchedule) -> tuple[float, float]:
    """(σ_min, σ_max) = the schedule's extreme finite positive σ's: σ_1 and σ_T (σ_{T-1} if ᾱ_T = 0)."""
    sig = s.sigmas
    top = sig[-1] if math.isfinite(float(sig[-1])) else sig[-2]
    return float(sig[1]), float(top)


def check_sigmas(s: NoiseSchedule, sigmas: Tensor | Sequence[float]) -> list[float]:
    """Validate a user grid: positive, strictly decreasing, within the schedule's finite range.

    A trailing 0 is accepted and dropped (the samplers append it themselves). Returns Python floats.
    """
    sig = torch.as_tensor(sigmas, dtype=F64).detach().cpu() if not isinstance(sigmas, Tensor) else \
        sigmas.detach().to(device="cpu", dtype=F64)
    if sig.ndim != 1 or sig.numel() < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence of noise levels; got shape {tuple(sig.shape)}")
    if sig.numel() > 1 and float(sig[-1]) == 0.0:
        sig = sig[:-1]
    if not torch.isfinite(sig).all() or (sig <= 0).any():
        raise ValueError("sigmas must be finite and > 0 (a final 0 is appended by the sampler)")
    if (sig[1:] >= sig[:-1]).any():
        raise ValueError(f"sigmas must be strictly decreasing; got {sig.tolist()}")
    _, top = sigma_range(s)
    if float(sig[0]) > top * (1 + 1e-9):
        raise ValueError(f"sigmas must not exceed the schedule's largest finite σ = {top:.6g}; got {float(sig[0]):.6g}")
    return [min(v, top) for v in sig.tolist()]


def schedule_grid(
    s: NoiseSchedule, steps: int | None, spacing: str, sigmas: Tensor | Sequence[float] | None, default_steps: int,
) -> list[tuple[int | float, float]]:
    """The levels a sampler visits, as (t for the model, ᾱ) pairs, before the final step to t = 0.

    Without ``sigmas``: the schedule's own steps ``ddim_timesteps(T, steps, spacing)`` (integer t,
    ᾱ from the table). With ``sigmas``: fractional t = ``s.t_from_sigma(σ)`` and ᾱ = 1/(1 + σ²);
    ``steps``, if given, must then equal the number of levels.
    """
    from .ddpm_ddim import ddim_timesteps

    if sigmas is None:
        ts = ddim_timesteps(s.T, default_steps if steps is None else steps, spacing)
        return [(t, float(s.alpha_bars[t])) for t in ts]
    sig = check_sigmas(s, sigmas)
    if steps is not None and steps != len(sig):
        raise ValueError(f"pass either steps= or sigmas= (the grid fixes the number of steps, here {len(sig)}), "
                         f"not both; got steps={steps!r}")
    ts = s.t_from_sigma(torch.tensor(sig, dtype=F64)).tolist()
    return [(t, 1.0 / (1.0 + v * v)) for t, v in zip(ts, sig, strict=True)]


__all__ = ["check_sigmas", "karras_sigmas", "log_snr_sigmas", "schedule_grid", "sigma_range"]
