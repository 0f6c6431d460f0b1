"""Flow matching on the oracle: the exact velocity E[ε - x_0 | x_t] of x_t = (1-t) x_0 + t ε, checked
by Monte Carlo and by the continuity equation, and the ODE sampler that integrates it from t = 1 to 0."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import tinyddpm as td
from tinyddpm.sampling.flow import flow_sample

F64 = torch.float64
GM = td.GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [1.4, 0.6], [0.0, -1.5]], [0.15, 0.3, 0.25, 0.1],
                        [0.4, 0.25, 0.25, 0.1])
N = 3000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_p(x: torch.Tensor, t: float) -> torch.Tensor:
    """log density of x_t = (1-t) x_0 + t ε, written from scratch: Σ_k w_k N((1-t) μ_k, (1-t)² σ_k² + t²)."""
    var = (1 - t) ** 2 * GM.stds**2 + t**2
    comp = torch.log(GM.weights) - 0.5 * (((x[:, None] - (1 - t) * GM.means) ** 2 / var)
                                          + torch.log(2 * math.pi * var)).sum(-1)
    return torch.logsumexp(comp, -1)


@pytest.mark.parametrize("t", [0.15, 0.5, 0.85])
def test_velocity_is_the_conditional_mean_monte_carlo(t):
    """Tower property: E[(ε - x_0) f(x_t)] = E[u_t(x_t) f(x_t)] for every test function f; checked for
    several f within 5 standard errors on 400k draws."""
    n = 400_000
    g = gen(int(100 * t))
    x0 = GM.sample(n, generator=g).double()
    eps = torch.randn(n, 2, generator=g, dtype=F64)
    xt = (1 - t) * x0 + t * eps
    u = GM.velocity(xt, t)
    target = eps - x0
    fs = [torch.ones(n), xt[:, 0], xt[:, 1], torch.tanh(2 * xt[:, 0]), (xt[:, 1] > 0.3).double(),
          torch.exp(-((xt - torch.tensor([1.0, 0.8], dtype=F64)) ** 2).sum(1))]
    for f in fs:
        diff = (target - u) * f[:, None].double()
        se = diff.std(0) / math.sqrt(n)
        assert (diff.mean(0).abs() < 5 * se + 1e-12).all(), (t, diff.mean(0), se)
    # the check has teeth: the sign-flipped velocity fails it by far
    se = (target * fs[1][:, None]).std(0).max() / math.sqrt(n)
    assert ((target + u) * fs[1][:, None]).mean(0).abs().max() > 10 * se


@pytest.mark.parametrize("t", [0.1, 0.4, 0.7, 0.95])
def test_velocity_satisfies_the_continuity_equation(t):
    """∂_t p + ∇·(p u) = 0  ⇔  ∂_t log p + ∇·u + u·∇ log p = 0, by central finite differences."""
    x = torch.randn(40, 2, generator=gen(1), dtype=F64) * 1.5
    h = 1e-5
    dlogp_dt = (log_p(x, t + h) - log_p(x, t - h)) / (2 * h)
    div = sum((GM.velocity(x + h * e, t)[:, i] - GM.velocity(x - h * e, t)[:, i]) / (2 * h)
              for i, e in enumerate(torch.eye(2, dtype=F64)))
    xg = x.clone().requires_grad_(True)
    (grad_logp,) = torch.autograd.grad(log_p(xg, t).sum(), xg)
    residual = dlogp_dt + div + (GM.velocity(x, t) * grad_logp).sum(1)
    scale = dlogp_dt.abs().max()
    assert residual.abs().max() < 1e-5 * max(1.0, float(scale)), residual.abs().max()


def test_velocity_endpoints_and_shapes():
    x = torch.randn(10, 2, generator=gen(2), dtype=F64)
    mean = (GM.weights[:, None] * GM.means).sum(0)
    torch.testing.assert_close(GM.velocity(x, 1.0), x - mean)      # t = 1: x = ε, E[x_0 | ε] = E[x_0]
    torch.testing.assert_close(GM.velocity(x, 0.0), -x)            # t = 0: x = x_0, E[ε | x_0] = 0
    per_row = GM.velocity(x, torch.linspace(0, 1, 10, dtype=F64))
    for i, ti in enumerate(torch.linspace(0, 1, 10, dtype=F64).tolist()):
        torch.testing.assert_close(per_row[i : i + 1], GM.velocity(x[i : i + 1], ti))
    assert GM.velocity(x.float(), 0.5).dtype == torch.float32
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        GM.velocity(x, 1.5)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        GM.velocity(x, torch.zeros(3))
    with pytest.raises(TypeError, match="t must be a float"):
        GM.velocity(x, "0.5")


# ----------------------------------------------------------------------------- the sampler
@functools.cache
def x_T():
    return torch.randn(400, 2, generator=gen(7), dtype=F64)


@functools.cache
def reference():
    return flow_sample(GM.velocity, (400, 2), steps=1000, solver="heun", x_T=x_T())


@functools.cache
def path_error(solver: str, steps: int) -> float:
    return float((flow_sample(GM.velocity, (400, 2), steps=steps, solver=solver, x_T=x_T()) - reference())
                 .norm(dim=1).mean())


def test_flow_sample_calls_the_model_on_the_uniform_grid():
    seen = []

    def v(x, t):
        assert t.shape == (x.shape[0],) and t.is_floating_point()
        seen.append(float(t[0]))
        return GM.velocity(x, t)
    flow_sample(v, (5, 2), steps=4, solver="euler", generator=gen(0))
    assert seen == [1.0, 0.75, 0.5, 0.25]
    seen.clear()
    flow_sample(v, (5, 2), steps=2, solver="heun", generator=gen(0))
    assert seen == [1.0, 0.5, 0.5, 0.0]                            # NFE = 2n


def test_flow_reproduces_the_mixture():
    real = GM.sample(N, generator=gen(100))
    floor = max(abs(td.energy_distance(GM.sample(N, generator=gen(200 + i)), GM.sample(N, generator=gen(300 + i))))
                for i in range(3))
    x = flow_sample(GM.velocity, (N, 2), steps=20, solver="heun", generator=gen(0))
    assert td.energy_distance(x, real) < 3 * floor
    bad = flow_sample(GM.velocity, (N, 2), steps=2, solver="euler", generator=gen(0))
    assert td.energy_distance(bad, real) > 10 * floor


def test_heun_beats_euler_at_equal_nfe_and_is_second_order():
    for n in (5, 10, 20):
        assert path_error("heun", n) < 0.5 * path_error("euler", 2 * n), n
    assert path_error("heun", 40) / path_error("heun", 20) < 0.3          # ~1/4: second order
    assert 0.4 < path_error("euler", 40) / path_error("euler", 20) < 0.7  # ~1/2: first order


def test_flow_sample_bad_input():
    with pytest.raises(ValueError, match="solver must be one of 'euler', 'heun'"):
        flow_sample(GM.velocity, (4, 2), solver="rk4")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow_sample(GM.velocity, (4, 2), steps=0)
    with pytest.raises(ValueError, match="model returned shape"):
        flow_sample(lambda x, t: x[:, :1], (4, 2), steps=2)


def test_nfe_table_rows():
    from tinyddpm.sampling.nfe import format_nfe_table, nfe_table

    s = td.NoiseSchedule.linear(1000)
    rows = nfe_table(GM, s, nfes=(10,), n=200, generator=gen(0))
    assert [(r["sampler"], r["nfe"]) for r in rows] == [
        ("ddim", 10), ("dpmpp_2m", 10), ("heun", 9), ("heun_logsnr", 9), ("flow_euler", 10), ("flow_heun", 10)]
    err = {r["sampler"]: r["path_error"] for r in rows}
    assert err["flow_heun"] < err["flow_euler"] and err["dpmpp_2m"] < err["ddim"]
    assert format_nfe_table(rows).count("\n") == len(rows) + 1
