"""Euler-ancestral, DPM-Solver++(2M), PLMS and the sampler registry, checked on the mixture oracle.

Three kinds of evidence: (1) the distribution each sampler produces approaches the data as NFE
grows (energy distance to fresh data vs the real-vs-real floor); (2) on the deterministic ODE
paths, the second-order solver converges faster than DDIM (Euler) from the same x_T, and
deliberately broken variants fail the same checks; (3) exact identities: Euler-ancestral(η) is
DDIM(η) in other variables, and each matches diffusers' scheduler step for step.
"""

import functools
import math

import pytest
import torch

import tinyddpm.sampling.solvers as solvers
from tinyddpm import (
    SAMPLERS,
    GaussianMixture,
    NoiseSchedule,
    count_nfe,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    energy_distance,
    euler_ancestral_sample,
    plms_sample,
    sample,
)

S = NoiseSchedule.linear(1000)
# unequal weights; one isolated component, two overlapping ones, one narrow one
GM = GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [1.4, 0.6], [0.0, -1.5]], [0.15, 0.3, 0.25, 0.1],
                     [0.4, 0.25, 0.25, 0.1])
ORACLE = GM.as_model(S)
N = 3000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def real():
    return GM.sample(N, generator=gen(100))


@pytest.fixture(scope="module")
def tol():
    """3 × the largest |energy distance| between independent fresh data sets of size N."""
    floors = [energy_distance(GM.sample(N, generator=gen(200 + i)), GM.sample(N, generator=gen(300 + i)))
              for i in range(3)]
    return 3 * max(abs(f) for f in floors)


def run(name, steps, seed=0, model=ORACLE, n=N):
    counted = count_nfe(model)
    x = sample(name, counted, S, (n, 2), steps=steps, generator=gen(seed))
    return x, counted.nfe


@functools.cache
def oracle_error(name: str, steps: int) -> tuple[float, int]:
    """(energy distance to fresh data, NFE) for one sampler run on the oracle."""
    x, nfe = run(name, steps)
    return energy_distance(x, GM.sample(N, generator=gen(100))), nfe


# ----------------------------------------------------------------------------- error vs NFE
@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "plms"])
def test_error_falls_as_nfe_grows(name, tol):
    errs, nfes = zip(*(oracle_error(name, k) for k in (5, 10, 50)), strict=True)
    assert list(nfes) == [k + (name == "plms") for k in (5, 10, 50)]   # PLMS' warm-up costs one call
    assert errs[0] > 5 * tol, (errs, tol)                          # 5 steps are visibly wrong
    assert errs[1] < 0.5 * errs[0], errs                           # more NFE, smaller error
    assert errs[2] < min(errs[1], tol), (errs, tol)                # 50 steps: as good as fresh data


def test_dpmpp_2m_beats_ddim_at_small_nfe():
    for steps in (5, 10):
        e_2m, e_ddim = oracle_error("dpmpp_2m", steps)[0], oracle_error("ddim", steps)[0]
        assert e_2m < 0.9 * e_ddim, (steps, e_2m, e_ddim)


def test_ddpm_is_forwarded():
    small = NoiseSchedule.linear(20, beta_end=0.3)
    oracle = GM.as_model(small)
    a = sample("ddpm", oracle, small, (64, 2), generator=gen(1), steps=20)
    assert torch.equal(a, ddpm_sample(oracle, small, (64, 2), generator=gen(1)))


# ----------------------------------------------------------------------------- order on ODE paths
M64 = lambda x, t: GM.optimal_eps(x.double(), t, S).to(x.dtype)  # noqa: E731
PATHS = (200, 2)


@functools.cache
def ode_reference():
    """The probability-flow ODE's endpoint from each x_T: PLMS (4th order) with 250 steps."""
    return plms_sample(M64, S, PATHS, steps=250, generator=gen(7))


@functools.cache
def ddim_path_error(steps: int) -> float:
    return path_error(ddim_sample, steps)


def path_error(fn, steps: int) -> float:
    """RMS distance to the ODE endpoint from the same x_T: the solver's own discretisation error."""
    x = fn(M64, S, PATHS, steps=steps, generator=gen(7))
    return float((x - ode_reference()).pow(2).sum(1).mean().sqrt())


def beats_euler(fn, steps=(10, 25, 50)) -> bool:
    """fn's error is < 0.85× DDIM's at 10 steps and < 0.5× from 25 steps on (2nd vs 1st order)."""
    return all(path_error(fn, k) < (0.85 if k < 25 else 0.5) * ddim_path_error(k) for k in steps)


def test_two_solvers_agree_on_the_ode_endpoint():
    x = dpmpp_2m_sample(M64, S, PATHS, steps=250, generator=gen(7))
    assert float((x - ode_reference()).pow(2).sum(1).mean().sqrt()) < 3e-3


def test_dpmpp_2m_is_second_order_and_broken_variants_are_not(monkeypatch):
    assert beats_euler(dpmpp_2m_sample)
    for broken in (
        lambda h, h_prev: (1.0, 0.0),                                        # correction dropped (= DDIM)
        lambda h, h_prev: (1.0, 0.0) if h_prev is None else (1 - h / (2 * h_prev), h / (2 * h_prev)),  # sign
    ):
        monkeypatch.setattr(solvers, "dpmpp_2m_weights", broken)
        assert not beats_euler(dpmpp_2m_sample, steps=(25,))


