"""q(x_{t-1} | x_t, x_0) against Bayes' rule done numerically, and the ε-form of its mean (DDPM eq. 11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

F64 = torch.float64


def _bayes_on_grid(x0: float, xt: float, t: int, betas: np.ndarray, n: int = 40_001) -> tuple[float, float]:
    """Mean and variance of  q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised over a fine 1-D grid.

    q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t),  q(x_{t-1} | x_0) = N(√ᾱ_{t-1} x_0, 1 - ᾱ_{t-1}).
    """
    ab_prev = float(np.prod(1.0 - betas[1:t]))            # ᾱ_{t-1}, from the β's alone
    beta, alpha = float(betas[t]), 1.0 - float(betas[t])
    prior_mean, prior_var = math.sqrt(ab_prev) * x0, 1.0 - ab_prev
    like_mean, like_var = xt / math.sqrt(alpha), beta / alpha   # the likelihood as a function of x_{t-1}
    # the posterior lies between the two centres and is narrower than either factor
    width = 12 * math.sqrt(min(prior_var, like_var))
    grid = np.linspace(min(prior_mean, like_mean) - width, max(prior_mean, like_mean) + width, n)
    log_p = -0.5 * (xt - math.sqrt(alpha) * grid) ** 2 / beta - 0.5 * (grid - prior_mean) ** 2 / prior_var
    p = np.exp(log_p - log_p.max())
    z = np.trapezoid(p, grid)
    mean = np.trapezoid(grid * p, grid) / z
    var = np.trapezoid((grid - mean) ** 2 * p, grid) / z
    return mean, var


@pytest.mark.parametrize("t", [2, 3, 50, 500, 999, 1000])
@pytest.mark.parametrize("x0", [-0.7, 1.3])
def test_q_posterior_matches_bayes_on_a_grid(schedule, t, x0):
    g = torch.Generator().manual_seed(t)
    x0_t = torch.tensor([[x0]], dtype=F64)
    xt = schedule.q_sample(x0_t, t, torch.randn(1, 1, generator=g, dtype=F64))
    mean, var = schedule.q_posterior(x0_t, xt, t)
    ref_mean, ref_var = _bayes_on_grid(x0, float(xt), t, schedule.betas.numpy())
    assert float(var) == pytest.approx(ref_var, rel=1e-6)
    assert float(mean) == pytest.approx(ref_mean, rel=1e-6, abs=1e-9)
    # and the β̃ formula written out: (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t
    ab = np.cumprod(1 - schedule.betas.numpy())
    assert float(var) == pytest.approx((1 - ab[t - 1]) / (1 - ab[t]) * float(schedule.betas[t]), rel=1e-12)


def test_q_posterior_at_t1_is_a_point_mass_at_x0(schedule):
    x0 = torch.tensor([[-0.3, 2.0]], dtype=F64)
    xt = torch.tensor([[5.0, -4.0]], dtype=F64)      # x_1 far from x_0: still the point mass at x_0
    mean, var = schedule.q_posterior(x0, xt, 1)
    assert float(var) == 0.0
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-12)


def test_q_posterior_batched_t_and_shapes(linear):
    t = torch.tensor([1, 2, 999])
    x0, xt = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    mean, var = linear.q_posterior(x0, xt, t)
    assert mean.shape == x0.shape and var.shape == (3, 1, 1, 1) and mean.dtype == torch.float32
    for i in range(3):
        m_i, v_i = linear.q_posterior(x0[i : i + 1], xt[i : i + 1], int(t[i]))
        torch.testing.assert_close(mean[i : i + 1], m_i)
        torch.testing.assert_close(var[i], v_i.reshape(1, 1, 1))


@pytest.mark.parametrize("t", [1, 2, 10, 500, 1000])
def test_eps_form_of_posterior_mean_ddpm_eq11(schedule, t):
    """μ = (x_t - β_t/√(1-ᾱ_t) ε) / √α_t  equals  q_posterior's mean at x̂_0 = x0_from_eps(x_t, ε)."""
    g = torch.Generator().manual_seed(t)
    xt, eps = torch.randn(16, 2, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
    betas = schedule.betas.numpy()
    ab_t = float(np.prod(1 - betas[1 : t + 1]))
    mu_eps = (xt - betas[t] / math.sqrt(1 - ab_t) * eps) / math.sqrt(1 - betas[t])
    mean, _ = schedule.q_posterior(schedule.x0_from_eps(xt, t, eps), xt, t)
    torch.testing.assert_close(mean, mu_eps, rtol=0, atol=1e-8)


def test_posterior_monte_carlo(linear):
    """Sampling x_{t-1} ~ q(·|x_0) then x_t ~ q(x_t|x_{t-1}), conditioned on x_t near a value: moments agree.

    The exact form of conditioning uses the joint Gaussian: regress x_{t-1} on x_t. With x_0 fixed,
    (x_{t-1}, x_t) is jointly Gaussian, so E[x_{t-1}|x_t] is linear in x_t and the residual variance is β̃_t.
    """
    t, n = 300, 200_000
    g = torch.Generator().manual_seed(7)
    x0 = 0.8
    b = linear.betas.numpy()
    ab_prev = float(np.prod(1 - b[1:t]))
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * torch.randn(n, generator=g, dtype=F64)
    xt = math.sqrt(1 - b[t]) * x_prev + math.sqrt(b[t]) * torch.randn(n, generator=g, dtype=F64)
    # least squares x_{t-1} ≈ a + c x_t
    A = torch.stack([torch.ones(n, dtype=F64), xt], 1)
    coef = torch.linalg.lstsq(A, x_prev[:, None]).solution[:, 0]
    resid_var = float((x_prev - A @ coef).var())
    probe = torch.tensor([[-1.0], [0.0], [1.0]], dtype=F64)
    mean, var = linear.q_posterior(torch.full_like(probe, x0), probe, t)
    pred = coef[0] + coef[1] * probe[:, 0]
    # the regression's standard errors scale like sqrt(resid_var / n); 5 SE with a little spread for |x_t| ≤ 1
    tol = 5 * math.sqrt(resid_var / n) * 3
    assert (pred - mean[:, 0]).abs().max() < tol
    assert resid_var == pytest.approx(float(var), rel=5 * math.sqrt(2 / n))
