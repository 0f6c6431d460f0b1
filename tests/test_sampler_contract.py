"""The one sampler contract (issue 9): every sampler returns a tensor; ``x_T`` fixes the start;
``generator`` draws everything else; ``trajectory=[]`` records the visited x_t; ``device`` decides
where the model runs while noise is drawn on the generator's device."""

from __future__ import annotations

import pytest
import torch

import tinyddpm as td
from tinyddpm.sampling.flow import flow_sample

GM = td.GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5], [0.6, 0.4])
S = td.NoiseSchedule.linear(40, beta_end=0.2)   # short: "ddpm" runs all T steps
ORACLE = GM.as_model(S)
SHAPE = (16, 2)
# (name, kwargs, number of visited levels after x_T)
RUNS = [
    ("ddpm", {}, 40),
    ("ddim", {"steps": 7}, 7),
    ("ddim", {"steps": 7, "eta": 1.0}, 7),
    ("euler_a", {"steps": 7}, 7),
    ("dpmpp_2m", {"steps": 7}, 7),
    ("plms", {"steps": 7}, 7),
    ("heun", {"steps": 7}, 7),
    ("heun", {"steps": 7, "s_churn": 5.0}, 7),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw, _ in RUNS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_registered_sampler_is_covered():
    assert {n for n, _, _ in RUNS} == set(td.SAMPLERS)


@pytest.mark.parametrize("name,kw,levels", RUNS, ids=IDS)
def test_tensor_out_and_trajectory(name, kw, levels):
    traj = []
    x = td.sample(name, ORACLE, S, SHAPE, generator=gen(1), trajectory=traj, **kw)
    assert isinstance(x, torch.Tensor) and x.shape == SHAPE
    assert len(traj) == levels + 1 and all(v.device.type == "cpu" and v.shape == SHAPE for v in traj)
    assert torch.equal(traj[0], torch.randn(SHAPE, generator=gen(1)))      # starts at x_T ~ N(0, I)
    assert torch.equal(traj[-1], x)
    # recording changes nothing
    assert torch.equal(x, td.sample(name, ORACLE, S, SHAPE, generator=gen(1), **kw))


@pytest.mark.parametrize("name,kw,levels", RUNS, ids=IDS)
def test_x_T_is_the_first_draw_of_the_generator(name, kw, levels):
    """sample(generator=g) draws x_T first, then the rest: passing that x_T and the advanced generator
    reproduces it exactly (stochastic samplers too); a different x_T gives a different result."""
    a = td.sample(name, ORACLE, S, SHAPE, generator=gen(2), **kw)
    g = gen(2)
    x_T = torch.randn(SHAPE, generator=g)
    b = td.sample(name, ORACLE, S, SHAPE, generator=g, x_T=x_T, **kw)
    assert torch.equal(a, b)
    c = td.sample(name, ORACLE, S, SHAPE, generator=gen(2), x_T=x_T + 0.5, **kw)
    assert not torch.allclose(a, c)


def test_flow_sample_follows_the_contract():
    traj = []
    x = flow_sample(GM.velocity, SHAPE, steps=5, solver="heun", generator=gen(3), trajectory=traj)
    assert len(traj) == 6 and torch.equal(traj[0], torch.randn(SHAPE, generator=gen(3))) and torch.equal(traj[-1], x)
    assert torch.equal(x, flow_sample(GM.velocity, SHAPE, steps=5, solver="heun", x_T=traj[0]))


def test_ddim_invert_trajectory():
    x0 = GM.sample(8, generator=gen(4))
    traj = []
    xT = td.ddim_invert(ORACLE, S, x0, steps=5, trajectory=traj)
    assert len(traj) == 6 and torch.equal(traj[0], x0) and torch.equal(traj[-1], xT)


@pytest.mark.parametrize("name,kw,levels", RUNS, ids=IDS)
def test_cpu_generator_drives_another_device(name, kw, levels):
    """device= puts the run elsewhere (meta: no values, every read-back raises) while a CPU generator
    draws the noise; x_T's device is the default device."""
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = td.sample(name, zeros, S, SHAPE, generator=gen(5), device="meta", clip_x0=True, **kw)
    assert x.device.type == "meta"
    x = td.sample(name, zeros, S, SHAPE, generator=gen(5), x_T=torch.zeros(SHAPE, device="meta"), clip_x0=True, **kw)
    assert x.device.type == "meta"


def test_flow_sample_on_meta():
    x = flow_sample(lambda x, t: torch.zeros_like(x), SHAPE, steps=3, solver="heun", generator=gen(5), device="meta")
    assert x.device.type == "meta"


def test_bad_contract_arguments():
    with pytest.raises(TypeError, match="trajectory must be a list"):
        td.ddim_sample(ORACLE, S, SHAPE, steps=3, trajectory=())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        td.ddim_sample(ORACLE, S, SHAPE, steps=3, generator=0)
    with pytest.raises(ValueError, match="shapes must match: x_T"):
        td.sample("heun", ORACLE, S, SHAPE, steps=3, x_T=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="x_T must be a torch.Tensor"):
        flow_sample(GM.velocity, SHAPE, x_T=[0.0])
    with pytest.raises(TypeError, match="return_trajectory"):
        td.ddim_sample(ORACLE, S, SHAPE, steps=3, return_trajectory=True)   # the old flag is gone


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,kw,levels", RUNS, ids=IDS)
def test_cpu_generator_with_cuda_model_matches_cpu(name, kw, levels):
    """The README's pattern: a CPU generator, a CUDA model. Same numbers as the CPU run (up to float error)."""
    cpu = td.sample(name, ORACLE, S, SHAPE, generator=gen(6), **kw)
    cuda = td.sample(name, ORACLE, S, SHAPE, generator=gen(6), device="cuda", **kw)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)
