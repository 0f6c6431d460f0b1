"""Continuous noise levels (issue 11): σ(t) between the steps, the grids, EDM's Heun, DPM-Solver++(2M)
on any grid, zero terminal SNR, and the oracle at fractional t. Expected values come from numpy /
closed forms / autograd, never from the code under test."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import tinyddpm as td
import tinyddpm.sampling.heun as heun_mod
from tinyddpm.sampling.grids import karras_sigmas, log_snr_sigmas, sigma_range
from tinyddpm.sampling.heun import heun_sample

F64 = torch.float64
S = td.NoiseSchedule.linear(1000)
Z = S.zero_terminal_snr()
GM = td.GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [1.4, 0.6], [0.0, -1.5]], [0.15, 0.3, 0.25, 0.1],
                        [0.4, 0.25, 0.25, 0.1])
ORACLE = GM.as_model(S)
N = 3000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def np_sigmas(s: td.NoiseSchedule) -> np.ndarray:
    ab = np.cumprod(1 - s.betas.numpy())
    with np.errstate(divide="ignore"):
        return np.sqrt((1 - ab) / ab)


@pytest.fixture(scope="module")
def real():
    return GM.sample(N, generator=gen(100))


@pytest.fixture(scope="module")
def tol():
    floors = [td.energy_distance(GM.sample(N, generator=gen(200 + i)), GM.sample(N, generator=gen(300 + i)))
              for i in range(3)]
    return 3 * max(abs(f) for f in floors)


# ----------------------------------------------------------------------------- σ(t) and t(σ)
@pytest.mark.parametrize("s", [S, td.NoiseSchedule.cosine(1000), Z], ids=["linear", "cosine", "zero_snr"])
def test_sigmas_table(s):
    sig = s.sigmas
    assert sig.shape == (s.T + 1,) and sig.dtype == F64 and float(sig[0]) == 0.0
    np.testing.assert_allclose(sig.numpy(), np_sigmas(s), rtol=1e-12)
    torch.testing.assert_close(s.sigma_at(torch.arange(s.T + 1, dtype=F64)), sig, rtol=1e-12, atol=0)


def test_sigma_at_interpolates_log_sigma():
    ref = np_sigmas(S)
    for t in (1.5, 17.25, 500.9, 999.5):
        lo = int(math.floor(t))
        w = t - lo
        expected = ref[lo] ** (1 - w) * ref[lo + 1] ** w                 # geometric interpolation
        assert float(S.sigma_at(t)) == pytest.approx(expected, rel=1e-12)
    assert float(S.sigma_at(0.25)) == pytest.approx(0.25 * ref[1], rel=1e-12)  # [0, 1]: linear in σ
    assert float(S.alpha_bar_at(17.25)) == pytest.approx(1 / (1 + float(S.sigma_at(17.25)) ** 2), rel=1e-14)


def test_t_from_sigma_inverts_sigma_at():
    t = torch.tensor([0.0, 0.3, 1.0, 1.5, 17.25, 400.0, 999.9, 1000.0], dtype=F64)
    torch.testing.assert_close(S.t_from_sigma(S.sigma_at(t)), t, rtol=0, atol=1e-9)
    sig = torch.tensor([1e-4, 0.5, 3.0, 100.0], dtype=F64)
    torch.testing.assert_close(S.sigma_at(S.t_from_sigma(sig)), sig, rtol=1e-12, atol=0)
    # monotone: a larger σ is a later step
    assert (S.t_from_sigma(torch.logspace(-3, 2, 50, dtype=F64)).diff() > 0).all()


def test_zero_terminal_snr_levels():
    assert math.isinf(float(Z.sigmas[-1])) and math.isinf(float(Z.sigma_at(999.5)))
    assert float(Z.t_from_sigma(math.inf)) == 1000.0
    assert float(Z.t_from_sigma(Z.sigmas[999])) == pytest.approx(999.0, abs=1e-9)
    with pytest.raises(ValueError, match="largest finite σ"):
        Z.t_from_sigma(2 * float(Z.sigmas[999]))


def test_continuous_levels_bad_input():
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\]"):
        S.sigma_at(1000.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\]"):
        S.sigma_at(float("nan"))
    with pytest.raises(TypeError, match="t must be a number"):
        S.sigma_at("5")
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        S.t_from_sigma(-1.0)
    with pytest.raises(ValueError, match="sigma must lie in"):
        S.t_from_sigma(1e4)


# ----------------------------------------------------------------------------- the oracle at fractional t
def test_oracle_at_fractional_t_is_the_exact_score():
    """E[ε | x_t] = -√(1-ᾱ) ∇ log q_t with ᾱ(t) = 1/(1+σ(t)²); the gradient by autograd through a
    mixture log-density written here from scratch."""
    t = 123.4
    ref = np_sigmas(S)
    sig = ref[123] ** 0.6 * ref[124] ** 0.4
    ab = 1 / (1 + sig**2)
    x = torch.randn(64, 2, generator=gen(1), dtype=F64).requires_grad_(True)
    mu = math.sqrt(ab) * GM.means
    var = ab * GM.stds**2 + 1 - ab
    comp = torch.log(GM.weights) - 0.5 * (((x[:, None] - mu) ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)
    (score,) = torch.autograd.grad(torch.logsumexp(comp, -1).sum(), x)
    x = x.detach()
    torch.testing.assert_close(GM.optimal_eps(x, t, S), -math.sqrt(1 - ab) * score, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(GM.optimal_eps(x, torch.full((64,), t, dtype=F64), S), -math.sqrt(1 - ab) * score,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(GM.marginal(t, S).score(x), score, rtol=1e-9, atol=1e-12)
    # per-row fractional t: each row as if alone
    ts = torch.tensor([3.5, 999.2, 40.0, 123.4], dtype=F64)
    rows = GM.optimal_eps(x[:4], ts, S)
    for i in range(4):
        torch.testing.assert_close(rows[i : i + 1], GM.optimal_eps(x[i : i + 1], float(ts[i]), S))
    # an integer-valued float t is the integer step
    torch.testing.assert_close(GM.optimal_eps(x, 500.0, S), GM.optimal_eps(x, 500, S), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t", [1, 250, 999, 1000])
def test_optimal_x0_and_v_oracles_are_tweedie(t):
    s = Z if t == 1000 else S
    x = torch.randn(50, 2, generator=gen(t), dtype=F64)
    x0 = GM.optimal_x0(x, t, s)
    if t < 1000:
        torch.testing.assert_close(x0, s.x0_from_eps(x, t, GM.optimal_eps(x, t, s)), rtol=1e-9, atol=1e-10)
    else:   # ᾱ_T = 0: x_T carries no information; E[x_0 | x_T] is the data mean
        torch.testing.assert_close(x0, (GM.weights[:, None] * GM.means).sum(0).expand(50, 2))
    v = GM.as_model(s, "v")(x, torch.full((50,), t))
    torch.testing.assert_close(s.x0_from_v(x, t, v), x0, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(GM.as_model(s, "x0")(x, torch.full((50,), t)), x0)


# ----------------------------------------------------------------------------- grids
def test_karras_sigmas_is_edm_eq5():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    i = np.arange(n)
    expected = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    got = td.karras_sigmas(n, lo, hi, rho) if hasattr(td, "karras_sigmas") else karras_sigmas(n, lo, hi, rho)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got.shape == (n,) and float(got[0]) == pytest.approx(hi) and float(got[-1]) == pytest.approx(lo)
    assert karras_sigmas(1, lo, hi).tolist() == [hi]


def test_log_snr_grid_is_uniform_in_log_sigma():
    g = log_snr_sigmas(10, 0.01, 100.0)
    d = np.diff(np.log(g.numpy()))
    np.testing.assert_allclose(d, np.full(9, math.log(1e-4) / 9), rtol=1e-10)


def test_grid_bad_input():
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        karras_sigmas(5, 2.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min must be a finite number > 0"):
        karras_sigmas(5, 0.0, 1.0)
    with pytest.raises(ValueError, match="rho must be"):
        karras_sigmas(5, 0.1, 1.0, rho=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        log_snr_sigmas(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        heun_sample(ORACLE, S, (4, 2), sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="must not exceed"):
        td.dpmpp_2m_sample(ORACLE, S, (4, 2), sigmas=[1e4, 1.0])
    with pytest.raises(ValueError, match="either steps= or sigmas="):
        heun_sample(ORACLE, S, (4, 2), steps=5, sigmas=[1.0, 0.5])


# ----------------------------------------------------------------------------- Heun (EDM Algorithms 1, 2)
class Recorder:
    def __init__(self, model):
        self.model, self.ts = model, []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],) and t.is_floating_point()
        self.ts.append(float(t[0]))
        return self.model(x, t)


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_heun_nfe_and_the_levels_it_visits(n):
    rec = Recorder(ORACLE)
    heun_sample(rec, S, (8, 2), steps=n, generator=gen(0))
    assert len(rec.ts) == 2 * n - 1                                        # no correction on the last step
    lo, hi = np_sigmas(S)[1], np_sigmas(S)[-1]
    i = np.arange(n)
    grid = hi if n == 1 else (hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    grid = np.atleast_1d(grid)
    expected = [grid[0]] + [v for g in grid[1:] for v in (g, g)]            # σ_i, then σ_{i+1} twice
    np.testing.assert_allclose(S.sigma_at(torch.tensor(rec.ts, dtype=F64)).numpy(), expected, rtol=1e-5)


M64 = lambda x, t: GM.optimal_eps(x.double(), t, S).to(x.dtype)  # noqa: E731
PATHS = 300


@functools.cache
def x_T():
    return torch.randn(PATHS, 2, generator=gen(7), dtype=F64)


@functools.cache
def reference():
    """The probability-flow ODE's endpoint: DPM-Solver++(2M), 1000 steps (an independent solver)."""
    return td.dpmpp_2m_sample(M64, S, (PATHS, 2), steps=1000, x_T=x_T())


