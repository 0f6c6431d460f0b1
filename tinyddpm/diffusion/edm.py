"""EDM's σ-parameterisation: preconditioning, training noise levels and loss weight (Karras et al. 2022).

EDM writes the noised data in "variance exploding" form, x = x_0 + σ n with n ~ N(0, I) — our
x̄ = x_t / √ᾱ_t with σ = σ̃_t = √((1 - ᾱ_t)/ᾱ_t) (book chapter 10, eq. :eq:`eq-prob-flow-ode`). A raw
network F_θ is wrapped into a denoiser

    D_θ(x; σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x; c_noise(σ)),                 :eq:`eq-edm-precond`

with the coefficients chosen so that, for data of standard deviation σ_data, the network's input
c_in x and its regression target (x_0 - c_skip x) / c_out both have unit variance at every σ, and
c_skip minimises c_out (Karras et al. 2022, App. B.6):

    c_in = 1/√(σ² + σ_data²),  c_skip = σ_data²/(σ² + σ_data²),  c_out = σ σ_data/√(σ² + σ_data²),
    c_noise = ¼ ln σ.

Training draws ln σ ~ N(P_mean, P_std²) and weights the denoising error ‖D_θ - x_0‖² by
λ(σ) = 1/c_out(σ)², which makes the effective loss on F_θ an unweighted unit-variance regression.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_int, check_nonneg_float

SIGMA_DATA = 0.5        # EDM's default for images in [-1, 1]
P_MEAN, P_STD = -1.2, 1.2


def _sigma(sigma: Tensor | float) -> Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    if not torch.is_floating_point(s):
        raise TypeError(f"sigma must be a float tensor or number; got {s.dtype}")
    return s


def edm_coefficients(sigma: Tensor | float, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at noise level ``sigma`` (any shape, > 0), eqs. :eq:`eq-edm-precond`,
    :eq:`eq-edm-coefficients`."""
    sigma_data = check_nonneg_float("sigma_data", sigma_data)
    if sigma_data == 0:
        raise ValueError("sigma_data must be > 0 (the standard deviation of the data)")
    s = _sigma(sigma)
    # checked where that costs no device sync (a GPU tensor is the sampler's own grid, already valid)
    if s.device.type == "cpu" and not torch.compiler.is_compiling() and bool((s <= 0).any()):
        raise ValueError("sigma must be > 0 (c_noise = ln(sigma) / 4)")
    total = s * s + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = s * sigma_data / total.sqrt()
    c_in = 1.0 / total.sqrt()
    c_noise = 0.25 * s.log()
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: Tensor | float, sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ) = (σ² + σ_data²) / (σ σ_data)² = 1 / c_out(σ)²: the weight on ‖D_θ(x; σ) - x_0‖²,
    eq. :eq:`eq-edm-weight`."""
    _, c_out, _, _ = edm_coefficients(sigma, sigma_data)
    return 1.0 / (c_out * c_out)


def sample_edm_sigmas(
    n: int, *, p_mean: float = P_MEAN, p_std: float = P_STD, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """n training noise levels with ln σ ~ N(p_mean, p_std²) (EDM Table 1), float32 on ``device``.

    The normal draw is made on the generator's device and moved, so a CPU generator drives any device.
    """
    n = check_int("n", n, low=1)
    if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std > 0):
        raise ValueError(f"p_mean must be finite and p_std > 0; got {p_mean}, {p_std}")
    z = torch.randn(n, generator=generator, device=generator.device if generator is not None else device)
    return (p_mean + p_std * z).exp().to(device if device is not None else z.device)


def edm_denoise(
    net_out: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = SIGMA_DATA,
) -> Tensor:
    """D = c_skip x + c_out F from a network output F computed at (c_in x, c_noise); σ is (B,) or ()."""
    c_skip, c_out, _, _ = edm_coefficients(sigma, sigma_data)
    shape = (-1,) + (1,) * (x.ndim - 1)
    c_skip = c_skip.to(x).reshape(shape) if c_skip.ndim else c_skip.to(x)
    c_out = c_out.to(x).reshape(shape) if c_out.ndim else c_out.to(x)
    return c_skip * x + c_out * net_out


__all__ = ["P_MEAN", "P_STD", "SIGMA_DATA", "edm_coefficients", "edm_denoise", "edm_loss_weight", "sample_edm_sigmas"]
