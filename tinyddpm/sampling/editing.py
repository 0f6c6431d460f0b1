"""Editing with an unconditional model: SDEdit (img2img) and RePaint (inpainting).

Neither method trains anything: both only change where the reverse process starts or what it is
told at each step. Their ground truth on the Gaussian-mixture oracle: SDEdit with the exact
denoiser maps data to data, and inpainting should sample :meth:`tinyddpm.GaussianMixture.condition`,
the exact law of the unknown coordinates given the known ones.

- **SDEdit** (Meng et al. 2022): noise the input to an intermediate step t₀ with the forward
  process, x_{t₀} = √ᾱ_{t₀} x + √(1-ᾱ_{t₀}) ε :eq:`eq-forward-closed`, then run the reverse process from
  t₀. The larger ``strength`` = t₀/T, the more of x is forgotten.
- **RePaint** (Lugmayr et al. 2022, Algorithm 1): at every reverse step, the known entries of x_{t-1}
  are replaced by a fresh draw of q(x_{t-1} | x_known) and the unknown ones follow the model's step.
  The two halves are noised independently, so they disagree; *resampling* (going back up with the
  forward kernel and down again, U times per step) lets the model harmonise them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_nonneg_float
from ..diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction
from .common import check_eps_at_zero_snr, check_model, check_trajectory, record, start
from .ddpm_ddim import SPACINGS, Model, Spacing, ddim_sample, ddim_step_x0_eps, ddim_timesteps, ddpm_sample
from .denoiser import predict_at
from .heun import heun_sample
from .solvers import dpmpp_2m_sample, euler_ancestral_sample

Img2ImgSampler = Literal["ddim", "ddpm", "euler_a", "dpmpp_2m", "heun"]
IMG2IMG_SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "euler_a", "dpmpp_2m", "heun")
InpaintSampler = Literal["ddpm", "ddim"]
INPAINT_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
_ON_SIGMAS = {"euler_a": euler_ancestral_sample, "dpmpp_2m": dpmpp_2m_sample, "heun": heun_sample}


def _check_images(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of shape (B, C, H, W) or (B, D); got {desc}")
    return x


def sdedit_start(strength: float, T: int) -> int:
    """t₀ = round(strength · T), the step SDEdit noises its input to (0 keeps it, T is plain sampling)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps x, 1 forgets it); got {strength!r}")
    return int(math.floor(float(strength) * T + 0.5))