def path_error(x):
    return float((x - reference()).norm(dim=1).mean())


def test_heun_converges_to_the_same_ode_endpoint():
    assert path_error(heun_sample(M64, S, (PATHS, 2), steps=500, x_T=x_T())) < 1e-3


def test_heun_is_second_order_and_without_correction_is_not(monkeypatch):
    """Halving the step divides the error by ~4 (Heun) — by ~2 with the correction removed (Euler)."""
    e = [path_error(heun_sample(M64, S, (PATHS, 2), steps=k, x_T=x_T())) for k in (20, 40, 80)]
    assert e[1] / e[0] < 0.3 and e[2] / e[1] < 0.3, e
    ddim80 = path_error(td.ddim_sample(M64, S, (PATHS, 2), steps=80, x_T=x_T()))
    assert e[2] < 0.2 * ddim80, (e, ddim80)                                 # and beats DDIM at 80 steps
    # broken: the corrector's slope d' evaluated at the step's start (x̂, σ̂) again, so (d + d')/2 = d: Euler
    real_predict = heun_mod.predict_at
    state = {}

    def stale(model, x, t, ab, prediction, clip_x0):
        state["n"] = state.get("n", 0) + 1
        if state["n"] % 2 == 1:                                          # predictor call: remember it
            state["args"] = (x, t, ab)
        x, t, ab = state["args"]
        return real_predict(model, x, t, ab, prediction, clip_x0)

    monkeypatch.setattr(heun_mod, "predict_at", stale)
    b = []
    for k in (40, 80):
        state.clear()
        b.append(path_error(heun_sample(M64, S, (PATHS, 2), steps=k, x_T=x_T())))
    assert b[1] / b[0] > 0.4 and b[1] > 3 * e[2], (b, e)


