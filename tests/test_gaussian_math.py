"""Forward process q(x_t | x_0) and the x0 / ε / v conversions.

Monte Carlo tolerances are 5 standard errors; a √ᾱ ↔ ᾱ or √(1-ᾱ) ↔ (1-ᾱ) mix-up moves the
mid-range moments by hundreds of standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

F64 = torch.float64
TS = [1, 10, 250, 500, 1000]


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, var: float | torch.Tensor, k: float = 5.0) -> None:
    """Sample mean and variance along dim 0 within k standard errors of (mean, var)."""
    n = x.shape[0]
    var = torch.as_tensor(var, dtype=F64).expand_as(mean)
    se_mean = (var / n).sqrt()
    se_var = var * math.sqrt(2.0 / (n - 1))
    assert ((x.mean(0) - mean).abs() <= k * se_mean).all(), (x.mean(0), mean, se_mean)
    assert ((x.var(0) - var).abs() <= k * se_var).all(), (x.var(0), var, se_var)


@pytest.mark.parametrize("t", TS)
def test_q_sample_moments(schedule, np_alpha_bars, t):
    g = torch.Generator().manual_seed(t)
    n = 40_000
    x0 = torch.tensor([-1.0, 0.5, 2.0], dtype=F64).expand(n, 3)
    xt = schedule.q_sample(x0, t, torch.randn(n, 3, generator=g, dtype=F64))
    ab = np_alpha_bars(schedule)[t]
    _assert_moments(xt, math.sqrt(ab) * x0[0], 1 - ab)


def test_q_sample_per_sample_timesteps(linear, np_alpha_bars):
    """A (B,) t picks each row's own ᾱ_t; a float32 x stays float32."""
    t = torch.tensor([1, 400, 1000])
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    xt = linear.q_sample(x0, t, eps)
    assert xt.dtype == torch.float32
    ab = torch.as_tensor(np_alpha_bars(linear)[t.numpy()], dtype=torch.float32)[:, None, None, None]
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    for i in range(3):  # row by row equals the scalar-t call
        torch.testing.assert_close(xt[i : i + 1], linear.q_sample(x0[i : i + 1], int(t[i]), eps[i : i + 1]))


def test_one_step_chain_recursion_equals_closed_form(schedule):
    """x_t = √α_t x_{t-1} + √β_t ε  ⇒  mean coef Π√α_s = √ᾱ_t and v_t = α_t v_{t-1} + β_t = 1 - ᾱ_t (exactly)."""
    betas = schedule.betas.tolist()
    m, v = 1.0, 0.0
    for t in range(1, schedule.T + 1):
        m *= math.sqrt(1 - betas[t])
        v = (1 - betas[t]) * v + betas[t]
        assert m == pytest.approx(float(schedule.sqrt_alpha_bars[t]), rel=1e-11)
        assert v == pytest.approx(1 - float(schedule.alpha_bars[t]), rel=1e-11, abs=1e-15)


def test_one_step_chain_monte_carlo_equals_q_sample(schedule):
    """Running the chain t times and jumping with q_sample give the same law (MC moments)."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = torch.full((n, 1), 1.5, dtype=F64)
    x = x0.clone()
    b = schedule.betas.tolist()
    for t in range(1, schedule.T + 1):
        x = math.sqrt(1 - b[t]) * x + math.sqrt(b[t]) * torch.randn(n, 1, generator=g).double()
        if t in TS:
            jump = schedule.q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=F64))
            # both against the closed form, and against each other (difference of means: √2 SE)
            ab = float(schedule.alpha_bars[t])
            _assert_moments(x, torch.tensor([math.sqrt(ab) * 1.5], dtype=F64), 1 - ab)
            _assert_moments(jump, torch.tensor([math.sqrt(ab) * 1.5], dtype=F64), 1 - ab)
            assert abs(float(x.mean() - jump.mean())) <= 5 * math.sqrt(2 * (1 - ab) / n)


@pytest.mark.parametrize("t", [1, 2, 500, 1000])
def test_x0_eps_v_round_trips(schedule, t):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
    xt = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(schedule.x0_from_eps(xt, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.eps_from_x0(xt, t, x0), eps, rtol=0, atol=1e-9 if t > 1 else 1e-6)
    v = schedule.v_from_x0_eps(x0, t, eps)
    ab = float(schedule.alpha_bars[t])
    torch.testing.assert_close(v, math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0)     # Salimans & Ho 2022
    torch.testing.assert_close(schedule.x0_from_v(xt, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.eps_from_v(xt, t, v), eps, rtol=0, atol=1e-12)
    # predict_x0_eps inverts target for every prediction kind
    for kind in ("eps", "x0", "v"):
        x0_hat, eps_hat = schedule.predict_x0_eps(xt, t, schedule.target(x0, t, eps, kind), kind)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9 if t > 1 else 1e-6)


def test_t0_is_identity(linear):
    x = torch.randn(4, 2, dtype=F64)
    e = torch.randn(4, 2, dtype=F64)
    assert torch.equal(linear.q_sample(x, 0, e), x)
    assert torch.equal(linear.x0_from_eps(x, 0, e), x)


def test_x0_from_eps_formula_float32_vs_numpy(cosine, np_alpha_bars):
    """Float32 callers get coefficients rounded once from float64 (extract casts after indexing)."""
    t = torch.tensor([3, 700])
    xt, eps = torch.randn(2, 5), torch.randn(2, 5)
    ab = np_alpha_bars(cosine)[t.numpy()][:, None]
    expected = (xt.numpy().astype(np.float64) - np.sqrt(1 - ab) * eps.numpy()) / np.sqrt(ab)
    np.testing.assert_allclose(cosine.x0_from_eps(xt, t, eps).numpy(), expected, rtol=1e-5, atol=1e-5)
