"""Every bad input to the core gets a ValueError/TypeError whose message says what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tinyddpm as td
from tinyddpm.checks import check_choice, check_int, check_nonneg_float, check_same_shape, check_timesteps

S = td.NoiseSchedule.linear(100)
X = torch.zeros(4, 2)
GM = td.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.5, 0.5], [0.5, 0.5])
MODEL = GM.as_model(S)


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize("make", [td.NoiseSchedule.linear, td.NoiseSchedule.cosine, td.NoiseSchedule.scaled_linear,
                                  td.NoiseSchedule.sigmoid])
def test_T_must_be_a_positive_integer(make):
    with pytest.raises(ValueError, match="T must be >= 1; got 0"):
        make(0)
    with pytest.raises(TypeError, match="T must be an integer; got float"):
        make(100.0)
    with pytest.raises(TypeError, match="T must be an integer; got bool"):
        make(True)
    assert make(np.int64(5)).T == 5          # numpy integers are integers


@pytest.mark.parametrize("betas", [[0.1, 0.0, 0.2], [0.1, 1.0], [0.5, -0.1], [0.2, 1.5]])
def test_betas_outside_open_unit_interval(betas):
    with pytest.raises(ValueError, match=r"every β_t must lie in \(0, 1\)"):
        td.NoiseSchedule.from_betas(betas)


def test_bad_beta_arrays():
    with pytest.raises(ValueError, match="must be finite"):
        td.NoiseSchedule.from_betas([0.1, float("nan")])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        td.NoiseSchedule.from_betas([])
    with pytest.raises(ValueError, match=r"paper-indexed array \[0, β_1, ..., β_T\]"):
        td.NoiseSchedule(torch.tensor([0.1, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"every β_t must lie in \(0, 1\)"):
        td.NoiseSchedule.linear(10, beta_end=1.5)


def test_alpha_bars_must_decrease_strictly_in_unit_interval():
    with pytest.raises(ValueError, match="strictly decreasing"):
        td.NoiseSchedule.from_alpha_bars([0.9, 0.9, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        td.NoiseSchedule.from_alpha_bars([0.9, 0.5, 0.7])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        td.NoiseSchedule.from_alpha_bars([1.0, 0.5])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        td.NoiseSchedule.from_alpha_bars([0.5, 0.0])


def test_from_config_needs_betas():
    with pytest.raises(ValueError, match="dict with key 'betas'"):
        td.NoiseSchedule.from_config({"name": "x"})


# ------------------------------------------------------------------ timesteps and shapes
@pytest.mark.parametrize("t", [-1, 101, torch.tensor([0, 101, 3, 4])])
def test_t_outside_range(t):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\]"):
        S.q_sample(X, t, X)


@pytest.mark.parametrize("t", [0.5, torch.tensor(3.0), torch.full((4,), 3.0), torch.tensor(True), "3", None])
def test_t_must_be_an_integer(t):
    with pytest.raises(TypeError, match="t must be an int"):
        S.q_sample(X, t, X)


def test_t_shape_and_batch():
    with pytest.raises(ValueError, match=r"t must have shape \(\) or \(B,\)"):
        S.q_sample(X, torch.ones(4, 1, dtype=torch.long), X)
    with pytest.raises(ValueError, match="x has batch size 4; expected one timestep per sample"):
        S.q_sample(X, torch.ones(3, dtype=torch.long), X)
    with pytest.raises(ValueError, match="x has batch size 4"):
        td.ddim_step(S, X, 10, torch.ones(3, dtype=torch.long), X)
    with pytest.raises(ValueError, match="x has batch size 4"):
        td.ddpm_step(S, X, torch.full((2,), 5), X, None)


def test_posterior_needs_t_at_least_1():
    with pytest.raises(ValueError, match=r"t must lie in \[1, 100\]"):
        S.q_posterior(X, X, 0)
    with pytest.raises(ValueError, match=r"t must lie in \[1, 100\]"):
        td.ddpm_step(S, X, 0, X, None)


@pytest.mark.parametrize("call", [
    lambda: S.q_sample(X, 5, torch.zeros(4, 3)),
    lambda: S.q_posterior(X, torch.zeros(4, 3), 5),
    lambda: S.x0_from_eps(X, 5, torch.zeros(2, 2)),
    lambda: S.eps_from_x0(X, 5, torch.zeros(2, 2)),
    lambda: S.v_from_x0_eps(X, 5, torch.zeros(2, 2)),
    lambda: td.ddpm_step(S, X, 5, X, torch.zeros(4, 3)),
    lambda: td.ddim_step(S, X, 5, 4, torch.zeros(4, 3)),
    lambda: td.ddim_step(S, X, 5, 4, X, eta=1.0, noise=torch.zeros(4, 3)),
])
def test_mismatched_shapes(call):
    with pytest.raises(ValueError, match="shapes must match"):
        call()


def test_non_tensor_inputs():
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        S.q_sample(np.zeros((4, 2)), 5, X)


# ------------------------------------------------------------------ samplers
def test_ddim_steps_eta_and_t_prev():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        td.ddim_timesteps(100, 0)
    with pytest.raises(ValueError, match="steps must be <= 100"):
        td.ddim_timesteps(100, 101)
    with pytest.raises(ValueError, match="steps must be <= 100"):
        td.ddim_sample(MODEL, S, (4, 2), steps=101)
    with pytest.raises(TypeError, match="steps must be an integer"):
        td.ddim_sample(MODEL, S, (4, 2), steps=10.0)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0; got -0.1"):
        td.ddim_step(S, X, 5, 4, X, eta=-0.1)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        td.ddim_sample(MODEL, S, (4, 2), eta=float("nan"))
    with pytest.raises(TypeError, match="eta must be a number"):
        td.ddim_step(S, X, 5, 4, X, eta="1")
    with pytest.raises(ValueError, match="t_prev must be smaller than t"):
        td.ddim_step(S, X, 5, 5, X)
    with pytest.raises(ValueError, match="needs a noise tensor"):
        td.ddim_step(S, X, 5, 4, X, eta=1.0)


@pytest.mark.parametrize("call,name,valid", [
    (lambda: td.ddpm_step(S, X, 5, X, None, variance="fixed_large"), "variance", "'beta_tilde', 'beta'"),
    (lambda: td.ddpm_variances(S, "learned"), "variance", "'beta_tilde', 'beta'"),
    (lambda: td.ddpm_sample(MODEL, S, (4, 2), variance="small"), "variance", "'beta_tilde', 'beta'"),
    (lambda: td.ddim_timesteps(100, 10, "uniform"), "spacing", "'leading', 'trailing', 'linspace'"),
    (lambda: td.ddim_sample(MODEL, S, (4, 2), spacing="quad"), "spacing", "'leading', 'trailing', 'linspace'"),
    (lambda: S.target(X, 5, X, "epsilon"), "prediction", "'eps', 'x0', 'v'"),
    (lambda: S.predict_x0_eps(X, 5, X, "sample"), "prediction", "'eps', 'x0', 'v'"),
    (lambda: td.ddpm_sample(MODEL, S, (4, 2), prediction="noise"), "prediction", "'eps', 'x0', 'v'"),
    (lambda: td.ddim_sample(MODEL, S, (4, 2), prediction="noise"), "prediction", "'eps', 'x0', 'v'"),
    (lambda: td.ddim_invert(MODEL, S, X, prediction="noise"), "prediction", "'eps', 'x0', 'v'"),
])
def test_unknown_names_list_the_valid_ones(call, name, valid):
    with pytest.raises(ValueError, match=f"{name} must be one of {valid}; got"):
        call()


@pytest.mark.parametrize("shape", [(), (0, 2), (-1, 2), (2.0, 2), (True, 2), "4,2", 4, None])
def test_bad_sampler_shape(shape):
    for sample in (td.ddpm_sample, td.ddim_sample):
        with pytest.raises(ValueError, match="shape must be a tuple of positive ints"):
            sample(MODEL, S, shape)


def test_model_contract():
    with pytest.raises(ValueError, match=r"model returned shape \(4, 3\) for input \(4, 2\); expected the same shape"):
        td.ddpm_sample(lambda x, t: torch.zeros(4, 3), S, (4, 2))
    with pytest.raises(ValueError, match="expected the same shape"):
        td.ddim_sample(lambda x, t: x[:, :1], S, (4, 2))
    with pytest.raises(TypeError, match="model must return a torch.Tensor"):
        td.ddim_sample(lambda x, t: 0.0, S, (4, 2))
    with pytest.raises(TypeError, match="model must be a callable"):
        td.ddpm_sample("unet", S, (4, 2))
    with pytest.raises(ValueError, match="shapes must match: x_T"):
        td.ddim_sample(MODEL, S, (4, 2), x_T=torch.zeros(3, 2))


# ------------------------------------------------------------------ mixture
def test_mixture_parameters():
    with pytest.raises(ValueError, match="weights must be >= 0"):
        td.GaussianMixture([0.0, 1.0], [1.0, 1.0], [1.5, -0.5])
    with pytest.raises(ValueError, match="weights must sum to 1; they sum to 0.9"):
        td.GaussianMixture([0.0, 1.0], [1.0, 1.0], [0.5, 0.4])
    with pytest.raises(ValueError, match=r"weights must have shape \(K,\) = \(2,\)"):
        td.GaussianMixture([0.0, 1.0], [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="every std must be a finite number > 0"):
        td.GaussianMixture([0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="every std must be a finite number > 0"):
        td.GaussianMixture([0.0, 1.0], [1.0, -2.0])
    with pytest.raises(ValueError, match=r"stds must have shape \(K,\) = \(2,\) or \(K, D\) = \(2, 2\)"):
        td.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"means must have shape \(K, D\)"):
        td.GaussianMixture(torch.zeros(2, 2, 2), 1.0)
    with pytest.raises(ValueError, match="every mean must be finite"):
        td.GaussianMixture([0.0, float("inf")], [1.0, 1.0])


def test_mixture_inputs():
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\) = \(N, 2\); got \(4, 3\)"):
        GM.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\) = \(N, 2\)"):
        GM.optimal_eps(torch.zeros(4, 3), 5, S)
    with pytest.raises(ValueError, match=r"t must lie in \[1, 100\]"):
        GM.optimal_eps(X, 0, S)
    with pytest.raises(ValueError, match="t has shape"):
        GM.optimal_eps(X, torch.ones(3, dtype=torch.long), S)
    with pytest.raises(ValueError, match="n must be >= 1"):
        GM.sample(0)
    with pytest.raises(TypeError, match="n must be an integer"):
        GM.sample(10.0)


def test_distances_inputs():
    with pytest.raises(ValueError, match="same dimension"):
        td.energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        td.energy_distance(torch.zeros(1, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"shape \(N, \.\.\.\)"):
        td.energy_distance(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="same shape"):
        td.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(6, 2))


# ------------------------------------------------------------------ the helpers themselves
def test_check_helpers():
    assert check_choice("k", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="k must be one of 'a', 'b'; got 3"):
        check_choice("k", 3, ("a", "b"))
    assert check_int("n", torch.tensor(3), low=1) == 3
    with pytest.raises(ValueError, match="n must be <= 2; got 3"):
        check_int("n", 3, high=2)
    assert check_nonneg_float("eta", 0) == 0.0
    with pytest.raises(ValueError, match="finite"):
        check_nonneg_float("eta", float("inf"))
    assert check_timesteps(3, 10).dtype == torch.long
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_same_shape(a=torch.zeros(1), b=[0.0])