def test_heun_reproduces_the_mixture(real, tol):
    x = heun_sample(ORACLE, S, (N, 2), steps=18, generator=gen(0))
    assert td.energy_distance(x, real) < tol


def test_heun_churn(real, tol):
    """Algorithm 2: fresh noise raises σ to (1+γ)σ before each step; still the right distribution."""
    rec = Recorder(ORACLE)
    x = heun_sample(rec, S, (N, 2), steps=30, s_churn=10.0, s_tmin=0.05, s_tmax=50.0, generator=gen(1))
    assert td.energy_distance(x, real) < tol
    det = heun_sample(ORACLE, S, (N, 2), steps=30, generator=gen(1))
    assert not torch.allclose(x, det)
    # γ = min(S_churn/n, √2 - 1) inside the window, 0 outside: check the first model call of a churned step
    assert heun_mod.churn_gamma(1.0, 30, 10.0, 0.05, 50.0) == pytest.approx(1 / 3)
    assert heun_mod.churn_gamma(1.0, 5, 10.0, 0.05, 50.0) == pytest.approx(math.sqrt(2) - 1)
    assert heun_mod.churn_gamma(100.0, 30, 10.0, 0.05, 50.0) == 0.0
    grid = karras_sigmas(30, *sigma_range(S)).numpy()
    first_calls = S.sigma_at(torch.tensor(rec.ts[0::2], dtype=F64)).numpy()
    inside = (grid >= 0.05) & (grid <= 50.0)
    np.testing.assert_allclose(first_calls[inside], grid[inside] * (1 + 1 / 3), rtol=1e-5)
    np.testing.assert_allclose(first_calls[~inside], grid[~inside], rtol=1e-5)
    # a window that holds no level: identical to the deterministic sampler
    same = heun_sample(ORACLE, S, (N, 2), steps=30, s_churn=10.0, s_tmin=1e3, generator=gen(1))
    assert torch.equal(same, det)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_heun_predictions_agree(prediction):
    a = heun_sample(ORACLE, S, (300, 2), steps=10, generator=gen(4))
    b = heun_sample(GM.as_model(S, prediction), S, (300, 2), steps=10, generator=gen(4), prediction=prediction)
    assert (a - b).abs().max() < 1e-4


