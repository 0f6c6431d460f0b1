"""Editing on the oracle (issue 12): the exact conditional law (gm.condition), SDEdit (img2img), RePaint
(inpaint) and classifier guidance with the exact class-posterior gradient.

Ground truth: Bayes' rule on a grid for ``condition``, autograd of an independent class posterior for
``class_log_prob_grad``, fresh data and the exact conditional for the samplers (energy distance beside
its real-vs-real floor)."""

from __future__ import annotations

import math

import pytest
import torch

import tinyddpm as td
from tinyddpm.sampling.editing import repaint_path

F64 = torch.float64
S = td.NoiseSchedule.linear(1000)
SHORT = td.NoiseSchedule.linear(40, beta_end=0.2)       # for mechanics: every step is cheap
# class 0 = components {0, 3}, class 1 = {1, 2, 4} (as in test_guidance)
GM = td.GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [1.4, 0.4], [-0.2, 0.1], [0.3, 0.3]],
                        [0.2, 0.3, 0.25, 0.3, 0.3], [0.3, 0.2, 0.2, 0.15, 0.15])
CM = td.ClassMixture(GM, [0, 1, 1, 0, 1])
# inpainting: x_0 is known; its value -0.6 rules out component 2 and nearly 3, so p(x_1 | x_0) is the
# two modes ±1 of components 0 and 1, weighted 0.6 / 0.4
INP = td.GaussianMixture([[-1.0, -1.0], [-1.0, 1.0], [1.0, 0.0], [0.2, 1.2]],
                         [[0.3, 0.2], [0.3, 0.2], [0.3, 0.3], [0.25, 0.2]], [0.3, 0.2, 0.3, 0.2])
KNOWN = torch.tensor([True, False])
N = 2000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def floor(gm: td.GaussianMixture, n: int = N, seed: int = 0) -> float:
    """The real-vs-real floor: mean |energy distance| between fresh samples, over three pairs."""
    draws = [gm.sample(n, generator=gen(seed + i)) for i in range(6)]
    return sum(abs(td.energy_distance(draws[2 * i], draws[2 * i + 1])) for i in range(3)) / 3


# ------------------------------------------------------------------ gm.condition
def simpson(f: torch.Tensor, x: torch.Tensor) -> float:
    """∫ f dx by composite Simpson on an even number of equal intervals (error O(h⁴))."""
    h = float(x[1] - x[0])
    return h / 3 * float(f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])


@pytest.mark.parametrize("mask,value", [([True, False], -0.6), ([False, True], 0.35), ([True, False], 1.3)])
def test_condition_is_bayes_on_a_grid(gm2, mask, value):
    """p(x_u | x_k) = p(x_k, x_u) / ∫ p(x_k, x_u) dx_u, the integral by Simpson's rule on a fine grid."""
    mask = torch.tensor(mask)
    grid = torch.linspace(-4.0, 4.0, 8001, dtype=F64)
    x = torch.empty(grid.numel(), 2, dtype=F64)
    x[:, mask], x[:, ~mask] = value, grid[:, None]
    joint = gm2.log_prob(x).exp()
    bayes = joint / simpson(joint, grid)
    x_known = torch.tensor([value, math.nan] if bool(mask[0]) else [math.nan, value], dtype=F64)
    cond = gm2.condition(mask, x_known)
    assert cond.D == 1 and cond.K == gm2.K
    torch.testing.assert_close(cond.log_prob(grid[:, None]).exp(), bayes, rtol=1e-10, atol=1e-12)


