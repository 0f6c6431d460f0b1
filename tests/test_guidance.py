"""Classifier-free guidance on the conditional mixture oracle (eq-cfg)."""

import functools

import pytest
import torch

from tinyddpm import (
    ClassMixture,
    GaussianMixture,
    NoiseSchedule,
    cfg_combine,
    ddim_sample,
    energy_distance,
    guided_model,
)

S = NoiseSchedule.linear(1000)
# class 0 = components {0, 3}, class 1 = {1, 2, 4}; components 3 and 4 overlap across classes
GM = GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [1.4, 0.4], [-0.2, 0.1], [0.3, 0.3]],
                     [0.2, 0.3, 0.25, 0.3, 0.3], [0.3, 0.2, 0.2, 0.15, 0.15])
CM = ClassMixture(GM, [0, 1, 1, 0, 1])
COND = CM.model(S)
N = 2000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@functools.cache
def guided_samples(c: int, w: float) -> torch.Tensor:
    return ddim_sample(guided_model(COND, c, w, num_classes=2), S, (N, 2), steps=50, generator=gen(0))


def test_class_mixture_is_the_sub_mixture():
    sub = CM.component(1)
    assert torch.allclose(sub.weights, torch.tensor([0.2, 0.2, 0.15], dtype=torch.float64) / 0.55)
    assert torch.allclose(CM.class_weights, torch.tensor([0.45, 0.55], dtype=torch.float64))
    # Bayes: p(x) = Σ_c p(c) p(x | c), and log p(c | x) = log p(c) + log p(x | c) - log p(x)
    x = GM.sample(500, generator=gen(1))
    lpc = torch.stack([CM.class_weights[c].log() + CM.component(c).log_prob(x) for c in range(2)], -1)
    assert torch.allclose(torch.logsumexp(lpc, -1), GM.log_prob(x), atol=1e-10)
    assert torch.allclose(CM.class_log_probs(x), lpc - GM.log_prob(x)[:, None], atol=1e-10)


def test_oracle_null_label_is_unconditional_and_eps_mixes_by_class_posterior():
    xt, t = torch.randn(300, 2, generator=gen(2)), torch.full((300,), 400)
    assert torch.equal(COND(xt, t, torch.full((300,), 2)), GM.optimal_eps(xt, t, S))
    # E[ε | x_t] = Σ_c p(c | x_t) E[ε | x_t, c]: the unconditional ε is the class-posterior average
    post = ClassMixture(GM.marginal(400, S), [0, 1, 1, 0, 1]).class_log_probs(xt).exp().float()
    mix = sum(post[:, c:c + 1] * COND(xt, t, torch.full((300,), c)) for c in range(2))
    assert torch.allclose(mix, GM.optimal_eps(xt, t, S), atol=1e-5)


@pytest.mark.parametrize("c", [0, 1])
def test_w1_recovers_the_class_and_w0_the_full_mixture(c):
    sub = CM.component(c)
    fresh_sub, fresh_full = sub.sample(N, generator=gen(10)), GM.sample(N, generator=gen(11))
    floor = abs(energy_distance(sub.sample(N, generator=gen(12)), fresh_sub))
    tol = max(5 * floor, 2e-3)
    x1, x0 = guided_samples(c, 1.0), guided_samples(c, 0.0)
    assert energy_distance(x1, fresh_sub) < tol
    assert energy_distance(x0, fresh_full) < tol
    assert energy_distance(x1, fresh_full) > 50 * tol                 # conditioning did something
    # weights within the class recovered (component of each sample = most responsible one)
    counts = sub.responsibilities(x1).argmax(1).bincount(minlength=sub.K) / N
    assert torch.allclose(counts.double(), sub.weights, atol=0.03)
    # as sure of the class as real class-c data is
    lp_samples, lp_real = CM.class_log_probs(x1)[:, c].mean(), CM.class_log_probs(fresh_sub)[:, c].mean()
    assert abs(lp_samples - lp_real) < 0.03


