"""Noise schedules against their formulas, computed independently with plain math / numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import tinyddpm as td


def _lin(a: float, b: float, T: int) -> list[float]:
    """T points evenly from a to b (both included), in plain Python."""
    return [a] if T == 1 else [a + (b - a) * i / (T - 1) for i in range(T)]


def _check_paper_indexing(s: td.NoiseSchedule, T: int, np_alpha_bars) -> None:
    for name in ("betas", "alphas", "alpha_bars", "alpha_bars_prev", "sqrt_alpha_bars", "posterior_variance"):
        arr = getattr(s, name)
        assert arr.shape == (T + 1,) and arr.dtype == torch.float64, name
    assert s.T == T and len(s) == T + 1
    assert s.betas[0] == 0 and s.alpha_bars[0] == 1
    assert (s.alpha_bars[1:] < s.alpha_bars[:-1]).all(), "ᾱ must be strictly decreasing"
    np.testing.assert_allclose(s.alpha_bars.numpy(), np_alpha_bars(s), rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.alphas.numpy(), 1 - s.betas.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_linear_matches_ho_et_al(T, np_alpha_bars):
    s = td.NoiseSchedule.linear(T)
    np.testing.assert_allclose(s.betas[1:].numpy(), _lin(1e-4, 0.02, T), rtol=1e-12)
    assert float(s.betas[1]) == pytest.approx(1e-4, rel=1e-14)
    if T > 1:
        assert float(s.betas[T]) == pytest.approx(0.02, rel=1e-14)
    _check_paper_indexing(s, T, np_alpha_bars)


def test_linear_known_terminal_value():
    # ᾱ_T of DDPM's schedule: Π (1 - β_t), a widely quoted ≈ 4.04e-5 (SNR_T ≈ 4e-5, not zero).
    ab_T = math.prod(1 - b for b in _lin(1e-4, 0.02, 1000))
    s = td.NoiseSchedule.linear(1000)
    assert float(s.alpha_bars[-1]) == pytest.approx(ab_T, rel=1e-10)
    assert 4.0e-5 < ab_T < 4.1e-5


@pytest.mark.parametrize("T", [1, 7, 1000])
def test_scaled_linear_is_linspace_of_sqrt_beta_squared(T, np_alpha_bars):
    s = td.NoiseSchedule.scaled_linear(T)
    expected = [r * r for r in _lin(math.sqrt(0.00085), math.sqrt(0.012), T)]
    np.testing.assert_allclose(s.betas[1:].numpy(), expected, rtol=1e-12)
    # not the same thing as a linear β schedule between the same ends
    if T > 2:
        assert not np.allclose(s.betas[1:].numpy(), _lin(0.00085, 0.012, T), rtol=1e-3)
    _check_paper_indexing(s, T, np_alpha_bars)


@pytest.mark.parametrize("T", [5, 1000])
def test_sigmoid(T, np_alpha_bars):
    s = td.NoiseSchedule.sigmoid(T)
    expected = [1e-4 + (0.02 - 1e-4) / (1 + math.exp(-u)) for u in _lin(-6.0, 6.0, T)]
    np.testing.assert_allclose(s.betas[1:].numpy(), expected, rtol=1e-12)
    _check_paper_indexing(s, T, np_alpha_bars)


def _cosine_reference(T: int, s: float, max_beta: float):
    f = [math.cos(math.pi / 2 * (t / T + s) / (1 + s)) ** 2 for t in range(T + 1)]
    ab_unclipped = [ft / f[0] for ft in f]
    raw = [1 - ab_unclipped[t] / ab_unclipped[t - 1] for t in range(1, T + 1)]
    clipped = {t for t in range(1, T + 1) if raw[t - 1] > max_beta}
    return ab_unclipped, [min(b, max_beta) for b in raw], clipped


@pytest.mark.parametrize(
    "T,s_,max_beta", [(1000, 0.008, 0.999), (50, 0.008, 0.999), (1000, 0.008, 0.02), (3, 0.1, 0.999)]
)
def test_cosine_nichol_dhariwal_eq17(T, s_, max_beta, np_alpha_bars):
    sch = td.NoiseSchedule.cosine(T, s=s_, max_beta=max_beta)
    ab_ref, betas_ref, clipped = _cosine_reference(T, s_, max_beta)
    np.testing.assert_allclose(sch.betas[1:].numpy(), betas_ref, rtol=1e-10, atol=1e-15)
    # clipping happens exactly at the reference's steps and nowhere else
    got_clipped = {t for t in range(1, T + 1) if float(sch.betas[t]) == max_beta}
    assert got_clipped == clipped and T in clipped          # β_T would be 1: always clipped
    # before the first clipped step ᾱ_t is exactly the closed form f(t)/f(0)
    first = min(clipped)
    np.testing.assert_allclose(sch.alpha_bars[:first].numpy(), ab_ref[:first], rtol=1e-10)
    _check_paper_indexing(sch, T, np_alpha_bars)


def test_cosine_known_values():
    s = td.NoiseSchedule.cosine(1000)
    closed = math.cos(math.pi / 2 * 0.508 / 1.008) ** 2 / math.cos(math.pi / 2 * 0.008 / 1.008) ** 2
    assert float(s.alpha_bars[500]) == pytest.approx(closed, rel=1e-12)
    assert float(s.alpha_bars[500]) == pytest.approx(0.4938436, abs=1e-7)
    assert float(s.betas[1000]) == 0.999               # the clip (Nichol & Dhariwal, Sec. 3.2)
    # the clip keeps ᾱ_T > 0: ᾱ_T = ᾱ_{T-1} · (1 - 0.999)
    assert float(s.alpha_bars[1000]) == pytest.approx(float(s.alpha_bars[999]) * 1e-3, rel=1e-9)


def test_from_betas_and_from_alpha_bars_round_trip(schedule):
    b = td.NoiseSchedule.from_betas(schedule.betas[1:])
    assert torch.equal(b.betas, schedule.betas) and torch.equal(b.alpha_bars, schedule.alpha_bars)
    a = td.NoiseSchedule.from_alpha_bars(schedule.alpha_bars[1:])
    np.testing.assert_allclose(a.alpha_bars.numpy(), schedule.alpha_bars.numpy(), rtol=1e-12)
    np.testing.assert_allclose(a.betas.numpy(), schedule.betas.numpy(), rtol=1e-9, atol=1e-15)
    # from_alpha_bars on plain Python floats: β_t = 1 - ᾱ_t/ᾱ_{t-1}
    c = td.NoiseSchedule.from_alpha_bars([0.9, 0.5, 0.1])
    np.testing.assert_allclose(c.betas.numpy(), [0, 0.1, 1 - 0.5 / 0.9, 1 - 0.1 / 0.5], rtol=1e-14)


@pytest.mark.parametrize("make", [td.NoiseSchedule.linear, td.NoiseSchedule.cosine, td.NoiseSchedule.scaled_linear])
def test_zero_terminal_snr_lin_et_al(make, np_alpha_bars):
    s = make(200)
    z = s.zero_terminal_snr()
    assert z.T == s.T
    assert float(z.alpha_bars[-1]) == 0.0 and float(z.betas[-1]) == 1.0
    assert float(z.alpha_bars[1]) == pytest.approx(float(s.alpha_bars[1]), rel=1e-12)
    # Lin et al. 2023 Alg. 1, in numpy: shift √ᾱ so the last is 0, scale so the first is unchanged
    r = np.sqrt(np_alpha_bars(s)[1:])
    r_new = (r - r[-1]) * r[0] / (r[0] - r[-1])
    np.testing.assert_allclose(np.sqrt(z.alpha_bars[1:].numpy()), r_new, rtol=1e-9, atol=1e-15)
    # affine in the original √ᾱ: a least-squares line fits exactly
    A = np.stack([r, np.ones_like(r)], 1)
    coef, *_ = np.linalg.lstsq(A, np.sqrt(z.alpha_bars[1:].numpy()), rcond=None)
    np.testing.assert_allclose(A @ coef, np.sqrt(z.alpha_bars[1:].numpy()), atol=1e-12)
    assert coef[0] > 1 and coef[1] < 0
    assert (z.alpha_bars[1:] < z.alpha_bars[:-1]).all()
    assert ((z.betas[1:-1] > 0) & (z.betas[1:-1] < 1)).all()
    assert float(z.snr[-1]) == 0.0 and float(z.log_snr[-1]) == -math.inf


def test_snr_and_log_snr(schedule, np_alpha_bars):
    ab = np_alpha_bars(schedule)
    np.testing.assert_allclose(schedule.snr[1:].numpy(), ab[1:] / (1 - ab[1:]), rtol=1e-12)
    np.testing.assert_allclose(schedule.log_snr[1:].numpy(), np.log(ab[1:] / (1 - ab[1:])), rtol=1e-9, atol=1e-12)
    assert float(schedule.snr[0]) == math.inf and float(schedule.log_snr[0]) == math.inf
    assert (schedule.log_snr[1:] < schedule.log_snr[:-1]).all()   # SNR strictly decreasing


@pytest.mark.parametrize(
    "s",
    [td.NoiseSchedule.linear(30), td.NoiseSchedule.cosine(30), td.NoiseSchedule.cosine(30).zero_terminal_snr()],
    ids=["linear", "cosine", "zero_snr"],
)
def test_config_round_trip(s):
    cfg = json.loads(json.dumps(s.to_config()))       # JSON-able
    r = td.NoiseSchedule.from_config(cfg)
    assert r.name == s.name and r.T == s.T
    for name in ("betas", "alpha_bars", "posterior_variance", "posterior_coef_x0", "posterior_coef_xt"):
        assert torch.equal(getattr(r, name), getattr(s, name)), name


def test_posterior_arrays_at_t1_are_exact(schedule):
    # t = 1: q(x_0 | x_1, x_0) is a point mass at x_0
    assert float(schedule.posterior_variance[1]) == 0.0
    assert float(schedule.posterior_coef_xt[1]) == 0.0
    assert float(schedule.posterior_coef_x0[1]) == pytest.approx(1.0, rel=1e-12)