def test_condition_in_three_dimensions_two_known():
    gm = td.GaussianMixture([[0.0, 1.0, -1.0], [1.0, -0.5, 0.5], [-1.0, 0.0, 1.0]],
                            [[0.5, 0.3, 0.4], [0.3, 0.6, 0.2], [0.4, 0.4, 0.5]], [0.5, 0.2, 0.3])
    mask = torch.tensor([True, False, True])
    grid = torch.linspace(-5.0, 5.0, 10001, dtype=F64)
    x = torch.stack([torch.full_like(grid, 0.4), grid, torch.full_like(grid, 0.1)], 1)
    joint = gm.log_prob(x).exp()
    cond = gm.condition(mask, torch.tensor([0.4, 123.0, 0.1], dtype=F64))      # the unknown entry is ignored
    torch.testing.assert_close(cond.log_prob(grid[:, None]).exp(), joint / simpson(joint, grid),
                               rtol=1e-10, atol=1e-12)
    # nothing known: the marginal of all coordinates, i.e. the mixture itself
    same = gm.condition(torch.zeros(3, dtype=torch.bool), torch.zeros(3))
    torch.testing.assert_close(same.weights, gm.weights, rtol=0, atol=1e-15)
    assert torch.equal(same.means, gm.means) and torch.equal(same.stds, gm.stds)


# ------------------------------------------------------------------ the t_start hook of the samplers
class _Recorder:
    def __init__(self, model):
        self.calls, self.model = [], model

    def __call__(self, x, t):
        self.calls.append(int(t[0]) if not t.is_floating_point() else float(t[0]))
        return self.model(x, t)


def test_samplers_start_at_t_start():
    rec = _Recorder(GM.as_model(S))
    x = torch.randn(8, 2, generator=gen(0))
    td.ddim_sample(rec, S, (8, 2), steps=5, t_start=600, x_T=x)
    assert rec.calls == [600, 480, 360, 240, 120] == td.ddim_timesteps(600, 5)
    rec = _Recorder(GM.as_model(SHORT))
    td.ddpm_sample(rec, SHORT, (8, 2), t_start=17, x_T=x, generator=gen(1))
    assert rec.calls == list(range(17, 0, -1))


# ------------------------------------------------------------------ img2img (SDEdit)
@pytest.fixture(scope="module")
def sdedit_runs():
    x = GM.sample(N, generator=gen(1))
    model = GM.as_model(S)
    return x, {st: td.img2img(model, S, x, st, steps=50, generator=gen(2)) for st in (0.3, 0.6, 1.0)}


def test_img2img_maps_data_to_data(sdedit_runs):
    """x ~ data, noised to t₀ by the forward process, is exactly q_t₀; the exact denoiser brings it back to the data."""
    x, runs = sdedit_runs
    fresh, fl = GM.sample(N, generator=gen(3)), floor(GM, seed=10)
    for st, out in runs.items():
        assert out.shape == x.shape and out.dtype == x.dtype
        assert td.energy_distance(out, fresh) < 5 * fl, (st, td.energy_distance(out, fresh), fl)


def test_img2img_strength_moves_points_further(sdedit_runs):
    x, runs = sdedit_runs
    moved = [float((runs[st] - x).norm(dim=1).mean()) for st in (0.3, 0.6, 1.0)]
    assert 0 < moved[0] < moved[1] < moved[2], moved


def test_img2img_strength_zero_and_grid():
    x = GM.sample(16, generator=gen(4))
    out = td.img2img(GM.as_model(S), S, x, 0.0)
    assert torch.equal(out, x) and out is not x
    # strength 0.6 of 50 steps: 30 DDIM steps from t₀ = 600; x_t₀ = q_sample(x, 600, first draw)
    rec, traj = _Recorder(GM.as_model(S)), []
    td.img2img(rec, S, x, 0.6, steps=50, generator=gen(5), trajectory=traj)
    assert rec.calls == list(range(600, 0, -20))
    torch.testing.assert_close(traj[0], S.q_sample(x, 600, torch.randn(16, 2, generator=gen(5))))
    # same generator, same result; ddpm takes every step below t₀
    a = td.img2img(GM.as_model(SHORT), SHORT, x, 0.5, sampler="ddpm", generator=gen(6))
    rec = _Recorder(GM.as_model(SHORT))
    b = td.img2img(rec, SHORT, x, 0.5, sampler="ddpm", generator=gen(6))
    assert torch.equal(a, b) and rec.calls == list(range(20, 0, -1))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "heun"])