@torch.no_grad()
def img2img(
    model: Model, s: NoiseSchedule, x: Tensor, strength: float, *, steps: int | None = None,
    sampler: Img2ImgSampler = "ddim", eta: float | None = None, spacing: Spacing = "trailing",
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
    trajectory: list[Tensor] | None = None, **sampler_kw,
) -> Tensor:
    """SDEdit (Meng et al. 2022), eq. :eq:`eq-sdedit`: noise x to t₀ = round(strength·T) by :eq:`eq-forward-closed`,
    then denoise from t₀.

    The reverse run visits ``ddim_timesteps(t₀, n, spacing)``, n = max(1, round(strength · steps))
    of the ``steps`` (default 50) a full run would take — diffusers' img2img grid. ``"ddim"``
    (η = ``eta``, default 0) steps on those integer t; ``"euler_a"``, ``"dpmpp_2m"`` and ``"heun"``
    take them as their ``sigmas=`` grid; ``"ddpm"`` takes every step t₀, ..., 1 (pass no ``steps``).
    ``strength=0`` returns a copy of x exactly; ``strength=1`` starts from √ᾱ_T x + √(1-ᾱ_T) ε,
    i.e. plain sampling up to the signal ᾱ_T leaves. ``generator`` draws ε first, then the
    sampler's noise; ``trajectory`` receives [x_{t₀}, ..., x_0] (just [x] at strength 0); other
    keywords (``prediction``, ``clip_x0``, ...) go to the sampler. x is (B, C, H, W) or (B, D).
    """
    check_model(model)
    check_trajectory(trajectory)
    check_choice("sampler", sampler, IMG2IMG_SAMPLERS)
    check_choice("spacing", spacing, SPACINGS)
    x = _check_images("x", x)
    t0 = sdedit_start(strength, s.T)
    if sampler == "ddpm" and steps is not None:
        raise ValueError("img2img with sampler='ddpm' takes every step below t0; for fewer steps use 'ddim' "
                         "(eta=1 for the stochastic update)")
    n = min(50, s.T) if steps is None else check_int("steps", steps, low=1, high=s.T)
    if eta is not None:
        if sampler not in ("ddim", "euler_a"):
            raise ValueError(f"eta applies to sampler 'ddim' or 'euler_a', not {sampler!r}")
        sampler_kw["eta"] = check_nonneg_float("eta", eta)
    device = x.device if device is None else torch.device(device)
    if t0 == 0:                                          # nothing forgotten: x itself
        out = x.detach().to(device).clone()
        record(trajectory, out)
        return out
    n = min(max(1, int(math.floor(strength * n + 0.5))), t0)
    draw_on = generator.device if generator is not None else device
    eps = torch.randn(x.shape, generator=generator, device=draw_on).to(device)
    xt0 = s.q_sample(x.to(device), t0, eps.to(x.dtype))              # 1. forward to t₀, eq. (eq-forward-closed)
    common = dict(x_T=xt0, generator=generator, device=device, trajectory=trajectory, **sampler_kw)
    if sampler == "ddpm":                                            # 2. the reverse process from t₀
        return ddpm_sample(model, s, tuple(x.shape), t_start=t0, **common)
    if sampler == "ddim":
        return ddim_sample(model, s, tuple(x.shape), steps=n, spacing=spacing, t_start=t0, **common)
    sigmas = s.sigmas[ddim_timesteps(t0, n, spacing)]
    return _ON_SIGMAS[sampler](model, s, tuple(x.shape), sigmas=sigmas, **common)


def _check_mask(mask: object, x_known: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = known) broadcastable to x_known; got {got}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x_known.shape)
    except RuntimeError:
        shape = None
    if shape != x_known.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x_known's shape "
                         f"{tuple(x_known.shape)} (e.g. (D,) or (B, D) for points, (H, W) or (B, 1, H, W) for images)")
    return mask


def repaint_path(n: int, resample: int = 1, jump_length: int = 1) -> list[int]:
    """The RePaint time path as indices into the grid levels 0 (noisiest) .. n (data).

    Down one level per reverse step; at every level k = j, 2j, ... below n (j = ``jump_length``)
    the path jumps back up to k - j, ``resample`` - 1 times, so each block of j steps is run
    ``resample`` times (Lugmayr et al. 2022, Sec. 4.2). Reverse steps: n + (U - 1)·j·⌊(n - 1)/j⌋.
    """
    n = check_int("n", n, low=1)
    resample, jump_length = check_int("resample", resample, low=1), check_int("jump_length", jump_length, low=1)
    if resample > 1 and jump_length > n - 1:
        raise ValueError(f"resampling with jump_length={jump_length} needs more than {jump_length} steps; got {n}")
    left = {k: resample - 1 for k in range(jump_length, n, jump_length)}
    path, i = [0], 0
    while i < n:
        i += 1
        path.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            i -= jump_length
            path.append(i)
    return path


