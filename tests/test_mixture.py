"""The Gaussian-mixture oracle: density, sampling, and the optimal ε against autograd and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import distributions as D

import tinyddpm as td

F64 = torch.float64


def _scipy_log_prob(gm: td.GaussianMixture, x: np.ndarray, means, stds, weights) -> np.ndarray:
    dens = sum(
        w * multivariate_normal(mean=np.atleast_1d(m), cov=np.diag(np.atleast_1d(s) ** 2)).pdf(x)
        for m, s, w in zip(means, stds, weights, strict=True)
    )
    return np.log(dens)


CASES = {
    "1d": ([-1.0, 0.5, 2.0], [0.3, 0.5, 0.2], [0.2, 0.5, 0.3]),
    "2d_iso": ([[0.0, 0.0], [1.0, -1.0]], [0.4, 0.8], [0.7, 0.3]),
    "2d_diag": ([[-1.0, 0.5], [1.0, 0.2], [0.0, -1.0]], [[0.2, 0.6], [0.5, 0.1], [0.3, 0.3]], [0.25, 0.25, 0.5]),
}


def _expand_stds(means, stds):
    m = np.asarray(means, dtype=float).reshape(len(means), -1)
    s = np.asarray(stds, dtype=float)
    return m, (np.repeat(s[:, None], m.shape[1], 1) if s.ndim == 1 else s)


@pytest.mark.parametrize("case", CASES)
def test_log_prob_matches_scipy(case):
    means, stds, weights = CASES[case]
    gm = td.GaussianMixture(means, stds, weights)
    m, s = _expand_stds(means, stds)
    x = np.random.default_rng(0).normal(size=(50, gm.D)) * 1.5
    ref = _scipy_log_prob(gm, x if gm.D > 1 else x[:, 0], m, s, weights)
    np.testing.assert_allclose(gm.log_prob(torch.as_tensor(x)).numpy(), ref, rtol=1e-10)
    # responsibilities are the normalised per-component densities
    comp = np.stack(
        [w * multivariate_normal(mi, np.diag(si**2)).pdf(x) for mi, si, w in zip(m, s, weights, strict=True)], 1
    )
    np.testing.assert_allclose(gm.responsibilities(torch.as_tensor(x)).numpy(), comp / comp.sum(1, keepdims=True),
                               rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("case", CASES)
def test_sampling_moments_and_weights(case):
    means, stds, weights = CASES[case]
    gm = td.GaussianMixture(means, stds, weights)
    m, s = _expand_stds(means, stds)
    n = 60_000
    x, k = gm.sample(n, generator=torch.Generator().manual_seed(0), return_labels=True)
    assert x.shape == (n, gm.D) and x.dtype == torch.float32
    w = np.asarray(weights)
    frac = np.bincount(k.numpy(), minlength=gm.K) / n
    assert (np.abs(frac - w) <= 5 * np.sqrt(w * (1 - w) / n)).all()
    xd = x.double().numpy()
    for j in range(gm.K):
        xj = xd[k.numpy() == j]
        nj = len(xj)
        assert (np.abs(xj.mean(0) - m[j]) <= 5 * s[j] / math.sqrt(nj)).all()
        assert (np.abs(xj.std(0) - s[j]) <= 5 * s[j] / math.sqrt(2 * nj)).all()
    # the overall mean Σ w_k μ_k and variance Σ w_k (σ_k² + μ_k²) - mean²
    mean = (w[:, None] * m).sum(0)
    var = (w[:, None] * (s**2 + m**2)).sum(0) - mean**2
    assert (np.abs(xd.mean(0) - mean) <= 5 * np.sqrt(var / n)).all()


def _marginal_log_density(means, stds, weights, ab: float):
    """log q_t(x) = log Σ_k w_k N(x; √ᾱ μ_k, diag(ᾱ σ_k² + 1 - ᾱ)), built from torch.distributions."""
    m, s = _expand_stds(means, stds)
    comp = D.Independent(
        D.Normal(torch.as_tensor(math.sqrt(ab) * m), torch.as_tensor(np.sqrt(ab * s**2 + 1 - ab))), 1
    )
    return D.MixtureSameFamily(D.Categorical(probs=torch.as_tensor(weights, dtype=F64)), comp).log_prob


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t", [1, 10, 200, 700, 1000])
def test_optimal_eps_is_tweedie_by_autograd(schedule, case, t):
    """E[ε | x_t] = -√(1-ᾱ_t) ∇ log q_t(x_t), with the gradient taken by autograd of an independent density."""
    means, stds, weights = CASES[case]
    gm = td.GaussianMixture(means, stds, weights)
    ab = float(np.prod(1 - schedule.betas.numpy()[1 : t + 1]))
    log_q = _marginal_log_density(means, stds, weights, ab)
    x = (torch.randn(64, gm.D, generator=torch.Generator().manual_seed(t), dtype=F64) * 1.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(log_q(x).sum(), x)
    expected = -math.sqrt(1 - ab) * grad
    got = gm.optimal_eps(x.detach(), t, schedule)
    assert got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    # a (N,) timestep tensor gives each row its own t; float32 in, float32 out
    got32 = gm.optimal_eps(x.detach().float(), torch.full((64,), t), schedule)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, expected.float(), rtol=1e-4, atol=1e-5)


def test_optimal_eps_per_row_timesteps(cosine):
    """Distinct t per row (the general path) equals row-by-row scalar calls (the matrix-product path)."""
    means, stds, weights = CASES["2d_diag"]
    gm = td.GaussianMixture(means, stds, weights)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.randint(1, 1001, (30,), generator=torch.Generator().manual_seed(3))
    got = gm.optimal_eps(x, t, cosine)
    for i in range(30):
        ab = float(cosine.alpha_bars[t[i]])
        xi = x[i : i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_marginal_log_density(means, stds, weights, ab)(xi).sum(), xi)
        torch.testing.assert_close(got[i : i + 1], -math.sqrt(1 - ab) * grad, rtol=1e-9, atol=1e-11)


def test_marginal_matches_independent_density(linear):
    means, stds, weights = CASES["2d_diag"]
    gm = td.GaussianMixture(means, stds, weights)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (0, 1, 300, 1000):
        ab = float(linear.alpha_bars[t])
        expected = _marginal_log_density(means, stds, weights, ab)(x)
        torch.testing.assert_close(gm.marginal(t, linear).log_prob(x), expected)


def test_optimal_eps_equals_monte_carlo_conditional_mean(linear):
    """1-D: bin x_t drawn from the forward process; the mean of the true ε in each bin equals E[ε | x_t]
    averaged over the same points (so bin width causes no bias). Tolerance: 5 standard errors per bin."""
    means, stds, weights = CASES["1d"]
    gm = td.GaussianMixture(means, stds, weights)
    t, n = 300, 200_000
    g = torch.Generator().manual_seed(11)
    x0 = gm.sample(n, generator=g).double()
    eps = torch.randn(n, 1, generator=g, dtype=F64)
    xt = linear.q_sample(x0, t, eps)
    opt = gm.optimal_eps(xt, t, linear)[:, 0]
    edges = torch.linspace(-2.5, 2.5, 26, dtype=F64)
    idx = torch.bucketize(xt[:, 0], edges)
    checked = 0
    for b in range(1, len(edges)):
        sel = idx == b
        nb = int(sel.sum())
        if nb < 1000:
            continue
        resid = eps[sel, 0] - opt[sel]            # E[ε - E[ε|x_t] | bin] = 0
        se = float(resid.std()) / math.sqrt(nb)
        assert abs(float(resid.mean())) <= 5 * se, (b, float(resid.mean()), se)
        checked += 1
    assert checked >= 15
    # E[ε | x_t] is not √(1-ᾱ) x_t (the single-Gaussian answer): the mixture matters here
    assert float((opt - math.sqrt(1 - float(linear.alpha_bars[t])) * xt[:, 0]).abs().max()) > 0.3


def test_as_model_is_optimal_eps(gm2, cosine):
    model = gm2.as_model(cosine)
    x = torch.randn(10, 2)
    t = torch.randint(1, 1001, (10,))
    assert torch.equal(model(x, t), gm2.optimal_eps(x, t, cosine))