# ----------------------------------------------------------------------------- DPM-Solver++(2M) on any grid
@pytest.mark.parametrize("name,kw", [("dpmpp_2m", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("euler_a", {}),
                                     ("euler_a", {"eta": 0.5})])
def test_sigma_grid_on_the_schedules_own_levels_is_the_default(name, kw):
    """sigmas = σ at the default timesteps: the model is called at (float) t equal to those steps, and the
    samples are the default ones (same noise draws)."""
    ts = td.ddim_timesteps(1000, 12)
    a = td.sample(name, M64, S, (PATHS, 2), steps=12, generator=gen(3), **kw)
    b = td.sample(name, M64, S, (PATHS, 2), sigmas=S.sigmas[ts], generator=gen(3), **kw)
    assert (a - b).abs().max() < 1e-6


def test_ddim_on_a_karras_grid_is_first_order():
    e = [path_error(td.ddim_sample(M64, S, (PATHS, 2), sigmas=karras_sigmas(k, *sigma_range(S)), x_T=x_T()))
         for k in (40, 80, 160)]
    assert 0.35 < e[1] / e[0] < 0.65 and 0.35 < e[2] / e[1] < 0.65, e


@pytest.mark.parametrize("grid", [karras_sigmas, log_snr_sigmas])
def test_dpmpp_2m_on_continuous_grids_converges(grid):
    e = [path_error(td.dpmpp_2m_sample(M64, S, (PATHS, 2), sigmas=grid(k, *sigma_range(S)), x_T=x_T()))
         for k in (20, 40, 80)]
    assert e[1] / e[0] < 0.35 and e[2] / e[1] < 0.35 and e[2] < 3e-3, e


# ----------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_eps_model_is_refused_at_zero_terminal_snr(name):
    kw = {} if name == "ddpm" else {"steps": 10}
    with pytest.raises(ValueError, match="ε-prediction model cannot denoise at ᾱ_t = 0.*prediction='v'"):
        td.sample(name, GM.as_model(Z), Z, (8, 2), generator=gen(0), **kw)


@pytest.mark.parametrize("name", ["euler_a", "plms"])
def test_sigma_tilde_samplers_refuse_zero_terminal_snr(name):
    with pytest.raises(ValueError, match="ᾱ_t > 0"):
        td.sample(name, GM.as_model(Z, "v"), Z, (8, 2), steps=10, prediction="v")


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "heun"])
def test_v_model_at_zero_terminal_snr(name, real, tol):
    """dpmpp_2m used to crash with 'math domain error' (log ᾱ_T = log 0); x_T is exactly ε there."""
    x = td.sample(name, GM.as_model(Z, "v"), Z, (N, 2), steps=40, generator=gen(2), prediction="v")
    assert torch.isfinite(x).all() and td.energy_distance(x, real) < tol


def test_dpmpp_2m_first_step_at_zero_snr_is_exact():
    """From ᾱ_T = 0 (λ = -∞): x_prev = σ_prev x_T + α_prev x̂_0, DDIM's step with ε = x_T."""
    v = GM.as_model(Z, "v")
    xT = torch.randn(50, 2, generator=gen(3), dtype=F64)
    ts = td.ddim_timesteps(1000, 10)
    traj = []
    td.dpmpp_2m_sample(v, Z, (50, 2), steps=10, x_T=xT, prediction="v", trajectory=traj)
    ab = float(Z.alpha_bars[ts[1]])
    x0 = GM.optimal_x0(xT, 1000, Z)
    torch.testing.assert_close(traj[1], math.sqrt(1 - ab) * xT + math.sqrt(ab) * x0, rtol=1e-10, atol=1e-12)


def test_heun_with_eps_at_zero_terminal_snr_stays_finite(real, tol):
    """Heun's Karras grid stops at the largest finite σ (σ_{T-1}), so an ε-model is usable there."""
    x = heun_sample(GM.as_model(Z), Z, (N, 2), steps=40, generator=gen(2))
    assert torch.isfinite(x).all() and td.energy_distance(x, real) < tol


@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2m_at_zero_snr_matches_diffusers(steps):
    """diffusers' DPMSolverMultistepScheduler with rescale_betas_zero_snr clamps ᾱ_T to 2^-24 inside the
    log (λ_T ≈ -8.3 instead of -∞): the two agree up to that clamp's effect (~1e-3 here)."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing",
        rescale_betas_zero_snr=True, prediction_type="v_prediction", algorithm_type="dpmsolver++", solver_order=2,
        final_sigmas_type="zero", lower_order_final=False)
    sch.set_timesteps(steps)
    v = GM.as_model(Z, "v")
    x = torch.randn(200, 2, generator=gen(9))
    x_T = x.clone()
    for tau in sch.timesteps:                        # diffusers' step τ is our paper step t = τ + 1
        x = sch.step(v(x, torch.full((200,), int(tau) + 1)), tau, x).prev_sample
    ours = td.dpmpp_2m_sample(v, Z, (200, 2), steps=steps, x_T=x_T, prediction="v")
    assert (ours - x).abs().max() < 5e-3