@torch.no_grad()
def inpaint(
    model: Model, s: NoiseSchedule, x_known: Tensor, mask: Tensor, *, steps: int | None = None,
    resample: int = 1, jump_length: int = 1, sampler: InpaintSampler = "ddpm", eta: float | None = None,
    spacing: Spacing = "trailing", prediction: Prediction = "eps", clip_x0: bool | float = False,
    generator: torch.Generator | None = None, x_T: Tensor | None = None,
    device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """Fill in the entries of x_known where ``mask`` is False: RePaint (Lugmayr et al. 2022, Algorithm 1),
    eq. :eq:`eq-repaint`.

    ``mask`` is a bool tensor broadcastable to x_known ((B, D) points or (B, C, H, W) images),
    True where known; x_known's other entries are ignored. Each reverse step t -> t' on the grid
    (every step T, ..., 1 when ``steps`` is None, else ``ddim_timesteps(T, steps, spacing)``):

    1. the model's step for all entries: ``"ddpm"`` draws from q(x_t' | x_t, x̂_0)
       (eq. :eq:`eq-ddpm-step`; DDIM's η = 1, the same update on a strided grid), ``"ddim"`` uses η = ``eta``
       (default 0), eq. :eq:`eq-ddim-step`;
    2. the known entries are replaced by a fresh draw √ᾱ_t' x_known + √(1-ᾱ_t') ε :eq:`eq-forward-closed`;
    3. ``resample`` = U > 1: at the jump points of :func:`repaint_path` the whole x goes back up
       ``jump_length`` levels with the forward kernel x_b = √(ᾱ_b/ᾱ_a) x_a + √(1-ᾱ_b/ᾱ_a) z and is
       denoised again, U passes in all, so the unknown part adapts to the known one.

    U = 1 is plain replacement (Song et al. 2021's inpainting). It is biased: the model sees a known
    part noised independently of its own past. On the oracle (``tests/test_editing.py``) resampling
    repairs unknown parts that settled on a component the known part rules out, but it is a
    heuristic: its fixed point is not the exact conditional, and a wrong balance between modes the
    known part allows survives any U. The known entries of the result equal x_known exactly
    (in x_known's dtype). Common keywords: :mod:`tinyddpm.sampling.common`;
    ``trajectory`` records every visited state, jumps included.
    """
    x_known = _check_images("x_known", x_known)
    mask = _check_mask(mask, x_known)
    check_choice("sampler", sampler, INPAINT_SAMPLERS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("spacing", spacing, SPACINGS)
    if sampler == "ddpm":
        if eta is not None:
            raise ValueError("eta applies to sampler='ddim'; 'ddpm' is the η = 1 (ancestral) step")
        eta = 1.0
    eta = check_nonneg_float("eta", 0.0 if eta is None else eta)
    ts = list(range(s.T, 0, -1)) if steps is None else ddim_timesteps(s.T, steps, spacing)
    levels = ts + [0]
    ab = [float(s.alpha_bars[t]) for t in levels]                       # Python floats: no device reads
    check_eps_at_zero_snr(ab[:-1], prediction, "inpaint")
    path = repaint_path(len(ts), resample, jump_length)
    if not bool(torch.isfinite(x_known.masked_fill(~mask.to(x_known.device), 0.0)).all()):   # one check, up front
        raise ValueError("x_known must be finite where mask is True")
    x, noise = start(model, tuple(x_known.shape), generator=generator, device=device, x_T=x_T, trajectory=trajectory)
    dtype = x_known.dtype
    x = x.to(dtype)
    m = mask.to(x.device)
    known = x_known.detach().to(x.device).masked_fill(~m, 0.0)      # (B, ...): x_0 where known, 0 elsewhere

    for i, j in zip(path, path[1:], strict=False):
        if j == i + 1:                                                 # a reverse step levels[i] -> levels[j]
            t, t_prev = levels[i], levels[j]
            x0, eps = predict_at(model, x, t, ab[i], prediction, clip_x0)          # 1. x̂_0, ε̂
            z = noise().to(dtype) if eta > 0 and t_prev > 0 else None
            x = ddim_step_x0_eps(s, x, t, t_prev, x0, eps, eta, z)                  #    x_{t'} for all entries
            if t_prev > 0:                                                           # 2. known from q(x_t' | x_0)
                known_t = math.sqrt(ab[j]) * known + math.sqrt(1 - ab[j]) * noise().to(dtype)
            else:
                known_t = known
            x = torch.where(m, known_t, x)
        else:                                                          # 3. jump back up: q(x_b | x_a)
            r = ab[j] / ab[i]
            x = math.sqrt(r) * x + math.sqrt(1 - r) * noise().to(dtype)
        record(trajectory, x)
    return x


__all__ = ["IMG2IMG_SAMPLERS", "INPAINT_SAMPLERS", "img2img", "inpaint", "repaint_path", "sdedit_start"]
