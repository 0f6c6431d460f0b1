"""Flow matching and EDM objectives: their minimisers are the oracle's exact velocity / denoiser, and the
trained networks sample through the standard samplers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

import tinyddpm as td
from tinyddpm.data.datasets import Dataset
from tinyddpm.diffusion.edm import edm_coefficients
from tinyddpm.sampling.flow import flow_sample
from tinyddpm.training.continuous import EDMObjective, FlowMatchingObjective, edm_eps_model, flow_velocity_model

F64 = torch.float64
GM = td.GaussianMixture([[-1.5, -0.5], [1.0, 1.0], [0.0, -1.5]], [0.15, 0.3, 0.1], [0.4, 0.4, 0.2])
S = td.NoiseSchedule.linear(1000)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bound(objective, n=20_000):
    data = Dataset(GM.sample(n, generator=gen(0)))
    trainer = SimpleNamespace(data=data, device=torch.device("cpu"), config=SimpleNamespace(label_dropout=0.0),
                              num_classes=None)
    objective.bind(trainer)
    return objective


def cross_term(objective, net, B=200_000):
    """E[g · (v - target)] for the perturbation g(x) = x, from loss(v + δg) - loss(v - δg) = 4δ E[g (v - target)]
    on one draw. It vanishes when v is the conditional mean of the target (the loss's minimiser)."""
    batch = objective.draw(B, gen(1), gen(2))
    d = 0.05
    plus = float(objective.loss(lambda x, t: net(x, t) + d * x, batch))
    minus = float(objective.loss(lambda x, t: net(x, t) - d * x, batch))
    return (plus - minus) / (4 * d)


def test_flow_objective_is_minimised_by_the_exact_velocity():
    """v* = E[ε - x_0 | x_t] (the oracle's velocity) has no first-order term; the velocity at the wrong time
    (0.8 t) has one, so the objective's target and time convention are both pinned."""
    obj = bound(FlowMatchingObjective("uniform"))
    v_star = lambda x, t_net: GM.velocity(x.double(), t_net.double() / 1000).float()   # noqa: E731
    wrong = lambda x, t_net: GM.velocity(x.double(), t_net.double() / 1000 * 0.8).float()   # noqa: E731
    right_term, wrong_term = cross_term(obj, v_star), cross_term(obj, wrong)
    assert abs(right_term) < 0.01 and abs(wrong_term) > 0.03, (right_term, wrong_term)


def exact_F(x_in, t, sigma_data=0.5):
    """The network output that makes the EDM denoiser exact: F* = (E[x_0 | x̄] - c_skip x̄) / c_out."""
    sigma = S.sigma_at(t.double())
    c_skip, c_out, c_in, _ = edm_coefficients(sigma, sigma_data)
    xbar = x_in.double() / c_in[:, None]
    ab = 1 / (1 + sigma**2)
    out = torch.empty_like(xbar)
    for i in range(len(xbar)):                          # per row: each has its own σ
        s_t = td.NoiseSchedule.from_alpha_bars([float(ab[i])])
        xt = xbar[i:i + 1] * math.sqrt(float(ab[i]))
        eps = GM.optimal_eps(xt, 1, s_t)
        x0 = (xbar[i:i + 1] - float(sigma[i]) * eps)
        out[i] = ((x0 - c_skip[i] * xbar[i:i + 1]) / c_out[i])[0]
    return out.float()


def test_edm_objective_is_minimised_by_the_exact_denoiser():
    """λ(σ) c_out² = 1, so with the exact F*, loss(F* + δ) - loss(F*) = δ² as well."""
    obj = bound(EDMObjective(S))
    batch = obj.draw(400, gen(3), gen(4))
    base = float(obj.loss(exact_F, batch))
    for delta in (0.1, -0.1):
        shifted = float(obj.loss(lambda x, t, d=delta: exact_F(x, t) + d, batch))
        assert abs(shifted - base - delta**2) < 0.02


def test_edm_eps_model_of_the_exact_denoiser_is_the_exact_eps():
    x = GM.sample(6, generator=gen(5)).double() * 0.7 + 0.4 * torch.randn(6, 2, generator=gen(6), dtype=F64)
    for t in (torch.full((6,), 40), torch.full((6,), 517.25, dtype=F64)):
        eps = edm_eps_model(exact_F, S)(x.float(), t).double()
        ab = float(1 / (1 + S.sigma_at(t.double()[0]) ** 2))
        ref = GM.optimal_eps(x, 1, td.NoiseSchedule.from_alpha_bars([ab]))
        torch.testing.assert_close(eps, ref, atol=2e-4, rtol=0)


def test_flow_and_edm_train_and_sample_through_the_trainer(tmp_path):
    """A small MLP trained by the one Trainer with each objective reproduces the mixture (energy distance
    within a few floors); sampling goes through flow_sample and through DDIM via edm_eps_model."""
    data = Dataset(GM.sample(4000, generator=gen(7)))
    real = GM.sample(1000, generator=gen(8))
    floor = abs(td.energy_distance(GM.sample(1000, generator=gen(9)), GM.sample(1000, generator=gen(10))))
    cfg = td.TrainConfig(steps=400, batch_size=256, lr=4e-3, warmup_steps=40, lr_schedule="cosine",
                         ema_decay=0.99, seed=0, device="cpu", progress=False, log_every=0)
    results = {}
    for name, objective in (("flow", FlowMatchingObjective()), ("edm", EDMObjective(S))):
        torch.manual_seed(0)
        model = td.MLPDenoiser(dim=2, hidden=128, depth=3, time_dim=64)
        trainer = td.Trainer(model, S, data, cfg, objective=objective)
        trainer.train()
        net = trainer.ema_model
        with torch.no_grad():
            if name == "flow":
                x = flow_sample(flow_velocity_model(net), (1000, 2), steps=40, solver="heun", generator=gen(11))
            else:
                x = td.ddim_sample(edm_eps_model(net, S), S, (1000, 2), steps=40, generator=gen(11))
        results[name] = td.energy_distance(x, real)
    assert all(r < 20 * floor for r in results.values()), (results, floor)   # measured: 14× (flow), 8× (edm)