@pytest.mark.parametrize("c", [0, 1])
def test_larger_w_concentrates(c):
    ws = [1.0, 2.0, 4.0]
    lp = [float(CM.class_log_probs(guided_samples(c, w))[:, c].mean()) for w in ws]
    spread = [float(guided_samples(c, w).std(0).norm()) for w in ws]
    assert lp[0] < lp[1] < lp[2] <= 0, lp                               # ever surer of the class
    assert spread[0] > spread[1] > spread[2], spread
    assert lp[1] - lp[0] > 0.02


def test_batched_forward_equals_two_calls():
    calls = []

    def counting(x, t, y):
        calls.append(x.shape[0])
        return COND(x, t, y)
    xt, t = torch.randn(64, 2, generator=gen(3)), torch.full((64,), 300)
    y = torch.randint(0, 2, (64,), generator=gen(4))
    out = guided_model(counting, y, 3.0, num_classes=2)(xt, t)
    assert calls == [128]                                                # one forward of 2B rows
    eps_c, eps_u = COND(xt, t, y), COND(xt, t, torch.full((64,), 2))
    assert torch.equal(out, eps_u + 3.0 * (eps_c - eps_u))
    assert torch.allclose(out, torch.lerp(eps_u, eps_c, 3.0), atol=1e-6)         # dome272's form
    assert torch.equal(cfg_combine(eps_u, eps_c, 3.0), eps_u + 3.0 * (eps_c - eps_u))
    calls.clear()
    assert torch.equal(guided_model(counting, y, 1.0, num_classes=2)(xt, t), eps_c) and calls == [64]
    assert torch.equal(guided_model(counting, y, 0.0, num_classes=2)(xt, t), eps_u)


def test_batched_forward_with_a_network_and_context():
    torch.manual_seed(0)
    net = torch.nn.Linear(2 + 1 + 3, 2)
    model = lambda x, t, context: net(torch.cat([x, t[:, None].float() / 1000, context], 1))  # noqa: E731
    xt, t = torch.randn(8, 2), torch.full((8,), 10)
    ctx = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    with torch.no_grad():
        out = guided_model(model, ctx, 2.5, keyword="context")(xt, t)
        eps_c, eps_u = model(xt, t, ctx), model(xt, t, torch.zeros_like(ctx))
    assert torch.allclose(out, eps_u + 2.5 * (eps_c - eps_u), atol=1e-6)


def test_bad_input():
    xt, t = torch.randn(4, 2), torch.full((4,), 10)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        guided_model(COND, 0, -1.0, num_classes=2)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        guided_model(COND, 0, float("inf"), num_classes=2)
    with pytest.raises(ValueError, match=r"null label 2 \(class labels lie in \[0, 1\]\).*pass guidance=0"):
        guided_model(COND, 2, 3.0, num_classes=2)(xt, t)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        guided_model(COND, 3, 3.0, num_classes=2)(xt, t)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        guided_model(COND, torch.tensor([0, 1, -1, 0]), 3.0, num_classes=2)(xt, t)
    with pytest.raises(ValueError, match="got 3 labels for a batch of 4"):
        guided_model(COND, torch.tensor([0, 1, 1]), 3.0, num_classes=2)(xt, t)
    with pytest.raises(ValueError, match="pass num_classes"):
        guided_model(COND, 0, 3.0)
    with pytest.raises(TypeError, match="integer tensor"):
        guided_model(COND, torch.tensor([0.5] * 4), 3.0, num_classes=2)(xt, t)
    with pytest.raises(ValueError, match="keyword must be one of 'y', 'context'"):
        guided_model(COND, 0, 3.0, num_classes=2, keyword="label")
    with pytest.raises(ValueError, match="classes must use every label"):
        ClassMixture(GM, [0, 2, 2, 0, 2])
    with pytest.raises(ValueError, match=r"y must hold one label per row in \[0, 2\]"):
        COND(xt, t, torch.full((4,), 3))