def test_euler_ancestral_broken_sigmas_fail_the_oracle(real, tol, monkeypatch):
    assert oracle_error("euler_a", 50)[0] < tol
    good = solvers.ancestral_sigmas
    for broken in (
        lambda s, sn, eta=1.0: (sn, good(s, sn, eta)[1]),        # σ_down = σ_next: noise added twice
        lambda s, sn, eta=1.0: (good(s, sn, eta)[0], 0.0),       # σ_up dropped: noise never re-added
    ):
        monkeypatch.setattr(solvers, "ancestral_sigmas", broken)
        assert energy_distance(run("euler_a", 50)[0], real) > 10 * tol


def test_ancestral_sigmas_land_on_the_next_noise_level():
    for sig, nxt in [(10.0, 3.0), (1.0, 0.5), (0.2, 0.0)]:
        down, up = solvers.ancestral_sigmas(sig, nxt)
        assert math.isclose(down**2 + up**2, nxt**2, rel_tol=1e-12, abs_tol=1e-15)
        # σ_up² = σ̃_next² (σ̃² - σ̃_next²) / σ̃², written out independently
        assert math.isclose(up, math.sqrt(nxt**2 * (sig**2 - nxt**2) / sig**2), abs_tol=1e-15)


# ----------------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_ancestral_is_ddim_with_the_same_eta(eta):
    a = euler_ancestral_sample(ORACLE, S, (500, 2), steps=12, eta=eta, generator=gen(3))
    b = ddim_sample(ORACLE, S, (500, 2), steps=12, eta=eta, generator=gen(3))
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "plms"])   # heun: tests/test_continuous.py
def test_v_prediction_gives_the_same_samples(name):
    def v_model(x, t):
        eps = ORACLE(x, t)
        return S.v_from_x0_eps(S.x0_from_eps(x, t, eps), t, eps)
    a = sample(name, ORACLE, S, (300, 2), steps=10, generator=gen(4))
    b = sample(name, v_model, S, (300, 2), steps=10, generator=gen(4), prediction="v")
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "plms", "heun"])
def test_trajectory(name):
    traj = []
    x = sample(name, ORACLE, S, (50, 2), steps=6, generator=gen(5), trajectory=traj)
    assert len(traj) == 7 and torch.equal(traj[-1], x)
    assert torch.equal(traj[0], torch.randn(50, 2, generator=gen(5)))          # starts at x_T ~ N(0, I)


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_matches_diffusers_schedulers(steps):
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  timestep_spacing="trailing")
    schedulers = {
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                          final_sigmas_type="zero", lower_order_final=False),
        "euler_a": diffusers.EulerAncestralDiscreteScheduler(**common),
        "plms": diffusers.PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=True),
    }
    for name, sch in schedulers.items():
        g = gen(9)
        sch.set_timesteps(steps)
        x = torch.randn(200, 2, generator=g) * sch.init_noise_sigma
        for tau in sch.timesteps:                       # diffusers' step τ is our paper step t = τ + 1
            eps = ORACLE(sch.scale_model_input(x, tau), torch.full((200,), int(tau) + 1))
            x = sch.step(eps, tau, x, **({"generator": g} if name == "euler_a" else {})).prev_sample
        ours = sample(name, ORACLE, S, (200, 2), steps=steps, generator=gen(9))
        assert (ours - x).abs().max() < 5e-4, name


# ----------------------------------------------------------------------------- registry and bad input
def test_registry_is_immutable_and_complete():
    assert {"ddpm", "ddim", "euler_a", "dpmpp_2m", "plms", "heun"} <= set(SAMPLERS)
    with pytest.raises(TypeError):
        SAMPLERS["mine"] = ddim_sample


def test_bad_input():
    with pytest.raises(ValueError, match="'ddim'.*'euler_a'"):
        sample("euler_b", ORACLE, S, (4, 2))
    for name in ("ddim", "euler_a", "dpmpp_2m", "plms", "heun"):
        with pytest.raises(ValueError, match="steps must be <= 1000"):
            sample(name, ORACLE, S, (4, 2), steps=1001)
    with pytest.raises(ValueError, match="ddpm.*all T = 1000 steps"):
        sample("ddpm", ORACLE, S, (4, 2), steps=10)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        euler_ancestral_sample(ORACLE, S, (4, 2), eta=-1.0)
    with pytest.raises(ValueError, match="ᾱ_t > 0"):
        euler_ancestral_sample(ORACLE, S.zero_terminal_snr(), (4, 2), steps=5)
    with pytest.raises(ValueError, match="spacing must be one of"):
        dpmpp_2m_sample(ORACLE, S, (4, 2), spacing="uniform")
    with pytest.raises(ValueError, match="model returned shape"):
        dpmpp_2m_sample(lambda x, t: x[:, :1], S, (4, 2), steps=3)


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "plms", "heun"])
def test_clip_x0_keeps_samples_in_range(name):
    wide = GaussianMixture([[-3.0, 0.0], [3.0, 0.0]], [0.5, 0.5])        # data far outside [-1, 1]
    x = sample(name, wide.as_model(S), S, (200, 2), steps=8, generator=gen(6), clip_x0=True)
    assert float(x.abs().max()) <= 1.0 + 1e-6
    assert float(sample(name, wide.as_model(S), S, (200, 2), steps=8, generator=gen(6)).abs().max()) > 2
