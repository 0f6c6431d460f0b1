"""The objective: uniform t on {1..T}, targets, min-SNR-γ weighting re-derived by hand, the oracle."""

from __future__ import annotations

import math

import pytest
import torch

import tinyddpm as td
from tinyddpm.training.losses import diffusion_loss_at, min_snr_weight

F64 = torch.float64


def hand_alpha_bars(T: int) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t}(1 - β_s) for the linear schedule, written out independently (index 0 = 1)."""
    ab, out = 1.0, [1.0]
    for i in range(T):
        beta = 1e-4 + (0.02 - 1e-4) * i / (T - 1)
        ab *= 1.0 - beta
        out.append(ab)
    return torch.tensor(out, dtype=F64)


def toy_model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, nonlinear, t-dependent "network" (so every prediction type has a non-trivial error)."""
    w = torch.linspace(0.5, 1.5, xt[0].numel(), dtype=xt.dtype).reshape(xt.shape[1:])
    return torch.tanh(w * xt + (t.to(xt.dtype) / 1000).reshape(-1, *[1] * (xt.ndim - 1)))


# ------------------------------------------------------------------ sample_timesteps
def test_timesteps_uniform_on_1_to_T_chi_square():
    T, n = 10, 100_000
    t = td.sample_timesteps(n, T, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) == 1 and int(t.max()) == T            # never 0, reaches T
    counts = torch.bincount(t, minlength=T + 1).double()
    assert counts[0] == 0
    expected = n / T
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 27.88                                       # χ²(9) 0.999 quantile
    # the same statistic flags a {0..T-1} sampler (the off-by-one of a 0-indexed schedule)
    wrong = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(0))
    wc = torch.bincount(wrong, minlength=T + 1).double()[1:]
    assert float(((wc - expected) ** 2 / expected).sum()) > 1000


def test_timesteps_reach_both_ends_for_T_1000_and_reproduce():
    g = torch.Generator().manual_seed(1)
    t = td.sample_timesteps(50_000, 1000, generator=g)
    assert int(t.min()) == 1 and int(t.max()) == 1000
    t1 = td.sample_timesteps(7, 1000, generator=torch.Generator().manual_seed(3))
    t2 = td.sample_timesteps(7, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2)


def test_timesteps_bad_input():
    with pytest.raises(ValueError, match="T must be >= 1"):
        td.sample_timesteps(4, 0)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        td.sample_timesteps(0, 10)
    with pytest.raises(TypeError, match="batch must be an integer"):
        td.sample_timesteps(2.5, 10)


# ------------------------------------------------------------------ the loss, re-derived
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_equals_hand_target_and_min_snr_is_weighted_x0_error(prediction):
    T, gamma = 1000, 5.0
    s = td.NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(0)
    B = 64
    x0 = torch.randn(B, 1, 3, 3, generator=g, dtype=F64)
    eps = torch.randn(B, 1, 3, 3, generator=g, dtype=F64)
    t = torch.cat([torch.tensor([1, T, 2, 20, 100, 500]), torch.randint(1, T + 1, (B - 6,), generator=g)])

    ab = hand_alpha_bars(T)[t].reshape(B, 1, 1, 1)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    xt = a * x0 + b * eps
    out = toy_model(xt, t)
    target = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]
    x0_hat = {"eps": (xt - b * out) / a, "x0": out, "v": a * xt - b * out}[prediction]
    snr = (ab / (1 - ab)).flatten()

    plain = diffusion_loss_at(toy_model, s, x0, t, eps, prediction=prediction, reduction="none")
    torch.testing.assert_close(plain, ((out - target) ** 2).flatten(1).mean(1), rtol=1e-10, atol=0)

    weighted = diffusion_loss_at(
        toy_model, s, x0, t, eps, prediction=prediction, weighting="min_snr", min_snr_gamma=gamma, reduction="none"
    )
    x0_err = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, snr.clamp(max=gamma) * x0_err, rtol=1e-8, atol=0)
    # and the mean reduction is the mean
    mean = diffusion_loss_at(toy_model, s, x0, t, eps, prediction=prediction, weighting="min_snr", min_snr_gamma=gamma)
    torch.testing.assert_close(mean, weighted.mean(), rtol=1e-12, atol=0)


