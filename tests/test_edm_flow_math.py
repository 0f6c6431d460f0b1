"""EDM preconditioning and the flow-matching path: each formula against an independent derivation or Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

import tinyddpm as td
from tinyddpm.diffusion.edm import edm_coefficients, edm_denoise, edm_loss_weight, sample_edm_sigmas
from tinyddpm.diffusion.flow_matching import (
    flow_interpolate,
    flow_target,
    flow_to_vp,
    sample_flow_times,
    velocity_from_eps,
    x0_eps_from_velocity,
)

F64 = torch.float64
GM = td.GaussianMixture([[-1.0], [0.3], [1.2]], [0.2, 0.35, 0.15], [0.3, 0.45, 0.25])
GM2 = td.GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [0.0, -1.5]], [0.15, 0.3, 0.1], [0.4, 0.4, 0.2])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ EDM
@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 40.0])
def test_edm_input_and_target_have_unit_variance(sigma):
    """The defining property (Karras et al. 2022, App. B.6), by Monte Carlo on data of std sigma_data."""
    x0 = GM.sample(200_000, generator=gen(0)).double()
    sigma_data = float(x0.std())
    n = torch.randn(x0.shape, generator=gen(1), dtype=F64)
    x = x0 + sigma * n
    c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(sigma, dtype=F64), sigma_data)
    assert abs(float((c_in * x).var()) - 1) < 0.02
    assert abs(float(((x0 - c_skip * x) / c_out).var()) - 1) < 0.02


def test_edm_c_skip_minimises_c_out():
    """c_out² = (1 - c_skip)² σ_data² + c_skip² σ² for a unit-variance target; its argmin is EDM's c_skip."""
    for sigma, sd in ((0.2, 0.5), (1.0, 0.5), (7.0, 0.3)):
        grid = torch.linspace(0, 1, 200_001, dtype=F64)
        c_out2 = (1 - grid) ** 2 * sd**2 + grid**2 * sigma**2
        c_skip, c_out, _, _ = edm_coefficients(sigma, sd)
        assert abs(float(grid[c_out2.argmin()]) - float(c_skip)) < 1e-4
        assert math.isclose(float(c_out2.min()), float(c_out) ** 2, rel_tol=1e-8)


def test_edm_loss_weight_makes_the_network_loss_unweighted():
    """λ(σ) ‖D - x_0‖² = ‖F - (x_0 - c_skip x)/c_out‖² per sample: the network sees a plain regression."""
    g = gen(2)
    sigma = torch.tensor([0.05, 0.5, 3.0, 20.0], dtype=F64)
    x0, n, F = (torch.randn(4, 3, generator=g, dtype=F64) for _ in range(3))
    x = x0 + sigma[:, None] * n
    c_skip, c_out, _, c_noise = edm_coefficients(sigma)
    D = edm_denoise(F, x, sigma)
    lhs = edm_loss_weight(sigma) * ((D - x0) ** 2).sum(1)
    rhs = ((F - (x0 - c_skip[:, None] * x) / c_out[:, None]) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(c_noise, sigma.log() / 4)


def test_edm_sigma_distribution_and_validation():
    s = sample_edm_sigmas(100_000, generator=gen(3))
    assert abs(float(s.log().mean()) + 1.2) < 0.02 and abs(float(s.log().std()) - 1.2) < 0.02
    with pytest.raises(ValueError, match="sigma must be > 0"):
        edm_coefficients(torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        edm_coefficients(1.0, 0.0)
    with pytest.raises(ValueError, match="p_std > 0"):
        sample_edm_sigmas(4, p_std=0.0)


# -------------------------------------------------------------------------------- flow matching
def test_flow_path_derivative_is_the_target():
    g = gen(4)
    x0, eps = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    t, h = torch.rand(5, generator=g, dtype=F64) * 0.8 + 0.1, 1e-6
    fd = (flow_interpolate(x0, eps, t + h) - flow_interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, flow_target(x0, eps), atol=1e-8, rtol=0)
    assert torch.equal(flow_interpolate(x0, eps, 0.0), x0) and torch.equal(flow_interpolate(x0, eps, 1.0), eps)


def test_velocity_conversions_invert_each_other():
    g = gen(5)
    x0, eps = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.rand(6, generator=g, dtype=F64) * 0.9 + 0.05
    xt, v = flow_interpolate(x0, eps, t), flow_target(x0, eps)
    x0_hat, eps_hat = x0_eps_from_velocity(xt, t, v)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(velocity_from_eps(xt, t, eps), v)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.85])
def test_flow_path_is_a_rescaled_vp_marginal(t):
    """p_flow(x) = q^VP_ᾱ(x / c) / c^D exactly, with (ᾱ, c) from flow_to_vp (the change of variables)."""
    ab, c = flow_to_vp(t)
    s1 = td.NoiseSchedule.from_alpha_bars([float(ab)])
    x = GM2.sample(500, generator=gen(6)).double() * 1.3
    flow = td.GaussianMixture((1 - t) * GM2.means, ((1 - t) ** 2 * GM2.stds**2 + t**2).sqrt(), GM2.weights)
    vp = GM2.marginal(1, s1).log_prob(x / float(c)) - 2 * math.log(float(c))
    torch.testing.assert_close(flow.log_prob(x), vp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("t", [0.2, 0.6])
def test_exact_velocity_from_the_eps_oracle(t):
    """E[ε - x_0 | x_t] from the VP ε-oracle at the equivalent ᾱ, against the oracle's own velocity."""
    if not hasattr(td.GaussianMixture, "velocity"):
        pytest.skip("GaussianMixture.velocity not available")
    ab, c = flow_to_vp(t)
    s1 = td.NoiseSchedule.from_alpha_bars([float(ab)])
    x = GM2.sample(300, generator=gen(7)).double() * (1 - t) + t * torch.randn(300, 2, generator=gen(8), dtype=F64)
    eps = GM2.optimal_eps(x / float(c), 1, s1)            # E[ε | x_t]: the same ε in both parametrisations
    v = velocity_from_eps(x, t, eps)
    torch.testing.assert_close(GM2.velocity(x, t).double(), v, atol=1e-8, rtol=0)


def test_flow_time_distributions():
    u = sample_flow_times(50_000, "uniform", generator=gen(9))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    ln = sample_flow_times(50_000, generator=gen(10), mean=0.5, std=0.8)
    logit = (ln / (1 - ln)).log()
    assert abs(float(logit.mean()) - 0.5) < 0.02 and abs(float(logit.std()) - 0.8) < 0.02
    with pytest.raises(ValueError, match="distribution must be one of"):
        sample_flow_times(3, "beta")
    with pytest.raises(ValueError, match=r"t must be a float or a \(B,\) tensor"):
        flow_interpolate(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2))