def test_img2img_on_sigma_grid_samplers(sampler):
    """The continuous-grid samplers take the same integer steps as their σ grid (model t ≈ the integers)."""
    x = GM.sample(500, generator=gen(7))
    rec = _Recorder(GM.as_model(S))
    out = td.img2img(rec, S, x, 0.5, steps=20, sampler=sampler, generator=gen(8))
    assert rec.calls[0] == pytest.approx(500, abs=1e-3) and max(rec.calls) <= 500 + 1e-3
    assert td.energy_distance(out, GM.sample(500, generator=gen(9))) < 0.02


# ------------------------------------------------------------------ inpaint (RePaint)
# 4-D, x_0 known: its value -0.5 rules out component 1, so p(x_1:3 | x_0) is components 0 and 2 (0.57 / 0.43)
GM4 = td.GaussianMixture([[-1.0, -1.0, 0.5, 0.0], [1.0, 1.0, -0.5, 0.5], [0.0, -1.0, 1.0, -1.0]],
                         [0.3, 0.4, 0.3], [0.4, 0.3, 0.3])


def _inpaint_ed(gm: td.GaussianMixture, known: list[float], resample: int, jump_length: int = 1, steps: int = 50,
                n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Energy distance between the inpainted unknown coordinates and the exact conditional gm.condition,
    and that conditional's floor. The first len(known) coordinates are known."""
    mask = torch.arange(gm.D) < len(known)
    x_known = torch.tensor(known + [math.nan] * (gm.D - len(known))).expand(n, gm.D)
    out = td.inpaint(gm.as_model(S), S, x_known, mask, steps=steps, resample=resample,
                     jump_length=jump_length, generator=gen(seed))
    assert torch.equal(out[:, mask], x_known[:, mask])                  # known entries come back exactly
    exact = gm.condition(mask, x_known[0])
    return td.energy_distance(out[:, ~mask], exact.sample(n, generator=gen(seed + 100))), floor(exact, n, seed + 200)


@pytest.mark.parametrize("resample,jump_length", [(1, 1), (3, 10)])
def test_inpaint_is_exact_when_the_known_part_says_nothing(resample, jump_length):
    """Every component has the same law along x_0: p(x_1 | x_0) = p(x_1), and the model's component
    posterior ignores x_0, so replacement is exact. Checks the steps, replacement and jumps end to end."""
    gm = td.GaussianMixture([[0.3, -1.0], [0.3, 0.8], [0.3, 1.6]], [[0.5, 0.3], [0.5, 0.2], [0.5, 0.25]],
                            [0.5, 0.3, 0.2])
    ed, fl = _inpaint_ed(gm, [-0.7], resample, jump_length, steps=100)
    assert ed < 4 * fl, (ed, fl)


def test_inpaint_resampling_reduces_the_bias():
    """Plain replacement (U = 1) lets the unknown part commit to the excluded component 1 at noise levels where
    the freshly noised known part says little; RePaint's resampling repairs most of it. Measured on 4 seeds:
    U = 1 is 60-1000 floors away, U = 5 (jump 5) 4.3-6.9 times closer."""
    ed1, fl = _inpaint_ed(GM4, [-0.5], resample=1)
    ed5, _ = _inpaint_ed(GM4, [-0.5], resample=5, jump_length=5)
    assert ed1 > 20 * fl and ed5 < ed1 / 2.5, (ed1, ed5, fl)


def test_inpaint_resampling_does_not_fix_mode_weights():
    """A bias that RePaint does not remove. Given x_0 = -0.6 the unknown x_1 has two modes ±1 weighted
    0.6 / 0.4 (the exact conditional, eq-mixture-condition); component 3 (x_1 = 1.2, ruled out by x_0)
    draws trajectories towards the +1 mode at mid noise. Checked: with the exact denoiser, the energy
    distance of the inpainted x_1 to the exact conditional stays above 20 times its sampling floor both
    for plain replacement (U = 1) and for resampling (U = 5, jump length 5) — more resampling does
    not remove the bias (chapter 14 tabulates the mode weights per U)."""
    ed1, fl = _inpaint_ed(INP, [-0.6], resample=1)
    ed5, _ = _inpaint_ed(INP, [-0.6], resample=5, jump_length=5)
    assert ed1 > 20 * fl and ed5 > 20 * fl, (ed1, ed5, fl)


def test_inpaint_known_entries_follow_the_forward_process_at_every_visited_level():
    """Along the whole RePaint path (reverse steps, replacements, jumps back up), the known entries of every
    visited x are distributed as q(x_t | x_known) = N(√ᾱ_t a, 1 - ᾱ_t) at that state's level t."""
    n, a, U, j = 4000, 0.8, 3, 4
    x_known = torch.tensor([a, 0.0], dtype=F64).expand(n, 2)
    traj = []
    td.inpaint(lambda x, t: 0.3 * x, SHORT, x_known, KNOWN, resample=U, jump_length=j, generator=gen(14),
               trajectory=traj)
    levels = [SHORT.T - i for i in repaint_path(SHORT.T, U, j)]            # path indices -> steps T..0
    assert len(traj) == len(levels)
    for x, t in zip(traj[1:], levels[1:], strict=True):
        ab = float(SHORT.alpha_bars[t])
        col = x[:, 0]
        if t == 0:
            assert torch.equal(col, x_known[:, 0])
            continue
        assert abs(float(col.mean()) - math.sqrt(ab) * a) < 5 * math.sqrt((1 - ab) / n), t
        assert abs(float(col.var()) / (1 - ab) - 1) < 5 * math.sqrt(2 / n), t


def test_inpaint_images_keeps_known_pixels_and_counts_steps():
    """(B, C, H, W) with an (H, W) mask; float64 known pixels come back bit for bit; NFE follows repaint_path."""
    x_known = torch.randn(3, 2, 5, 5, generator=gen(11), dtype=F64)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:, :2] = True
    model = td.count_nfe(lambda x, t: 0.1 * x)
    traj = []
    out = td.inpaint(model, SHORT, x_known, mask, resample=3, jump_length=4, generator=gen(12), trajectory=traj)
    assert out.dtype == F64 and torch.equal(out[..., :2], x_known[..., :2])
    assert bool(torch.isfinite(out).all()) and not torch.equal(out[..., 2:], x_known[..., 2:])
    path = repaint_path(40, 3, 4)
    assert model.nfe == 40 + 2 * 4 * 9 == sum(b == a + 1 for a, b in zip(path, path[1:], strict=False))
    assert len(traj) == len(path)
    # (B, D) points with a per-row mask; steps on a strided grid, DDIM η = 0
    pts, m = torch.randn(4, 3, generator=gen(13)), torch.tensor([[True, False, False]] * 2 + [[False, True, True]] * 2)
    out = td.inpaint(lambda x, t: 0 * x, S, pts, m, steps=10, sampler="ddim")
    assert torch.equal(out[m], pts[m])