def test_min_snr_weights_by_hand_and_a_wrong_weight_would_fail():
    s = td.NoiseSchedule.linear(1000)
    t = torch.tensor([1, 10, 100, 300, 1000])
    snr = s.alpha_bars[t] / (1 - s.alpha_bars[t])
    gamma = 5.0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    torch.testing.assert_close(min_snr_weight(s, t, "eps", gamma), clipped / snr)
    torch.testing.assert_close(min_snr_weight(s, t, "x0", gamma), snr.clamp(max=gamma))
    torch.testing.assert_close(min_snr_weight(s, t, "v", gamma), snr.clamp(max=gamma) / (snr + 1))
    # low-noise steps are clipped (SNR > γ), high-noise steps keep weight 1 for ε
    assert float(snr[0]) > gamma and float(min_snr_weight(s, t, "eps", gamma)[-1]) == 1.0
    # a common mistake, min(SNR, γ) applied to the ε-loss directly, differs by the factor SNR
    assert not torch.allclose(min_snr_weight(s, t, "eps", gamma), snr.clamp(max=gamma))


def test_min_snr_with_zero_terminal_snr_is_finite():
    s = td.NoiseSchedule.linear(100).zero_terminal_snr()
    t = torch.tensor([1, 50, 100])
    for p in ("eps", "x0", "v"):
        w = min_snr_weight(s, t, p)
        assert torch.isfinite(w).all()
    assert float(min_snr_weight(s, t, "eps")[-1]) == 1.0           # lim min(SNR, γ)/SNR as SNR → 0


def test_diffusion_loss_draws_t_then_eps_from_the_generator():
    s = td.NoiseSchedule.linear(1000)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    loss = td.diffusion_loss(toy_model, s, x0, generator=torch.Generator().manual_seed(9), reduction="none")
    g = torch.Generator().manual_seed(9)
    t = td.sample_timesteps(16, 1000, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(loss, diffusion_loss_at(toy_model, s, x0, t, eps, reduction="none"))
    assert loss.shape == (16,)


def test_model_kwargs_reach_the_model():
    seen = {}

    def model(xt, t, y=None):
        seen["y"] = y
        return torch.zeros_like(xt)
    y = torch.arange(4)
    loss = td.diffusion_loss(model, td.NoiseSchedule.linear(10), torch.zeros(4, 2), model_kwargs={"y": y},
                             generator=torch.Generator().manual_seed(0))
    assert seen["y"] is y
    assert 0.2 < float(loss) < 3.0                         # predicting 0 costs E ε² = 1 on average


def test_oracle_eps_has_lower_loss_than_perturbed_predictors():
    s = td.NoiseSchedule.linear(1000)
    gm = td.GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], [0.3, 0.5, 0.4])
    x0 = gm.sample(20_000, generator=torch.Generator().manual_seed(0))
    oracle = gm.as_model(s)

    def loss(model):   # common random numbers: the same t and ε for every predictor
        return float(td.diffusion_loss(model, s, x0, generator=torch.Generator().manual_seed(1)))
    best = loss(oracle)
    assert best < 0.8                                          # far below the predict-zero baseline of 1
    assert loss(lambda xt, t: torch.zeros_like(xt)) == pytest.approx(1.0, abs=0.03)
    for bad in (lambda xt, t: 1.2 * oracle(xt, t), lambda xt, t: oracle(xt, t) + 0.1,
                lambda xt, t: s.eps_from_x0(xt, t, s.x0_from_eps(xt, t, oracle(xt, t)).clamp(-1, 1))):
        assert loss(bad) > best + 0.005


def test_loss_bad_input():
    s = td.NoiseSchedule.linear(10)
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="prediction must be one of 'eps', 'x0', 'v'"):
        td.diffusion_loss(toy_model, s, x0, prediction="score")
    with pytest.raises(ValueError, match="weighting must be one of 'none', 'min_snr'"):
        td.diffusion_loss(toy_model, s, x0, weighting="snr")
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'none'"):
        td.diffusion_loss(toy_model, s, x0, reduction="sum")
    with pytest.raises(ValueError, match="min_snr_gamma must be a number > 0"):
        td.diffusion_loss(toy_model, s, x0, weighting="min_snr", min_snr_gamma=0)
    with pytest.raises(ValueError, match="model returned"):
        td.diffusion_loss(lambda xt, t: xt[:, :1], s, x0)
    with pytest.raises(ValueError, match="x0 must be a float tensor"):
        td.diffusion_loss(toy_model, s, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must lie in \[1, 10\]"):
        min_snr_weight(s, torch.tensor([0, 3]))


def test_snr_weight_matches_math_module_at_one_point():
    s = td.NoiseSchedule.cosine(1000)
    t = 700
    ab = float(s.alpha_bars[t])
    snr = ab / (1 - ab)
    w = float(min_snr_weight(s, torch.tensor([t]), "v", 5.0)[0])
    assert w == pytest.approx(min(snr, 5.0) / (snr + 1), rel=1e-12)
    assert math.isfinite(snr)