def test_repaint_path():
    assert repaint_path(3) == [0, 1, 2, 3]
    assert repaint_path(3, 2) == [0, 1, 0, 1, 2, 1, 2, 3]                   # Algorithm 1: U passes per step
    assert repaint_path(5, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5]    # blocks of j = 2 steps, twice each


# ------------------------------------------------------------------ classifier guidance
@pytest.mark.parametrize("t", [1, 250, 1000, 0.4, 613.75])
def test_classifier_guidance_with_the_exact_gradient_is_the_conditional_eps(t):
    """ε(x_t) - √(1-ᾱ_t) ∇ log q_t(y | x_t) = E[ε | x_t, y] exactly (Bayes + eq-score-eps), integer and fractional t."""
    xt = torch.randn(64, 2, generator=gen(20), dtype=F64) * 1.5
    tt = torch.full((64,), t, dtype=F64 if isinstance(t, float) else torch.long)
    for y in (0, 1):
        guided = td.classifier_guidance(GM.as_model(S), S, CM.class_log_prob_grad(y, S), 1.0)
        torch.testing.assert_close(guided(xt, tt), CM.component(y).optimal_eps(xt, tt, S), rtol=1e-12, atol=1e-13)
    # per-row labels through the conditional oracle
    y = torch.randint(0, 2, (64,), generator=gen(21))
    guided = td.classifier_guidance(GM.as_model(S), S, CM.class_log_prob_grad(y, S), 1.0)
    torch.testing.assert_close(guided(xt, tt), CM.model(S)(xt, tt, y), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("t", [0, 3, 500, 1000, 41.5])
def test_class_log_prob_grad_is_autograd_of_bayes(t):
    """Against autograd of log q_t(y | x) from an independently built marginal ClassMixture."""
    xt = (torch.randn(40, 2, generator=gen(22), dtype=F64) * 2).requires_grad_(True)
    post = td.ClassMixture(GM.marginal(float(t) if isinstance(t, float) else t, S), [0, 1, 1, 0, 1])
    for y in (0, 1):
        (expected,) = torch.autograd.grad(post.class_log_probs(xt)[:, y].sum(), xt)
        tt = torch.tensor(t) if isinstance(t, float) else t
        torch.testing.assert_close(CM.class_log_prob_grad(y, S)(xt.detach(), tt), expected, rtol=1e-9, atol=1e-11)
    far = torch.tensor([[-30.0, -30.0], [40.0, 40.0]], dtype=F64)      # no underflow far from either class
    assert bool(torch.isfinite(CM.class_log_prob_grad(1, S)(far, 1)).all())


def test_classifier_guidance_samples_the_class_with_any_sampler():
    """Scale 1 on the unconditional oracle runs every sampler exactly as the conditional oracle does (same
    noise, integer and fractional t), and scale 0 is the model itself."""
    guided = td.classifier_guidance(GM.as_model(S), S, CM.class_log_prob_grad(1, S), 1.0)
    cond = lambda x, t: CM.model(S)(x, t, torch.ones(x.shape[0], dtype=torch.long))  # noqa: E731
    for name, kw in (("ddim", {"steps": 25}), ("heun", {"steps": 12}), ("euler_a", {"steps": 10})):
        x = td.sample(name, guided, S, (500, 2), generator=gen(32), **kw)
        torch.testing.assert_close(x, td.sample(name, cond, S, (500, 2), generator=gen(32), **kw), rtol=0, atol=1e-4)
    fresh, sub = CM.component(1).sample(N, generator=gen(31)), CM.component(1)
    x = td.sample("ddim", guided, S, (N, 2), steps=50, generator=gen(33))
    assert td.energy_distance(x, fresh) < 5 * floor(sub, seed=50)
    t9 = torch.full((N,), 9)
    unguided = td.classifier_guidance(GM.as_model(S), S, CM.class_log_prob_grad(1, S), 0.0)
    assert torch.equal(unguided(fresh, t9), GM.optimal_eps(fresh, t9, S))


# ------------------------------------------------------------------ devices
def test_editing_loops_never_read_back_from_the_device():
    """On the meta device every read-back raises: the loops must only use Python floats and device tensors."""
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.randn(4, 3, 5, 5, generator=gen(40))
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:2] = True
    out = td.inpaint(zeros, SHORT, x, mask, resample=2, jump_length=3, generator=gen(41), device="meta")
    assert out.device.type == "meta"
    for sampler in ("ddim", "ddpm", "euler_a", "dpmpp_2m", "heun"):
        assert td.img2img(zeros, SHORT, x.to("meta"), 0.5, sampler=sampler, generator=gen(42)).device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_editing_on_cuda_matches_cpu():
    """A CPU generator and a CUDA run: the same numbers as on the CPU (up to float error)."""
    x = GM.sample(64, generator=gen(43))
    model = GM.as_model(S)
    for fn in (lambda d: td.img2img(model, S, x.to(d), 0.4, steps=20, generator=gen(44)),
               lambda d: td.inpaint(model, S, x.to(d), KNOWN, steps=20, resample=2, jump_length=2, generator=gen(45)),
               lambda d: td.sample("heun", td.classifier_guidance(model, S, CM.class_log_prob_grad(1, S), 2.0), S,
                                   (64, 2), steps=8, generator=gen(46), device=d)):
        cuda = fn("cuda")
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), fn("cpu"), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ validation
def test_validation_errors():
    model, x = GM.as_model(S), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="strength"):
        td.img2img(model, S, x, 1.5)
    with pytest.raises(ValueError, match="strength"):
        td.img2img(model, S, x, -0.1)
    with pytest.raises(ValueError, match="strength"):
        td.img2img(model, S, x, True)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        td.img2img(model, S, torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="sampler"):
        td.img2img(model, S, x, 0.5, sampler="plms")
    with pytest.raises(ValueError, match="every step below t0"):
        td.img2img(model, S, x, 0.5, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="eta"):
        td.img2img(model, S, x, 0.5, sampler="heun", eta=1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        td.inpaint(model, S, x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        td.inpaint(model, S, x, torch.ones(2))
    with pytest.raises(ValueError, match="jump_length"):
        td.inpaint(model, S, x, KNOWN, steps=5, resample=2, jump_length=5)
    with pytest.raises(ValueError, match="resample"):
        td.inpaint(model, S, x, KNOWN, resample=0)
    with pytest.raises(ValueError, match="eta"):
        td.inpaint(model, S, x, KNOWN, eta=0.5)
    with pytest.raises(ValueError, match="finite where mask"):
        td.inpaint(model, S, torch.tensor([[math.nan, 0.0]]), KNOWN)
    with pytest.raises(ValueError, match="shape \\(D,\\)"):
        INP.condition(torch.tensor([True, False, True]), torch.zeros(3))
    with pytest.raises(ValueError, match="one point"):
        INP.condition(KNOWN, torch.zeros(5, 2))
    with pytest.raises(TypeError, match="bool"):
        INP.condition(torch.tensor([1, 0]), torch.zeros(2))
    with pytest.raises(ValueError, match="every coordinate"):
        INP.condition(torch.tensor([True, True]), torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        INP.condition(KNOWN, torch.tensor([math.inf, 0.0]))
    with pytest.raises(ValueError, match="y must lie"):
        CM.class_log_prob_grad(2, S)
    with pytest.raises(TypeError, match="y must be"):
        CM.class_log_prob_grad(0.5, S)
    with pytest.raises(ValueError, match="labels for a batch"):
        CM.class_log_prob_grad(torch.tensor([0, 1, 1]), S)(x, 5)
    with pytest.raises(ValueError, match="scale"):
        td.classifier_guidance(model, S, CM.class_log_prob_grad(0, S), -1.0)
    with pytest.raises(TypeError, match="grad_fn"):
        td.classifier_guidance(model, S, None, 1.0)
    with pytest.raises(ValueError, match="shaped like x_t"):
        td.classifier_guidance(model, S, lambda x, t: x[:, :1], 1.0)(x, torch.full((4,), 3))
    with pytest.raises(ValueError, match="t_start"):
        td.ddim_sample(model, S, (4, 2), t_start=1001)
    with pytest.raises(ValueError, match="not both"):
        td.ddim_sample(model, S, (4, 2), t_start=500, sigmas=[1.0, 0.5])
